"""The address policy, table-driven: every spelling of an address, and resolve-once semantics.

Pure: names are answered by a fake resolver (a dict), never by DNS; the TLS test runs a real TLS
handshake against a server on loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

import pytest

from outbox_relay.domain import KafkaTarget, RabbitMQTarget, RedisStreamsTarget, Target
from outbox_relay.errors import AddressNotAllowed
from outbox_relay.netguard import AddressPolicy, Endpoint, NameBoundSSLContext, check_target, embedded_ipv4
from tests.tls import TestCA

DENIED = ["10.9.0.0/16", "127.0.0.2/32"]
NAMES = {
    "public.example": ["93.184.216.34"],
    "public.example.": ["93.184.216.34"],
    "mixed.example": ["93.184.216.34", "127.0.0.1"],
    "v6.example": ["2606:2800:220:1:248:1893:25c8:1946", "93.184.216.34", "93.184.216.34"],
}


class FakeResolver:
    """Answers from NAMES; counts the questions; OSError for anything else, as getaddrinfo would."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers = NAMES if answers is None else answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(-2, "Name or service not known")
        return self.answers[host]


def strict() -> AddressPolicy:
    return AddressPolicy(allow_private=False, resolver=FakeResolver())


def lax() -> AddressPolicy:
    return AddressPolicy(allow_private=True, extra_denied=DENIED, resolver=FakeResolver())


# host, what the strict policy says, what the lax one (private allowed, DENIED denied) says: "ok"
# or a word of the refusal; the IPv4 address the refusal must name, when there is one inside.
FORMS: list[tuple[str, str, str, str | None]] = [
    # plain
    ("93.184.216.34", "ok", "ok", None),
    ("127.0.0.1", "private", "ok", None),
    ("10.9.1.1", "private", "denied", None),
    ("0.0.0.0", "denied", "denied", None),
    ("::", "denied", "denied", None),
    ("::1", "private", "ok", None),
    ("169.254.169.254", "denied", "denied", None),
    ("fe80::1%eth0", "denied", "denied", None),  # link-local with a zone id
    ("fe80::1%25eth0", "denied", "denied", None),  # ... as a URL spells the zone
    ("ff02::1", "denied", "denied", None),
    # IPv4 in IPv6: judged by the IPv4 address inside
    ("::ffff:127.0.0.1", "private", "ok", "127.0.0.1"),  # IPv4-mapped
    ("::ffff:10.9.1.1", "private", "denied", "10.9.1.1"),
    ("::ffff:169.254.169.254", "denied", "denied", "169.254.169.254"),
    ("::127.0.0.1", "private", "ok", "127.0.0.1"),  # IPv4-compatible (deprecated)
    ("::10.9.1.1", "private", "denied", "10.9.1.1"),
    ("64:ff9b::7f00:1", "private", "ok", "127.0.0.1"),  # NAT64 well-known prefix
    ("64:ff9b::a09:101", "private", "denied", "10.9.1.1"),
    ("64:ff9b::a9fe:a9fe", "denied", "denied", "169.254.169.254"),
    ("64:ff9b::808:808", "ok", "ok", None),  # NAT64 of a public address is public
    ("64:ff9b:1::7f00:1", "denied", "denied", None),  # NAT64 local-use: the layout is the site's
    ("64:ff9b:1:a09:1:100::", "denied", "denied", None),
    ("64:ff9b:1::808:808", "denied", "denied", None),
    ("2002:7f00:1::", "private", "ok", "127.0.0.1"),  # 6to4
    ("2002:a9fe:a9fe::1", "denied", "denied", "169.254.169.254"),
    ("2002:808:808::1", "ok", "ok", None),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private", "ok", "192.0.2.45"),  # Teredo, client 192.0.2.45
    ("2001:0:4136:e378::80ff:fffd", "private", "denied", "127.0.0.2"),  # Teredo, client 127.0.0.2
    # IPv4 spellings a C resolver accepts (inet_aton): decimal, hex, octal, short forms
    ("2130706433", "private", "ok", "127.0.0.1"),
    ("0x7f.1", "private", "ok", "127.0.0.1"),
    ("017700000001", "private", "ok", "127.0.0.1"),
    ("0x7f000001", "private", "ok", "127.0.0.1"),
    ("127.1", "private", "ok", "127.0.0.1"),
    ("2130706434", "private", "denied", "127.0.0.2"),
    ("0251.0376.0251.0376", "denied", "denied", "169.254.169.254"),
    # names
    ("localhost", "private", "ok", "127.0.0.1"),
    ("LOCALHOST.", "private", "ok", "127.0.0.1"),  # trailing dot, any case
    ("db.localhost", "private", "ok", "127.0.0.1"),
    ("public.example", "ok", "ok", None),
    ("public.example.", "ok", "ok", None),
    ("mixed.example", "private", "ok", "127.0.0.1"),  # one bad answer refuses the name
    ("no-such-name.example", "cannot be resolved", "cannot be resolved", None),
    ("", "no host", "no host", None),
    # unix sockets: local by definition
    ("/var/run/postgresql", "unix sockets", "ok", None),
]


@pytest.mark.parametrize(("host", "strictly", "laxly", "inner"), FORMS, ids=[f[0] or "empty" for f in FORMS])
async def test_address_forms(host: str, strictly: str, laxly: str, inner: str | None) -> None:
    for policy, expected in ((strict(), strictly), (lax(), laxly)):
        if expected == "ok":
            endpoints = await policy.resolve(host, 5432)
            assert endpoints and all(e.name == host and e.port == 5432 for e in endpoints)
            if inner is not None and ":" not in host:  # a spelling is dialled as the address it means
                assert inner in [e.address for e in endpoints], endpoints
        else:
            with pytest.raises(AddressNotAllowed, match=expected) as refused:
                await policy.resolve(host, 5432)
            if inner is not None:
                assert inner in str(refused.value), refused.value


def test_embedded_ipv4() -> None:
    def inside(text: str) -> list[str]:
        return [str(a) for a in embedded_ipv4(ipaddress.IPv6Address(text))]

    assert inside("64:ff9b::192.0.2.33") == ["192.0.2.33"]  # RFC 6052's example
    assert inside("::ffff:192.0.2.33") == inside("::192.0.2.33") == inside("2002:c000:221::") == ["192.0.2.33"]
    assert inside("2001:0:4136:e378:8000:63bf:3fff:fdd2") == ["65.54.227.120", "192.0.2.45"]  # RFC 4380's
    assert inside("::1") == inside("::") == inside("2606:2800:220:1::1") == []


async def test_resolve_asks_once_and_answers_the_checked_addresses() -> None:
    resolver = FakeResolver()
    policy = AddressPolicy(allow_private=False, resolver=resolver)
    endpoints = await policy.resolve("v6.example", 9092)
    assert endpoints == [
        Endpoint(name="v6.example", address="2606:2800:220:1:248:1893:25c8:1946", port=9092),
        Endpoint(name="v6.example", address="93.184.216.34", port=9092),
    ]
    assert resolver.asked == ["v6.example"]
    assert (await policy.resolve("public.example.", 1))[0].server_name == "public.example"
    # literals and localhost names never reach the resolver
    await AddressPolicy(allow_private=True, resolver=resolver).resolve_all([("127.0.0.1", 1), ("localhost", 2)])
    assert resolver.asked == ["v6.example", "public.example."]


async def test_resolution_is_bounded() -> None:
    async def hangs(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(10)
        return []

    policy = AddressPolicy(allow_private=True, resolver=hangs, resolve_timeout_s=0.05)
    with pytest.raises(AddressNotAllowed, match="timed out"):
        await policy.resolve("slow.example", 1)


async def test_the_system_resolver_refuses_odd_names() -> None:
    policy = AddressPolicy(allow_private=True)
    for host in ("exa\x00mple.com", "no-such-host.invalid", "[::1]"):
        with pytest.raises(AddressNotAllowed, match="cannot be resolved"):
            await policy.resolve(host, 1)


@pytest.mark.parametrize(
    ("target", "word"),
    [
        (RedisStreamsTarget(url="redis://[::]:6379/0"), "denied"),
        (RedisStreamsTarget(url="redis://[::ffff:7f00:1]:6379/0"), "private"),
        (RedisStreamsTarget(url="rediss://2130706433:6380/0"), "private"),
        (RabbitMQTarget(url="amqp://u@[64:ff9b::a9fe:a9fe]/vh"), "denied"),
        (RabbitMQTarget(url="amqp://u@0x7f.1/vh"), "private"),
        (KafkaTarget(bootstrap_servers=["public.example:9092", "[2002:7f00:1::]:9092"]), "private"),
        (KafkaTarget(bootstrap_servers=["localhost.:9092"]), "private"),
    ],
)
async def test_targets_in_url_forms(target: Target, word: str) -> None:
    with pytest.raises(AddressNotAllowed, match=word):
        await check_target(strict(), target)


async def test_name_bound_context_verifies_the_name_while_dialling_the_address(tmp_path: Path) -> None:
    """asyncio passes the dialled host as server_hostname; the context swaps in the bound name, so
    the certificate (which names only broker.test) verifies and SNI says broker.test."""
    ca = TestCA(tmp_path)
    sni: list[str | None] = []
    server = await asyncio.start_server(
        lambda r, w: w.close(), "127.0.0.1", 0, ssl=ca.server_context(ca.issue("broker.test"), sni)
    )
    port = server.sockets[0].getsockname()[1]

    def client_context() -> NameBoundSSLContext:
        context = NameBoundSSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=ca.pem)
        return context

    async with server:
        bound = client_context()
        bound.bind(Endpoint(name="broker.test.", address="127.0.0.1", port=port))
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=bound)
        writer.close()
        assert sni == ["broker.test"]
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            await asyncio.open_connection("127.0.0.1", port, ssl=client_context())  # unbound: the IP
