"""The arq job behind ``POST /v1/dead-letters/replay-jobs``: replay a job's letters, report progress.

The job row (``dead_letter_jobs``) is the source of truth; the arq job only carries its id. A job
runs once (``queued`` -> ``running`` is a compare-and-set), writes its counts after every chunk of
letters so callers can poll them, and ends ``done``, or ``failed`` with the reason (an unreachable
target stops it; what it had not reached stays dead). Its end is written to the audit log.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from outbox_relay.crypto import SecretBox
from outbox_relay.domain import JobStatus
from outbox_relay.netguard import AddressPolicy
from outbox_relay.replay import JobCounts, Replayer
from outbox_relay.store.control import ControlStore
from outbox_relay.store.dead_letters import DeadLetterStore

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
    await store.audit(job.tenant_id, job.actor, "replay-finished", f"dead-letter-jobs/{job.id}", json.dumps(detail))
    log.info("replay job %s %s: %s", job_id, status, detail)
    return status
