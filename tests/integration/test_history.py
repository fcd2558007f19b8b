"""The replay from history's reads and publishing (outbox_relay.history) on a real tenant database and a
real Redis: the range is the rows the asking snapshot saw committed (a transaction open then stays out
even once it commits, as do rows committed after), rows dropped after the count are counted as skipped,
and what is published carries ``outbox-replay`` in outbox order."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from outbox_relay import history
from outbox_relay.brokers.redis_streams import RedisStreamsPublisher
from outbox_relay.client import add
from outbox_relay.domain import Relay
from outbox_relay.replay import JobCounts
from outbox_relay.tenant import db as tenant_db
from tests.conftest import DatabaseFactory, pg_dsn
from tests.helpers import LOCAL

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def outbox(databases: DatabaseFactory) -> AsyncIterator[str]:
    dsn = pg_dsn(await databases.create("history"))
    conn = await asyncpg.connect(dsn)
    try:
        await tenant_db.provision(conn, "outbox_relay")
    finally:
        await conn.close()
    yield dsn


async def write(conn: asyncpg.Connection, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        await add(conn, "orders", f"k{i % 3}", {"n": i})


async def test_the_range_is_what_the_snapshot_saw_and_dropped_rows_count_as_skipped(outbox: str) -> None:
    writer, late, reader = [await asyncpg.connect(outbox) for _ in range(3)]
    stream = f"it:history:{uuid.uuid4().hex}"
    client = aioredis.Redis.from_url(REDIS)
    try:
        await write(writer, 10)  # rows n=0..9, committed
        open_tx = late.transaction()
        await open_tx.start()
        await write(late, 2, first=100)  # open while the replay is asked for: never part of it
        spec = msgspec.convert({"ids": {"from": 1, "to": 1000}}, history.HistorySpec)
        spec.snapshot = await tenant_db.snapshot(reader)
        await write(writer, 3, first=10)  # committed after the snapshot: not part of it either
        await open_tx.commit()
        by, low, high = spec.bounds()
        spec.in_range = await tenant_db.history_count(reader, "outbox_relay", by, low, high, seen=spec.snapshot, cap=99)
        assert spec.in_range == 10
        # two of the ten go before the job reads them (as maintenance dropping their day would)
        await writer.execute(
            "DELETE FROM outbox_relay.outbox WHERE payload = ANY($1::bytea[])", [b'{"n":3}', b'{"n":4}']
        )

        spec_of_relay = {"database": "d", "target": "t", "topic_mapping": {"*": stream}, "policy": {"batch_size": 3}}
        relay = msgspec.convert(spec_of_relay, Relay)
        reports: list[tuple[int, int]] = []

        async def progress(counts: JobCounts) -> None:
            reports.append((counts.replayed, counts.skipped))

        job_id = uuid.uuid4()
        layout = await tenant_db.read_layout(reader, "outbox_relay")
        async with RedisStreamsPublisher(url=REDIS, policy=LOCAL) as publisher:
            counts = await history.replay(
                reader,
                "outbox_relay",
                layout,
                spec,
                history.Selection.of(relay, "r", spec),
                publisher,
                job_id=job_id,
                target_name="t",
                progress=progress,
            )
        assert (counts.replayed, counts.failed, counts.skipped, counts.stopped) == (8, 0, 2, None)
        assert reports[-1] == (8, 2), "the last report has the final counts"
        entries = await client.xrange(stream)
        got = [msgspec.json.decode(fields[b"payload"])["n"] for _, fields in entries]
        assert got == [0, 1, 2, 5, 6, 7, 8, 9]
        assert {fields[b"h:outbox-replay"] for _, fields in entries} == {str(job_id).encode()}
        assert {fields[b"h:outbox-relay"] for _, fields in entries} == {b"r"}
    finally:
        await client.delete(stream)
        await client.aclose()
        for conn in (writer, late, reader):
            await conn.close()
