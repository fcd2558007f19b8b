"""Outbound address policy for hosts that tenants name (databases, brokers).

Every address a tenant host resolves to is checked: link-local and cloud-metadata ranges are always
denied; private, loopback and other non-global ranges are denied unless the operator allows them.
The check runs when a resource is written and again before each connection (DNS can change).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from outbox_relay.errors import AddressNotAllowed

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_DENIED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "fe80::/10",
        "100.100.100.200/32",  # Alibaba metadata
        "fd00:ec2::254/128",  # AWS IPv6 metadata
        "0.0.0.0/8",
        "224.0.0.0/4",
        "ff00::/8",
    )
)


class AddressPolicy:
    def __init__(self, *, allow_private: bool, extra_denied: Iterable[str] = ()) -> None:
        self.allow_private = allow_private
        self.denied = ALWAYS_DENIED + tuple(ipaddress.ip_network(n) for n in extra_denied)

    def check_ip(self, host: str, ip: str) -> None:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for net in self.denied:
            if addr.version == net.version and addr in net:
                raise AddressNotAllowed(f"host {host!r} resolves to {addr}, which is in a denied network")
        if not addr.is_global and not self.allow_private:
            raise AddressNotAllowed(
                f"host {host!r} resolves to {addr}, a private or reserved address "
                "(the operator has not allowed private networks)"
            )

    async def check_host(self, host: str, port: int | None = None) -> None:
        """Resolve ``host`` and check every address; raises AddressNotAllowed."""
        if not host:
            raise AddressNotAllowed("no host given")
        if host.startswith("/"):
            if not self.allow_private:
                raise AddressNotAllowed("unix sockets are not allowed")
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=5)
        except (OSError, TimeoutError) as exc:
            raise AddressNotAllowed(f"host {host!r} cannot be resolved: {exc}") from None
        for info in infos:
            self.check_ip(host, str(info[4][0]))

    async def check_url(self, url: str, default_port: int) -> None:
        parts = urlsplit(url)
        for host, port in hosts_of(parts.netloc, default_port):
            await self.check_host(host, port)


def hosts_of(netloc: str, default_port: int) -> list[tuple[str, int]]:
    """(host, port) pairs of a netloc, including multi-host lists ``h1:1,h2:2``."""
    hostpart = netloc.rsplit("@", 1)[-1]
    out: list[tuple[str, int]] = []
    for item in hostpart.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") and rest[1:] else default_port
        elif item.count(":") == 1:
            host, _, p = item.partition(":")
            port = int(p) if p else default_port
        else:
            host, port = item, default_port
        out.append((host, port))
    return out
