"""Outbox maintenance in a tenant database: create daily partitions ahead, drop the ones every relay
has passed. The relay never updates or deletes rows; this is how old rows go away, without bloat.

A partition is dropped only when (1) its day ended longer ago than the longest retention of the
relays reading the database, and (2) no row in it lies after the cursor of the relay partition it
belongs to, for every relay. The check is repeated under an exclusive lock on the outbox (with a
short lock timeout), so a transaction still inserting into the partition either finished first, and
its rows are seen, or makes the drop give up until next time. A database without relays keeps
everything. One maintainer at a time per tenant schema (a session advisory lock in that database).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from outbox_relay.tenant import db as tenant_db
from outbox_relay.tenant.sql import quote_ident

log = logging.getLogger("outbox_relay.maintenance")

PARTITION_RE = re.compile(r"^outbox_(\d{8})$")
DAYS_AHEAD = 7


@dataclass(frozen=True, slots=True)
class RelayCursors:
    """One relay reading the database: its partition count, retention and cursors by partition."""

    partitions: int
    retention_hours: int
    cursors: dict[int, tuple[int, int]]


@dataclass
class MaintenanceResult:
    locked: bool = True
    created: int = 0
    dropped: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    """Partitions old enough to drop but kept, and why."""


def _unpassed_sql(schema: str, table: str) -> str:
    return (
        f"SELECT EXISTS (SELECT 1 FROM {quote_ident(schema)}.{quote_ident(table)} t "
        "JOIN unnest($1::int[], $2::bigint[], $3::bigint[]) AS c(p, tx, id) ON t.bucket % $4::int = c.p "
        "WHERE (t.txid, t.id) > (c.tx::text::xid8, c.id))"
    )


async def _passed_by_all(conn: tenant_db.Connection, schema: str, table: str, relays: list[RelayCursors]) -> bool:
    for relay in relays:
        parts = list(range(relay.partitions))
        cursors = [relay.cursors.get(p, (0, 0)) for p in parts]
        unpassed = await conn.fetchval(
            _unpassed_sql(schema, table), parts, [c[0] for c in cursors], [c[1] for c in cursors], relay.partitions
        )
        if unpassed:
            return False
    return True


async def maintain(
    conn: tenant_db.Connection,
    schema: str,
    relays: list[RelayCursors],
    *,
    now: datetime | None = None,
    lock_timeout_ms: int = 2000,
) -> MaintenanceResult:
    now = now or datetime.now(UTC)
    result = MaintenanceResult()
    lock_key = f"outbox_relay.maintenance.{schema}"
    if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock_key):
        result.locked = False
        return result
    try:
        result.created = await conn.fetchval(f"SELECT {quote_ident(schema)}.outbox_ensure_partitions($1)", DAYS_AHEAD)
        if not relays:
            return result
        retention = timedelta(hours=max(r.retention_hours for r in relays))
        tables = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass($1) ORDER BY c.relname",
            f"{quote_ident(schema)}.outbox",
        )
        for record in tables:
            name = record["relname"]
            match = PARTITION_RE.match(name)
            if match is None:
                continue  # the default partition stays
            day_end = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC) + timedelta(days=1)
            if day_end > now - retention:
                continue
            if not await _passed_by_all(conn, schema, name, relays):
                result.kept[name] = "a relay has not published all of it yet"
                continue
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                    await conn.execute(f"LOCK TABLE {quote_ident(schema)}.outbox IN ACCESS EXCLUSIVE MODE")
                    if not await _passed_by_all(conn, schema, name, relays):
                        result.kept[name] = "a relay has not published all of it yet"
                        continue
                    table = f"{quote_ident(schema)}.{quote_ident(name)}"
                    await conn.execute(f"ALTER TABLE {quote_ident(schema)}.outbox DETACH PARTITION {table}")
                    await conn.execute(f"DROP TABLE {table}")
            except tenant_db.LockNotAvailable:
                result.kept[name] = "the outbox was busy (lock timeout); next time"
                continue
            result.dropped.append(name)
            log.info("dropped outbox partition %s.%s", schema, name)
        return result
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
