"""A relay's status that explains itself: state, the cause of a stall, lag and leases.

Computed from what the workers record per partition (``relay_partitions``): cursor, lease, last
error and its class, the message being retried, the backlog sample and the transaction holding the
horizon back. States, worst first:

* ``paused``: the relay is disabled.
* ``failing``: the target or the tenant database cannot be reached (partitions back off, no
  message is charged an attempt).
* ``stalled``: messages wait and cannot move: a poison message is retrying, a long-running
  transaction holds the xmin horizon, or no worker holds a partition that has work (lease lost).
* ``running``: published within the last minute.
* ``idle``: nothing waiting.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec

from outbox_relay.domain import CauseKind, CauseKindName, PartitionErrorClass
from outbox_relay.store.control import PartitionState

State = Literal["paused", "failing", "stalled", "running", "idle"]
RECENT = timedelta(seconds=60)
LEASE_GRACE = timedelta(seconds=30)


class Cause(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: CauseKindName
    """A :class:`~outbox_relay.domain.CauseKind`."""
    detail: str
    partition: int
    outbox_id: int | None = None
    attempts: int | None = None
    pid: int | None = None
    age_s: float | None = None
    database: str | None = None
    """For ``long_running_transaction``: the database the holding transaction runs in. The xmin
    horizon is server-wide, so a transaction in any database of the server holds it."""


class RetryingMessage(msgspec.Struct, kw_only=True):
    outbox_id: int
    attempts: int
    next_attempt_at: datetime | None


class RestoreStatus(msgspec.Struct, kw_only=True):
    """The last restore (or failover) detected, and what became of its restored backlog: the rows
    that existed then whose transaction ids lay above the new server's counter (with the older
    restored rows up to the highest id among them), which the ordinary read would have held back
    until the counter caught up."""

    policy: Literal["resend", "skip"]
    """The relay's ``policy.on_restore`` when the restore was detected."""
    state: Literal["resending", "resent", "skipped"]
    """``resending``: being published, before anything written after the restore; ``resent``: all
    published again; ``skipped``: left out, never published again."""
    rows: int
    """The backlog's size."""
    done: int
    """Rows resent (or skipped) so far."""
    detected_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    """From detection to the last backlog row resent (or skipped)."""


class PartitionStatus(msgspec.Struct, kw_only=True):
    partition: int
    cursor: str
    """``txid:id`` of the last published outbox row."""
    published: int
    filtered: int
    """Rows the relay's filter left out, passed by the cursor unpublished."""
    pending: int | None
    """Rows the owning worker had read and not yet published when it last sampled (a bounded count:
    rows still in the outbox behind them are not counted, ``lag_s`` covers those); null: not sampled."""
    oldest_pending_at: datetime | None
    """Commit time of the oldest row waiting after the cursor, read or not, as last sampled."""
    lag_s: float | None
    """Age in seconds of that row when last sampled (one index lookup of the next row after the
    cursor); 0: nothing waited; null: not sampled yet."""
    lease_holder: str | None
    lease_epoch: int
    lease_expires_at: datetime | None
    last_published_at: datetime | None
    last_error: str | None
    last_error_class: str | None
    last_error_at: datetime | None
    dead_lettered: int
    retries: int
    """Refusals retried so far."""
    retrying: RetryingMessage | None
    """The refused message this partition is retrying, holding the partition back."""
    resets: int
    """Times the cursor started over because the tenant database was restored or failed over."""
    last_reset_reason: str | None
    restore: RestoreStatus | None = None
    """The partition's part of the last restore with a backlog; null: none detected."""
    cause: Cause | None


class Throttled(msgspec.Struct, kw_only=True):
    """The relay's batches waited on its target's limits (``rate_limit_per_s``, ``max_in_flight``)
    within the last minute: the target's policy holds it back, not a fault."""

    waited_s: float
    """Seconds its batches waited, over the workers' last lag samples (summed over the workers)."""
    last_at: datetime
    """When a worker last saw them wait."""


class RelayStatus(msgspec.Struct, kw_only=True):
    relay: str
    enabled: bool
    state: State
    cause: Cause | None
    """Why the relay is failing or stalled (the first partition's cause, worst first)."""
    pending: int
    oldest_pending_age_s: float | None
    """Lag: age of the oldest message waiting, as last sampled."""
    published: int
    filtered: int
    """Rows the relay's filter left out (summed over the partitions): passed unpublished."""
    dead_lettered: int
    last_published_at: datetime | None
    restore: RestoreStatus | None = None
    """The last restore over all partitions: ``resending`` while any partition still is, rows and
    done summed, detected at the first partition's detection, finished with the last one."""
    throttled: Throttled | None = None
    """Set while the target's limits hold the relay back (within the last minute)."""
    partitions: list[PartitionStatus]


def partition_restore(p: PartitionState) -> RestoreStatus | None:
    detected, finished = p.restore_detected_at, p.restore_finished_at
    if p.restore_state is None or p.restore_policy is None or detected is None:
        return None  # the three are written together, by the detection
    return RestoreStatus(
        policy=p.restore_policy,
        state=p.restore_state,
        rows=p.restore_rows,
        done=p.restore_done,
        detected_at=detected,
        finished_at=finished,
        duration_s=round((finished - detected).total_seconds(), 3) if finished is not None else None,
    )


def relay_restore(parts: list[RestoreStatus]) -> RestoreStatus | None:
    """One view of a restore that each partition detected and handled on its own."""
    if not parts:
        return None
    latest = max(parts, key=lambda r: r.detected_at)
    states = {r.state for r in parts}
    state = "resending" if "resending" in states else latest.state
    detected = min(r.detected_at for r in parts)
    finished = None if state == "resending" else max((r.finished_at for r in parts if r.finished_at), default=None)
    return RestoreStatus(
        policy=latest.policy,
        state=state,
        rows=sum(r.rows for r in parts),
        done=sum(r.done for r in parts),
        detected_at=detected,
        finished_at=finished,
        duration_s=round((finished - detected).total_seconds(), 3) if finished is not None else None,
    )


_SEVERITY: dict[str, int] = {kind: rank for rank, kind in enumerate(CauseKind)}
"""CauseKind lists the kinds worst first."""


def partition_cause(p: PartitionState, now: datetime) -> Cause | None:
    part = p.partition
    error_at = p.last_error_at
    recent_error = (
        error_at is not None
        and now - error_at < RECENT
        and (p.last_published_at is None or p.last_published_at <= error_at)
    )
    if recent_error and p.last_error_class == PartitionErrorClass.TARGET_UNAVAILABLE:
        return Cause(kind=CauseKind.TARGET_UNREACHABLE.value, detail=p.last_error or "", partition=part)
    if recent_error and p.last_error_class == PartitionErrorClass.DATABASE_UNAVAILABLE:
        return Cause(kind=CauseKind.DATABASE_UNREACHABLE.value, detail=p.last_error or "", partition=part)
    if p.retry_outbox_id is not None:
        return Cause(
            kind=CauseKind.POISON_MESSAGE.value,
            detail=p.last_error or "a refused message is being retried",
            partition=part,
            outbox_id=p.retry_outbox_id,
            attempts=p.retry_attempts,
        )
    stall = msgspec.json.decode(p.stall) if p.stall else None
    if stall and stall.get("cause") == CauseKind.LONG_RUNNING_TRANSACTION:
        age = stall.get("age_s")
        where = stall.get("database")
        held = f"a transaction open for {age:.0f} s" if age is not None else "a long-running transaction"
        if where:
            held += f" in database {where!r}"
        return Cause(
            kind=CauseKind.LONG_RUNNING_TRANSACTION.value,
            detail=f"{held} holds the server-wide xmin horizon; rows committed after it began are "
            "published once it ends",
            partition=part,
            pid=stall.get("pid"),
            age_s=age,
            database=where,
        )
    expires = p.lease_expires_at
    waiting = _waits(p)
    if waiting and p.lease_holder is not None and expires is not None and now - expires > LEASE_GRACE:
        return Cause(
            kind=CauseKind.LEASE_LOST.value,
            detail=f"the lease of {p.lease_holder} expired at {expires.isoformat()} and no worker took it over",
            partition=part,
        )
    return None


def _waits(p: PartitionState) -> bool:
    """Whether a partition had rows waiting when last sampled: read and not yet published, or
    still in the outbox (a lag without a count, e.g. behind a long-running transaction)."""
    return (p.pending_estimate or 0) > 0 or (p.lag_s or 0) > 0


def partition_status(p: PartitionState, enabled: bool, now: datetime) -> PartitionStatus:
    """One partition's status from its ``relay_partitions`` row (with the lag and pending columns)."""
    return PartitionStatus(
        partition=p.partition,
        cursor=f"{p.cursor_txid}:{p.cursor_id}",
        published=p.published_count,
        filtered=p.filtered_count,
        pending=p.pending_estimate,
        oldest_pending_at=p.oldest_pending_at if _waits(p) else None,
        lag_s=p.lag_s,
        lease_holder=p.lease_holder,
        lease_epoch=p.lease_epoch,
        lease_expires_at=p.lease_expires_at,
        last_published_at=p.last_published_at,
        last_error=p.last_error,
        last_error_class=p.last_error_class,
        last_error_at=p.last_error_at,
        dead_lettered=p.dead_count,
        retries=p.retried_count,
        retrying=RetryingMessage(
            outbox_id=p.retry_outbox_id, attempts=p.retry_attempts or 0, next_attempt_at=p.retry_next_at
        )
        if p.retry_outbox_id is not None
        else None,
        resets=p.resets,
        last_reset_reason=p.last_reset_reason,
        restore=partition_restore(p),
        cause=partition_cause(p, now) if enabled else None,
    )


def relay_status(name: str, enabled: bool, parts: list[PartitionState], now: datetime | None = None) -> RelayStatus:
    now = now or datetime.now(UTC)
    statuses = [partition_status(p, enabled, now) for p in parts]
    causes = sorted((s.cause for s in statuses if s.cause), key=lambda c: _SEVERITY[c.kind])
    cause = causes[0] if causes else None
    pending = sum(s.pending or 0 for s in statuses)
    oldest = [s.oldest_pending_at for s in statuses if s.oldest_pending_at is not None]
    published_at = [s.last_published_at for s in statuses if s.last_published_at]
    last_published = max(published_at) if published_at else None
    state: State
    if not enabled:
        state = "paused"
    elif cause is not None and cause.kind in (CauseKind.TARGET_UNREACHABLE, CauseKind.DATABASE_UNREACHABLE):
        state = "failing"
    elif cause is not None:
        state = "stalled"
    elif last_published is not None and now - last_published < RECENT:
        state = "running"
    else:
        state = "idle" if pending == 0 and not oldest else "running"
    return RelayStatus(
        relay=name,
        enabled=enabled,
        state=state,
        cause=cause,
        pending=pending,
        oldest_pending_age_s=round((now - min(oldest)).total_seconds(), 3) if oldest else None,
        published=sum(s.published for s in statuses),
        filtered=sum(s.filtered for s in statuses),
        dead_lettered=sum(s.dead_lettered for s in statuses),
        last_published_at=last_published,
        restore=relay_restore([s.restore for s in statuses if s.restore is not None]),
        throttled=relay_throttled(parts, now),
        partitions=statuses,
    )


def relay_throttled(parts: list[PartitionState], now: datetime) -> Throttled | None:
    """From the partitions' samples within the last minute: every partition a worker owns carries
    that worker's wait, so the wait is summed over the workers (one partition each), not the partitions."""
    recent = [p for p in parts if p.throttled_s and p.throttled_at is not None and now - p.throttled_at < RECENT]
    if not recent:
        return None
    by_worker: dict[str | None, float] = {}
    for p in recent:
        by_worker[p.lease_holder] = max(by_worker.get(p.lease_holder, 0.0), p.throttled_s or 0.0)
    last = max(p.throttled_at for p in recent if p.throttled_at is not None)
    return Throttled(waited_s=round(sum(by_worker.values()), 3), last_at=last)


class RelayOverview(msgspec.Struct, kw_only=True):
    relay: str
    state: State
    cause: Cause | None
    pending: int
    oldest_pending_age_s: float | None
    published: int
    filtered: int
    dead_lettered: int
    last_published_at: datetime | None


class TenantOverview(msgspec.Struct, kw_only=True):
    relays: list[RelayOverview]
    states: dict[str, int]
    """How many relays are in each state."""
