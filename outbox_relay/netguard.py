"""Outbound address policy for hosts that tenants name (databases, brokers).

Every address a tenant host resolves to is checked: link-local, cloud-metadata and unspecified
addresses are always denied; private, loopback and other non-global ranges are denied unless the
operator allows them; the operator's ``denied_networks`` are denied always. An IPv6 address that
carries an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64
``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo ``2001::/32``) is judged by the IPv4 addresses inside it
too, since that is where a translator or relay delivers it. NAT64's local-use prefix
``64:ff9b:1::/48`` is always denied: where the IPv4 address sits in it depends on the site's own
prefix length (RFC 6052, 8215), so what it reaches cannot be checked.

Resolve once, dial what was checked. :meth:`AddressPolicy.resolve` resolves a name once, checks every
address it answers and returns those addresses as :class:`Endpoint` s; every connection the relay
opens to a tenant-named host (tenant databases in :mod:`outbox_relay.tenant.db`, each broker adapter,
every broker a Kafka cluster advertises) dials one of them by IP literal, so the driver never
resolves the name again. Otherwise a name answering a public address to the check and 127.0.0.1 to
the driver a moment later (DNS rebinding) would steer the connection wherever it likes. The name
stays in use for TLS: certificate verification and SNI are done against it (``server_hostname``, or
:class:`NameBoundSSLContext` where a driver passes only the address it dials).

The check also runs when a resource is written (the API refuses an address at once), but that one
only informs: what protects is the check at each connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from outbox_relay.domain import KafkaTarget, NatsTarget, RabbitMQTarget, RedisStreamsTarget, Target, WebhookTarget
from outbox_relay.errors import AddressNotAllowed

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``resolver(host, port)`` answers the addresses ``host`` has, as IP literals (OSError when none)."""

ALWAYS_DENIED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "fe80::/10",
        "100.100.100.200/32",  # Alibaba metadata
        "fd00:ec2::254/128",  # AWS IPv6 metadata
        "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the local host
        "::/128",  # unspecified: like 0.0.0.0
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): the IPv4 address inside cannot be located
        "224.0.0.0/4",
        "ff00::/8",
    )
)

IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

RESOLVE_TIMEOUT_S = 5.0


async def system_resolver(host: str, port: int) -> list[str]:
    """The running loop's ``getaddrinfo`` (what the drivers would have used themselves)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (see the module docstring); [] for a plain one."""
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    if addr in IPV4_COMPATIBLE and int(addr) > 1:  # :: and ::1 are IPv6's own
        return [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    if addr in NAT64:
        return [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    if addr.sixtofour is not None:
        return [addr.sixtofour]
    if addr.teredo is not None:
        server, client = addr.teredo
        return [server, client]
    return []


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one, in any spelling a C resolver accepts: the canonical
    forms (IPv6 zone ids included) and the ``inet_aton`` ones (``2130706433``, ``0x7f.1``,
    ``017700000001``, ``127.1``); None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def is_localhost_name(host: str) -> bool:
    """``localhost`` and ``*.localhost`` (any case, trailing dot or not): loopback by RFC 6761,
    whatever a resolver would answer for them."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One checked address of a tenant-named host: dial ``address``, speak TLS to ``name``."""

    name: str
    """The host as the tenant wrote it: for TLS verification and SNI, and for messages."""
    address: str
    """The checked IP literal to dial (or, with private networks allowed, a unix socket path)."""
    port: int

    @property
    def server_name(self) -> str:
        """The TLS server name: the name without a trailing dot (SNI carries none)."""
        return self.name.rstrip(".") or self.name


class AddressPolicy:
    """Which addresses tenant-named hosts may connect to; see the module docstring.

    ``resolver`` is how names are resolved (the running loop's ``getaddrinfo`` by default); it is
    asked at most once per :meth:`resolve`, within ``resolve_timeout_s``.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        extra_denied: Iterable[str] = (),
        resolver: Resolver | None = None,
        resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
    ) -> None:
        self.allow_private = allow_private
        self.denied = ALWAYS_DENIED + tuple(ipaddress.ip_network(n) for n in extra_denied)
        self.resolver: Resolver = resolver or system_resolver
        self.resolve_timeout_s = resolve_timeout_s

    def check_ip(self, host: str, ip: str) -> None:
        """Raise AddressNotAllowed unless ``ip`` (an address ``host`` has) may be dialled."""
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            raise AddressNotAllowed(f"host {host!r} resolves to {ip!r}, which is not an IP address") from None
        inner: list[ipaddress.IPv4Address] = []
        if isinstance(addr, ipaddress.IPv6Address):
            inner = embedded_ipv4(addr)
        for candidate in (addr, *inner):
            via = "" if candidate is addr else f" (which carries the IPv4 address {candidate})"
            for net in self.denied:
                if candidate.version == net.version and candidate in net:
                    raise AddressNotAllowed(f"host {host!r} resolves to {addr}{via}, which is in a denied network")
        if self.allow_private:
            return
        judged: list[IPAddress] = [*inner] if inner else [addr]
        if not all(a.is_global for a in judged):
            carried = f" (carrying {', '.join(map(str, inner))})" if inner else ""
            raise AddressNotAllowed(
                f"host {host!r} resolves to {addr}{carried}, a private or reserved address "
                "(the operator has not allowed private networks)"
            )

    async def resolve(self, host: str, port: int) -> list[Endpoint]:
        """Resolve ``host`` once and check every address it has; the checked endpoints, in the
        resolver's order. AddressNotAllowed when any address is refused or none can be found."""
        if not host:
            raise AddressNotAllowed("no host given")
        if host.startswith("/"):
            if not self.allow_private:
                raise AddressNotAllowed("unix sockets are not allowed")
            return [Endpoint(name=host, address=host, port=port)]
        literal = literal_address(host)
        if literal is not None:
            addresses = [str(literal)]
        elif is_localhost_name(host):
            addresses = ["127.0.0.1", "::1"]
        else:
            try:
                async with asyncio.timeout(self.resolve_timeout_s):
                    answers = await self.resolver(host, port)
            except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
                raise AddressNotAllowed(f"host {host!r} cannot be resolved: {reason}") from None
            addresses = list(dict.fromkeys(answers))
            if not addresses:
                raise AddressNotAllowed(f"host {host!r} cannot be resolved: no address")
        for address in addresses:
            self.check_ip(host, address)
        return [Endpoint(name=host, address=address, port=port) for address in addresses]

    async def resolve_all(self, pairs: Iterable[tuple[str, int]]) -> list[Endpoint]:
        """:meth:`resolve` for each (host, port), the endpoints in order."""
        out: list[Endpoint] = []
        for host, port in pairs:
            out.extend(await self.resolve(host, port))
        return out

    async def check_host(self, host: str, port: int = 0) -> None:
        """Resolve ``host`` and check every address; raises AddressNotAllowed."""
        await self.resolve(host, port)

    async def check_url(self, url: str, default_port: int) -> None:
        parts = urlsplit(url)
        for host, port in hosts_of(parts.netloc, default_port):
            await self.check_host(host, port)


class NameBoundSSLContext(ssl.SSLContext):
    """An SSLContext that verifies the certificate of, and sends SNI for, the *name* of an endpoint
    although the driver dials, and passes as ``server_hostname``, its checked IP address.

    For drivers with no separate server-name setting (asyncpg, aiokafka): ``server_names`` maps each
    address the driver is given to the name it stands for; a ``server_hostname`` not in it is used as
    it is. Everything else (trust store, verify mode, ``check_hostname``) is an ordinary SSLContext's.
    """

    server_names: dict[str, str]

    def __init__(
        self, protocol: int = ssl.PROTOCOL_TLS_CLIENT, *, server_names: Mapping[str, str] | None = None
    ) -> None:
        # ssl.SSLContext is built in __new__ (which ignores these arguments); this only adds the map.
        self.server_names = dict(server_names or {})

    def bind(self, endpoint: Endpoint) -> None:
        self.server_names[endpoint.address] = endpoint.server_name

    def _name_for(self, server_hostname: str | bytes | None) -> str | bytes | None:
        if isinstance(server_hostname, str):
            return self.server_names.get(server_hostname, server_hostname)
        return server_hostname

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=self._name_for(server_hostname),
            session=session,
        )

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if "server_hostname" in kwargs:
            kwargs["server_hostname"] = self._name_for(kwargs["server_hostname"])
        return super().wrap_socket(sock, *args, **kwargs)


def refusal_in(exc: BaseException | None) -> AddressNotAllowed | None:
    """The AddressNotAllowed ``exc`` is or was caused by (drivers wrap what a dial raises), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, AddressNotAllowed):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
    WebhookTarget: (("http", "https"), 443),
}
DEFAULT_PORTS = {"http": 80}
"""Where a scheme's default port is not its SCHEMES entry's (that one is the secure scheme's)."""


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
    if isinstance(target, NatsTarget):
        return [nats_endpoint(server) for server in target.servers]
    schemes, default_port = SCHEMES[type(target)]
    parts = urlsplit(target.url)
    if parts.scheme not in schemes:
        raise ValueError(f"url must start with {schemes[0]}:// or {schemes[1]}://")
    if parts.password is not None:
        raise ValueError("url must not contain a password: send it in the write-only `password` field")
    if not parts.hostname:
        raise ValueError("url must name a host")
    try:
        return [(parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme, default_port))]
    except ValueError:
        raise ValueError("url has an invalid port") from None


NATS_PORT = 4222


def nats_endpoint(server: str) -> tuple[str, int]:
    """The (host, port) of one NATS server URL (``nats://`` or ``tls://``); ValueError when malformed."""
    parts = urlsplit(server)
    if parts.scheme not in ("nats", "tls"):
        raise ValueError(f"server {server!r} must start with nats:// or tls://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a server URL must not carry a user, password or token")
    if not parts.hostname:
        raise ValueError(f"server {server!r} must name a host")
    try:
        return (parts.hostname, parts.port or NATS_PORT)
    except ValueError:
        raise ValueError(f"server {server!r} has an invalid port") from None


async def check_target(policy: AddressPolicy, target: Target) -> None:
    """Check every address a target connects to (AddressNotAllowed, or ValueError if malformed)."""
    for host, port in target_endpoints(target):
        await policy.check_host(host, port)
