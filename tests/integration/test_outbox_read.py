"""The write-free read on a real tenant database: committed rows only, in order, never behind the cursor."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from outbox_relay.client import add
from outbox_relay.tenant import db as tenant_db
from outbox_relay.tenant import sql
from outbox_relay.tenant.sql import BUCKETS
from tests.conftest import DatabaseFactory, pg_dsn


@pytest.fixture
async def app_dsn(databases: DatabaseFactory) -> AsyncIterator[str]:
    dsn = pg_dsn(await databases.create("outbox"))
    conn = await asyncpg.connect(dsn)
    try:
        assert await tenant_db.provision(conn, "outbox_relay") == 2
        assert await tenant_db.provision(conn, "outbox_relay") == 2  # re-applying is harmless
    finally:
        await conn.close()
    yield dsn


async def read_all(conn: asyncpg.Connection, cursor: tuple[int, int] = (0, 0)) -> list[tenant_db.OutboxRow]:
    return await tenant_db.poll(conn, "outbox_relay", cursor=cursor, partitions=1, partition=0, limit=1000)


def ids(rows: list[tenant_db.OutboxRow]) -> list[uuid.UUID]:
    return [uuid.UUID(r.message_id) for r in rows]


async def test_only_committed_rows_and_nothing_behind_an_open_transaction(app_dsn: str) -> None:
    writer, late, reader = [await asyncpg.connect(app_dsn) for _ in range(3)]
    try:
        async with writer.transaction():
            first = await add(writer, "t", "k", b"one")
        # the horizon is server-wide: a transaction in another database (another test run) can hold
        # it for a moment, so wait until the committed row is readable before opening ours
        for _ in range(100):
            if await read_all(reader):
                break
            await asyncio.sleep(0.1)
        rolled = writer.transaction()
        await rolled.start()
        await add(writer, "t", "k", b"never")
        await rolled.rollback()

        # a transaction that started writing earlier and commits later holds the horizon:
        # rows committed after it began stay invisible until it ends, so none is skipped
        open_tx = late.transaction()
        await open_tx.start()
        early = await add(late, "t", "k2", b"early-but-slow")
        async with writer.transaction():
            after = await add(writer, "t", "k", b"two")
        rows = await read_all(reader)
        assert ids(rows) == [first]

        await open_tx.commit()
        for _ in range(100):
            rows = await read_all(reader)
            if len(rows) == 3:
                break
            await asyncio.sleep(0.1)
        assert ids(rows) == [first, early, after]
        assert rows[0].payload == b"one" and rows[1].key == "k2"

        # resuming from a cursor returns what comes after it, and nothing else
        assert ids(await read_all(reader, (rows[1].txid, rows[1].id))) == [after]
        assert await read_all(reader, (rows[2].txid, rows[2].id)) == []
    finally:
        for c in (writer, late, reader):
            await c.close()


async def test_partitions_split_keys_and_cover_everything(app_dsn: str) -> None:
    conn = await asyncpg.connect(app_dsn)
    try:
        async with conn.transaction():
            ids = {await add(conn, "t", f"key-{i % 40}", b"x") for i in range(200)}
            ids |= {await add(conn, "t", None, b"keyless") for _ in range(20)}
        seen: dict[uuid.UUID, int] = {}
        keys_at: dict[str, int] = {}
        for p in range(4):
            rows = await tenant_db.poll(conn, "outbox_relay", cursor=(0, 0), partitions=4, partition=p, limit=1000)
            for r in rows:
                assert uuid.UUID(r.message_id) not in seen
                seen[uuid.UUID(r.message_id)] = p
                if r.key is not None:
                    assert keys_at.setdefault(r.key, p) == p  # one key, one partition
        assert set(seen) == ids
        assert len(set(keys_at.values())) == 4  # 40 keys over 4 partitions use them all
        buckets = await conn.fetchval("SELECT max(bucket) FROM outbox_relay.outbox")
        assert 0 <= buckets < BUCKETS
    finally:
        await conn.close()


async def test_the_poll_walks_the_txid_index_instead_of_sorting(app_dsn: str) -> None:
    """A poll must read the next rows off the (txid, id) index, not sort the whole backlog.

    Ordering by the select list's ``txid`` (a bigint expression) once made PostgreSQL sort every
    row after the cursor on each poll: 10-126 ms per poll on a busy outbox instead of ~1 ms.
    """
    conn = await asyncpg.connect(app_dsn)
    try:
        for _ in range(5):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO outbox_relay.outbox (topic, key, payload) "
                    "SELECT 't', (g % 100)::text, 'x' FROM generate_series(1, 1000) AS g"
                )
        await conn.execute("ANALYZE outbox_relay.outbox")
        # with sorting priced out, the planner sorts only if no index can give the order
        await conn.execute("SET enable_sort = off")
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + sql.poll_sql("outbox_relay"), 0, 0, 16, 3, 500, 0, tenant_db.NO_FENCE_AT
        )
        nodes = []
        stack = [json.loads(plan)[0]["Plan"] if isinstance(plan, str) else plan[0]["Plan"]]
        while stack:
            node = stack.pop()
            nodes.append(node["Node Type"])
            stack.extend(node.get("Plans", []))
        assert "Sort" not in nodes, nodes
        assert any(n.startswith("Index") for n in nodes), nodes
        rows = await tenant_db.poll(conn, "outbox_relay", cursor=(0, 0), partitions=16, partition=3, limit=200)
        assert len(rows) == 200
        assert [(r.txid, r.id) for r in rows] == sorted((r.txid, r.id) for r in rows)
    finally:
        await conn.close()


def _nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    out = [plan]
    for child in plan.get("Plans", []):  # type: ignore[union-attr]
        out += _nodes(child)  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("shape", ["one big transaction", "many transactions"])
async def test_the_relay_read_sorts_no_backlog_whatever_its_shape(app_dsn: str, shape: str) -> None:
    """The fleet's read (``scan_sql``) from a cursor in the middle of a large backlog: index range
    scans in order (Merge Append), stopped at the limit; the only sort merges the two limited branches
    (at most 2 x limit rows), never the rows after the cursor. Before, one row comparison
    ``(txid, id) > (t, i)`` was estimated at one row when a transaction wrote many rows, and the
    planner sorted the whole backlog for every poll."""
    conn = await asyncpg.connect(app_dsn)
    try:
        insert = (
            "INSERT INTO outbox_relay.outbox (topic, key, payload) "
            "SELECT 't', 'k' || (g % 500), 'x' FROM generate_series(1, $1::int) g"
        )
        if shape == "one big transaction":
            await conn.execute(insert, 40_000)
        else:
            for _ in range(80):
                await conn.execute(insert, 500)
        await conn.execute("ANALYZE outbox_relay.outbox")
        txid, row_id = await conn.fetchrow(
            "SELECT txid::text::bigint, id FROM outbox_relay.outbox ORDER BY txid, id OFFSET 20000 LIMIT 1"
        )
        limit = 100
        for wanted in (None, [0, 3, 5]):
            for _ in range(7):  # past the point where PostgreSQL may switch to a generic plan
                statement = await conn.prepare("EXPLAIN (FORMAT JSON, ANALYZE) " + sql.scan_sql("outbox_relay"))
                (plan_json,) = (await statement.fetchrow(txid, row_id, 16, wanted, limit)) or ()
            plan = json.loads(plan_json)[0]["Plan"]
            nodes = _nodes(plan)
            kinds = {str(n["Node Type"]) for n in nodes}
            # a sequential scan only of an empty partition (tomorrow's), which reads nothing
            scans = [n for n in nodes if n["Node Type"] == "Seq Scan"]
            assert all(n["Actual Rows"] == 0 and not n.get("Rows Removed by Filter") for n in scans), scans
            assert "Merge Append" in kinds, plan
            for node in nodes:
                if node["Node Type"] == "Sort":
                    assert int(node["Actual Rows"]) <= 2 * limit, node  # type: ignore[call-overload]
                if str(node["Node Type"]).startswith("Index"):  # read ahead by Merge Append, not the backlog
                    assert int(node["Actual Rows"]) <= 2 * limit, node  # type: ignore[call-overload]
            rows = await tenant_db.scan(
                conn, "outbox_relay", after=(txid, row_id), partitions=16, wanted=wanted, limit=limit
            )
            assert len(rows) == limit
            positions = [(r.txid, r.id) for _, r in rows]
            assert positions == sorted(positions) and positions[0] > (txid, row_id)
            assert wanted is None or {p for p, _ in rows} <= set(wanted)
    finally:
        await conn.close()
