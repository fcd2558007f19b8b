"""A relay with a filter, end to end through a real worker process: exactly the rows that match
reach Redis, the cursor passes the others, and the relay's status counts them as ``filtered``
(rows the topic mapping does not route are not counted there).

The expected set is computed here in plain Python, independently of ``outbox_relay.filters``."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from outbox_relay.client import add
from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import RedisAccount
from tests.helpers import TenantClient, make_tenant
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

ROWS = 120
TOPICS = ("orders.created", "orders.cancelled", "audit", "users")
"""``users`` is not routed by the topic mapping; the others are."""
COUNTRIES = ("DE", "US", "FR", None)
FILTER = {
    "all": [
        {"not": {"topic": {"eq": "audit"}}},
        {"any": [{"payload": "country", "in": ["DE", "FR"]}, {"header": "vip", "eq": "yes"}]},
        {"not": {"header": "x-test", "exists": True}},
    ]
}


def row(i: int) -> tuple[str, Any, dict[str, str]]:
    """Row ``i``'s topic, payload (every seventh not JSON) and headers."""
    topic = TOPICS[i % len(TOPICS)]
    country = COUNTRIES[(i // len(TOPICS)) % len(COUNTRIES)]
    payload: Any = b"\x00not json" if i % 7 == 0 else {"n": i, "country": country}
    headers = {"writer": "e2e"}
    if i % 5 == 0:
        headers["vip"] = "yes"
    if i % 11 == 0:
        headers["x-test"] = "1"
    return topic, payload, headers


def matches(i: int) -> bool:
    topic, payload, headers = row(i)
    country_ok = isinstance(payload, dict) and payload["country"] in ("DE", "FR")
    return topic != "audit" and (country_ok or headers.get("vip") == "yes") and "x-test" not in headers


async def test_a_filtered_relay_publishes_exactly_the_matching_rows(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    worker_pool: WorkerPool,
) -> None:
    t: TenantClient = await make_tenant(client, "filters")
    app_db = await databases.create("filters_app")
    stream = f"{redis_account.prefix}filtered"
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(app_db)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    assert (await t.put("/v1/targets/stream", target)).status_code == 201
    body = {
        "database": "app",
        "target": "stream",
        "topic_mapping": {"orders.created": stream, "orders.cancelled": stream, "audit": stream},
        "partitions": 2,
        "filter": FILTER,
        "policy": {"batch_size": 16, "poll_interval_ms": 200},
    }
    r = await t.put("/v1/relays/filtered", body)
    assert r.status_code == 201, r.text

    ids: dict[int, uuid.UUID] = {}
    conn = await asyncpg.connect(pg_dsn(app_db))
    try:
        for start in range(0, ROWS, 10):  # a few transactions, so batches mix matching and filtered rows
            async with conn.transaction():
                for i in range(start, start + 10):
                    topic, payload, headers = row(i)
                    ids[i] = await add(conn, topic, f"key-{i % 6}", payload, headers=headers)
        last = await conn.fetch(
            "SELECT DISTINCT ON (bucket % 2) bucket % 2 AS partition, txid::text AS txid, id "
            "FROM outbox_relay.outbox ORDER BY bucket % 2, txid DESC, id DESC"
        )
    finally:
        await conn.close()
    last_rows = {r["partition"]: f"{r['txid']}:{r['id']}" for r in last}
    routed = [i for i in range(ROWS) if TOPICS[i % len(TOPICS)] != "users"]
    expected = {ids[i] for i in routed if matches(i)}
    filtered_out = len(routed) - len(expected)
    assert 0 < len(expected) < len(routed), "the data set must have rows on both sides of the filter"

    worker_pool.start()
    deadline = time.monotonic() + 90  # a bound on the wait, not an assertion about speed
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = (await t.get("/v1/relays/filtered/status")).json()
        cursors = {p["partition"]: p["cursor"] for p in status["partitions"]}
        if cursors == last_rows:
            break
        await asyncio.sleep(0.2)
    # the cursor passed every row, the filtered and the unrouted ones included
    assert {p["partition"]: p["cursor"] for p in status["partitions"]} == last_rows, (status, worker_pool.logs())
    assert (status["published"], status["filtered"]) == (len(expected), filtered_out), status
    assert sum(p["filtered"] for p in status["partitions"]) == filtered_out

    redis = aioredis.Redis.from_url(redis_account.admin_url)
    try:
        entries = await redis.xrange(stream)
    finally:
        await redis.aclose()
    received = [uuid.UUID(fields[b"outbox-id"].decode()) for _, fields in entries]
    assert len(received) == len(set(received)), "no duplicates"
    assert set(received) == expected
    assert (await t.delete("/v1/relays/filtered")).status_code == 204
