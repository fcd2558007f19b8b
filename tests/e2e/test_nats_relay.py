"""NATS JetStream end to end: a worker process relays to a stream on the local server; every committed
message once, in per-key order, with ``Nats-Msg-Id`` = ``outbox-id`` = the message id and the headers
carried."""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from typing import Any

import nats
import nats.js.api
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from outbox_relay.store.control import ControlStore
from tests.conftest import DatabaseFactory, pg_dsn
from tests.e2e.test_dashboard import dead_letter_for_real, ui_login
from tests.harness.brokers import NatsServer
from tests.helpers import make_tenant
from tests.integration.conftest import FAST_RETRY, write
from tests.traffic import check_delivery, write_messages
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e


def stored_headers(encoded: bytes | None) -> dict[str, str]:
    """A stored message's headers (``NATS/1.0`` then ``Name: value`` lines, base64 in the API's answer)."""
    assert encoded
    first, *lines = base64.b64decode(encoded).decode().split("\r\n")
    assert first == "NATS/1.0"
    return dict(line.split(": ", 1) for line in lines if line)


async def test_relay_to_nats_jetstream(
    client: AsyncTestClient[Any], databases: DatabaseFactory, nats_server: NatsServer, worker_pool: WorkerPool
) -> None:
    t = await make_tenant(client, "nats")
    app_db = await databases.create("nats")
    stream = f"{nats_server.prefix}-{t.name}-{uuid.uuid4().hex[:6]}"
    subject = stream.replace("-", ".")
    admin = await nats.connect(nats_server.url, connect_timeout=5, allow_reconnect=False)
    js = admin.jetstream(timeout=10)
    await js.add_stream(nats.js.api.StreamConfig(name=stream, subjects=[f"{subject}.>"]))
    try:
        assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(app_db)})).status_code == 201
        assert (await t.post("/v1/databases/app/provision")).status_code == 200
        target = {"kind": "nats", "servers": [nats_server.url], "timeout_ms": 5000}
        assert (await t.put("/v1/targets/js", target)).status_code == 201
        body = {
            "database": "app",
            "target": "js",
            "partitions": 4,
            "topic_mapping": {"orders": f"{subject}.{{topic}}"},
            "policy": {"batch_size": 100, "poll_interval_ms": 100},
        }
        assert (await t.put("/v1/relays/to-nats", body)).status_code == 201
        worker_pool.start()
        committed, rolled_back = await write_messages(pg_dsn(app_db), seed=5, messages=600, keys=60, writers=3)
        total = sum(len(v) for v in committed.values())

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = await js.stream_info(stream)
            if info.state.messages >= total:
                break
            await asyncio.sleep(0.2)
        assert info.state.messages >= total, worker_pool.logs()

        received: list[tuple[str, uuid.UUID]] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await js.get_msg(stream, seq)
            assert raw.subject == f"{subject}.orders"
            headers = stored_headers(raw.hdrs)
            assert headers["Nats-Msg-Id"] == headers["outbox-id"], headers
            assert headers["outbox-relay"] == "to-nats" and headers["writer"] in {"0", "1", "2"}
            received.append((headers["outbox-key"], uuid.UUID(headers["outbox-id"])))
        check_delivery("nats", received, committed, rolled_back)
        assert (await t.delete("/v1/relays/to-nats")).status_code == 204
    finally:
        await js.delete_stream(stream)
        await admin.close()


async def test_a_nats_refusal_is_a_dead_letter_the_dashboard_replays_to_a_nats_target(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    nats_server: NatsServer,
    settings: Settings,
    control_dsn: str,
) -> None:
    """A subject no stream captures is a refusal (an attempt each time, then a dead letter, never an
    outage); the dashboard's replay form lists the NATS target by name and replays the letter to it
    once a stream captures the subject."""
    t = await make_tenant(client, "nats-ui")
    db = await databases.create("nats-ui")
    subject = f"{nats_server.prefix}-{t.name}-{uuid.uuid4().hex[:6]}".replace("-", ".")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(db)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "nats", "servers": [nats_server.url], "timeout_ms": 2000}
    assert (await t.put("/v1/targets/jetstream", target)).status_code == 201
    relay = {"database": "app", "target": "jetstream", "partitions": 1, "policy": FAST_RETRY,
             "topic_mapping": {"orders": f"{subject}.{{topic}}"}}  # fmt: skip
    assert (await t.put("/v1/relays/shop", relay)).status_code == 201
    await write(pg_dsn(db), ("orders", "order-1", b'{"order": 1}'))
    store = await ControlStore.connect(control_dsn)
    try:
        tenant = await store.get_tenant(t.name)
        assert tenant is not None
        row = await store.get_resource("relays", tenant.id, "shop")
        assert row is not None
        await dead_letter_for_real(settings, store, row.id, pg_dsn(db), 1)
    finally:
        await store.close()
    (listed,) = (await t.get("/v1/dead-letters")).json()["items"]
    letter = (await t.get(f"/v1/dead-letters/{listed['id']}")).json()
    assert letter["error_class"] == "refused" and "no responders" in letter["last_error"], letter

    stream = subject.replace(".", "-")
    admin = await nats.connect(nats_server.url, connect_timeout=5, allow_reconnect=False)
    js = admin.jetstream(timeout=10)
    await js.add_stream(nats.js.api.StreamConfig(name=stream, subjects=[f"{subject}.>"]))
    try:
        await ui_login(client, t.key)
        page = await client.get(f"/ui/dead-letters/{letter['id']}")
        assert page.status_code == 200
        assert '<option value="jetstream">jetstream</option>' in page.text, page.text
        csrf = re.findall(r'name="csrf" value="([^"]+)"', page.text)[0]
        r = await client.post(
            f"/ui/dead-letters/{letter['id']}/replay",
            data={"csrf": csrf, "target": "jetstream", "destination": ""},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        assert (await t.get(f"/v1/dead-letters/{letter['id']}")).json()["status"] == "replayed"
        raw = await js.get_msg(stream, 1)
        assert raw.data == b'{"order": 1}' and raw.subject == f"{subject}.orders"
        headers = stored_headers(raw.hdrs)
        assert headers["Nats-Msg-Id"] == headers["outbox-id"] == letter["message_id"], headers
        assert headers["outbox-key"] == "order-1" and headers["outbox-replay-count"] == "1"
    finally:
        await js.delete_stream(stream)
        await admin.close()
