"""NATS JetStream end to end: a worker process relays to a stream on the local server; every committed
message once, in per-key order, with ``Nats-Msg-Id`` = ``outbox-id`` = the message id and the headers
carried."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import nats
import nats.js.api
import pytest
from litestar.testing import AsyncTestClient

from tests.brokers import NatsServer
from tests.conftest import DatabaseFactory, pg_dsn
from tests.helpers import make_tenant
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
