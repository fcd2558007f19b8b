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

from outbox_relay.store.fleet import CLAIM_SQL
from outbox_relay.store.migrate import migrate
from tests.conftest import DatabaseFactory, pg_dsn


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


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
