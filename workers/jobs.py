"""arq jobs: the scheduler keeps one relay job queued per idle (relay, partition); outbox maintenance.

Job ids (``relay:<relay id>:<partition>:<lease epoch>``) stop arq from queueing a partition twice
while its job waits; the lease keeps the relay correct even if that fails. Results are never kept
(``keep_result=0``): a kept result would block the next enqueue of the same job id.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
from arq.connections import ArqRedis

from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Database
from outbox_relay.engine import RelayRunner, TenantConnections
from outbox_relay.maintenance import RelayCursors, maintain
from outbox_relay.outages import Outages
from outbox_relay.store.control import ControlStore, control_unavailable

log = logging.getLogger("outbox_relay.workers")
CONTROL_DB = "the control database"


def job_id(relay_id: uuid.UUID | str, partition: int, epoch: int) -> str:
    return f"relay:{relay_id}:{partition}:{epoch}"


async def schedule(ctx: dict[str, Any]) -> int:
    """Queue a relay job for every partition nobody holds; returns how many were queued.

    The job id carries the lease epoch the job will try to succeed, so arq drops repeats while the
    job waits, and a worker that froze or died holding a partition only delays it until its lease
    expires (not until arq gives up on the frozen job, which takes the longest job timeout).
    """
    redis: ArqRedis = ctx["redis"]
    outages: Outages = ctx["outages"]
    queued = 0
    try:
        idle = await ctx["store"].idle_partitions()
    except Exception as exc:
        if not control_unavailable(exc):
            raise
        outages.down(CONTROL_DB, exc)
        return 0
    outages.up(CONTROL_DB)
    for relay_id, partition, epoch in idle:
        job = await redis.enqueue_job(
            "relay_partition", str(relay_id), partition, _job_id=job_id(relay_id, partition, epoch)
        )
        queued += job is not None
    return queued


async def maintain_outboxes(ctx: dict[str, Any]) -> int:
    """Create partitions ahead and drop passed ones in every tenant database a relay reads."""
    store: ControlStore = ctx["store"]
    tenants: TenantConnections = ctx["tenants"]
    secrets: SecretBox = ctx["secrets"]
    dropped = 0
    for row in await store.databases_with_relays():
        database = msgspec.json.decode(row["spec"], type=Database)
        error = None
        try:
            relays = [
                RelayCursors(partitions=n, retention_hours=hours, cursors=cursors)
                for n, hours, cursors in await store.relay_cursors(row["id"])
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


async def relay_partition(ctx: dict[str, Any], relay_id: str, partition: int) -> str:
    runner: RelayRunner = ctx["runner"]
    holder = f"{ctx['worker_id']}/{ctx.get('job_id', uuid.uuid4().hex)}"
    try:
        result = await runner.run_slice(uuid.UUID(relay_id), partition, holder)
    except Exception as exc:
        # never fail the job: arq would keep a failed result under this job id
        if control_unavailable(exc):
            ctx["outages"].down(CONTROL_DB, exc)  # one line per outage, not a traceback per partition
        else:
            log.exception("relay slice failed: relay %s partition %s", relay_id, partition)
        return "error"
    ctx["outages"].up(CONTROL_DB)
    if result.published or result.outcome != "ran":
        log.info("relay %s/%s: %s, %d published", relay_id, partition, result.outcome, result.published)
    return result.outcome
