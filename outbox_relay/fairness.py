"""Admission control for the worker data plane: fair slots per worker, limits per target.

One worker process relays thousands of partitions ("lanes") of many tenants. Before a lane publishes a
batch it takes

* a slot from the worker's :class:`FairScheduler`, which bounds the batches in flight in the process and,
  when they are all taken, hands freed slots to tenants in weighted round robin, so a tenant with a
  thousand busy lanes cannot starve a tenant with one;
* its target's :class:`TargetLimits`: a bound on batches in flight to that target and a :class:`TokenBucket`
  in messages per second.

Everything here is single-event-loop asyncio with no locks: state changes happen between awaits, so each
operation is atomic. Every wait is cancellation-safe: a cancelled waiter leaves its queue and never holds
anything; a cancelled holder releases on the way out of its ``async with``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType

__all__ = ["FairScheduler", "TargetLimits", "TokenBucket"]

# A wait shorter than this is float rounding (earned vs reserved totals), not a reason to sleep again.
_EPSILON_S = 1e-9
SHARE_WINDOW_S = 1.0
"""A tenant granted a slot within this long counts as active for :meth:`FairScheduler.shared`."""


class _Queue:
    """FIFO of pending grants, with O(1) withdrawal: a cancelled future is skipped when it reaches the head.

    ``live`` counts the waiters that have not left: it includes a waiter whose future was cancelled but
    whose task has not run its ``withdraw`` yet, so ``live`` can be positive with nothing left to grant
    (:meth:`grant` says so). ``weight`` and ``credit`` are the round-robin state of a tenant (unused by
    :class:`_Gate`).
    """

    __slots__ = ("_futures", "credit", "live", "weight")

    def __init__(self, weight: int = 1) -> None:
        self._futures: deque[asyncio.Future[None]] = deque()
        self.live = 0
        self.weight = weight
        self.credit = weight

    def push(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        self.live += 1
        return fut

    def grant(self) -> bool:
        """Resolve the oldest pending future; False when there is none (only cancelled ones were left)."""
        futures = self._futures
        while futures:
            fut = futures.popleft()
            if not fut.done():
                self.live -= 1
                fut.set_result(None)
                return True
        return False

    def withdraw(self, fut: asyncio.Future[None]) -> None:
        """Take back the ungranted ``fut`` of a waiter that leaves (cancelled); it may have been popped."""
        fut.cancel()
        self.live -= 1
        if not self.live:
            self._futures.clear()  # only withdrawn futures are left: drop them now


async def _wait(queue: _Queue, release: Callable[[], None]) -> None:
    """Wait in ``queue`` until granted. Cancelled while queued: withdraw. Cancelled after the grant but
    before resuming: the slot was already counted as ours, so ``release`` it (hands it to the next)."""
    fut = queue.push()
    try:
        await fut
    except BaseException:
        if fut.done() and not fut.cancelled():
            release()
        else:
            queue.withdraw(fut)
        raise


class FairScheduler:
    """Bounded batches in flight per worker, granted to tenants in weighted round robin.

    Promises:

    * never more than ``max_in_flight`` slots held (a slot counts as held from the moment it is granted);
    * work conserving: a slot is never idle while someone waits; when one is free, ``slot()`` grants at once
      without suspending (the uncontended path is a counter decrement and a dict update);
    * when contended, waiters queue per tenant, FIFO within a tenant, and each freed slot goes to the next
      waiting tenant in deficit round robin: a tenant of weight ``w`` gets ``w`` consecutive grants per
      round. A tenant with nothing waiting is not in the round and keeps no credit: when it comes back it
      joins the end of the round with a fresh quantum, so idling never buys a burst later.
    * O(1) amortised per grant, release, and cancellation (cancelled waiters are skipped lazily).

    A tenant's weight is the ``weight`` of its most recent queued ``slot()`` call; it takes effect from the
    tenant's next turn.

    The scheduler also remembers the last two tenants it granted a slot, so :meth:`shared` can tell a
    tenant in O(1) whether another one has been active lately (the caller then cuts its work into short
    pieces: slots share batches in flight, but the event loop's turns are the CPU they share).

    There is no cap on one tenant's share: alone, a tenant may hold every slot (idle capacity helps nobody).
    Fairness acts on each freed slot, so once others queue, a monopolising tenant gives up slots as its
    batches finish: a newcomer waits at most for the next release plus one round, never for the noisy
    tenant's queue. That bound is only as good as batches are short, which is why this bounds batches, not
    lanes.
    """

    __slots__ = ("_clock", "_free", "_held", "_max", "_recent", "_ring")

    def __init__(self, *, max_in_flight: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._max = max_in_flight
        self._clock = clock
        # The last tenant granted a slot and when, then the last one before it that was not that tenant.
        self._recent: list[tuple[Hashable, float] | None] = [None, None]
        self._free = max_in_flight
        self._held: dict[Hashable, int] = {}
        # Tenants with someone waiting, in round order: the first is the one whose turn it is.
        self._ring: OrderedDict[Hashable, _Queue] = OrderedDict()

    @property
    def max_in_flight(self) -> int:
        return self._max

    def slot(self, tenant: Hashable, *, weight: int = 1) -> contextlib.AbstractAsyncContextManager[None]:
        """``async with scheduler.slot(tenant_id, weight=w): ...`` waits until granted and releases on exit
        (also on exception or cancellation)."""
        if weight < 1:
            raise ValueError(f"weight must be at least 1, got {weight}")
        return _Slot(self, tenant, weight)

    def in_flight(self, tenant: Hashable) -> int:
        """Slots ``tenant`` holds (granted, whether or not its task has resumed yet)."""
        return self._held.get(tenant, 0)

    def waiting(self, tenant: Hashable) -> int:
        """``tenant``'s queued waiters (a waiter cancelled this instant counts until its task runs)."""
        queue = self._ring.get(tenant)
        return queue.live if queue is not None else 0

    def shared(self, tenant: Hashable, *, within_s: float = SHARE_WINDOW_S) -> bool:
        """Whether a tenant other than ``tenant`` was granted a slot within the last ``within_s``."""
        latest, before = self._recent
        other = latest if latest is None or latest[0] != tenant else before
        return other is not None and self._clock() - other[1] <= within_s

    def _granted(self, tenant: Hashable) -> None:
        latest = self._recent[0]
        if latest is not None and latest[0] != tenant:
            self._recent[1] = latest
        self._recent[0] = (tenant, self._clock())

    def snapshot(self) -> dict[Hashable, tuple[int, int]]:
        """Tenant -> (in flight, waiting), for every tenant with either; for status and metrics."""
        out = {tenant: (held, 0) for tenant, held in self._held.items()}
        for tenant, queue in self._ring.items():
            out[tenant] = (self._held.get(tenant, 0), queue.live)
        return out

    async def _queue_up(self, tenant: Hashable, weight: int) -> None:
        """The contended path of :class:`_Slot`: wait in ``tenant``'s queue for a released slot."""
        queue = self._ring.get(tenant)
        if queue is None:
            queue = self._ring[tenant] = _Queue(weight)
        else:
            queue.weight = weight
        try:
            await _wait(queue, lambda: self._release(tenant))
        finally:
            if not queue.live and self._ring.get(tenant) is queue:
                del self._ring[tenant]

    def _release(self, tenant: Hashable) -> None:
        held = self._held[tenant] - 1
        if held:
            self._held[tenant] = held
        else:
            del self._held[tenant]
        ring = self._ring
        while ring:
            turn, queue = next(iter(ring.items()))  # whose turn it is
            if not queue.grant():
                del ring[turn]  # its waiters were all cancelled (and will withdraw when they run)
                continue
            self._held[turn] = self._held.get(turn, 0) + 1
            self._granted(turn)
            if not queue.live:
                del ring[turn]  # leaves the round, and its unused credit with it
            else:
                queue.credit -= 1
                if queue.credit <= 0:
                    queue.credit = queue.weight
                    ring.move_to_end(turn)
            return
        self._free += 1


class _Slot(contextlib.AbstractAsyncContextManager[None]):
    __slots__ = ("_scheduler", "_tenant", "_weight")

    def __init__(self, scheduler: FairScheduler, tenant: Hashable, weight: int) -> None:
        self._scheduler = scheduler
        self._tenant = tenant
        self._weight = weight

    async def __aenter__(self) -> None:
        scheduler = self._scheduler
        if scheduler._free:  # free slots imply nobody waits (_release hands slots over directly)
            scheduler._free -= 1
            scheduler._held[self._tenant] = scheduler._held.get(self._tenant, 0) + 1
            scheduler._granted(self._tenant)
            return
        await scheduler._queue_up(self._tenant, self._weight)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._scheduler._release(self._tenant)


class TokenBucket:
    """msg/s limit. ``acquire(n)`` waits until n tokens are available and takes them.

    The bucket holds up to ``burst`` tokens (default: one second's worth, ``rate_per_s``) and starts full.
    Tokens are reserved at call time, so concurrent acquirers are paced in call order and the bucket can
    go into debt: ``n`` may exceed the burst, and then the caller waits for the deficit (large batches are
    paced, not refused), and later callers wait for the debt to be paid. ``rate_per_s`` None = unlimited:
    ``acquire`` never waits and nothing is counted.

    :meth:`update` changes the rate at runtime and applies to callers already waiting too (they re-check
    at once). A caller cancelled while waiting gives its tokens back.
    """

    def __init__(
        self,
        *,
        rate_per_s: float | None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._rate: float | None = None
        self._burst = 0.0
        # Running totals; tokens = earned - taken. A reservation is paid once earned reaches its position.
        self._earned = 0.0
        self._taken = 0.0
        self._stamp = clock()
        self._changed: asyncio.Future[None] | None = None
        self._throttled_s = 0.0
        self.update(rate_per_s=rate_per_s, burst=burst)

    @property
    def rate_per_s(self) -> float | None:
        return self._rate

    @property
    def burst(self) -> float | None:
        return None if self._rate is None else self._burst

    @property
    def tokens(self) -> float | None:
        """Tokens available now (negative: debt of reservations not yet paid); None when unlimited."""
        return None if self._rate is None else self._earned_at(self._clock()) - self._taken

    @property
    def throttled_s_total(self) -> float:
        """Seconds callers have spent waiting in :meth:`acquire`, summed (cancelled waits included)."""
        return self._throttled_s

    def update(self, *, rate_per_s: float | None, burst: float | None = None) -> None:
        """Change the limit now; tokens earned so far are kept (up to the new burst). Wakes waiters so that
        they wait by the new rate (unlimited: they go at once, any debt is forgiven)."""
        if rate_per_s is not None and not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate_per_s must be a positive number or None, got {rate_per_s}")
        if burst is not None and not (burst > 0 and math.isfinite(burst)):
            raise ValueError(f"burst must be a positive number or None, got {burst}")
        now = self._clock()
        was_unlimited = self._rate is None
        self._earned = self._earned_at(now)
        self._stamp = now
        self._rate = rate_per_s
        if rate_per_s is None:
            self._burst = 0.0
            self._earned = max(self._earned, self._taken)
        else:
            self._burst = burst if burst is not None else rate_per_s
            if was_unlimited:
                self._earned = self._taken + self._burst
            else:
                self._earned = min(self._earned, self._taken + self._burst)
        self._wake()

    def delay_for(self, n: int) -> float:
        """Seconds until ``n`` tokens would be available (after any debt), without taking them."""
        if self._rate is None:
            return 0.0
        return max(0.0, (self._taken + n - self._earned_at(self._clock())) / self._rate)

    async def acquire(self, n: int) -> float:
        """Take ``n`` tokens, waiting as long as needed; returns the seconds waited."""
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        if self._rate is None:
            return 0.0
        start = self._clock()
        self._earned = self._earned_at(start)
        self._stamp = start
        self._taken += n
        position = self._taken
        if self._earned >= position:
            return 0.0
        try:
            while (delay := self._delay_to(position)) > _EPSILON_S:
                await self._nap(delay)
        except BaseException:
            # Give the reservation back: later reservations get paid n tokens sooner.
            self._earned = min(self._earned + n, self._taken + self._burst)
            self._wake()
            raise
        finally:
            waited = self._clock() - start
            self._throttled_s += waited
        return waited

    def _earned_at(self, now: float) -> float:
        if self._rate is None:
            return self._earned
        return min(self._earned + (now - self._stamp) * self._rate, self._taken + self._burst)

    def _delay_to(self, position: float) -> float:
        if self._rate is None:
            return 0.0
        now = self._clock()
        self._earned = self._earned_at(now)
        self._stamp = now
        return (position - self._earned) / self._rate

    async def _nap(self, delay_s: float) -> None:
        """Sleep ``delay_s``, or less if :meth:`update` or a refund changes the picture meanwhile."""
        changed = self._changed
        if changed is None:
            changed = self._changed = asyncio.get_running_loop().create_future()
        sleeper = asyncio.ensure_future(self._sleep(delay_s))
        try:
            await asyncio.wait((sleeper, changed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if sleeper.done() and not sleeper.cancelled():
            sleeper.result()  # a failing sleep() fails acquire()

    def _wake(self) -> None:
        if self._changed is not None:
            if not self._changed.done():
                self._changed.set_result(None)
            self._changed = None


class _Gate:
    """FIFO bound on holders that can be resized at runtime; ``limit`` None = unbounded.

    Shrinking below the current holders takes effect as they release; nobody is pre-empted.
    """

    __slots__ = ("_queue", "held", "limit")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0
        self._queue = _Queue()

    async def acquire(self) -> None:
        if self.limit is None or self.held < self.limit:  # room implies no one to admit: _admit ran
            self.held += 1
            return
        await _wait(self._queue, self.release)

    def release(self) -> None:
        self.held -= 1
        self._admit()

    def resize(self, limit: int | None) -> None:
        self.limit = limit
        self._admit()

    def _admit(self) -> None:
        while (self.limit is None or self.held < self.limit) and self._queue.grant():
            self.held += 1


def _check_max_in_flight(max_in_flight: int | None) -> None:
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1 or None, got {max_in_flight}")


class TargetLimits:
    """Per target: a :class:`TokenBucket` (msg/s, burst one second's worth) and a bound on batches in flight.

    ``async with limits.batch(len(batch)): publish`` first waits (FIFO) for an in-flight slot, then for the
    batch's tokens while holding it, so the bound counts batches being throttled as well as being
    published. The slot is released on exit, also on exception or cancellation; a batch cancelled while
    waiting for tokens gives them back. ``None`` for either limit means unlimited.
    """

    def __init__(
        self,
        *,
        rate_per_s: float | None,
        max_in_flight: int | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        _check_max_in_flight(max_in_flight)
        self._bucket = TokenBucket(rate_per_s=rate_per_s, clock=clock, sleep=sleep)
        self._gate = _Gate(max_in_flight)

    @property
    def limited(self) -> bool:
        """Whether either limit is set (a batch can wait here at all)."""
        return self._bucket.rate_per_s is not None or self._gate.limit is not None

    def batch(self, messages: int) -> contextlib.AbstractAsyncContextManager[None]:
        if messages < 0:
            raise ValueError(f"messages must not be negative, got {messages}")
        return _Batch(self, messages)

    def update(self, *, rate_per_s: float | None, max_in_flight: int | None) -> None:
        """Apply a changed policy now, to waiting batches too (see :meth:`TokenBucket.update`; a lower
        in-flight bound takes effect as batches finish, a higher one admits waiters at once)."""
        _check_max_in_flight(max_in_flight)
        if rate_per_s == self._bucket.rate_per_s and max_in_flight == self._gate.limit:
            return  # unchanged: keep the tokens earned and let waiters be (callers re-apply per batch)
        self._bucket.update(rate_per_s=rate_per_s)
        self._gate.resize(max_in_flight)

    def snapshot(self) -> dict[str, float | int | None]:
        """``rate_per_s``, ``in_flight``, ``max_in_flight``, ``tokens`` (None when unlimited; negative is a
        debt), ``throttled_s_total`` (seconds batches spent waiting for tokens)."""
        return {
            "rate_per_s": self._bucket.rate_per_s,
            "in_flight": self._gate.held,
            "max_in_flight": self._gate.limit,
            "tokens": self._bucket.tokens,
            "throttled_s_total": self._bucket.throttled_s_total,
        }

    async def _enter(self, messages: int) -> None:
        await self._gate.acquire()
        try:
            await self._bucket.acquire(messages)
        except BaseException:
            self._gate.release()
            raise


class _Batch(contextlib.AbstractAsyncContextManager[None]):
    __slots__ = ("_limits", "_messages")

    def __init__(self, limits: TargetLimits, messages: int) -> None:
        self._limits = limits
        self._messages = messages

    async def __aenter__(self) -> None:
        await self._limits._enter(self._messages)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._limits._gate.release()
