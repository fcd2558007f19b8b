"""Outbox maintenance on a real tenant database: partitions ahead, passed partitions dropped, nothing
dropped that a relay still needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from outbox_relay.maintenance import DAYS_AHEAD, RelayCursors, maintain
from outbox_relay.tenant import db as tenant_db
from tests.conftest import DatabaseFactory, pg_dsn


async def partitions(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'outbox_relay.outbox'::regclass ORDER BY 1"
    )
    return [r["relname"] for r in rows]


async def old_partition(conn: asyncpg.Connection, days_ago: int) -> str:
    day = (datetime.now(UTC) - timedelta(days=days_ago)).date()
    name = f"outbox_{day:%Y%m%d}"
    await conn.execute(
        f"CREATE TABLE outbox_relay.{name} PARTITION OF outbox_relay.outbox "
        f"FOR VALUES FROM ('{day}T00:00:00Z') TO ('{day + timedelta(days=1)}T00:00:00Z')"
    )
    return name


async def test_maintenance_drops_only_what_every_relay_has_passed(databases: DatabaseFactory) -> None:
    conn = await asyncpg.connect(pg_dsn(await databases.create("maint")))
    try:
        await tenant_db.provision(conn, "outbox_relay")
        today = datetime.now(UTC).date()
        assert f"outbox_{today + timedelta(days=DAYS_AHEAD):%Y%m%d}" in await partitions(conn)

        passed = await old_partition(conn, 20)
        pending = await old_partition(conn, 10)
        young = await old_partition(conn, 2)
        rows = {}
        for name, days in ((passed, 20), (pending, 10), (young, 2)):
            rows[name] = await conn.fetchrow(
                "INSERT INTO outbox_relay.outbox (topic, key, payload, created_at) "
                "VALUES ('t', $1, 'x', now() - make_interval(days => $2)) RETURNING txid::text::bigint AS txid, id",
                f"key-{days}",
                days,
            )
        # relay A (4 partitions) has passed everything but the row in `pending`
        pending_bucket = await conn.fetchval(
            "SELECT bucket FROM outbox_relay.outbox WHERE id = $1", rows[pending]["id"]
        )
        everything = (rows[young]["txid"], rows[young]["id"])
        cursors_a = {p: everything for p in range(4)}
        before_pending = (rows[pending]["txid"], rows[pending]["id"] - 1)
        cursors_a[pending_bucket % 4] = before_pending
        relay_a = RelayCursors(partitions=4, retention_hours=24 * 7, cursors=cursors_a)
        relay_b = RelayCursors(partitions=1, retention_hours=24, cursors={0: everything})

        result = await maintain(conn, "outbox_relay", [relay_a, relay_b])
        assert result.locked and result.dropped == [passed]
        assert pending in result.kept and young not in result.kept  # young: inside the retention
        names = await partitions(conn)
        assert passed not in names and pending in names and young in names and "outbox_default" in names

        # once relay A's cursor passes the row, its partition goes too
        cursors_a[pending_bucket % 4] = everything
        result = await maintain(conn, "outbox_relay", [relay_a, relay_b])
        assert result.dropped == [pending]
        assert await conn.fetchval("SELECT count(*) FROM outbox_relay.outbox") == 1

        # no relays: nothing is dropped, partitions are still made ahead
        assert (await maintain(conn, "outbox_relay", [])).dropped == []
    finally:
        await conn.close()


async def test_one_maintainer_at_a_time(databases: DatabaseFactory) -> None:
    dsn = pg_dsn(await databases.create("maint"))
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await tenant_db.provision(first, "outbox_relay")
        await first.execute("SELECT pg_advisory_lock(hashtext('outbox_relay.maintenance.outbox_relay'))")
        assert (await maintain(second, "outbox_relay", [])).locked is False
    finally:
        await first.close()
        await second.close()
