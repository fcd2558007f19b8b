"""Several real worker processes share the relays' partitions through leases.

* Three workers spread 8 partitions among them, then relay 2,000 messages: every committed message
  arrives once, in per-key order, and more than one worker did the work.
* A worker frozen with SIGSTOP past its lease loses the partition to another worker; once it is
  continued it cannot move the cursor it lost (every cursor write is fenced by the lease epoch),
  and nothing is lost.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import RedisAccount, free_port
from tests.helpers import TenantClient, make_tenant
from tests.traffic import check_delivery, write_messages
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e


async def configure(
    client: AsyncTestClient[Any], databases: DatabaseFactory, redis_account: RedisAccount, partitions: int, tag: str
) -> tuple[TenantClient, str, str]:
    t = await make_tenant(client, tag)
    app_db = await databases.create(tag)
    stream = f"{redis_account.prefix}{tag}"
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(app_db)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    r = await t.put(
        "/v1/targets/stream", {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    )
    assert r.status_code == 201
    body = {
        "database": "app",
        "target": "stream",
        "partitions": partitions,
        "topic_mapping": {"*": stream},
        "policy": {"batch_size": 50, "poll_interval_ms": 100},
    }
    assert (await t.put("/v1/relays/events", body)).status_code == 201
    return t, app_db, stream


async def read_stream(redis: aioredis.Redis, stream: str, want: int, timeout_s: float) -> list[tuple[str, uuid.UUID]]:
    """Read until ``want`` entries arrived (then one more second, for duplicates) or the timeout."""
    received: list[tuple[str, uuid.UUID]] = []
    last = "0-0"
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    while time.monotonic() < (settle_until or deadline):
        entries = await redis.xread({stream: last}, count=1000, block=200)
        for _, items in entries:
            for entry_id, fields in items:
                last = entry_id.decode()
                received.append((fields[b"key"].decode(), uuid.UUID(fields[b"outbox-id"].decode())))
        if settle_until is None and len(received) >= want:
            settle_until = time.monotonic() + 1.0
    return received


async def holders(control_dsn: str) -> set[str]:
    conn = await asyncpg.connect(control_dsn)
    try:
        rows = await conn.fetch("SELECT lease_holder FROM relay_partitions WHERE lease_holder IS NOT NULL")
        return {r["lease_holder"].split("/")[0] for r in rows}
    finally:
        await conn.close()


async def test_three_workers_share_partitions_without_duplicates(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    worker_pool: WorkerPool,
    settings: Settings,
) -> None:
    tenant, app_db, stream = await configure(client, databases, redis_account, 8, "scale")
    metrics_ports = [free_port() for _ in range(3)]
    for port in metrics_ports:  # each exposes its metrics: the relay's partitions spread over all three
        worker_pool.start(slice_s=2, metrics_port=port)
    seen_holders: set[str] = set()

    async def watch() -> None:
        while True:
            seen_holders.update(await holders(settings.database_url))
            await asyncio.sleep(0.2)

    # the first worker up claims all 8; the others' shares come to them within two lease TTLs of
    # joining. Write only once all three hold some (the whole drain takes under a second, shorter
    # than the workers' start-up, so writing at once would often leave it all to the first).
    deadline = time.monotonic() + 20 + 2 * settings.lease_ttl_s
    while len(current := await holders(settings.database_url)) < 3:
        assert time.monotonic() < deadline, f"partitions never spread over three workers: {current}"
        await asyncio.sleep(0.2)
    watcher = asyncio.create_task(watch())
    committed, rolled_back = await write_messages(pg_dsn(app_db), seed=11, messages=2000, keys=200, writers=4)
    total = sum(len(v) for v in committed.values())
    redis = aioredis.Redis.from_url(redis_account.admin_url)
    try:
        received = await read_stream(redis, stream, total, timeout_s=90)
    finally:
        watcher.cancel()
        await redis.aclose()
    assert len(received) >= total, worker_pool.logs()
    check_delivery("redis", received, committed, rolled_back)
    assert len(seen_holders) >= 2, f"only {seen_holders} held partitions"
    async with httpx.AsyncClient() as http:
        scraped = [(await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text for port in metrics_ports]
    sent = [line for text in scraped for line in text.splitlines() if line.startswith("outbox_messages_sent_total{")]
    assert sum(any('relay="events"' in line for line in text.splitlines()) for text in scraped) >= 2, sent
    assert (await tenant.delete("/v1/relays/events")).status_code == 204  # later tests' workers skip it


async def test_a_frozen_worker_cannot_move_a_cursor_it_lost(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    worker_pool: WorkerPool,
    settings: Settings,
) -> None:
    tenant, app_db, stream = await configure(client, databases, redis_account, 1, "frozen")
    control = await asyncpg.connect(settings.database_url)
    relay_id: uuid.UUID = await control.fetchval(
        "SELECT r.id FROM relays r JOIN tenants t ON t.id = r.tenant_id WHERE t.name LIKE 'frozen-%' "
        "ORDER BY r.created_at DESC LIMIT 1"
    )

    async def lease() -> asyncpg.Record:
        row = await control.fetchrow(
            "SELECT lease_holder, lease_epoch, cursor_txid, cursor_id FROM relay_partitions WHERE relay_id = $1",
            relay_id,
        )
        assert row is not None
        return row

    frozen = worker_pool.start(slice_s=30, lease_ttl_s=2)
    try:
        # the first worker takes the partition and relays a first batch
        first, _ = await write_messages(pg_dsn(app_db), seed=1, messages=50, keys=5, writers=1, rollback_share=0)
        deadline = time.monotonic() + 30
        while (await lease())["cursor_id"] == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        before = await lease()
        assert before["lease_holder"].startswith(frozen.name), before

        os.kill(frozen.pid, signal.SIGSTOP)
        rescuer = worker_pool.start(slice_s=2, lease_ttl_s=2)
        second, _ = await write_messages(pg_dsn(app_db), seed=2, messages=50, keys=5, writers=1, rollback_share=0)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            now = await lease()
            if now["lease_epoch"] > before["lease_epoch"] and now["cursor_id"] > before["cursor_id"]:
                break
            await asyncio.sleep(0.2)
        taken = await lease()
        assert taken["lease_epoch"] > before["lease_epoch"], "the lease was not taken over"
        assert not (taken["lease_holder"] or "").startswith(frozen.name)

        # stop the rescuer, then wake the frozen worker: it still believes it holds epoch N
        rescuer.stop()
        cursor_after_rescue = (await lease())["cursor_txid"], (await lease())["cursor_id"]
        os.kill(frozen.pid, signal.SIGCONT)
        await asyncio.sleep(3)
        log = frozen.log()
        assert "lease lost" in log, log[-3000:]
        now = await lease()
        assert (now["cursor_txid"], now["cursor_id"]) >= cursor_after_rescue  # never moved back

        committed = {k: first.get(k, []) + second.get(k, []) for k in set(first) | set(second)}
        total = sum(len(v) for v in committed.values())
        redis = aioredis.Redis.from_url(redis_account.admin_url)
        try:
            received = await read_stream(redis, stream, total, timeout_s=60)
        finally:
            await redis.aclose()
        ids = {i for _, i in received}
        assert ids == {i for v in committed.values() for i in v}, "messages were lost"
        assert (await tenant.delete("/v1/relays/events")).status_code == 204
    finally:
        if frozen.process is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        await control.close()
