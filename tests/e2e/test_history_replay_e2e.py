"""Replay from history end to end, through a real worker process and Redis Streams: rows are written and
delivered by the relay; then a time range and an id range of them are replayed. The replayed messages
arrive in outbox order with ``outbox-replay: <job id>``; the relay's cursors and counts are not touched
by a replay; and live rows written while a replay runs are delivered as ever, once each, in order per
key, beside the replayed ones."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from datetime import datetime
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

KEYS = 7
WAIT_S = 120.0
"""A bound on every wait, not an assertion about speed."""


class Outbox:
    """The tenant database's writer: row ``i`` has key ``key-{i % KEYS}`` and payload ``{"n": i}``."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.written = 0

    async def write(self, transactions: int, per_transaction: int) -> None:
        for _ in range(transactions):
            async with self.conn.transaction():
                for _ in range(per_transaction):
                    i = self.written
                    await add(self.conn, "orders", f"key-{i % KEYS}", {"n": i})
                    self.written += 1

    async def now(self) -> datetime:
        value: datetime = await self.conn.fetchval("SELECT clock_timestamp()")
        return value

    async def rows(self) -> list[asyncpg.Record]:
        """Every row, in outbox order (one writer: also write order)."""
        return await self.conn.fetch(
            "SELECT id, message_id::text AS message_id, created_at FROM outbox_relay.outbox ORDER BY txid, id"
        )

    async def last_per_partition(self) -> dict[int, str]:
        rows = await self.conn.fetch(
            "SELECT DISTINCT ON (bucket % 2) bucket % 2 AS partition, txid::text AS txid, id "
            "FROM outbox_relay.outbox ORDER BY bucket % 2, txid DESC, id DESC"
        )
        return {r["partition"]: f"{r['txid']}:{r['id']}" for r in rows}


async def delivered(t: TenantClient, outbox: Outbox, workers: WorkerPool) -> dict[str, Any]:
    """The relay's status once its cursors passed every row written so far."""
    last = await outbox.last_per_partition()
    deadline = time.monotonic() + WAIT_S
    while True:
        status: dict[str, Any] = (await t.get("/v1/relays/shop/status")).json()
        if {p["partition"]: p["cursor"] for p in status["partitions"]} == last:
            return status
        assert time.monotonic() < deadline, (status, last, workers.logs())
        await asyncio.sleep(0.2)


async def finished(t: TenantClient, job_id: str, workers: WorkerPool) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        job: dict[str, Any] = (await t.get(f"/v1/dead-letters/replay-jobs/{job_id}")).json()
        if job["status"] in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, (job, workers.logs())
        await asyncio.sleep(0.1)


def cursors(status: dict[str, Any]) -> dict[int, str]:
    return {p["partition"]: p["cursor"] for p in status["partitions"]}


async def test_replay_a_time_range_and_an_id_range_beside_the_live_stream(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    worker_pool: WorkerPool,
    control_dsn: str,
) -> None:
    t = await make_tenant(client, "history")
    app_db = await databases.create("history_app")
    stream = f"{redis_account.prefix}history"
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(app_db)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    assert (await t.put("/v1/targets/stream", target)).status_code == 201
    relay = {
        "database": "app",
        "target": "stream",
        "topic_mapping": {"*": stream},
        "partitions": 2,
        "policy": {"batch_size": 50, "poll_interval_ms": 200},
    }
    assert (await t.put("/v1/relays/shop", relay)).status_code == 201

    conn = await asyncpg.connect(pg_dsn(app_db))
    redis = aioredis.Redis.from_url(redis_account.admin_url)
    try:
        outbox = Outbox(conn)
        await outbox.write(10, 10)  # rows 0-99
        t1 = await outbox.now()
        await outbox.write(10, 10)  # rows 100-199: the time range
        t2 = await outbox.now()
        await outbox.write(15, 100)  # rows 200-1699: the id range
        history = await outbox.rows()
        assert len(history) == 1700

        worker_pool.start()
        before = await delivered(t, outbox, worker_pool)
        assert before["published"] == 1700

        # --- a time range: rows 100-199, in order, each with the job's id; the relay untouched
        r = await t.post("/v1/relays/shop/replays", {"inserted_at": {"from": t1.isoformat(), "to": t2.isoformat()}})
        assert r.status_code == 202, r.text
        first = await finished(t, r.json()["id"], worker_pool)
        assert (first["status"], first["kind"], first["total"]) == ("done", "history", 100), first
        assert (first["replayed"], first["failed"], first["skipped"], first["remaining"]) == (100, 0, 0, 0), first
        entries = await redis.xrange(stream)
        assert replayed_ids(entries, first["id"]) == [row["message_id"] for row in history[100:200]]
        after_first = (await t.get("/v1/relays/shop/status")).json()
        assert cursors(after_first) == cursors(before), "a replay never moves the live cursor"
        assert after_first["published"] == 1700, "nor counts as the relay's own delivery"

        # --- an id range of 1500 rows, while live rows keep being written (from before it is asked
        # for until after it is done, so they straddle it)
        await outbox.write(1, 5)
        ids = {"from": history[200]["id"], "to": history[1699]["id"]}
        r = await t.post("/v1/relays/shop/replays", {"ids": ids})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        while (await t.get(f"/v1/dead-letters/replay-jobs/{job_id}")).json()["status"] not in ("done", "failed"):
            await outbox.write(1, 5)
            await asyncio.sleep(0.02)
        await outbox.write(1, 5)
        second = await finished(t, job_id, worker_pool)
        assert (second["status"], second["total"], second["replayed"], second["failed"]) == ("done", 1500, 1500, 0)
        live = (await outbox.rows())[1700:]
        started, ended = (datetime.fromisoformat(second[k]) for k in ("started_at", "finished_at"))
        assert live[0]["created_at"] < started <= ended < live[-1]["created_at"], "live rows straddle the replay"
        after = await delivered(t, outbox, worker_pool)
        assert after["published"] == outbox.written == 1700 + len(live), "each live row published once"

        entries = await redis.xrange(stream)
        assert replayed_ids(entries, job_id) == [row["message_id"] for row in history[200:1700]]
        # the live stream: every row exactly once, without the header, in write order per key
        everything = await outbox.rows()
        live_ids = [fields[b"outbox-id"].decode() for _, fields in entries if b"h:outbox-replay" not in fields]
        assert sorted(live_ids) == sorted(row["message_id"] for row in everything), "each row once, live"
        assert per_key(entries, live_only=True) == per_key_written(outbox.written)
        took = (ended - started).total_seconds()
        print(f"\nreplayed {second['replayed']} rows in {took:.2f} s; {len(live)} live rows written meanwhile")

        # both ends in the audit log, as the dead-letter jobs' are
        control = await asyncpg.connect(control_dsn)
        try:
            audit = await control.fetch(
                "SELECT action, detail::text AS detail FROM audit_log WHERE resource = $1 ORDER BY id",
                f"relays/shop/replays/{job_id}",
            )
        finally:
            await control.close()
        assert [a["action"] for a in audit] == ["replay", "replay-finished"]
        assert json.loads(audit[1]["detail"])["replayed"] == 1500
    finally:
        await redis.aclose()
        await conn.close()
    assert (await t.delete("/v1/relays/shop")).status_code == 204


def replayed_ids(entries: list[Any], job_id: str) -> list[str]:
    """The ``outbox-id`` of the stream's entries a replay job sent, in stream order."""
    return [fields[b"outbox-id"].decode() for _, fields in entries if fields.get(b"h:outbox-replay") == job_id.encode()]


def per_key(entries: list[Any], *, live_only: bool) -> dict[str, list[int]]:
    """The payloads' ``n`` per key, in stream order."""
    out: dict[str, list[int]] = defaultdict(list)
    for _, fields in entries:
        if live_only and b"h:outbox-replay" in fields:
            continue
        out[fields[b"key"].decode()].append(json.loads(fields[b"payload"])["n"])
    return dict(out)


def per_key_written(n: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        out[f"key-{i % KEYS}"].append(i)
    return dict(out)
