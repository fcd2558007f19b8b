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

from outbox_relay.domain import KafkaTarget, RabbitMQTarget, RedisStreamsTarget, Target
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


SCHEMES = {
    RabbitMQTarget: (("amqp", "amqps"), 5672),
    RedisStreamsTarget: (("redis", "rediss"), 6379),
}


def target_endpoints(target: Target) -> list[tuple[str, int]]:
    """The (host, port) pairs a target will connect to; ValueError when malformed."""
    if isinstance(target, KafkaTarget):
        out = []
        for server in target.bootstrap_servers:
            pairs = hosts_of(server, 9092)
            if len(pairs) != 1 or not pairs[0][0] or "/" in server or "@" in server:
                raise ValueError(f"bootstrap server {server!r} is not host:port")
            out.extend(pairs)
        return out
    schemes, default_port = SCHEMES[type(target)]
    parts = urlsplit(target.url)
    if parts.scheme not in schemes:
        raise ValueError(f"url must start with {schemes[0]}:// or {schemes[1]}://")
    if parts.password is not None:
        raise ValueError("url must not contain a password: send it in the write-only `password` field")
    if not parts.hostname:
        raise ValueError("url must name a host")
    try:
        return [(parts.hostname, parts.port or default_port)]
    except ValueError:
        raise ValueError("url has an invalid port") from None


async def check_target(policy: AddressPolicy, target: Target) -> None:
    """Check every address a target connects to (AddressNotAllowed, or ValueError if malformed)."""
    for host, port in target_endpoints(target):
        await policy.check_host(host, port)
