"""An adopted Debezium-layout outbox, end to end through a real worker process and Redis Streams.

The application writes to its own ``outbox`` table as it did for Debezium; the relay publishes every
row committed after provision, in per-key order, on the stream its ``aggregatetype`` routes to, with
``aggregateid`` as the key, ``id`` as the message id, ``type`` as the ``eventType`` header and the
payload's JSON; a rolled-back insert and the rows that were there before provision are never published.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import RedisAccount
from tests.helpers import TenantClient, make_tenant
from tests.integration.test_adopt_table import INSERT, debezium_database
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

KEYS = ("order-1", "order-2", "order-3", "customer-9")


async def test_an_adopted_debezium_outbox_is_relayed_in_key_order(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    worker_pool: WorkerPool,
) -> None:
    t: TenantClient = await make_tenant(client, "adopt_e2e")
    db_name = await debezium_database(databases, "adopt_e2e")
    dsn = pg_dsn(db_name)
    body = {"dsn": dsn, "table": {"name": "outbox", "schema": "public"}}  # Debezium's column names
    assert (await t.put("/v1/databases/app", body)).status_code == 201
    r = await t.post("/v1/databases/app/provision")
    assert r.status_code == 200, r.text
    target = {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    assert (await t.put("/v1/targets/stream", target)).status_code == 201
    prefix = redis_account.prefix
    relay = {
        "database": "app",
        "target": "stream",
        "topic_mapping": {"*": prefix + "{topic}"},
        "partitions": 4,
        "policy": {"batch_size": 8, "poll_interval_ms": 200},
    }
    assert (await t.put("/v1/relays/adopted", relay)).status_code == 201
    worker_pool.start()

    written: dict[uuid.UUID, tuple[str, str, str, dict[str, Any]]] = {}
    rolled_back: list[uuid.UUID] = []
    conn = await asyncpg.connect(dsn)
    try:
        n = 0
        for round_ in range(12):  # transactions of several rows over several keys
            async with conn.transaction():
                for key in KEYS:
                    topic = "customer" if key.startswith("customer") else "order"
                    message_id, payload = uuid.uuid4(), {"key": key, "n": n, "note": "ünïcode"}
                    await conn.execute(INSERT, message_id, topic, key, f"Event{round_}", json.dumps(payload))
                    written[message_id] = (topic, key, f"Event{round_}", payload)
                    n += 1
            if round_ == 5:  # the application's transaction fails after its insert
                with pytest.raises(RuntimeError):
                    async with conn.transaction():
                        rolled_back.append(uuid.uuid4())
                        await conn.execute(INSERT, rolled_back[-1], "order", "order-1", "Lost", "{}")
                        raise RuntimeError("rolled back")
    finally:
        await conn.close()

    redis = aioredis.Redis.from_url(redis_account.admin_url)
    try:
        entries: dict[str, list[dict[bytes, bytes]]] = {}
        deadline = time.monotonic() + 90  # a bound on the wait, not an assertion about speed
        while time.monotonic() < deadline:
            entries = {s: [f for _, f in await redis.xrange(prefix + s)] for s in ("order", "customer")}
            if sum(map(len, entries.values())) >= len(written):
                break
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()
    status = (await t.get("/v1/relays/adopted/status")).json()
    received = {s: [uuid.UUID(f[b"outbox-id"].decode()) for f in fs] for s, fs in entries.items()}
    assert sum(map(len, received.values())) == len(written), (status, worker_pool.logs())

    every = [i for ids in received.values() for i in ids]
    assert len(every) == len(set(every)), "no duplicates"
    assert set(every) == set(written), "every committed row after provision, and none of the old ones"
    assert not set(rolled_back) & set(every), "a rolled-back insert is never published"
    for stream, fields_list in entries.items():
        for fields in fields_list:
            topic, key, event_type, payload = written[uuid.UUID(fields[b"outbox-id"].decode())]
            assert stream == topic
            assert fields[b"key"].decode() == key
            assert fields[b"h:eventType"].decode() == event_type
            assert fields[b"h:outbox-topic"].decode() == topic
            assert json.loads(fields[b"payload"]) == payload
        # per-key order: each key's messages in the order the application wrote them
        by_key: dict[str, list[int]] = {}
        for fields in fields_list:
            _, key, _, payload = written[uuid.UUID(fields[b"outbox-id"].decode())]
            by_key.setdefault(key, []).append(payload["n"])
        for key, ns in by_key.items():
            assert ns == sorted(ns), (key, ns)
    assert (await t.delete("/v1/relays/adopted")).status_code == 204
