"""The fleet data plane: a worker owns partitions while it lives, reads each relay once for all of
them, and publishes through per-partition lanes, fair by tenant.

Cost follows traffic, not configured partitions:

* **Membership, not leases.** A worker registers (``workers`` row), heartbeats that one row every
  ``lease_ttl_s / 3``, and claims about ``ceil(partitions / live workers)`` partitions by
  compare-and-set (each claim bumps the partition's epoch, the fence of every cursor write). Over
  its share it releases (after its lanes flushed), under it claims free ones; a worker whose
  heartbeat lapsed is reaped by the others and its partitions freed; SIGTERM releases at once.
* **Read per relay, dispatch per lane.** One :class:`RelayReader` per relay with owned partitions
  reads ``scan_sql`` from the lowest position its lanes still need (one round trip for all of them)
  and hands each row to its partition's :class:`Lane`. It wakes on the tenant database's
  LISTEN/NOTIFY (one connection per database, shared by its relays), after a wake-up that found
  nothing (a notified row may still sit above the xmin horizon) with a short backoff, when a lane
  has room again, and on a rare safety poll.
* **Fair by tenant.** A lane's batch runs under a slot of the worker's
  :class:`~outbox_relay.fairness.FairScheduler` (bounded batches in flight, weighted round robin by
  tenant) and its target's :class:`~outbox_relay.fairness.TargetLimits` (msg/s, batches in flight).
* **Few writes.** Cursor writes of all lanes are batched into one fenced statement
  (:class:`BatchWriter`); lag goes to the control DB only when it changed.

The delivery policy (what a refusal, an over-size payload or an outage does to a partition) is the
one of :class:`~outbox_relay.engine.RelayRunner`, which the lanes share.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec

from outbox_relay.brokers.base import Publisher
from outbox_relay.config import Settings
from outbox_relay.delivery import backoff_s
from outbox_relay.domain import Database, PartitionErrorClass, Target
from outbox_relay.engine import (
    STALL_AFTER_S,
    LeaseLost,
    RelayRunner,
    Watch,
    _Partition,
    horizon_stall,
    plan_change,
    plan_keys,
    restart_reason,
    wait_any,
    wait_event,
)
from outbox_relay.errors import AddressNotAllowed, TargetUnavailable, TenantDatabaseError
from outbox_relay.fairness import FairScheduler, TargetLimits
from outbox_relay.outages import CONTROL_DB, Outages
from outbox_relay.rotation import Rotator
from outbox_relay.store import fleet as fleet_store
from outbox_relay.store.alerts import record_lease_losses
from outbox_relay.store.control import Lease, RelayPlan, control_unavailable
from outbox_relay.store.fleet import CursorWrite, FleetStore, LagSample
from outbox_relay.tasks import cancel_and_wait
from outbox_relay.telemetry import PendingSample, instruments
from outbox_relay.tenant import db as tenant_db

log = logging.getLogger("outbox_relay.fleet")
LANE_BUFFER_BATCHES = 4
"""A lane buffers up to this many batches of rows; beyond, the reader leaves its rows for later."""
SCAN_MIN_ROWS = 500
SCAN_MAX_ROWS = 1000
WIDE_SCAN_ROWS_PER_LANE = 5
WIDE_SCAN_MAX_ROWS = 5000
"""A relay of many partitions reads up to ``WIDE_SCAN_ROWS_PER_LANE`` rows per lane that has room
(at most this many): 1,000 rows over 1,024 lanes is one row per lane, and a round of one-row batches
pays each lane's overhead per message (measured: 0.76x the rate of 16 partitions, 0.84x with this).
A relay of few partitions keeps the 1,000-row reads (larger ones slowed its drain)."""
NOTIFIED_RETRY_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""Re-polls after a wake-up that found nothing: the notified row is committed but a concurrent
transaction still holds the horizon below it."""
THROTTLED_MIN_S = 0.001
"""A round that waited on its target's limits at least this long counts as held back by them (the
relay status's ``throttled``); entering the limits of a target that has room takes microseconds."""
LAG_INTERVAL_S = 5.0
OWNED_RECOUNT_S = 60.0
"""The balance counts this worker's partitions in the control DB (one index entry read per
partition) after anything changed (a relay or worker event, a claim or release, a lane that
stopped) and at least this often; other ticks trust the lanes it runs."""
ROUNDS_IN_FLIGHT = 4
"""Rounds of one relay publishing at once (over disjoint lanes)."""
SHARED_ROUNDS_IN_FLIGHT = 1
"""Rounds in flight of a relay while another tenant is active in this worker (:meth:`FairScheduler.shared`):
four rounds of ``SHARED_MAX_ROWS`` joined into one group publish of 800 messages, whose send and
whose replies each held the event loop 3-8 ms (timed per callback during the noisy-neighbour bench);
with one, every callback but a handful stayed under 2 ms and the drain kept its rate (its reads are
paced, so 200 rows every ``READ_PACE_S`` bound it either way)."""
ROUND_MAX_MESSAGES = 1000
"""A round takes whole lane batches up to about this many messages; the other lanes go first next round."""
BUSY_ROUND_MIN = 100
"""While a relay has a round in flight, another one starts only with at least this many messages;
fewer wait for a round to end (``_publish_round`` sets ``rows`` when it does)."""
SHARED_MAX_ROWS = 200
"""Rows per read and messages per round of a relay while another tenant is active in this worker
(:meth:`FairScheduler.shared`): the event loop is the CPU the tenants share, and a read or a round of
1,000 rows holds it for several milliseconds at a time. Measured beside a relay draining 500k rows, a
quiet tenant's p99 went from 49 to 10.5 ms, for 9% of the drain's rate; with 100 rows 6.8 ms, for half
of it (reads are paced at ``READ_PACE_S``, so this also caps a relay at 25,000 msg/s while shared)."""
HOT_READS = 3
READ_PACE_S = 0.008
"""A relay is read at most once per this: the wake-ups of a trickle (one NOTIFY per commit) that come
sooner wait for the rest of it, so one read (and one group publish per target) takes the rows of
several commits, for a few milliseconds of latency."""

Position = tuple[int, int]
W = TypeVar("W")


@dataclass
class Lane:
    """One owned partition: its rows in order, waiting to be published, and its delivery state."""

    part: _Partition
    buffer: deque[tenant_db.OutboxRow] = field(default_factory=deque)
    read_pos: Position = (0, 0)
    """Every row of this partition up to here has been read (into the buffer or published)."""
    last_lag: tuple[float | None, int | None] | None = None
    starved: bool = False
    """A read left rows of this partition unread because its buffer was full."""
    throttled: bool = False
    """Its last stored lag sample said its batches waited on the target's limits."""

    @property
    def partition(self) -> int:
        return self.part.lease.partition

    def capacity(self) -> int:
        return LANE_BUFFER_BATCHES * self.part.relay.policy.batch_size - len(self.buffer)

    def waiting_retry(self) -> bool:
        retry = self.part.retry
        return retry is not None and retry.next_at is not None and retry.next_at > datetime.now(UTC)


class BatchWriter(Generic[W]):
    """Batches fenced writes of many lanes into one statement (``flush``): the writes submitted in
    the same event-loop turn as the first (``delay_s`` 0), and all that come while a flush is
    running go in the next one. A write resolves to whether ``flush`` wrote it (its ``key`` in the
    returned set; missing: the partition was taken over). A control DB that cannot be reached is
    retried while ownership is known to hold (nobody can claim a partition while the control DB is
    down).

    Cursor writes go this way (a 5 ms wait for more writes, as before, held every round that long:
    the relay's rate rose from 49,764 to 66,968 msg/s to Redis without it), and so do the identity
    writes of lanes' first reads (a worker claiming 1,000 relays at start wrote them a relay at a
    time, each waiting for the one before: 0.9 s on average in the fleet bench)."""

    def __init__(
        self,
        flush: Callable[[list[W]], Awaitable[set[tuple[uuid.UUID, int]]]],
        key: Callable[[W], tuple[uuid.UUID, int]],
        *,
        lease_until: Callable[[], float],
        delay_s: float = 0.0,
    ) -> None:
        self._write_all = flush
        self._key = key
        self.delay_s = delay_s
        self._lease_until = lease_until
        self._pending: list[tuple[W, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, item: W) -> bool:
        return await self.submit(item)

    def submit(self, item: W) -> asyncio.Future[bool]:
        """Queue a write for the next flush; the future resolves as :meth:`write` returns."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        await asyncio.sleep(self.delay_s)
        batch, self._pending = self._pending, []
        attempt = 0
        while True:
            try:
                written = await self._write_all([item for item, _ in batch])
                break
            except Exception as exc:
                transient = control_unavailable(exc) or fleet_store.transient(exc)
                if not transient or time.monotonic() >= self._lease_until():
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    return
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, base_s=0.05, cap_s=1.0))
        for item, future in batch:
            if not future.done():
                future.set_result(self._key(item) in written)
        if self._pending:
            self._flusher = asyncio.create_task(self._flush())

    async def close(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher


def _lease_key(lease: Lease) -> tuple[uuid.UUID, int]:
    return lease.relay_id, lease.partition


def cursor_writer(fleet: FleetStore, *, lease_until: Callable[[], float]) -> BatchWriter[CursorWrite]:
    return BatchWriter(fleet.advance_cursors, lambda w: _lease_key(w.lease), lease_until=lease_until)


class _FleetRunner(RelayRunner):
    """The relay engine's delivery policy with the fleet's batched, membership-fenced cursor writes."""

    def __init__(self, *, cursors: BatchWriter[CursorWrite], lease_until: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cursors = cursors
        self._lease_until = lease_until

    async def _advance_cursor(
        self, part: _Partition, txid: int, row_id: int, published: int, filtered: int = 0
    ) -> bool:
        write = CursorWrite(lease=part.lease, txid=txid, row_id=row_id, published=published, filtered=filtered)
        return await self.cursors.write(write)

    async def _advance_cursors(self, writes: list[tuple[_Partition, int, int, int, int]]) -> list[bool]:
        """A round's cursor writes in one flush (one statement)."""
        futures = [
            self.cursors.submit(
                CursorWrite(lease=part.lease, txid=txid, row_id=row_id, published=sent, filtered=filtered)
            )
            for part, txid, row_id, sent, filtered in writes
        ]
        return list(await asyncio.gather(*futures))

    async def _fenced(self, part: _Partition, write: Any) -> bool:
        part.lease_until = self._lease_until()
        return await super()._fenced(part, write)


class RelayReader:
    """The owned partitions of one relay: one reader task, and one publisher task that sends the
    rows of every lane with rows in rounds (one broker round trip and one cursor statement per round)."""

    def __init__(self, engine: FleetEngine, plan: RelayPlan, leases: list[Lease]) -> None:
        self.engine = engine
        self.plan = plan
        self.database = msgspec.json.decode(plan.database_spec, type=Database)
        self.target: Target = msgspec.json.decode(plan.target_spec, type=Target)
        self.database_password = engine.runner._decrypt(plan.database_secret)
        self.target_password = engine.runner._decrypt(plan.target_secret)
        self.target_secret_version = plan.target_secret_version
        self.pending_first = True
        """Which credential the next refresh takes while a rotation is pending (:meth:`FleetEngine._refresh_target`)."""
        self.lanes: dict[int, Lane] = {}
        # one log line when this relay's database or target goes away, one when it is back
        self.database_outage = f"tenant {plan.tenant_name}: database of relay {plan.relay_name}"
        self.target_outage = f"tenant {plan.tenant_name}: target {plan.target_name}"
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.rows = asyncio.Event()
        """Set when lanes got rows (or a lane is stopping): the publisher looks for a round."""
        self.in_round: set[int] = set()
        """Partitions whose rows are being published right now."""
        self.sending = 0
        """Rounds publishing right now (not those backing off after a failure)."""
        self.round_done = asyncio.Event()
        self.failures = 0
        """Rounds that failed in a row (their backoff grows with it)."""
        self.next_first = 0
        """Where the next round starts among the lanes (a round is bounded; the rest go first next time)."""
        self.notified_at: float | None = None
        self.restart = False
        """Set with ``stop`` when the plan changed but the relay still runs: re-read, keep the partitions."""
        self.last_scan_full = True
        """The last read stopped at its limit (rows wait behind it), or none happened yet."""
        self.moved = False
        """A read moved a lane's read position since the idle cursors were last stored."""
        self.quiet = False
        """Nothing read, buffered or waiting since the last lag sample reported every lane at zero:
        the sampler skips the relay (an idle fleet costs no Python per partition)."""
        self._inserts: Watch | None = None
        """This relay's watch of its database's inserts (opened with the first read)."""
        self.throttled_s = 0.0
        """Seconds this relay's rounds waited on their target's limits since the last lag sample."""
        self.hot = False
        """Reading on its own at ``READ_PACE_S`` while its reads find rows (``HOT_READS`` in a row came
        as early as the pace allows and found rows); no notification needed until one finds none."""
        self._task: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        for lease in leases:
            self.add(lease)

    @property
    def relay_id(self) -> uuid.UUID:
        return self.plan.relay_id

    def add(self, lease: Lease) -> None:
        part = self.engine.runner._partition(self.plan, lease)
        lane = Lane(part=part, read_pos=part.cursor)
        self.lanes[lease.partition] = lane
        if self._task is not None:
            self.wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.engine._run_reader(self), name=f"reader-{self.plan.relay_name}")
        self._publisher = asyncio.create_task(self.engine._run_rounds(self), name=f"publish-{self.plan.relay_name}")
        self._watcher = asyncio.create_task(self.engine._watch_plan(self), name=f"plan-{self.plan.relay_name}")

    def set_hot(self, hot: bool) -> None:
        """Whether this relay reads on its own at the pace (its reads keep finding rows): when every
        relay of the database does, its LISTEN connection stops listening."""
        self.hot = hot
        if self._inserts is not None:
            self._inserts.hot(hot)

    def on_insert(self, buckets: list[int] | None) -> None:
        partitions = self.plan.partitions
        if buckets is None or any(b % partitions in self.lanes for b in buckets):
            self.notified_at = time.monotonic()
            self.quiet = False
            self.wake.set()

    async def stop_lanes(self, partitions: Iterable[int] | None = None) -> list[Lane]:
        """Stop lanes (all, or those of ``partitions``) after their batch in flight; returns them."""
        chosen = [
            self.lanes[p] for p in (partitions if partitions is not None else list(self.lanes)) if p in self.lanes
        ]
        for lane in chosen:
            lane.part.stop.set()
        self.rows.set()
        stopping = {lane.partition for lane in chosen}
        deadline = time.monotonic() + 30
        while True:  # the rounds holding these lanes end first
            self.round_done.clear()  # before the look: a round that ends after it sets it again
            if not self.in_round & stopping or time.monotonic() >= deadline:
                break
            await wait_event(self.round_done, deadline - time.monotonic())
        for lane in chosen:
            self.lanes.pop(lane.partition, None)
        return chosen

    async def close(self) -> None:
        self.stop.set()
        self.wake.set()
        await self.stop_lanes()
        for task in (self._task, self._publisher, self._watcher):
            await cancel_and_wait(task)
        if self._inserts is not None:
            self._inserts()


class FleetEngine:
    """A worker's data plane (see the module docstring). ``run()`` until ``close()``."""

    def __init__(
        self,
        *,
        settings: Settings,
        runner: RelayRunner,
        fleet: FleetStore,
        outages: Outages | None = None,
        scheduler: FairScheduler | None = None,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.outages = outages or Outages()
        self.scheduler = scheduler or FairScheduler(max_in_flight=settings.max_batches_in_flight)
        self.key = f"{settings.worker_id}#{uuid.uuid4().hex[:8]}"
        self._valid_until = 0.0
        self.cursors = cursor_writer(fleet, lease_until=lambda: self._valid_until)
        self.identities: BatchWriter[tuple[Lease, str]] = BatchWriter(
            fleet.set_identities, lambda w: _lease_key(w[0]), lease_until=lambda: self._valid_until
        )
        self.runner = _FleetRunner(
            cursors=self.cursors,
            lease_until=lambda: self._valid_until,
            settings=runner.settings,
            store=runner.store,
            secrets=runner.secrets,
            tenants=runner.tenants,
            publishers=runner.publishers,
            events=runner.events,
        )
        self.store = runner.store
        self.rotator = Rotator(
            store=runner.store,
            secrets=runner.secrets,
            tenants=runner.tenants,
            publishers=runner.publishers,
            events=runner.events,
            worker_key=lambda: self.key,
            ttl_s=settings.lease_ttl_s,
            read_targets=self.idle_targets,
        )
        self.tenants = runner.tenants
        self.publishers = runner.publishers
        self.events = runner.events
        self.readers: dict[uuid.UUID, RelayReader] = {}
        self.limits: dict[uuid.UUID, TargetLimits] = {}
        self.live_workers = 1
        self.tick = asyncio.Event()
        self._recount = True
        self._recount_at = 0.0
        self._total: int | None = None
        """Partitions of enabled relays, as last counted (``_balance``)."""
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None

    # --- membership and balance -----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="fleet")
        self.rotator.start()
        instruments().fleet_sources.append(self.metrics)

    def metrics(self) -> dict[str, list[tuple[float, dict[str, Any]]]]:
        """Fairness and limits as gauges: batches in flight and waiting per tenant, time throttled per
        target, partitions owned."""
        out: dict[str, list[tuple[float, dict[str, Any]]]] = {
            "outbox_batches_in_flight": [],
            "outbox_batches_waiting": [],
        }
        for tenant, (in_flight, waiting) in self.scheduler.snapshot().items():
            out["outbox_batches_in_flight"].append((in_flight, {"tenant": str(tenant)}))
            out["outbox_batches_waiting"].append((waiting, {"tenant": str(tenant)}))
        names = {r.plan.target_id: (r.plan.tenant_name, r.plan.target_name) for r in self.readers.values()}
        out["outbox_target_throttled_seconds"] = [
            (float(limits.snapshot()["throttled_s_total"] or 0.0), {"tenant": names[t][0], "target": names[t][1]})
            for t, limits in self.limits.items()
            if t in names
        ]
        out["outbox_partitions_owned"] = [(sum(len(r.lanes) for r in self.readers.values()), {})]
        return out

    async def run(self) -> None:
        interval = self.settings.lease_ttl_s / 3
        registered = False
        self._lag_task = asyncio.create_task(self._sample_lag_forever(), name="fleet-lag")
        watcher = (
            self.events.subscribe(["relays:*", "fleet:*"]) if self.events is not None else contextlib.nullcontext(None)
        )
        with watcher as any_relay:
            while not self._stopping:
                started = time.monotonic()
                try:
                    if not registered:
                        await self.fleet.register(self.key)
                        registered = True
                        self._valid_until = started + self.settings.lease_ttl_s
                    elif not await self.fleet.heartbeat(self.key, self.settings.lease_ttl_s):
                        log.warning("lease lost: this worker was declared dead (heartbeat lapsed); dropping all")
                        await self._record_lost(
                            [lane.part.lease for r in self.readers.values() for lane in r.lanes.values()]
                        )
                        await self._drop_all()
                        self.key = f"{self.settings.worker_id}#{uuid.uuid4().hex[:8]}"
                        registered = False
                        continue
                    self._valid_until = started + self.settings.lease_ttl_s
                    await self._balance()
                    self.outages.up(CONTROL_DB)
                except Exception as exc:
                    self._recount = True  # it may have failed between a claim and its lanes
                    if not control_unavailable(exc):
                        log.exception("fleet tick failed")
                    else:
                        self.outages.down(CONTROL_DB, exc)
                waits = [self.tick]
                if any_relay is not None:
                    waits.append(any_relay)
                await wait_any(waits, interval)
                if self.tick.is_set() or (any_relay is not None and any_relay.is_set()):
                    self._recount = True  # a relay, a worker or a lane changed: count what we own
                self.tick.clear()
                if any_relay is not None:
                    any_relay.clear()

    async def _balance(self) -> None:
        """One tick: reap, then claim or release toward this worker's share. What only a change of a
        relay or of the fleet can move (the partitions to share, this worker's count, disabled relays'
        partitions to free) is read after such a change (a notification, a claim or release of ours, a
        failed tick) and once every ``OWNED_RECOUNT_S``: at 1,000 idle relays the reads of every relay
        on each tick were most of the control DB's."""
        await self.fleet.reap(self.settings.lease_ttl_s)
        # without the control DB's notifications (no events), every tick is after a change
        recount = self._recount or self.events is None or time.monotonic() >= self._recount_at
        await self._drop_disabled(release=recount)
        view = await self.fleet.balance(
            self.key, self.settings.lease_ttl_s, count_owned=recount, total=None if recount else self._total
        )
        self._total = view.total_partitions
        if recount:
            self._recount, self._recount_at = False, time.monotonic() + OWNED_RECOUNT_S
        self.live_workers = max(1, view.live_workers)
        share = view.share(self.key)
        owned = sum(len(r.lanes) for r in self.readers.values())
        if view.owned is not None and view.owned != owned:
            await self._reconcile()  # a claim of an earlier tick, or a lane that stopped
            owned = sum(len(r.lanes) for r in self.readers.values())
        if owned > share:
            self._recount = True  # the next tick checks what the release left
            await self._release(owned - share)
        elif owned < share:  # the claim finds what is free; a worker at its share reads none of it
            leases = await self.fleet.claim(self.key, share - owned)
            if leases:
                self._recount = True
                log.info(
                    "claimed %d partitions (share %d of %d, %d workers)",
                    len(leases),
                    share,
                    view.total_partitions,
                    view.live_workers,
                )
                await self._adopt(leases)  # the claim returned them: no second read of what we own

    async def _record_lost(self, leases: list[Lease]) -> None:
        """Count the leases lost (the ``lease_lost`` alert's); a control DB that fails here loses the count only."""
        if not leases:
            return
        try:
            await record_lease_losses(self.store.pool, [(lease.relay_id, lease.partition) for lease in leases])
        except Exception as exc:
            log.debug("lease losses not recorded: %s", exc)

    async def _drop_disabled(self, *, release: bool) -> None:
        """Close the readers that stopped; with ``release``, free this worker's partitions of disabled
        relays (those no reader holds: claimed as the relay was disabled)."""
        for reader in list(self.readers.values()):
            if reader.stop.is_set():
                await self._close_reader(reader, release=not reader.restart)
                if reader.restart:  # edited: its partitions stay ours, read again under the new plan
                    await self._reconcile()
        if release:
            await self.fleet.release_disabled(self.key)

    async def _release(self, count: int) -> None:
        """Give back ``count`` partitions after their lanes flushed. First what this worker holds of
        a relay beyond that relay's even part (``ceil(partitions / live)``), then from the relays it
        holds the largest part of: relays stay spread over the workers, so a busy relay is published
        by all of them. Highest partition numbers go first (the mirror of the claim order)."""
        live = max(1, self.live_workers)
        held = {reader.relay_id: sorted(reader.lanes) for reader in self.readers.values()}
        readers = {reader.relay_id: reader for reader in self.readers.values()}
        owned: list[tuple[int, str, RelayReader]] = []
        for relay_id, parts in held.items():  # beyond each relay's even part, highest numbers first
            over = len(parts) - -(-readers[relay_id].plan.partitions // live)
            while over > 0 and len(owned) < count:
                owned.append((parts.pop(), str(relay_id), readers[relay_id]))
                over -= 1
        while len(owned) < count:  # then from the relay this worker holds the largest part of
            candidates = [r for r, parts in held.items() if parts]
            if not candidates:
                break
            relay_id = max(candidates, key=lambda r: (len(held[r]) / readers[r].plan.partitions, len(held[r])))
            owned.append((held[relay_id].pop(), str(relay_id), readers[relay_id]))
        chosen: dict[uuid.UUID, tuple[RelayReader, list[int]]] = {}
        for partition, _, reader in owned:
            chosen.setdefault(reader.relay_id, (reader, []))[1].append(partition)
        for reader, parts in chosen.values():
            await reader.stop_lanes(parts)
        await self.cursors.close()
        released = [(reader.relay_id, p) for reader, parts in chosen.values() for p in parts]
        await self.fleet.release(self.key, released)
        log.info("gave back %d partitions of %d relays to the fleet", len(released), len(chosen))
        for reader, _ in chosen.values():
            if not reader.lanes:
                await self._close_reader(reader, release=False)

    async def _reconcile(self) -> None:
        """Make the lanes match what the control DB says this worker owns."""
        leases = await self.fleet.owned(self.key)
        by_relay: dict[uuid.UUID, list[Lease]] = {}
        for lease in leases:
            by_relay.setdefault(lease.relay_id, []).append(lease)
        for relay_id, reader in list(self.readers.items()):
            mine = {lease.partition for lease in by_relay.get(relay_id, [])}
            lost = [p for p in reader.lanes if p not in mine]
            if lost:
                await reader.stop_lanes(lost)
            if not reader.lanes:
                await self._close_reader(reader, release=False)
        await self._adopt(leases)

    async def _adopt(self, leases: list[Lease]) -> None:
        """Read and publish from ``leases`` (partitions this worker owns): lanes of running readers,
        or a reader of their relay opened."""
        by_relay: dict[uuid.UUID, list[Lease]] = {}
        for lease in leases:
            by_relay.setdefault(lease.relay_id, []).append(lease)
        # the plans of the relays new to this worker in one read (a thousand at a worker's start)
        plans = await self.store.relay_plans([r for r in by_relay if r not in self.readers])
        for relay_id, relay_leases in by_relay.items():
            existing = self.readers.get(relay_id)
            if existing is not None:
                for lease in relay_leases:
                    if lease.partition not in existing.lanes:
                        existing.add(lease)
                continue
            plan = plans.get(relay_id)
            if plan is None or not plan.enabled:
                continue
            reader = self.readers[relay_id] = RelayReader(self, plan, relay_leases)
            await self._open_reader(reader)

    async def _open_reader(self, reader: RelayReader) -> None:
        reader.start()
        reader.wake.set()

    async def _close_reader(self, reader: RelayReader, *, release: bool) -> None:
        parts = list(reader.lanes)
        await reader.close()
        self.readers.pop(reader.relay_id, None)
        await self.cursors.close()
        if release and parts:
            await self.fleet.release(self.key, [(reader.relay_id, p) for p in parts])
        database_id = reader.plan.database_id
        if not any(r.plan.database_id == database_id for r in self.readers.values()):
            await self.tenants.release(database_id)

    async def _drop_all(self) -> None:
        for reader in list(self.readers.values()):
            await self._close_reader(reader, release=False)

    async def close(self) -> None:
        """Leave the fleet at once: stop every lane after its batch in flight, flush the cursors,
        release every partition and the membership (others claim them at their next tick)."""
        self._stopping = True
        self.tick.set()
        with contextlib.suppress(ValueError):
            instruments().fleet_sources.remove(self.metrics)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, timeout=5)
        await cancel_and_wait(self._lag_task)
        await self.rotator.close()
        await self._drop_all()
        await self.cursors.close()
        await self.identities.close()  # a first read's identity write in flight: done before we leave
        with contextlib.suppress(Exception):
            await self.fleet.deregister(self.key)

    async def _watch_plan(self, reader: RelayReader) -> None:
        """Stop a relay's lanes within a second of it being disabled, deleted or edited (after the
        batch in flight); the next tick releases its partitions or reads them under the new plan."""
        if self.events is None:
            return
        with self.events.subscribe(plan_keys(reader.plan)) as changed:
            now = await plan_change(self.store, reader.plan, changed)
        reader.restart = now is not None and now.enabled
        reader.stop.set()
        reader.wake.set()
        for lane in reader.lanes.values():
            lane.part.stop.set()
        reader.rows.set()
        self.tick.set()

    # --- reading ---------------------------------------------------------------------------------

    def _limits(self, reader: RelayReader) -> TargetLimits:
        rate = self.target_rate(reader.target)
        limits = self.limits.get(reader.plan.target_id)
        if limits is None:
            limits = self.limits[reader.plan.target_id] = TargetLimits(
                rate_per_s=rate, max_in_flight=reader.target.max_in_flight
            )
        else:
            limits.update(rate_per_s=rate, max_in_flight=reader.target.max_in_flight)
        return limits

    def target_rate(self, target: Target) -> float | None:
        """This worker's part of the target's msg/s limit: shared out among the live workers."""
        if target.rate_limit_per_s is None:
            return None
        return target.rate_limit_per_s / max(1, self.live_workers)

    async def _run_reader(self, reader: RelayReader) -> None:
        """Read a relay's outbox for its lanes while it runs: after a wake-up (a notified insert, a
        lane with room again) or the safety poll, at most once per ``READ_PACE_S``; back off while
        its database or the control DB fails."""
        failures = 0
        notified_retry = 0
        checked: set[int] = set()
        read_at = 0.0
        busy_reads = 0  # reads in a row that found rows although they came as early as the pace allows
        while not reader.stop.is_set():
            paced = await self._await_read(reader, notified_retry, read_at)
            if reader.stop.is_set() or not reader.lanes:
                busy_reads = 0
                reader.set_hot(False)  # no lanes: wait for a wake-up, not the pace
                continue
            read_at = time.monotonic()
            try:
                got, backlog_waiting = await self._read_once(reader, checked)
            except LeaseLost:
                reader.stop.set()
                self.tick.set()
                continue
            except Exception as exc:
                failures += 1
                busy_reads = 0
                await self._read_failed(reader, exc, failures)
                continue
            failures = 0
            busy_reads = busy_reads + 1 if paced and got != 0 else 0
            reader.set_hot(busy_reads >= HOT_READS)
            self.outages.up(reader.database_outage)
            if backlog_waiting:
                notified_retry = max(notified_retry, len(NOTIFIED_RETRY_S) - 3)  # look again soon
            notified_retry = _next_notified_retry(reader, got, notified_retry)

    async def _await_read(self, reader: RelayReader, notified_retry: int, read_at: float) -> bool:
        """Wait for the relay's next read: a wake-up, or its safety poll (sooner while a notified row
        was not readable yet, or while the relay is hot), then the rest of ``READ_PACE_S`` since the
        last read at ``read_at``. Returns whether the read came as early as the pace allows."""
        policy = next(iter(reader.lanes.values())).part.relay.policy if reader.lanes else None
        if self.tenants.listening(reader.plan.database_id):
            safety_s = self.settings.safety_poll_s
        else:
            safety_s = policy.poll_interval_ms / 1000 if policy else 1.0
        if notified_retry and notified_retry < len(NOTIFIED_RETRY_S):
            safety_s = min(safety_s, NOTIFIED_RETRY_S[notified_retry - 1])
        elif notified_retry and policy is not None:
            safety_s = min(safety_s, policy.poll_interval_ms / 1000)
        if reader.hot:  # reading on its own at the pace: no notification comes
            safety_s = min(safety_s, READ_PACE_S)
        await wait_event(reader.wake, safety_s)  # whoever sets ``stop`` sets ``wake`` too
        early = READ_PACE_S - (time.monotonic() - read_at)
        if early > 0 and not reader.stop.is_set():
            await asyncio.sleep(early)
        reader.wake.clear()
        return early > 0 or reader.hot  # rows come faster than the reads may

    async def _read_once(self, reader: RelayReader, checked: set[int]) -> tuple[int | None, bool]:
        """One read for the relay's lanes: identity and restore check of lanes not ``checked`` yet,
        restored backlogs, then the shared scan. Returns what :meth:`_scan` returns and whether a
        backlog still waits for rows a transaction open at its detection holds back."""
        plan = reader.plan
        pool = await self.tenants.pool(
            plan.database_id,
            plan.database_version,
            reader.database,
            reader.database_password,
            secret_version=plan.database_secret_version,
        )
        if reader._inserts is None:
            reader._inserts = self.tenants.watch(plan.database_id, reader.on_insert)
        unchecked = [lane for lane in reader.lanes.values() if lane.partition not in checked]
        if unchecked:
            await self._check_identity(reader, pool, unchecked)
            checked.update(lane.partition for lane in unchecked)
        backlog_waiting = await self._read_backlogs(reader, pool)
        return await self._scan(reader, pool), backlog_waiting

    async def _read_failed(self, reader: RelayReader, exc: Exception, failures: int) -> None:
        """After a failed read: record the tenant database's outage on the relay (or the control DB's,
        or log what was not foreseen), then back off (``failures`` in a row) before reading again.
        Ending the reader instead would leave the relay's partitions owned and never read."""
        reader.set_hot(False)
        if isinstance(exc, (TenantDatabaseError, AddressNotAllowed)):
            self.outages.down(reader.database_outage, exc)
            for lane in reader.lanes.values():  # one partition carries the relay's error
                with contextlib.suppress(Exception):
                    await self.store.record_error(lane.part.lease, str(exc), PartitionErrorClass.DATABASE_UNAVAILABLE)
                break
            delay = backoff_s(failures, base_s=0.5, cap_s=30)
        else:  # the control DB (identity, restore state) or anything unforeseen
            if control_unavailable(exc):
                self.outages.down(CONTROL_DB, exc)
            else:
                log.error("relay %s: reading failed", reader.plan.relay_name, exc_info=exc)
            delay = backoff_s(failures, base_s=0.2, cap_s=10)
        await wait_any([reader.stop], delay)
        reader.wake.set()

    async def _check_identity(self, reader: RelayReader, pool: Any, lanes: list[Lane]) -> None:
        """The engine's restore and failover detection for many lanes at once: one identity read,
        one restore-state read and one batched identity write for the relay; only a partition that
        must start over takes the engine's own path."""
        identity, xmin, layout = await self.runner._read_identity(pool, reader.database.schema)
        restores = await self.store.restore_states(reader.relay_id, [lane.partition for lane in lanes])
        unknown: list[Lane] = []
        for lane in lanes:
            part = lane.part
            part.layout, part.restore = layout, restores.get(lane.partition)
            reason = restart_reason(part, identity, xmin)
            if reason is not None:
                log.warning("relay %s partition %s: %s", part.plan.relay_name, lane.partition, reason)
                await self.runner._start_over(pool, reader.database.schema, part, identity, reason)
            elif part.lease.system_identifier is None:
                unknown.append(lane)
            lane.read_pos = part.cursor  # a detected restore starts the partition over
            lane.buffer.clear()
        if unknown:
            # one statement for the relays whose first reads come together (a worker's start)
            kept = await asyncio.gather(*(self.identities.submit((lane.part.lease, identity)) for lane in unknown))
            lost = [lane.partition for lane, ok in zip(unknown, kept, strict=True) if not ok]
            if lost:
                await reader.stop_lanes(lost)
                self.tick.set()

    async def _read_backlogs(self, reader: RelayReader, pool: Any) -> bool:
        """Feed the lanes that are resending a restored backlog from their own read (the engine's
        ``_poll``: backlog first, then the ordinary read from the start); returns whether one is
        still waiting for rows that a transaction open at the detection holds back."""
        waiting = False
        for lane in list(reader.lanes.values()):
            restore = lane.part.restore
            if restore is None or restore.state != "resending" or lane.buffer:
                continue
            rows = await self.runner._poll(pool, reader.database, lane.part, lane.part.relay.policy.batch_size)
            for row in rows:
                lane.buffer.append(row)
            if lane.part.restore is None or lane.part.restore.state != "resending":
                lane.read_pos = lane.part.cursor  # the backlog is done: the ordinary read starts over
            if rows:
                lane.read_pos = max(lane.read_pos, (rows[-1].txid, rows[-1].id))
                reader.rows.set()
            elif lane.part.restore is not None and lane.part.restore.state == "resending":
                waiting = True
        return waiting

    async def _scan(self, reader: RelayReader, pool: Any) -> int | None:
        """One read for every lane that has room: rows handed to lanes; returns how many rows, or
        None when the read was full (more wait behind it)."""
        accepting = [
            lane
            for lane in reader.lanes.values()
            if lane.capacity() > 0 and not lane.waiting_retry() and not _resending(lane)
        ]
        if not accepting:
            return 0
        limit = self._scan_limit(reader, accepting)
        start = min(lane.read_pos for lane in accepting)
        wanted = None if len(accepting) == reader.plan.partitions else sorted(lane.partition for lane in accepting)
        rows = await tenant_db.scan(
            pool,
            reader.database.schema,
            after=start,
            partitions=reader.plan.partitions,
            wanted=wanted,
            limit=limit,
            layout=accepting[0].part.layout,
        )
        open_lanes = {lane.partition: lane for lane in accepting}
        full = _hand_out(reader, open_lanes, rows)
        if rows:
            end = (rows[-1][1].txid, rows[-1][1].id)
            for partition, lane in open_lanes.items():
                if partition not in full and lane.read_pos < end:
                    lane.read_pos = end  # nothing of this partition up to ``end`` is left unread
                    reader.moved = True
        reader.last_scan_full = len(rows) >= limit
        if reader.last_scan_full:  # rows wait behind the limit: read on, now or once a full lane has room
            for lane in accepting:
                if lane.capacity() <= 0:
                    lane.starved = True
            if any(lane.capacity() > 0 for lane in accepting):
                reader.wake.set()
            return None
        return len(rows)

    def _scan_limit(self, reader: RelayReader, accepting: list[Lane]) -> int:
        """Rows per read: ``SHARED_MAX_ROWS`` beside another active tenant; otherwise a batch per
        accepting lane within ``SCAN_MIN_ROWS``..``SCAN_MAX_ROWS``, or ``WIDE_SCAN_ROWS_PER_LANE`` per
        lane for a relay of many partitions (up to ``WIDE_SCAN_MAX_ROWS``)."""
        if self.scheduler.shared(reader.plan.tenant_name):
            return SHARED_MAX_ROWS
        policy = accepting[0].part.relay.policy
        limit = max(SCAN_MIN_ROWS, min(SCAN_MAX_ROWS, policy.batch_size * len(accepting)))
        return max(limit, min(WIDE_SCAN_MAX_ROWS, WIDE_SCAN_ROWS_PER_LANE * len(accepting)))

    # --- publishing ------------------------------------------------------------------------------

    def _round(self, reader: RelayReader) -> tuple[list[Lane], float | None]:
        """The lanes of the next round (rows buffered, not stopping, not waiting for a retry), from
        where the last round stopped, up to ``ROUND_MAX_MESSAGES`` (``SHARED_MAX_ROWS`` while
        another tenant is active), none if they hold fewer than ``BUSY_ROUND_MIN`` messages while a
        round is sending (a trickle would otherwise split into a round per read and lane); and,
        when none, how long until a retry is due (None: nothing to wait for)."""
        now = datetime.now(UTC)
        lanes = list(reader.lanes.values())
        first = reader.next_first % len(lanes) if lanes else 0
        most = SHARED_MAX_ROWS if self.scheduler.shared(reader.plan.tenant_name) else ROUND_MAX_MESSAGES
        chosen: list[Lane] = []
        size = 0
        retry_in: float | None = None
        for index in range(len(lanes)):
            lane = lanes[(first + index) % len(lanes)]
            if not lane.buffer or lane.part.stop.is_set() or lane.partition in reader.in_round:
                continue
            retry = lane.part.retry
            if retry is not None and retry.next_at is not None and retry.next_at > now:
                wait = (retry.next_at - now).total_seconds()
                retry_in = wait if retry_in is None else min(retry_in, wait)
                continue
            if chosen and size >= most:
                reader.next_first = first + index  # the lanes left over go first next round
                break
            chosen.append(lane)
            size += min(len(lane.buffer), lane.part.relay.policy.batch_size)
        else:
            reader.next_first = first
        if reader.sending and size < BUSY_ROUND_MIN:
            return [], retry_in
        return chosen, retry_in

    async def _run_rounds(self, reader: RelayReader) -> None:
        """Publish a relay's buffered rows in rounds: a round takes the next batch of every lane that
        has one and is in no round yet, sends them to the target in one round trip and settles each
        lane (cursor, refusals) with the engine's delivery policy. Up to ``ROUNDS_IN_FLIGHT`` rounds
        run at once over disjoint lanes (rows that come while a round waits for its cursor writes
        need not wait for it); a lane's next batch waits for its last one (per-key order)."""
        rounds: set[asyncio.Task[None]] = set()
        reader.failures = 0
        try:
            while not reader.stop.is_set():
                lanes: list[Lane] = []
                retry_in: float | None = None
                most = SHARED_ROUNDS_IN_FLIGHT if self.scheduler.shared(reader.plan.tenant_name) else ROUNDS_IN_FLIGHT
                if len(rounds) < most:
                    lanes, retry_in = self._round(reader)
                if not lanes:
                    reader.rows.clear()
                    if len(rounds) < most:  # rows that came between the look and the clear
                        lanes, retry_in = self._round(reader)
                    if not lanes:
                        await wait_event(reader.rows, retry_in)  # a round that ends sets ``rows`` too
                        continue
                reader.in_round.update(lane.partition for lane in lanes)
                rounds.add(asyncio.create_task(self._round_in_flight(reader, lanes, rounds), name="round"))
        finally:
            for task in list(rounds):
                task.cancel()

    async def _round_in_flight(self, reader: RelayReader, lanes: list[Lane], rounds: set[asyncio.Task[None]]) -> None:
        """A round, counted in ``rounds`` until it ends: it leaves the set before it wakes the
        publisher. (Left by the task's done callback, it was still counted when ``rows.set()`` woke
        the publisher, which, with every slot taken, cleared ``rows`` and waited for a wake-up that
        never came: the relay's buffered rows stayed unpublished.)"""
        try:
            await self._publish_round(reader, lanes)
        finally:
            rounds.discard(asyncio.current_task())
            reader.rows.set()

    async def _publish_round(self, reader: RelayReader, lanes: list[Lane]) -> None:
        """Send the next batch of each of ``lanes`` to the target in one call and settle them with the
        engine's delivery policy; a failure holds the lanes for a backoff (their rows are sent again)."""
        plan = reader.plan
        lost: list[_Partition] = []
        reader.sending += 1
        try:  # prepare() too: whatever it raises must not leave the lanes marked in a round for ever
            batches = [
                self.runner.prepare(lane.part, list(itertools.islice(lane.buffer, lane.part.relay.policy.batch_size)))
                for lane in lanes
            ]
            size = sum(len(batch.rows) for batch in batches)
            # the target first: a throttled target must not hold worker slots other tenants could use
            limits, asked = self._limits(reader), time.monotonic()
            async with limits.batch(size):
                waited = time.monotonic() - asked
                if limits.limited and waited >= THROTTLED_MIN_S:  # the target's limits held the round
                    reader.throttled_s += waited
                async with self.scheduler.slot(plan.tenant_name):
                    publisher = await self._publisher(reader)
                    lost = await self.runner.publish_batches(publisher, batches)
            reader.failures = 0
            self.outages.up(reader.target_outage)
        except Exception as exc:
            reader.failures += 1
            await self._back_off(reader, lanes, await self._round_failed(reader, lanes, exc))
        finally:
            reader.sending -= 1
            reader.in_round.difference_update(lane.partition for lane in lanes)
            reader.round_done.set()
            reader.rows.set()
        for part in lost:
            log.warning("partition %s of relay %s was taken over", part.lease.partition, plan.relay_name)
            part.stop.set()
            self.tick.set()
        if lost:
            await self._record_lost([part.lease for part in lost])
        for lane in lanes:
            part = lane.part
            while lane.buffer and (lane.buffer[0].txid, lane.buffer[0].id) <= part.cursor:
                lane.buffer.popleft()
            if lane.starved and lane.capacity() >= part.relay.policy.batch_size:
                lane.starved = False  # it left rows unread for want of room: read on now
                reader.wake.set()

    async def _round_failed(self, reader: RelayReader, lanes: list[Lane], exc: Exception) -> float:
        """Record why a round failed (the target's or the tenant database's outage on its partitions,
        the control DB's, or a log line for what was not foreseen); returns the backoff before its
        lanes are sent again (the relay's policy for a target outage: no attempt is charged)."""
        leases = [lane.part.lease for lane in lanes]
        if isinstance(exc, TargetUnavailable):
            self.outages.down(reader.target_outage, exc)
            if reader.plan.target_id not in self.publishers.in_use():
                with contextlib.suppress(Exception):
                    await self._refresh_target(reader)
            with contextlib.suppress(Exception):
                await self.fleet.record_errors(
                    leases, f"target unavailable: {exc}", PartitionErrorClass.TARGET_UNAVAILABLE
                )
            policy = lanes[0].part.relay.policy
            base_s = policy.backoff_base_ms / 1000
            backoff = backoff_s(reader.failures, base_s=base_s, cap_s=policy.backoff_max_ms / 1000)
            return exc.pause_s(backoff, floor_s=base_s)  # the target's Retry-After, when it gave one
        if isinstance(exc, (TenantDatabaseError, AddressNotAllowed)):
            with contextlib.suppress(Exception):
                await self.fleet.record_errors(leases, str(exc), PartitionErrorClass.DATABASE_UNAVAILABLE)
            return backoff_s(reader.failures, base_s=0.5, cap_s=30)
        if control_unavailable(exc):
            self.outages.down(CONTROL_DB, exc)
        else:
            log.error("relay %s: a round of %d partitions failed", reader.plan.relay_name, len(lanes), exc_info=exc)
        return backoff_s(reader.failures, base_s=0.2, cap_s=10)

    async def _back_off(self, reader: RelayReader, lanes: list[Lane], delay: float) -> None:
        """Hold a failed round's lanes for ``delay`` (their rows are sent again after), less when the
        relay or one of them stops. Meanwhile it does not count as sending: other lanes' rows go on
        in rounds of any size."""
        reader.sending -= 1
        reader.rows.set()
        try:
            await wait_any([reader.stop, *(lane.part.stop for lane in lanes)], delay)
        finally:
            reader.sending += 1

    async def _publisher(self, reader: RelayReader) -> Publisher:
        plan = reader.plan
        if not self.publishers.has(plan.target_id):
            # about to connect: with the newest credential, which the rotator promised for this
            # worker's targets that had no publisher open (an idle relay's, see ``idle_targets``)
            with contextlib.suppress(Exception):
                await self._refresh_target(reader)
        return await self.publishers.get(
            plan.target_id,
            plan.target_version,
            reader.target,
            reader.target_password,
            secret_version=reader.target_secret_version,
        )

    def idle_targets(self) -> set[uuid.UUID]:
        """The targets of the relays this worker reads, whether or not a publisher of them is open."""
        return {reader.plan.target_id for reader in self.readers.values()}

    async def _refresh_target(self, reader: RelayReader) -> None:
        """Before connecting to the target (and after it refused to connect) with no publisher of it
        open here: take its newest credential from the store (a PUT that fixed a wrong password is a
        rotation, which does not restart the relay, and only switches publishers that are open).
        While a rotation is pending, the pending and the current credential are tried in turn."""
        due = await self.store.credential_of("targets", reader.plan.target_id)
        if due is None:
            return
        token, spec, version = due.secret, due.spec, due.secret_version
        if due.rotating and due.pending_version is not None:
            if reader.pending_first:
                token, spec, version = due.pending, due.target_spec, due.pending_version
            reader.pending_first = not reader.pending_first
        reader.target = msgspec.json.decode(spec, type=Target)
        reader.target_password = self.runner._decrypt(token)
        reader.target_secret_version = version

    # --- lag ---------------------------------------------------------------------------------------

    async def _sample_lag_forever(self) -> None:
        while True:
            await asyncio.sleep(LAG_INTERVAL_S)
            try:
                await self._sample_lag()
            except Exception as exc:
                log.debug("lag sample failed: %s", exc)

    async def _sample_lag(self) -> None:
        """Per lane: the age of its oldest unpublished row, recorded only when it changed. A lane
        with rows buffered knows it. An empty lane of a relay whose last read reached the horizon
        and that no wake-up left unanswered has nothing waiting (lag 0, no query). Otherwise (the read
        was full, or a notified row is not readable yet) one index probe per relay gives the age of
        the next row after the lowest position its empty lanes read to, and, past a few seconds, the
        transaction holding the horizon back."""
        samples: list[LagSample] = []
        now = datetime.now(UTC)
        for reader in list(self.readers.values()):
            if reader.quiet:
                continue
            waiting_at, stall = await self._probe_waiting(reader, now)
            reader.quiet = not reader.last_scan_full and reader.notified_at is None and waiting_at is None
            throttled, reader.throttled_s = reader.throttled_s, 0.0
            samples.extend(_lane_samples(reader, now, waiting_at, stall, throttled))
        quiet = [reader for reader in self.readers.values() if reader.quiet]
        await self.fleet.record_lag(samples)
        await self._advance_idle_cursors(
            [reader for reader in self.readers.values() if reader not in quiet or reader.moved]
        )

    async def _probe_waiting(self, reader: RelayReader, now: datetime) -> tuple[datetime | None, dict[str, Any] | None]:
        """When the next unread row of the relay's empty lanes was written (None: nothing waits, or
        no probe was needed), and the transaction holding the horizon back once it waited a while."""
        empty = [lane for lane in reader.lanes.values() if not lane.buffer]
        if not empty or not (reader.last_scan_full or reader.notified_at is not None):
            return None, None
        waiting_at: datetime | None = None
        stall: dict[str, Any] | None = None
        try:
            pool = await self.tenants.pool(
                reader.plan.database_id,
                reader.plan.database_version,
                reader.database,
                reader.database_password,
                secret_version=reader.plan.database_secret_version,
            )
            waiting_at = await tenant_db.next_row_at(pool, reader.database.schema, min(lane.read_pos for lane in empty))
            if waiting_at is None:
                reader.notified_at = None  # nothing waits: the wake-up was answered by an earlier read
            elif not reader.last_scan_full and (now - waiting_at).total_seconds() >= STALL_AFTER_S:
                stall = await horizon_stall(pool)
        except Exception as exc:
            log.debug("lag probe of relay %s failed: %s", reader.plan.relay_name, exc)
        return waiting_at, stall

    async def _advance_idle_cursors(self, readers: list[RelayReader]) -> None:
        """Move the stored cursor of a lane with nothing buffered, in flight or retrying up to where
        its reads got (rows of other partitions passed by): a worker taking the partition over later,
        and outbox maintenance, then start from there instead of from the lane's last own row."""
        writes: list[CursorWrite] = []
        for reader in readers:
            reader.moved = False
            for lane in list(reader.lanes.values()):
                if (
                    not lane.buffer
                    and lane.part.retry is None
                    and not _resending(lane)
                    and lane.read_pos > lane.part.cursor
                ):
                    txid, row_id = lane.read_pos
                    writes.append(CursorWrite(lease=lane.part.lease, txid=txid, row_id=row_id, published=0))
        if not writes:
            return
        await self.fleet.advance_idle_cursors(writes)
        for write in writes:
            owner = self.readers.get(write.lease.relay_id)
            moved = owner.lanes.get(write.lease.partition) if owner else None
            if moved is not None and moved.part.lease.epoch == write.lease.epoch:
                moved.part.cursor = max(moved.part.cursor, (write.txid, write.row_id))


def _lane_samples(
    reader: RelayReader,
    now: datetime,
    waiting_at: datetime | None,
    stall: dict[str, Any] | None,
    throttled_s: float = 0.0,
) -> list[LagSample]:
    """Each lane's lag (its oldest buffered row, else the relay's next waiting row) into the pending
    gauge, and as a sample to store where it changed (every sample while the relay's rounds waited
    ``throttled_s`` on the target's limits); a lane with rows or lag keeps the reader awake."""
    samples: list[LagSample] = []
    for lane in list(reader.lanes.values()):
        oldest = lane.buffer[0].created_at if lane.buffer else waiting_at
        pending = len(lane.buffer)
        lag = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        metric_key = (reader.plan.tenant_name, reader.plan.relay_name, reader.plan.target_name, lane.partition)
        instruments().pending[metric_key] = PendingSample(labels=lane.part.labels, pending=pending, oldest_age_s=lag)
        key = (round(lag, 0), pending)
        if pending or lag:
            reader.quiet = False
        if key != lane.last_lag or throttled_s > 0 or lane.throttled:
            lane.throttled = throttled_s > 0
            lane.last_lag = key
            samples.append(
                LagSample(
                    lease=lane.part.lease,
                    lag_s=lag,
                    pending=pending,
                    oldest_at=oldest,
                    stall=stall if not lane.buffer else None,
                    throttled_s=throttled_s,
                )
            )
    return samples


def _hand_out(
    reader: RelayReader, open_lanes: dict[int, Lane], rows: list[tuple[int, tenant_db.OutboxRow]]
) -> set[int]:
    """Buffer a read's rows in their lanes, in order, past each lane's read position; a lane that is
    full stops taking rows (marked starved: it reads on once it has room). Returns the full lanes'
    partitions."""
    full: set[int] = set()
    for partition, row in rows:
        lane = open_lanes.get(partition)
        if lane is None or partition in full:
            continue
        position = (row.txid, row.id)
        if position <= lane.read_pos:
            continue
        if lane.capacity() <= 0:
            full.add(partition)
            lane.starved = True
            continue
        fence = lane.part.restore
        if fence is not None and row.id <= fence.max_id and row.created_at <= fence.max_created_at:
            # a restored backlog that was resent (or skipped) on its own: the cursor only passes it
            row = msgspec.structs.replace(row, fenced=True, payload=b"")
        lane.buffer.append(row)
        lane.read_pos = position
        reader.rows.set()
        reader.quiet = False
    return full


def _next_notified_retry(reader: RelayReader, got: int | None, notified_retry: int) -> int:
    """How far into ``NOTIFIED_RETRY_S`` the next read's wait is, after a read that got ``got`` rows
    (None: a full read, more wait behind it)."""
    if got is None:  # the lanes that have room ask again
        return 0
    if got == 0 and reader.notified_at is not None:
        # the notified row is not readable yet: look again soon, then at the relay's poll interval
        # for as long as a transaction holds the horizon below it (the lag probe names that
        # transaction in the status meanwhile)
        return min(notified_retry + 1, len(NOTIFIED_RETRY_S))
    if got:
        reader.notified_at = None
    return 0


def _resending(lane: Lane) -> bool:
    return lane.part.restore is not None and lane.part.restore.state == "resending"


__all__ = ["BatchWriter", "FleetEngine", "Lane", "RelayReader", "cursor_writer"]
