"""arq jobs besides the data plane (which runs as the worker's long-lived fleet task,
``outbox_relay.fleet``): outbox maintenance once a minute. Results are never kept (``keep_result=0``)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Database
from outbox_relay.engine import TenantConnections
from outbox_relay.maintenance import RelayCursors, maintain
from outbox_relay.store.control import ControlStore, control_unavailable

log = logging.getLogger("outbox_relay.workers")


async def maintain_outboxes(ctx: dict[str, Any]) -> int:
    """Create partitions ahead and drop passed ones in the tenant databases a relay reads: each about
    every ``maintenance_interval_s`` (partitions are made a week ahead), a share of them a minute.
    A control DB that goes away meanwhile ends this run with one warning (the next run, a minute
    later, picks up what is still due), not with a failed job and its traceback."""
    try:
        return await _maintain_outboxes(ctx)
    except Exception as exc:
        if not control_unavailable(exc):
            raise
        log.warning("outbox maintenance stopped: the control DB is unavailable (%s: %s)", type(exc).__name__, exc)
        return 0


async def _maintain_outboxes(ctx: dict[str, Any]) -> int:
    store: ControlStore = ctx["store"]
    tenants: TenantConnections = ctx["tenants"]
    secrets: SecretBox = ctx["secrets"]
    dropped = 0
    settings = ctx.get("settings")
    interval_s = settings.maintenance_interval_s if settings is not None else 0.0
    databases = await store.databases_with_relays(due_after_s=interval_s, spread_s=60.0)
    cursors_of = await store.relay_cursors_of([row["id"] for row in databases])
    for row in databases:
        database = msgspec.json.decode(row["spec"], type=Database)
        error = None
        if database.table is not None:  # an adopted table is the application's: no partitions, no drops
            await store.record_maintenance(row["id"], None)
            continue
        try:
            relays = [
                RelayCursors(partitions=n, retention_hours=hours, cursors=cursors)
                for n, hours, cursors in cursors_of.get(row["id"], [])
            ]
            password = secrets.decrypt(bytes(row["secret"])) if row["secret"] else None
            pool = await tenants.pool(row["id"], row["updated_at"], database, password)
            async with pool.acquire() as conn:
                result = await maintain(conn, database.schema, relays)
            dropped += len(result.dropped)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
            log.warning("outbox maintenance of database %s failed: %s", row["id"], error)
        await store.record_maintenance(row["id"], error)
    return dropped
