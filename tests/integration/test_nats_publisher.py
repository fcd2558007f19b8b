"""The NATS adapter against private nats-server processes (auth and permissions need a server
configured for them; stopping one is an outage of this test only): user and password, a token, a
subject the user may not publish to, a re-send dropped by the duplicate window, tenant headers that
would steer JetStream, the server stopped and started again."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.js.api
import pytest

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.domain import NatsTarget
from outbox_relay.errors import TargetUnavailable
from outbox_relay.netguard import AddressPolicy
from tests.harness.brokers import TEST_PASSWORD, end_process, free_port, listening
from tests.helpers import LOCAL
from tests.tls import TestCA

TOKEN = "t0ken/with:odd=chars&"
ADMIN_PASSWORD = "admin-pw"


@dataclass
class NatsProcess:
    """One nats-server on a free port; ``stop()`` and ``start()`` keep its port and JetStream store."""

    config: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["nats-server", "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(100):
            if listening(("127.0.0.1", self.port)):
                return
            assert self.process.poll() is None, f"nats-server exited with {self.process.returncode}"
            subprocess.run(["sleep", "0.05"], check=True)
        raise AssertionError("nats-server did not listen")

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process, timeout_s=5)
            self.process = None


def _server(tmp: Path, name: str, auth: str, *, jetstream: bool = True) -> Iterator[NatsProcess]:
    if shutil.which("nats-server") is None:
        pytest.fail("nats-server is not installed (`make services` installs it)")
    port = free_port()
    store = tmp / f"{name}-store"
    config = tmp / f"{name}.conf"
    js = f"jetstream {{ store_dir: {json.dumps(str(store))} }}" if jetstream else ""
    config.write_text(f'listen: "127.0.0.1:{port}"\n{js}\n{auth}\n')
    server = NatsProcess(config=config, port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def users_server(tmp_path: Path) -> Iterator[NatsProcess]:
    """Account APP with JetStream: ``relay`` (the test password) may publish to ``ok.>`` and the
    JetStream API only; ``admin`` may do anything."""
    relay_permissions = '{ publish: { allow: ["ok.>", "$JS.API.>"] }, subscribe: { allow: ["_INBOX.>"] } }'
    auth = f"""accounts {{ APP {{ jetstream: enabled, users: [
        {{ user: relay, password: {json.dumps(TEST_PASSWORD, ensure_ascii=False)}, permissions: {relay_permissions} }},
        {{ user: admin, password: {ADMIN_PASSWORD} }}
    ] }} }}"""
    yield from _server(tmp_path, "users", auth)


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[NatsProcess]:
    yield from _server(tmp_path, "token", f"authorization {{ token: {json.dumps(TOKEN)} }}")


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[NatsProcess]:
    yield from _server(tmp_path, "open", "")


@contextlib.asynccontextmanager
async def jetstream(url: str, **auth: str) -> AsyncIterator[nats.js.JetStreamContext]:
    client = await nats.connect(url, connect_timeout=5, allow_reconnect=False, **auth)  # type: ignore[arg-type]
    try:
        yield client.jetstream(timeout=10)
    finally:
        await client.close()


def message(n: int, subject: str, *, headers: dict[str, str] | None = None) -> OutgoingMessage:
    message_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{subject}/{n}"))
    return OutgoingMessage(
        id=n,
        message_id=message_id,
        destination=subject,
        key=f"k{n % 2}",
        payload=f"p{n}".encode(),
        headers={"outbox-id": message_id, **(headers or {})},
    )


async def test_user_and_password_and_a_subject_the_user_may_not_publish_to(users_server: NatsProcess) -> None:
    """The password (full of URL-special characters) goes to the server as is; a publish the server
    drops for want of permission is that message's refusal, not an outage; a wrong password is."""
    async with jetstream(users_server.url, user="admin", password=ADMIN_PASSWORD) as js:
        await js.add_stream(nats.js.api.StreamConfig(name="OK", subjects=["ok.>"]))
        await js.add_stream(nats.js.api.StreamConfig(name="NO", subjects=["forbidden.>"]))
        target = NatsTarget(servers=[users_server.url], username="relay", timeout_ms=2000)
        async with await open_publisher(target, password=TEST_PASSWORD, policy=LOCAL) as publisher:
            batch = [message(1, "ok.a"), message(2, "ok.a"), message(3, "forbidden.a"), message(4, "ok.a")]
            result = await publisher.publish_batch(batch)
            assert result.acked == 2 and result.rejected is not None and result.rejected.index == 2, result
            assert "permission" in str(result.rejected)
            assert await publisher.publish_batch([message(5, "ok.a")]) == PublishResult(acked=1)
        assert (await js.stream_info("NO")).state.messages == 0
        stored = [
            (await js.get_msg("OK", seq)).data for seq in range(1, (await js.stream_info("OK")).state.messages + 1)
        ]
        assert stored[:2] == [b"p1", b"p2"] and stored[-1] == b"p5"
    with pytest.raises(TargetUnavailable, match=r"(?i)authorization"):
        await open_publisher(target, password="wrong", policy=LOCAL)
    with pytest.raises(TargetUnavailable):
        await open_publisher(target, password=None, policy=LOCAL)


async def test_a_password_without_username_is_a_token(token_server: NatsProcess) -> None:
    async with jetstream(token_server.url, token=TOKEN) as js:
        await js.add_stream(nats.js.api.StreamConfig(name="T", subjects=["t.>"]))
        target = NatsTarget(servers=[token_server.url], timeout_ms=2000)
        async with await open_publisher(target, password=TOKEN, policy=LOCAL) as publisher:
            assert await publisher.publish_batch([message(1, "t.x")]) == PublishResult(acked=1)
        assert (await js.stream_info("T")).state.messages == 1
    for wrong in (None, "not-the-token"):
        with pytest.raises(TargetUnavailable):
            await open_publisher(target, password=wrong, policy=LOCAL)


async def test_a_resent_batch_is_stored_once_and_tenant_headers_do_not_steer_jetstream(
    open_server: NatsProcess,
) -> None:
    """The relay sends a batch again after an outage it could not see through: Nats-Msg-Id makes
    JetStream drop the copies (acknowledged all the same). A tenant's ``Nats-Rollup`` header, on a
    stream that honours rollups, would purge the subject; it arrives as an ordinary header."""
    async with jetstream(open_server.url) as js:
        await js.add_stream(nats.js.api.StreamConfig(name="D", subjects=["d.>"], allow_rollup_hdrs=True))
        target = NatsTarget(servers=[open_server.url], timeout_ms=2000)
        async with await open_publisher(target, password=None, policy=LOCAL) as publisher:
            batch = [message(n, "d.x") for n in range(1, 11)]
            assert await publisher.publish_batch(batch) == PublishResult(acked=10)
            assert await publisher.publish_batch(batch[3:]) == PublishResult(acked=7)
            assert (await js.stream_info("D")).state.messages == 10
            rollup = message(11, "d.x", headers={"Nats-Rollup": "sub", "Nats-Expected-Stream": "other"})
            assert await publisher.publish_batch([rollup]) == PublishResult(acked=1)
        assert (await js.stream_info("D")).state.messages == 11
        stored = await js.get_msg("D", 11)
        assert stored.hdrs is not None and b"%4Eats-Rollup: sub" in base64.b64decode(stored.hdrs)


async def test_the_server_stopped_is_an_outage_and_back_is_published_to(open_server: NatsProcess) -> None:
    async with jetstream(open_server.url) as js:
        await js.add_stream(nats.js.api.StreamConfig(name="R", subjects=["r.>"], storage=nats.js.api.StorageType.FILE))
    target = NatsTarget(servers=[open_server.url], timeout_ms=1000)
    async with await open_publisher(target, password=None, policy=LOCAL) as publisher:
        assert await publisher.publish_batch([message(1, "r.x")]) == PublishResult(acked=1)
        open_server.stop()
        with pytest.raises(TargetUnavailable):
            await publisher.publish_batch([message(2, "r.x")])
        with pytest.raises(TargetUnavailable):  # no server to dial: still an outage, not a refusal
            await publisher.publish_batch([message(2, "r.x")])
        open_server.start()
        assert await publisher.publish_batch([message(3, "r.x")]) == PublishResult(acked=1)
    async with jetstream(open_server.url) as js:
        stored = [(await js.get_msg("R", seq)).data for seq in range(1, (await js.stream_info("R")).state.last_seq + 1)]
    assert stored[0] == b"p1" and stored[-1] == b"p3"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[NatsProcess, TestCA]]:
    """A nats-server of this test's own, TLS required, its certificate naming nats.test only."""
    ca = TestCA(tmp_path)
    cert = ca.issue("nats.test")
    tls = f"tls {{ cert_file: {json.dumps(str(cert.cert))}, key_file: {json.dumps(str(cert.key))} }}"
    for server in _server(tmp_path, "tls", tls):
        yield server, ca


async def test_tls_verifies_the_name_while_dialling_the_checked_address(
    tls_server: tuple[NatsProcess, TestCA], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tls://`` dials the address the policy checked and verifies the certificate for the server's
    name (``tls_hostname``), against the system trust store (here the test CA, by SSL_CERT_FILE)."""
    server, ca = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.pem))

    async def resolver(host: str, port: int) -> list[str]:
        assert host in ("nats.test", "other.test"), host
        return ["127.0.0.1"]

    policy = AddressPolicy(allow_private=True, resolver=resolver)
    good = NatsTarget(servers=[f"tls://nats.test:{server.port}"], timeout_ms=2000)
    async with await open_publisher(good, password=None, policy=policy) as publisher:
        result = await publisher.publish_batch([message(1, "tls.nostream")])
        assert result.acked == 0 and result.rejected is not None  # an answer: connected and verified
    bad_targets: list[tuple[str, str | None]] = [
        ("tls://other.test", r"certificate verify failed|[Hh]ostname mismatch"),  # not the certificate's name
        ("nats://nats.test", None),  # the server requires TLS
    ]
    for bad, why in bad_targets:
        target = NatsTarget(servers=[f"{bad}:{server.port}"], timeout_ms=2000)
        with pytest.raises(TargetUnavailable, match=why):
            await open_publisher(target, password=None, policy=policy)


async def test_servers_a_cluster_advertises_are_never_dialled(tmp_path: Path) -> None:
    """nats-py adds the servers a cluster advertises (INFO ``connect_urls``) to its pool and would dial
    them on a reconnect, unchecked. Server B advertises itself at 127.0.0.2, where a decoy listens:
    with server A, the one the target names, gone, the next batch is an outage and the decoy is never
    dialled."""
    accepted = 0

    def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    decoy_port = free_port()
    decoy = await asyncio.start_server(accept, "127.0.0.2", decoy_port)
    route_a, route_b = free_port(), free_port()
    cluster_a = f"cluster {{ name: c, listen: 127.0.0.1:{route_a}, routes: [nats-route://127.0.0.1:{route_b}] }}"
    cluster_b = f"cluster {{ name: c, listen: 127.0.0.1:{route_b}, routes: [nats-route://127.0.0.1:{route_a}] }}"
    advertise_b = f'client_advertise: "127.0.0.2:{decoy_port}"'
    a = next(servers_a := _server(tmp_path, "a", cluster_a, jetstream=False))
    b = next(servers_b := _server(tmp_path, "b", f"{advertise_b}\n{cluster_b}", jetstream=False))
    try:
        watcher = await nats.connect(a.url, connect_timeout=5, allow_reconnect=False)
        try:
            for _ in range(200):  # until A advertises B: the route is up
                if watcher.discovered_servers:
                    break
                await asyncio.sleep(0.05)
            assert watcher.discovered_servers, "the cluster did not form"
        finally:
            await watcher.close()
        target = NatsTarget(servers=[a.url], timeout_ms=1000)
        async with await open_publisher(target, password=None, policy=LOCAL) as publisher:
            answered = await publisher.publish_batch([message(1, "c.nostream")])
            assert answered.acked == 0 and answered.rejected is not None  # connected, A's INFO names B
            a.stop()
            # a window for a reconnect of nats-py's own, were it on, to reach the advertised decoy
            await asyncio.sleep(0.5)
            for _ in range(2):
                with pytest.raises(TargetUnavailable):
                    await publisher.publish_batch([message(2, "c.nostream")])
        assert b.process is not None and b.process.poll() is None
    finally:
        for servers in (servers_a, servers_b):
            servers.close()
        decoy.close()
    assert accepted == 0
