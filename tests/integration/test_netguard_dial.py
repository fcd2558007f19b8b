"""Every outside address is checked where it is dialled: DNS rebinding, Kafka's advertised brokers,
TLS to the name while dialling the address. Real servers throughout.

Rebinding without DNS tricks: the running loop's ``getaddrinfo`` (what the address policy and every
driver resolve names with) answers the name ``REBIND`` with 127.0.0.1 for its first ``good``
questions and 127.0.0.2 after that. A decoy listens on 127.0.0.2 at the real server's port (the
servers listen on 127.0.0.1 only) and counts the connections it gets; the policy denies
127.0.0.2/32. A connect that dials only what the policy checked reaches the real server and never
the decoy; one whose driver resolves the name again is steered to the decoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
from aiormq.connection import SSLCerts, SSLContextProvider
from litestar.testing import AsyncTestClient
from yarl import URL

from outbox_relay.brokers.base import OutgoingMessage, Publisher
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.brokers.rabbitmq import GuardedTransport
from outbox_relay.brokers.redis_streams import RedisStreamsPublisher
from outbox_relay.brokers.webhook import WebhookPublisher
from outbox_relay.config import Settings
from outbox_relay.domain import Database, KafkaTarget, NatsTarget, RabbitMQTarget, RedisStreamsTarget, WebhookTarget
from outbox_relay.engine import TenantConnections
from outbox_relay.errors import AddressNotAllowed, TargetUnavailable, TenantDatabaseError
from outbox_relay.netguard import AddressPolicy
from outbox_relay.specs import webhook_secrets
from outbox_relay.tenant import db as tenant_db
from tests.conftest import PG_PORT, PG_USER, DatabaseFactory, pg_dsn
from tests.contract.proxy import TcpProxy
from tests.harness.brokers import (
    NATS_ADDRESS,
    RabbitMQAccount,
    RedisAccount,
    TansuBroker,
    free_port,
    listening,
    running_tansu,
)
from tests.harness.webhooks import WebhookReceiver, new_secret
from tests.helpers import make_tenant
from tests.tls import TestCA
from workers.settings import worker_settings

REBIND = "rebind.outbox-relay.test"
DECOY_HOST = "127.0.0.2"
GUARDED = AddressPolicy(allow_private=True, extra_denied=[f"{DECOY_HOST}/32"])


class Rebinding:
    """Every event loop's getaddrinfo, answering REBIND with 127.0.0.1 ``good`` times, then 127.0.0.2.

    Patched on the loop class, not one loop: the in-process API client runs the app on a loop of its
    own."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.good = 1
        self.asked = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        rebinding = self

        async def getaddrinfo(
            loop: asyncio.AbstractEventLoop,
            host: Any,
            port: Any,
            *,
            family: int = 0,
            type: int = 0,
            proto: int = 0,
            flags: int = 0,
        ) -> Any:
            if host != REBIND:
                return await rebinding.real(loop, host, port, family=family, type=type, proto=proto, flags=flags)
            return rebinding.answer(port)

        monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", getaddrinfo)

    def answer(self, port: Any) -> Any:
        self.asked += 1
        address = "127.0.0.1" if self.asked <= self.good else DECOY_HOST
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 0)))]


class Decoy:
    """Listens on 127.0.0.2:port and counts (and drops) the connections it gets."""

    def __init__(self) -> None:
        self.accepted = 0
        self._servers: list[asyncio.Server] = []

    async def listen(self, port: int) -> None:
        def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        self._servers.append(await asyncio.start_server(accept, DECOY_HOST, port))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def rebinding(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rebinding]:
    fake = Rebinding(asyncio.base_events.BaseEventLoop.getaddrinfo)
    fake.install(monkeypatch)
    yield fake


@pytest.fixture
async def decoy() -> AsyncIterator[Decoy]:
    d = Decoy()
    yield d
    await d.close()


@contextlib.asynccontextmanager
async def worker_factory(settings: Settings) -> AsyncIterator[Any]:
    """The worker's own publisher factory (workers/settings.py), its policy denying the decoy."""
    ws = worker_settings(dataclasses.replace(settings, denied_networks=(f"{DECOY_HOST}/32",)))
    ctx: dict[str, Any] = {}
    await ws["on_startup"](ctx)
    try:
        yield ctx["publishers"].factory
    finally:
        await ws["on_shutdown"](ctx)


def message(destination: str) -> OutgoingMessage:
    return OutgoingMessage(id=1, destination=destination, key="k", payload=b"{}", headers={"outbox-id": "1"})


# --- PostgreSQL --------------------------------------------------------------------------------------


async def test_tenant_db_connect_dials_the_checked_address(
    databases: DatabaseFactory, rebinding: Rebinding, decoy: Decoy
) -> None:
    name = await databases.create("rebind")
    await decoy.listen(PG_PORT)
    db = Database(dsn=f"postgresql://{PG_USER}@{REBIND}:{PG_PORT}/{name}")
    conn = await tenant_db.connect(db, None, policy=GUARDED, timeout_s=3)
    try:
        assert await conn.fetchval("SELECT host(inet_server_addr())") == "127.0.0.1"
    finally:
        await conn.close()
    assert decoy.accepted == 0 and rebinding.asked == 1  # resolved once, for check and dial alike


async def test_every_pool_connection_is_checked_when_dialled(
    databases: DatabaseFactory, rebinding: Rebinding, decoy: Decoy
) -> None:
    """The worker's pool: a DNS answer that changes after the pool was made is checked again when the
    pool opens its next connection, and refused."""
    name = await databases.create("rebind_pool")
    await decoy.listen(PG_PORT)
    rebinding.good = 2  # the pool's own check, then its first connection
    tenants = TenantConnections(policy=GUARDED, timeout_s=3)
    try:
        pool = await tenants.pool(
            uuid.uuid4(), _now(), Database(dsn=f"postgresql://{PG_USER}@{REBIND}:{PG_PORT}/{name}"), None
        )
        async with pool.acquire() as first:
            assert await first.fetchval("SELECT host(inet_server_addr())") == "127.0.0.1"
            with pytest.raises(AddressNotAllowed, match="denied"):
                async with pool.acquire():
                    pass
    finally:
        await tenants.close()
    assert decoy.accepted == 0


async def test_provision_dials_the_checked_address(
    client: AsyncTestClient[Any], databases: DatabaseFactory, rebinding: Rebinding, decoy: Decoy
) -> None:
    """API side: the database is written (its address checked), then provisioned; the name answers
    127.0.0.1 to both checks and 127.0.0.2 to anything after."""
    tenant = await make_tenant(client, "rebind")
    name = await databases.create("rebind_api")
    await decoy.listen(PG_PORT)
    rebinding.good = 2
    put = await tenant.put("/v1/databases/d", {"dsn": f"postgresql://{PG_USER}@{REBIND}:{PG_PORT}/{name}"})
    assert put.status_code == 201, put.text
    provisioned = await tenant.post("/v1/databases/d/provision")
    assert provisioned.status_code == 200, provisioned.text
    assert decoy.accepted == 0
    conn = await asyncpg.connect(pg_dsn(name))
    try:
        assert await conn.fetchval("SELECT to_regclass('outbox_relay.outbox') IS NOT NULL")
    finally:
        await conn.close()


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)


# --- brokers, through the worker's factory -----------------------------------------------------------


async def test_redis_connects_and_reconnects_only_to_checked_addresses(
    settings: Settings, redis_account: RedisAccount, rebinding: Rebinding, decoy: Decoy
) -> None:
    await decoy.listen(6379)
    target = RedisStreamsTarget(url=f"redis://{redis_account.user}@{REBIND}:6379/0", timeout_ms=2000)
    async with worker_factory(settings) as factory:
        publisher: Publisher = await factory(target, redis_account.password)
        try:
            assert (await publisher.publish_batch([message(f"{redis_account.prefix}s")])).acked == 1
            admin = redis.Redis.from_url(redis_account.admin_url)
            admin.client_kill_filter(user=redis_account.user)  # the next batch reconnects
            admin.close()
            errors: list[TargetUnavailable] = []
            for _ in range(2):
                with pytest.raises(TargetUnavailable) as failed:
                    await publisher.publish_batch([message(f"{redis_account.prefix}s")])
                errors.append(failed.value)
            assert any("denied" in str(e) for e in errors), errors
        finally:
            await publisher.close()
    assert decoy.accepted == 0


async def test_rabbitmq_connects_and_reconnects_only_to_checked_addresses(
    settings: Settings, rabbitmq: RabbitMQAccount, rebinding: Rebinding, decoy: Decoy
) -> None:
    await decoy.listen(5672)
    target = RabbitMQTarget(
        url=f"amqp://{rabbitmq.user}@{REBIND}:5672/{rabbitmq.vhost}", mandatory=False, timeout_ms=3000
    )
    async with worker_factory(settings) as factory:
        publisher: Publisher = await factory(target, rabbitmq.password)
        try:
            assert (await publisher.publish_batch([message("nowhere")])).acked == 1
            await asyncio.to_thread(rabbitmq.close_connections)
            errors: list[TargetUnavailable] = []
            for _ in range(3):
                try:
                    await publisher.publish_batch([message("nowhere")])
                except TargetUnavailable as exc:
                    errors.append(exc)
                    if "denied" in str(exc):
                        break
                else:
                    await asyncio.sleep(0.5)  # the close may not have reached the client yet
            assert errors and "denied" in str(errors[-1]), errors
        finally:
            await publisher.close()
    assert decoy.accepted == 0


async def test_nats_connects_and_reconnects_only_to_checked_addresses(
    settings: Settings, rebinding: Rebinding, decoy: Decoy
) -> None:
    """nats-py's own reconnect would dial the name again: the adapter dials each connection itself,
    through the policy. A proxy on 127.0.0.1 stands for the server (so its connections can be cut);
    the decoy listens on 127.0.0.2 at the proxy's port."""
    proxy = TcpProxy(NATS_ADDRESS)
    await proxy.up()
    await decoy.listen(proxy.port)
    target = NatsTarget(servers=[f"nats://{REBIND}:{proxy.port}"], timeout_ms=2000)
    try:
        async with worker_factory(settings) as factory:
            publisher: Publisher = await factory(target, None)
            try:
                first = await publisher.publish_batch([message(f"nowhere.{uuid.uuid4().hex}")])
                assert first.acked == 0 and first.rejected is not None  # no stream: an answer, so connected
                await proxy.drop()  # the next batch dials again: REBIND answers the decoy now
                errors: list[TargetUnavailable] = []
                for _ in range(3):
                    try:
                        await publisher.publish_batch([message("nowhere")])
                    except TargetUnavailable as exc:
                        errors.append(exc)
                        if "denied" in str(exc):
                            break
                    else:
                        await asyncio.sleep(0.5)  # the cut may not have reached the client yet
                assert errors and "denied" in str(errors[-1]), errors
            finally:
                await publisher.close()
    finally:
        await proxy.close()
    assert decoy.accepted == 0


async def test_kafka_bootstrap_dials_the_checked_address(
    settings: Settings, tansu: TansuBroker, rebinding: Rebinding, decoy: Decoy
) -> None:
    await decoy.listen(tansu.port)
    target = KafkaTarget(bootstrap_servers=[f"{REBIND}:{tansu.port}"], enable_idempotence=False, timeout_ms=3000)
    async with worker_factory(settings) as factory:
        publisher: Publisher = await factory(target, None)
        await publisher.close()
    assert decoy.accepted == 0


# --- Kafka: brokers the cluster advertises ----------------------------------------------------------


@pytest.fixture
def tansu_advertising_decoy() -> Iterator[TansuBroker]:
    """A Tansu broker on 127.0.0.1 that tells its clients to dial it at 127.0.0.2 (same port)."""
    with running_tansu(advertised_host=DECOY_HOST) as broker:
        yield broker


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "plain"])
async def test_kafka_never_dials_a_refused_advertised_broker(
    settings: Settings,
    tansu_advertising_decoy: TansuBroker,
    decoy: Decoy,
    idempotent: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bootstrap at 127.0.0.1 is allowed; the metadata names 127.0.0.2, which the policy denies: the
    worker never dials it, and the batch fails as TargetUnavailable naming the refusal."""
    await decoy.listen(tansu_advertising_decoy.port)
    target = KafkaTarget(
        bootstrap_servers=[tansu_advertising_decoy.bootstrap], enable_idempotence=idempotent, timeout_ms=1500
    )
    caplog.set_level(logging.WARNING, logger="outbox_relay.brokers.kafka")
    async with worker_factory(settings) as factory:
        if idempotent:  # InitProducerId needs a broker: start() fails
            with pytest.raises(TargetUnavailable, match=r"refused.*127\.0\.0\.2.*denied"):
                await factory(target, None)
        else:
            publisher: Publisher = await factory(target, None)
            try:
                with pytest.raises(TargetUnavailable, match=r"refused.*127\.0\.0\.2.*denied"):
                    await publisher.publish_batch([message("events")])
            finally:
                await publisher.close()
    assert decoy.accepted == 0
    warnings = [r for r in caplog.records if "is not dialled" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # once, not a loop of them


# --- TLS: dial the address, verify the name ------------------------------------------------------------


def resolver_for(**names: str) -> Any:
    async def resolve(host: str, port: int) -> Sequence[str]:
        if host not in names:
            raise OSError(-2, "Name or service not known")
        return [names[host]]

    return resolve


async def test_amqps_verifies_the_name_and_sends_it_as_sni(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    sni: list[str | None] = []
    server = await asyncio.start_server(
        lambda r, w: w.close(), "127.0.0.1", 0, ssl=ca.server_context(ca.issue("amqp.test"), sni)
    )
    port = server.sockets[0].getsockname()[1]
    policy = AddressPolicy(
        allow_private=True, resolver=resolver_for(**{"amqp.test": "127.0.0.1", "other.test": "127.0.0.1"})
    )

    def provider() -> SSLContextProvider:
        certs = SSLCerts(cafile=str(ca.pem), capath=None, cadata=None, key=None, cert=None, verify=True)
        return SSLContextProvider(ssl_context=None, ssl_certs=certs, loop=asyncio.get_running_loop())

    async with server:
        _, writer = await GuardedTransport(policy).create(
            URL(f"amqps://u@amqp.test:{port}/"), ssl_context_provider=provider()
        )
        writer.close()
        assert sni == ["amqp.test"]
        with pytest.raises(Exception, match=r"certificate verify failed|Hostname mismatch"):
            await GuardedTransport(policy).create(URL(f"amqps://u@other.test:{port}/"), ssl_context_provider=provider())


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, TestCA]]:
    """A redis-server of this test's own, TLS only, its certificate naming redis.test."""
    ca = TestCA(tmp_path)
    cert = ca.issue("redis.test")
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert.cert),
         "--tls-key-file", str(cert.key), "--tls-ca-cert-file", str(ca.pem), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            if listening(("127.0.0.1", port)):
                break
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            subprocess.run(["sleep", "0.02"], check=True)
        yield port, ca
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_rediss_verifies_the_name_while_dialling_the_address(tls_redis: tuple[int, TestCA]) -> None:
    port, ca = tls_redis
    policy = AddressPolicy(
        allow_private=True, resolver=resolver_for(**{"redis.test": "127.0.0.1", "other.test": "127.0.0.1"})
    )
    async with RedisStreamsPublisher(url=f"rediss://redis.test:{port}/0?ssl_ca_certs={ca.pem}", policy=policy) as good:
        await good.connect()
    # the certificate does not name other.test: refused, since the name is checked by default
    async with RedisStreamsPublisher(url=f"rediss://other.test:{port}/0?ssl_ca_certs={ca.pem}", policy=policy) as bad:
        with pytest.raises(TargetUnavailable, match=r"certificate verify failed|Hostname mismatch"):
            await bad.connect()


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[tuple[int, TestCA]]:
    """A PostgreSQL cluster of this module's own, with TLS on, its certificate naming pg.test."""
    if shutil.which("pg_createcluster") is None or os.geteuid() != 0:
        pytest.fail("needs pg_createcluster, as root")
    directory = Path(tempfile.mkdtemp(prefix="orly-tls-"))
    directory.chmod(0o755)
    ca = TestCA(directory)
    cert = ca.issue("pg.test")
    shutil.chown(cert.key, "postgres", "postgres")
    name, port = f"orly_tls_{os.getpid()}", free_port()
    subprocess.run(
        ["pg_createcluster", "-p", str(port), "15", name, "--", "--auth=trust"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        # pg_conftool quotes the paths; it listens on localhost (127.0.0.1) by default
        for key, value in (("ssl", "on"), ("ssl_cert_file", cert.cert), ("ssl_key_file", cert.key), ("fsync", "off")):
            subprocess.run(["pg_conftool", "15", name, "set", key, str(value)], check=True, capture_output=True)
        subprocess.run(["pg_ctlcluster", "15", name, "start"], check=True, capture_output=True, timeout=60)
        yield port, ca
    finally:
        subprocess.run(["pg_dropcluster", "--stop", "15", name], capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


async def ssl_in_use(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))


async def test_postgres_tls_verifies_the_name_while_dialling_the_address(tls_postgres: tuple[int, TestCA]) -> None:
    port, ca = tls_postgres
    policy = AddressPolicy(
        allow_private=True, resolver=resolver_for(**{"pg.test": "127.0.0.1", "other.test": "127.0.0.1"})
    )

    async def connect(host: str, query: str) -> asyncpg.Connection:
        db = Database(dsn=f"postgresql://postgres@{host}:{port}/postgres?{query}")
        return await tenant_db.connect(db, None, policy=policy, timeout_s=5)

    conn = await connect("pg.test", f"sslmode=verify-full&sslrootcert={ca.pem}")
    try:
        assert await ssl_in_use(conn)
        assert await conn.fetchval("SELECT host(inet_server_addr())") == "127.0.0.1"
    finally:
        await conn.close()
    with pytest.raises(TenantDatabaseError, match=r"certificate verify failed|Hostname mismatch"):
        await connect("other.test", f"sslmode=verify-full&sslrootcert={ca.pem}")
    for host, query in (
        ("other.test", f"sslmode=verify-ca&sslrootcert={ca.pem}"),
        ("other.test", "sslmode=require"),
        ("pg.test", ""),
    ):
        conn = await connect(host, query)  # chain only / no verification / prefer: TLS all the same
        try:
            assert await ssl_in_use(conn), query
        finally:
            await conn.close()
    with pytest.raises(TenantDatabaseError, match="certificate verify failed"):
        await connect("pg.test", "sslmode=verify-ca")  # the system trust store does not know this CA


# --- webhooks ------------------------------------------------------------------------------------------


async def test_webhook_connects_and_reconnects_only_to_checked_addresses(
    settings: Settings, rebinding: Rebinding, decoy: Decoy
) -> None:
    """The adapter's connections dial through the address policy: the first connection reaches the
    receiver; once the receiver closed it, the next one resolves the name again, which now answers
    the denied decoy, and is refused: the decoy never sees a connection."""
    secret = new_secret(7)
    async with WebhookReceiver([secret]) as receiver:
        await decoy.listen(receiver.port)
        target = WebhookTarget(url=f"http://{REBIND}:{receiver.port}/hooks", timeout_ms=2000)
        async with worker_factory(settings) as factory:
            publisher: Publisher = await factory(target, secret)
            try:
                assert (await publisher.publish_batch([message("d")])).acked == 1
                receiver.drop()  # the next batch needs a new connection
                await asyncio.sleep(0.05)
                with pytest.raises(TargetUnavailable, match="denied"):
                    await publisher.publish_batch([message("d")])
            finally:
                await publisher.close()
        assert [d.destination for d in receiver.all] == ["d"] and receiver.bad_signatures == 0
    assert rebinding.asked >= 2 and decoy.accepted == 0


async def test_webhook_refuses_a_private_address_unless_allowed() -> None:
    secret = new_secret(8)
    async with WebhookReceiver([secret]) as receiver:
        target = WebhookTarget(url=receiver.url, timeout_ms=2000)
        with pytest.raises(TargetUnavailable, match="private"):
            await open_publisher(target, password=secret, policy=AddressPolicy(allow_private=False))
        async with await open_publisher(target, password=secret, policy=AddressPolicy(allow_private=True)) as ok:
            assert (await ok.publish_batch([message("d")])).acked == 1
        # a name is checked as its address: localhost is loopback whatever a resolver says
        named = WebhookTarget(url=f"http://localhost:{receiver.port}/hooks", timeout_ms=2000)
        with pytest.raises(TargetUnavailable, match="private"):
            await open_publisher(named, password=secret, policy=AddressPolicy(allow_private=False))


async def test_https_webhook_verifies_the_name_while_dialling_the_address(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    sni: list[str | None] = []
    secret = new_secret(9)
    trust = ssl.create_default_context(cafile=str(ca.pem))
    policy = AddressPolicy(
        allow_private=True, resolver=resolver_for(**{"hook.test": "127.0.0.1", "other.test": "127.0.0.1"})
    )
    async with WebhookReceiver([secret]) as receiver:
        await receiver.close()
        await receiver.start(tls=ca.server_context(ca.issue("hook.test"), sni))
        keys = webhook_secrets(secret)
        good = WebhookPublisher(url=f"https://hook.test:{receiver.port}/hooks", secrets=keys, policy=policy,
                                ssl_context=trust)  # fmt: skip
        async with good:
            await good.connect()
            assert (await good.publish_batch([message("tls")])).acked == 1
        assert set(sni) == {"hook.test"} and [d.destination for d in receiver.all] == ["tls"]
        # the certificate does not name other.test, though it is the same address
        bad = WebhookPublisher(url=f"https://other.test:{receiver.port}/hooks", secrets=keys, policy=policy,
                               ssl_context=trust)  # fmt: skip
        async with bad:
            with pytest.raises(TargetUnavailable, match=r"certificate verify failed|Hostname mismatch"):
                await bad.connect()
