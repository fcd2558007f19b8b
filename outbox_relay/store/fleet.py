"""Membership and ownership of relay partitions for the fleet data plane (control DB).

A worker registers under a key unique to its process (``workers``), heartbeats that one row, and
owns partitions (``relay_partitions.lease_holder = key``) while the heartbeat is younger than the
ownership TTL. Each claim bumps the partition's ``lease_epoch``; every cursor write checks holder
and epoch in the same statement, so a worker that froze past its TTL and wakes up cannot move a
cursor it no longer owns. Cost per worker and tick: one heartbeat row, one read of the live workers
(the partitions to share and this worker's count only after a change), and a claim only while under
its share, a release only while over it. (A count of the free partitions each tick read the claim's
dead entries in their partial index, 16,000 after a worker claimed 1,000 relays, until autovacuum
removed them: about 5,000 rows a second at 1,000 idle relays in the fleet bench.)
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from outbox_relay.domain import PartitionErrorClass
from outbox_relay.store.control import Lease, lease_of

T = TypeVar("T")


def _serialized(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(method)
    async def run(self: FleetStore, *args: Any, **kwargs: Any) -> T:
        async with self._writes:
            return await method(self, *args, **kwargs)

    return run


BULK_CHUNK_ROWS = 128
"""Rows per statement of the bulk writes nobody waits for (lag samples, idle cursors, releases).
Each statement holds the write lock, and a relay's cursor writes wait for it: one statement over a
1,024-partition relay's rows took 15-31 ms in the fleet bench (about 12,000 buffers) and held its
drain that long; in chunks the lock is handed over between them (``asyncio.Lock`` wakes in order)."""

S = TypeVar("S")


def _chunks(items: Sequence[S]) -> Iterable[Sequence[S]]:
    for start in range(0, len(items), BULK_CHUNK_ROWS):
        yield items[start : start + BULK_CHUNK_ROWS]


def _keys(leases: Iterable[Lease]) -> tuple[list[uuid.UUID], list[int], list[int]]:
    """The ``relay_id``, ``partition`` and ``epoch`` arrays of a fenced batch write ($1, $2, $3)."""
    chosen = list(leases)
    return (
        [lease.relay_id for lease in chosen],
        [lease.partition for lease in chosen],
        [lease.epoch for lease in chosen],
    )


def transient(exc: BaseException) -> bool:
    """A statement that failed for a reason a retry clears (a deadlock, a serialization failure)."""
    return isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.SerializationError)


NOTIFY_MEMBERSHIP = "SELECT pg_notify('outbox_relay_config', 'fleet:membership')"
"""Heard by every worker's control-events connection: rebalance now, not at the next tick."""


@dataclass(frozen=True, slots=True)
class BalanceView:
    live: tuple[str, ...]
    """Keys of the live workers, sorted."""
    total_partitions: int
    """Partitions of enabled relays."""
    owned: int | None
    """Partitions this worker owns, or None when not counted (``balance(count_owned=False)``)."""

    @property
    def live_workers(self) -> int:
        return len(self.live)

    def share(self, key: str) -> int:
        """This worker's part: ``total // live``, plus one for the first ``total % live`` workers in
        key order, so that the shares add up to the total and differ by at most one (a plain
        ``ceil(total / live)`` each leaves the last worker short: 4, 4 and 2 of 10)."""
        live = max(1, len(self.live))
        base, extra = divmod(self.total_partitions, live)
        rank = self.live.index(key) if key in self.live else live
        return base + (1 if rank < extra else 0)


@dataclass(frozen=True, slots=True)
class CursorWrite:
    lease: Lease
    txid: int
    row_id: int
    published: int
    filtered: int = 0
    """Rows the relay's filter left out that this write moves the cursor past."""


@dataclass(frozen=True, slots=True)
class LagSample:
    lease: Lease
    lag_s: float | None
    pending: int | None
    oldest_at: datetime | None
    stall: dict[str, Any] | None
    throttled_s: float = 0.0
    """Seconds the partition's batches waited on the target's limits since the last sample."""


_OWNED_COLUMNS = (
    "p.relay_id, p.partition, p.lease_holder, p.lease_epoch, p.cursor_txid, p.cursor_id, p.system_identifier, "
    "p.retry_outbox_id, p.retry_attempts, p.retry_errors::text AS retry_errors, p.retry_next_at"
)


def _owned_leases(rows: Iterable[Any]) -> list[Lease]:
    """Leases from rows of ``_OWNED_COLUMNS``."""
    return [lease_of(r, relay_id=r["relay_id"], partition=r["partition"], holder=r["lease_holder"]) for r in rows]


CLAIM_SQL = (
    "WITH picked AS (SELECT p.relay_id, p.partition FROM relay_partitions p JOIN relays r ON r.id = p.relay_id "
    "WHERE p.lease_holder IS NULL AND r.enabled ORDER BY p.partition, p.relay_id LIMIT $2 "
    "FOR UPDATE OF p SKIP LOCKED) "
    "UPDATE relay_partitions p SET lease_holder = $1, lease_epoch = p.lease_epoch + 1, "
    "lease_expires_at = NULL, updated_at = now() FROM picked "
    "WHERE p.relay_id = picked.relay_id AND p.partition = picked.partition "
    f"RETURNING {_OWNED_COLUMNS}"
)
"""``FleetStore.claim``: $1 the worker's key, $2 the most partitions to take. The picked rows are
locked and were free when locked (``FOR UPDATE`` re-checks a row that changed before it got the
lock), so the update needs no ``lease_holder IS NULL`` of its own; with one, on a table not yet
analysed (a new relay's rows), the planner joined every picked row to a scan of all free rows
through their partial index: 1,024 partitions took 125-167 ms, against a few ms through the
primary key."""


RELEASE_DISABLED_SQL = (
    "UPDATE relay_partitions p SET lease_holder = NULL, lease_expires_at = NULL "
    "WHERE p.relay_id = ANY(ARRAY(SELECT id FROM relays WHERE NOT enabled)) AND coalesce(p.lease_holder, '') = $1"
)
"""``FleetStore.release_disabled``, $1 the worker's key: after a relay changed, driven from the disabled relays
(usually none) through the primary key, not from this worker's partitions. The holder is compared
through ``coalesce`` so that no plan can start from the owner index: with statistics from before
the claim (an estimate of 78 owned rows) the planner read all of them (24,098 index entries at
1,000 idle relays in the fleet bench, every tick) to find none of a disabled relay."""


class FleetStore:
    """The fleet's statements. A worker's writes to its own partitions (cursors, lag, identities,
    claims and releases) go one at a time (``_writes``): two batched updates of overlapping rows in
    different orders would deadlock each other; other workers' rows are disjoint from ours."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._writes = asyncio.Lock()

    async def _in_chunks(self, sql: str, items: Sequence[S], arrays: Callable[[Sequence[S]], list[Any]]) -> int:
        """Run ``sql`` over ``items`` in chunks of ``BULK_CHUNK_ROWS`` (``arrays``: a chunk's
        parameters), each its own statement under the write lock; returns the rows changed."""
        changed = 0
        for chunk in _chunks(items):
            async with self._writes:
                result = await self.pool.execute(sql, *arrays(chunk))
            changed += int(result.split()[-1])
        return changed

    async def register(self, key: str) -> None:
        """Join the fleet; the others hear it (``fleet:membership``) and make room at once."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO workers (key) VALUES ($1) ON CONFLICT (key) DO UPDATE SET heartbeat_at = now()", key
            )
            await conn.execute(NOTIFY_MEMBERSHIP)

    async def heartbeat(self, key: str, ttl_s: float) -> bool:
        """Renew this worker's ownership of all its partitions at once; False when the worker was
        declared dead meanwhile (its row reaped: it owns nothing any more)."""
        return (
            await self.pool.fetchval("UPDATE workers SET heartbeat_at = now() WHERE key = $1 RETURNING true", key)
            is True
        )

    async def reap(self, ttl_s: float) -> int:
        """Forget workers whose heartbeat lapsed and free their partitions (epochs stay: the claim
        that takes a partition bumps it). Returns how many partitions were freed."""
        freed = await self.pool.fetchval(
            "WITH dead AS (DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => $1) "
            "RETURNING key), freed AS (UPDATE relay_partitions SET lease_holder = NULL, lease_expires_at = NULL "
            "WHERE lease_holder IN (SELECT key FROM dead) RETURNING 1) SELECT count(*) FROM freed",
            ttl_s,
        )
        return int(freed or 0)

    async def balance(
        self, key: str, ttl_s: float, *, count_owned: bool = True, total: int | None = None
    ) -> BalanceView:
        """Membership and the partitions to share. Counting this worker's own partitions reads one
        index entry per partition it owns, and the partitions to share (``total`` not given) one row
        per relay, so the engine asks for them only when something changed (and now and then), not
        on every tick."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT coalesce(array_agg(key ORDER BY key), '{}') FROM workers "
            "WHERE heartbeat_at >= now() - make_interval(secs => $2)) AS live, "
            "(SELECT coalesce(sum(partitions), 0) FROM relays WHERE enabled AND $4) AS total, "
            "(SELECT count(*) FROM relay_partitions WHERE lease_holder = $1 AND $3) AS owned",
            key,
            ttl_s,
            count_owned,
            total is None,
        )
        assert row is not None
        return BalanceView(
            live=tuple(row["live"]),
            total_partitions=int(row["total"]) if total is None else total,
            owned=int(row["owned"]) if count_owned else None,
        )

    @_serialized
    async def claim(self, key: str, limit: int) -> list[Lease]:
        """Take up to ``limit`` free partitions of enabled relays (compare-and-set, bumping each
        epoch), lowest partition numbers of every relay first: a relay's partitions spread over the
        workers, so one busy relay is published by all of them, not by whichever claimed it. Returns
        the leases taken (no second read of what this worker owns)."""
        if limit <= 0:
            return []
        rows = await self.pool.fetch(CLAIM_SQL, key, limit)
        return sorted(_owned_leases(rows), key=lambda lease: (lease.relay_id, lease.partition))  # owned()'s order

    async def owned(self, key: str) -> list[Lease]:
        rows = await self.pool.fetch(
            f"SELECT {_OWNED_COLUMNS} FROM relay_partitions p JOIN relays r ON r.id = p.relay_id "
            "WHERE p.lease_holder = $1 ORDER BY p.relay_id, p.partition",
            key,
        )
        return _owned_leases(rows)

    async def release(self, key: str, partitions: Iterable[tuple[uuid.UUID, int]]) -> int:
        """Give partitions back (after their lanes flushed); only those still ours. In chunks of
        ``BULK_CHUNK_ROWS``, each its own statement under the write lock."""
        return await self._in_chunks(
            "UPDATE relay_partitions p SET lease_holder = NULL, lease_expires_at = NULL "
            "FROM unnest($2::uuid[], $3::int[]) AS x(relay_id, partition) "
            "WHERE p.relay_id = x.relay_id AND p.partition = x.partition AND p.lease_holder = $1",
            list(partitions),
            lambda chunk: [key, [relay_id for relay_id, _ in chunk], [partition for _, partition in chunk]],
        )

    @_serialized
    async def release_disabled(self, key: str) -> int:
        """Free this worker's partitions of relays that were disabled."""
        result = await self.pool.execute(RELEASE_DISABLED_SQL, key)
        return int(result.split()[-1])

    @_serialized
    async def deregister(self, key: str) -> None:
        """Leave the fleet at once (SIGTERM): free every partition, delete the membership row."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE relay_partitions SET lease_holder = NULL, lease_expires_at = NULL WHERE lease_holder = $1", key
            )
            await conn.execute("DELETE FROM workers WHERE key = $1", key)
            await conn.execute(NOTIFY_MEMBERSHIP)

    @_serialized
    async def advance_cursors(self, writes: Sequence[CursorWrite]) -> set[tuple[uuid.UUID, int]]:
        """Move many partitions' cursors in one fenced statement; returns the ones that moved
        (a partition missing from the result was taken over: its lane must stop)."""
        if not writes:
            return set()
        rows = await self.pool.fetch(
            "UPDATE relay_partitions p SET cursor_txid = x.txid, cursor_id = x.row_id, "
            "published_count = p.published_count + x.published, filtered_count = p.filtered_count + x.filtered, "
            "last_published_at = CASE WHEN x.published > 0 THEN now() ELSE p.last_published_at END, "
            "last_error = NULL, last_error_class = NULL, stall = NULL, "
            "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', retry_next_at = NULL, updated_at = now() "
            "FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::int[], $7::bigint[]) "
            "AS x(relay_id, partition, epoch, txid, row_id, published, filtered) "
            "WHERE p.relay_id = x.relay_id AND p.partition = x.partition AND p.lease_epoch = x.epoch "
            "AND p.lease_holder IS NOT NULL "
            "RETURNING p.relay_id, p.partition",
            *_keys(w.lease for w in writes),
            [w.txid for w in writes],
            [w.row_id for w in writes],
            [w.published for w in writes],
            [w.filtered for w in writes],
        )
        return {(r["relay_id"], r["partition"]) for r in rows}

    @_serialized
    async def record_errors(
        self, leases: Sequence[Lease], error: str, error_class: str = PartitionErrorClass.ERROR
    ) -> None:
        """The last error of many partitions (of any relays) in one fenced statement, serialised with
        the other batch writes like them (two multi-row updates of ``relay_partitions`` taking row locks
        in different orders deadlock)."""
        if not leases:
            return
        await self.pool.execute(
            "UPDATE relay_partitions p SET last_error = $4, last_error_at = now(), last_error_class = $5 "
            "FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS x(relay_id, partition, epoch) "
            "WHERE p.relay_id = x.relay_id AND p.partition = x.partition AND p.lease_epoch = x.epoch",
            *_keys(leases),
            error[:2000],
            error_class,
        )

    async def advance_idle_cursors(self, writes: Sequence[CursorWrite]) -> None:
        """Move idle partitions' cursors forward only (fenced): a lane's own write of a later
        position may have landed meanwhile, and a cursor never goes back. In chunks, as ``release``."""
        await self._in_chunks(
            "UPDATE relay_partitions p SET cursor_txid = x.txid, cursor_id = x.row_id "
            "FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::bigint[], $5::bigint[]) "
            "AS x(relay_id, partition, epoch, txid, row_id) "
            "WHERE p.relay_id = x.relay_id AND p.partition = x.partition AND p.lease_epoch = x.epoch "
            "AND p.lease_holder IS NOT NULL AND (p.cursor_txid, p.cursor_id) < (x.txid, x.row_id)",
            writes,
            lambda chunk: [*_keys(w.lease for w in chunk), [w.txid for w in chunk], [w.row_id for w in chunk]],
        )

    async def record_lag(self, samples: Sequence[LagSample]) -> None:
        """What the owners last saw of their partitions' backlog (only changed ones), in chunks, as ``release``."""
        await self._in_chunks(
            "UPDATE relay_partitions p SET lag_s = x.lag_s, pending_estimate = x.pending, "
            "oldest_pending_at = x.oldest_at, pending_checked_at = now(), stall = x.stall::jsonb, "
            "throttled_s = x.throttled_s, "
            "throttled_at = CASE WHEN x.throttled_s > 0 THEN now() ELSE p.throttled_at END "
            "FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::float8[], $5::bigint[], "
            "$6::timestamptz[], $7::text[], $8::float8[]) "
            "AS x(relay_id, partition, epoch, lag_s, pending, oldest_at, stall, throttled_s) "
            "WHERE p.relay_id = x.relay_id AND p.partition = x.partition AND p.lease_epoch = x.epoch",
            samples,
            lambda chunk: [
                *_keys(s.lease for s in chunk),
                [s.lag_s for s in chunk],
                [s.pending for s in chunk],
                [s.oldest_at for s in chunk],
                [json.dumps(s.stall) if s.stall is not None else None for s in chunk],
                [s.throttled_s for s in chunk],
            ],
        )

    @_serialized
    async def set_identities(self, writes: Sequence[tuple[Lease, str]]) -> set[tuple[uuid.UUID, int]]:
        """Record each lease's tenant-database identity (first seen), fenced by its epoch, in one
        statement for every relay given; returns the partitions it was written for."""
        if not writes:
            return set()
        relays, parts, epochs = _keys(lease for lease, _ in writes)
        rows = await self.pool.fetch(
            "UPDATE relay_partitions p SET system_identifier = x.identity "
            "FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::text[]) AS x(relay_id, partition, epoch, identity) "
            "WHERE p.relay_id = x.relay_id AND p.partition = x.partition AND p.lease_epoch = x.epoch "
            "AND p.lease_holder IS NOT NULL RETURNING p.relay_id, p.partition",
            relays,
            parts,
            epochs,
            [identity for _, identity in writes],
        )
        return {(r["relay_id"], r["partition"]) for r in rows}
