"""The arq jobs behind ``POST /v1/dead-letters/replay-jobs`` (replay a job's letters) and
``POST /v1/relays/{name}/replays`` (replay a relay's retained rows: :mod:`outbox_relay.history`).

The job row (``dead_letter_jobs``) is the source of truth; the arq job only carries its id. A job
runs once (``queued`` -> ``running`` is a compare-and-set), writes its counts after every chunk of
letters so callers can poll them, and ends ``done``, or ``failed`` with the reason (an unreachable
target stops it; what it had not reached stays dead). Its end is written to the audit log. Both kinds
share the job row, its progress, its status endpoint and its audit entries.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import msgspec

from outbox_relay import history
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Database, ErrorClass, JobStatus, Relay
from outbox_relay.engine import PublisherCache
from outbox_relay.errors import AddressNotAllowed, ReplayRefused, TargetUnavailable, TenantDatabaseError
from outbox_relay.netguard import AddressPolicy
from outbox_relay.replay import JobCounts, Replayer, address_refusal, decode_target
from outbox_relay.specs import usable_database
from outbox_relay.store.control import ControlStore
from outbox_relay.store.dead_letters import DeadLetterStore, JobRow
from outbox_relay.tenant import db as tenant_db

log = logging.getLogger("outbox_relay.workers")


async def replay_dead_letters(ctx: dict[str, Any], job_id: str) -> str:
    store: ControlStore = ctx["store"]
    secrets: SecretBox = ctx["secrets"]
    policy: AddressPolicy = ctx["policy"]
    letters = DeadLetterStore(store.pool)
    started = await letters.start_job(uuid.UUID(job_id))
    if started is None:
        return "not-queued"  # already run (or gone): a job runs once
    job, ids = started

    async def progress(counts: JobCounts) -> None:
        await letters.job_progress(job.id, replayed=counts.replayed, failed=counts.failed, skipped=counts.skipped)

    try:
        async with Replayer(letters=letters, secrets=secrets, policy=policy) as replayer:
            counts = await replayer.replay_many(
                ids,
                job.tenant_id,
                actor=job.actor,
                target_name=job.target_name,
                destination=job.destination,
                progress=progress,
            )
    except Exception as exc:
        # never fail the arq job (max_tries=1 and keep_result=0): the row says what happened
        log.exception("replay job %s failed", job_id)
        await letters.finish_job(job.id, status=JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        await store.audit(job.tenant_id, job.actor, "replay-failed", f"dead-letter-jobs/{job.id}", "{}")
        return JobStatus.FAILED
    return await _finished(store, letters, job, counts, f"dead-letter-jobs/{job.id}")


async def replay_history(ctx: dict[str, Any], job_id: str) -> str:
    """Run a replay from history once (the same ``queued`` -> ``running`` compare-and-set), write its
    counts as it goes, end it ``done`` or ``failed`` and audit its end."""
    store: ControlStore = ctx["store"]
    letters = DeadLetterStore(store.pool)
    started = await letters.start_job(uuid.UUID(job_id))
    if started is None:
        return "not-queued"
    job, _ = started
    resource = f"relays/{job.relay_name}/replays/{job.id}"

    async def progress(counts: JobCounts) -> None:
        await letters.job_progress(job.id, replayed=counts.replayed, failed=counts.failed, skipped=counts.skipped)

    try:
        counts = await _run_history(ctx, letters, job, progress)
    except Exception as exc:
        # like the dead-letter job: never fail the arq job; the row says what happened
        if not isinstance(exc, ReplayRefused | TenantDatabaseError | AddressNotAllowed | TargetUnavailable):
            log.exception("replay from history %s failed", job_id)
        error = f"{type(exc).__name__}: {exc}"
        await letters.finish_job(job.id, status=JobStatus.FAILED, error=error)
        await store.audit(job.tenant_id, job.actor, "replay-failed", resource, json.dumps({"error": error}))
        return JobStatus.FAILED
    return await _finished(store, letters, job, counts, resource)


async def _finished(
    store: ControlStore, letters: DeadLetterStore, job: JobRow, counts: JobCounts, resource: str
) -> str:
    """End a replay job that ran to its end (``failed`` when it stopped early) and audit its counts
    on ``resource``; its status."""
    status = JobStatus.FAILED if counts.stopped else JobStatus.DONE
    await letters.finish_job(job.id, status=status, error=counts.stopped)
    detail = {
        "total": job.total,
        "replayed": counts.replayed,
        "failed": counts.failed,
        "skipped": counts.skipped,
        "errors": counts.errors,
        "stopped": counts.stopped,
    }
    await store.audit(job.tenant_id, job.actor, "replay-finished", resource, json.dumps(detail))
    log.info("replay job %s (%s) %s: %s", job.id, resource, status, detail)
    return status


async def _run_history(
    ctx: dict[str, Any], letters: DeadLetterStore, job: JobRow, progress: history.Progress
) -> JobCounts:
    """Find the relay, its database and the target as they are now, open a guarded connection and a
    publisher of the job's own, and replay. ReplayRefused when any of them is gone or refused."""
    store: ControlStore = ctx["store"]
    secrets: SecretBox = ctx["secrets"]
    policy: AddressPolicy = ctx["policy"]
    settings: Settings = ctx["settings"]
    spec = msgspec.convert(job.spec, history.HistorySpec)
    relay_route = await letters.relay_route(job.relay_id) if job.relay_id is not None else None
    if relay_route is None or job.tenant_id is None:
        raise ReplayRefused(f"relay {job.relay_name!r} no longer exists")
    relay = msgspec.json.decode(relay_route.relay_spec, type=Relay)
    target_row = await letters.target(job.tenant_id, spec.target) if spec.target else relay_route.target
    if target_row is None:
        raise ReplayRefused(f"target {spec.target!r} no longer exists")
    target, target_password = decode_target(target_row, secrets)
    refusal = await address_refusal(policy, target_row, target)
    if refusal is not None:
        raise ReplayRefused(refusal, error_class=ErrorClass.NOT_ALLOWED)
    db_row = await store.get_resource("databases", job.tenant_id, relay.database)
    if db_row is None:
        raise ReplayRefused(f"database {relay.database!r} no longer exists")
    database = msgspec.json.decode(db_row.spec, type=Database)
    usable_database(database)
    db_secret = await store.get_secret("databases", job.tenant_id, relay.database)
    conn = await tenant_db.connect(
        database,
        secrets.decrypt(db_secret) if db_secret else None,
        policy=policy,
        timeout_s=settings.connect_timeout_s,
        session=tenant_db.SessionLimits.of(settings),
    )
    publishers = PublisherCache(lambda t, password: open_publisher(t, password=password, policy=policy))
    try:
        try:
            publisher = await publishers.get(target_row.id, target_row.updated_at, target, target_password)
        except TargetUnavailable as exc:  # as when it goes away mid-run: the job stops, nothing sent
            return JobCounts(stopped=f"target {target_row.name!r} unavailable: {exc}")
        layout = await tenant_db.read_layout(conn, database.schema)
        return await history.replay(
            conn,
            database.schema,
            layout,
            spec,
            history.Selection.of(relay, relay_route.relay_name, spec),
            publisher,
            job_id=job.id,
            target_name=target_row.name,
            progress=progress,
        )
    finally:
        await publishers.close()
        await conn.close()
