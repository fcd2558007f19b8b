"""The fleet's control-DB statements keep their plans linear on a table the planner knows nothing
about yet: a new control DB, or a relay of 1,024 partitions created a moment ago (no ANALYZE has
seen its rows). The fleet bench found the claim of 1,024 new partitions taking 125-167 ms: with a
2-row estimate the planner joined each picked row to a bitmap scan of every free partition
(523,776 rows removed by its join filter, 31,463 buffer hits)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg

from outbox_relay.store.alerts import CAUSES_SQL, fetch_by_index, relays_with_causes
from outbox_relay.store.fleet import CLAIM_SQL, RELEASE_DISABLED_SQL, FleetStore
from outbox_relay.store.migrate import migrate
from tests.conftest import DatabaseFactory, pg_dsn


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def idle_fleet(databases: DatabaseFactory, name: str, *, analysed: bool) -> asyncpg.Connection:
    """A new control DB holding the fleet bench's 1,000 idle relays (200 tenants x 5, 16 partitions
    each) held by two live workers, with statistics from before they claimed them (``analysed``)
    or none yet, and a workers table no ANALYZE saw: a connection to it."""
    dsn = pg_dsn(await databases.create(name))
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    await conn.execute("INSERT INTO workers (key) VALUES ('worker-a#1'), ('worker-b#1')")
    await conn.execute("INSERT INTO tenants (name) SELECT 't' || g FROM generate_series(1, 200) g")
    await conn.execute("INSERT INTO databases (tenant_id, name, spec) SELECT id, 'db', '{}' FROM tenants")
    await conn.execute("INSERT INTO targets (tenant_id, name, kind, spec) SELECT id, 't', 'redis', '{}' FROM tenants")
    await conn.execute(
        "INSERT INTO relays (tenant_id, name, database_id, target_id, partitions, spec) "
        "SELECT t.id, 'r' || g, d.id, x.id, 16, '{}' FROM tenants t JOIN databases d ON d.tenant_id = t.id "
        "JOIN targets x ON x.tenant_id = t.id, generate_series(1, 5) g"
    )
    await conn.execute(
        "INSERT INTO relay_partitions (relay_id, partition, lag_s, pending_estimate) "
        "SELECT r.id, g, 0, 0 FROM relays r, generate_series(0, 15) g"
    )
    # statistics from before the workers claimed the partitions (autovacuum analysed the new relays'
    # rows; the claim that followed changed fewer rows than its next run waits for), as the bench saw
    if analysed:
        await conn.execute("ANALYZE relays, relay_partitions")
    await conn.execute(
        "UPDATE relay_partitions SET lease_holder = CASE WHEN partition % 2 = 0 THEN 'worker-a#1' ELSE 'worker-b#1' END"
    )
    # and a workers table no ANALYZE saw, whose pages held more rows once (workers come and go): the
    # planner estimates its rows from its pages (357 stopped workers in the bench, where none were)
    await conn.execute("ALTER TABLE workers SET (autovacuum_enabled = off)")
    await conn.execute("INSERT INTO workers (key) SELECT 'gone-' || g FROM generate_series(1, 2000) g")
    await conn.execute("DELETE FROM workers WHERE key LIKE 'gone-%'")
    return conn


def partitions_read(plan: dict[str, Any], tables: tuple[str, ...] = ("relay_partitions",)) -> tuple[int, str]:
    """Rows of ``tables`` an analysed plan read (returned or filtered out), and the plan's nodes."""
    every = list(nodes(plan))
    read = sum(
        node.get("Rows Removed by Filter", 0) + node["Actual Rows"] * node["Actual Loops"]
        for node in every
        if node.get("Relation Name") in tables
    )
    return read, "; ".join(
        f"{n['Node Type']} {n.get('Relation Name') or n.get('Index Name') or ''}: "
        f"{n['Actual Rows']} x{n['Actual Loops']}, {n.get('Rows Removed by Filter', 0)} removed"
        for n in every
    )


async def test_claiming_a_new_relays_1024_partitions_reads_each_row_once(databases: DatabaseFactory) -> None:
    dsn = pg_dsn(await databases.create("claimplan"))
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('plan') RETURNING id")
        database = await conn.fetchval(
            "INSERT INTO databases (tenant_id, name, spec) VALUES ($1, 'db', '{}') RETURNING id", tenant
        )
        target = await conn.fetchval(
            "INSERT INTO targets (tenant_id, name, kind, spec) VALUES ($1, 't', 'redis', '{}') RETURNING id", tenant
        )
        for name, partitions in (("small", 16), ("wide", 1024)):
            relay = await conn.fetchval(
                "INSERT INTO relays (tenant_id, name, database_id, target_id, partitions, spec) "
                "VALUES ($1, $2, $3, $4, $5, '{}') RETURNING id",
                tenant,
                name,
                database,
                target,
                partitions,
            )
            await conn.execute(
                "INSERT INTO relay_partitions (relay_id, partition) SELECT $1, g FROM generate_series(0, $2 - 1) g",
                relay,
                partitions,
            )
        claim = conn.transaction()  # the claim is measured, not kept
        await claim.start()
        try:
            explained = await conn.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + CLAIM_SQL, "worker-a#1", 1024)
        finally:
            await claim.rollback()
        plan = json.loads(explained)[0]["Plan"]
        every = list(nodes(plan))
        assert plan["Actual Rows"] == 1024
        removed = sum(node.get("Rows Removed by Join Filter", 0) for node in every)
        rescans = [
            (node["Node Type"], node.get("Index Name"), node["Actual Loops"])
            for node in every
            if node["Actual Loops"] > 1 and node["Node Type"] in ("Bitmap Heap Scan", "Seq Scan", "Bitmap Index Scan")
        ]
        assert removed == 0 and not rescans, (removed, rescans)
        # a claimed row's lock, new tuple, index entries and primary-key lookup: ~12 buffers (31,463 in all before)
        assert plan["Shared Hit Blocks"] < 20 * 1024, plan["Shared Hit Blocks"]
    finally:
        await conn.close()


async def test_the_alerts_look_for_relays_in_trouble_reads_no_healthy_partition(databases: DatabaseFactory) -> None:
    """Every 5 s the alerts evaluation looks for relays that may have a status cause. The fleet bench
    at 1,000 idle relays saw it read all 16,000 partitions each time (a hash join that scanned them
    for the partitions of workers whose heartbeat stopped, of which there were none)."""
    conn = await idle_fleet(databases, "causesplan", analysed=False)
    try:
        async with conn.transaction():  # the evaluation's own
            [explained] = await fetch_by_index(conn, "EXPLAIN (ANALYZE, FORMAT JSON) " + CAUSES_SQL, 10.0)
            assert await conn.fetchval("SHOW enable_seqscan") == "on"  # for that statement only
            assert await conn.fetchval("SHOW jit") == "on"
            assert await relays_with_causes(conn, 10.0) == []
        plan = json.loads(explained[0])[0]
        assert "JIT" not in plan, plan["JIT"]
        read, shown = partitions_read(plan["Plan"], ("relay_partitions", "relays"))
        assert read < 100, shown
        # and it still finds them: a partition with rows waiting, held by a worker whose heartbeat stopped
        await conn.execute("UPDATE workers SET heartbeat_at = now() - interval '1 hour' WHERE key = 'worker-b#1'")
        stuck = await conn.fetchval("SELECT relay_id FROM relay_partitions WHERE partition = 1 LIMIT 1")
        await conn.execute(
            "UPDATE relay_partitions SET pending_estimate = 3 WHERE relay_id = $1 AND partition = 1", stuck
        )
        assert await relays_with_causes(conn, 10.0) == [stuck]  # outside a transaction too
    finally:
        await conn.close()


async def test_the_release_of_disabled_relays_reads_no_partition_when_none_is_disabled(
    databases: DatabaseFactory,
) -> None:
    """Each balance tick frees the worker's partitions of disabled relays. The fleet bench at 1,000
    idle relays saw it read every partition the worker owns each time (11,000 index entries a second
    through the owner index, filtered by an empty list of disabled relays)."""
    conn = await idle_fleet(databases, "releaseplan", analysed=True)
    try:
        measured = conn.transaction()  # the release is measured, not kept
        await measured.start()
        try:
            explained = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + RELEASE_DISABLED_SQL, "worker-a#1")
        finally:
            await measured.rollback()
        read, shown = partitions_read(json.loads(explained)[0]["Plan"])
        assert read < 100, shown
        # and a disabled relay's partitions are freed, only this worker's
        relay = await conn.fetchval(
            "UPDATE relays SET enabled = false WHERE id = (SELECT id FROM relays ORDER BY id LIMIT 1) RETURNING id"
        )
        freed = await FleetStore(conn).release_disabled("worker-a#1")  # type: ignore[arg-type]
        assert freed == 8
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM relay_partitions WHERE relay_id = $1 AND lease_holder IS NOT NULL", relay
            )
            == 8
        )
    finally:
        await conn.close()
