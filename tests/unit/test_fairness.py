"""Pure logic: the worker's fair slot scheduler, the token bucket and per-target limits (fake clock)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Hashable

import pytest

from outbox_relay.fairness import FairScheduler, TargetLimits, TokenBucket


async def finished(*aws: Awaitable[object], return_exceptions: bool = False) -> list[object]:
    """asyncio.gather, but failing instead of hanging when a lost slot leaves some waiting forever."""
    return await asyncio.wait_for(asyncio.gather(*aws, return_exceptions=return_exceptions), timeout=10)


async def settle(rounds: int = 20) -> None:
    """Let every runnable task run until it blocks again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class AutoClock:
    """Fake time where sleep() jumps the clock forward: sequential waits without real time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class ManualClock:
    """Fake time that moves only by advance(); sleepers wake when their deadline has passed."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self.now + seconds, fut)
        self._sleepers.append(entry)
        try:
            await fut
        finally:
            self._sleepers.remove(entry)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, fut in list(self._sleepers):
            if deadline <= self.now + 1e-12 and not fut.done():
                fut.set_result(None)
        await settle()


async def hold(scheduler: FairScheduler, tenant: Hashable) -> contextlib.AsyncExitStack:
    """Take a slot from the test itself (must be uncontended); close the stack to release it."""
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(scheduler.slot(tenant))
    return stack


def granted_without_suspending(cm: contextlib.AbstractAsyncContextManager[None]) -> bool:
    """True when ``cm.__aenter__()`` completes on its first step, i.e. without ever yielding to the loop."""
    coro = cm.__aenter__()
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


# --- FairScheduler ---------------------------------------------------------------------------------------


async def test_uncontended_slots_are_granted_without_suspending() -> None:
    scheduler = FairScheduler(max_in_flight=3)
    slots = [scheduler.slot("a"), scheduler.slot("a"), scheduler.slot("b", weight=5)]
    assert [granted_without_suspending(cm) for cm in slots] == [True, True, True]
    assert (scheduler.in_flight("a"), scheduler.in_flight("b"), scheduler.max_in_flight) == (2, 1, 3)
    assert scheduler.snapshot() == {"a": (2, 0), "b": (1, 0)}
    # the fourth has to wait: it suspends, and is counted as waiting
    fourth = scheduler.slot("c")
    entering = asyncio.ensure_future(fourth.__aenter__())
    await settle()
    assert not entering.done()
    assert scheduler.waiting("c") == 1
    assert scheduler.snapshot() == {"a": (2, 0), "b": (1, 0), "c": (0, 1)}
    await slots[0].__aexit__(None, None, None)
    await entering
    assert scheduler.snapshot() == {"a": (1, 0), "b": (1, 0), "c": (1, 0)}
    for cm in [*slots[1:], fourth]:
        await cm.__aexit__(None, None, None)
    assert scheduler.snapshot() == {}


async def test_stress_random_holders_and_cancellations_never_exceed_max_and_drain() -> None:
    rng = random.Random(20240607)
    max_in_flight = 4
    scheduler = FairScheduler(max_in_flight=max_in_flight)
    tenants = ["t0", "t1", "t2", "t3", "t4"]
    inside: set[int] = set()
    release: dict[int, asyncio.Event] = {}
    tasks: dict[int, asyncio.Task[None]] = {}
    entered = 0

    async def lane(n: int, tenant: str) -> None:
        nonlocal entered
        async with scheduler.slot(tenant, weight=1 + n % 3):
            inside.add(n)
            entered += 1
            try:
                await release[n].wait()
                if n % 7 == 0:
                    raise RuntimeError("publish failed")  # exception exit must release too
            finally:
                inside.discard(n)

    def check() -> None:
        snap = scheduler.snapshot()
        held = sum(h for h, _ in snap.values())
        waiting = sum(w for _, w in snap.values())
        assert len(inside) <= held <= max_in_flight
        if waiting:  # work conserving: no slot idles while someone waits
            assert held == max_in_flight
        live = [t for t in tasks.values() if not t.done()]
        assert held + waiting <= len(live)

    for step in range(3000):
        action = rng.random()
        if action < 0.45:
            n = step
            release[n] = asyncio.Event()
            tasks[n] = asyncio.create_task(lane(n, rng.choice(tenants)))
        elif action < 0.75:
            holders = sorted(inside)
            if holders:
                release[rng.choice(holders)].set()
        else:
            pending = [n for n, t in tasks.items() if not t.done()]
            if pending:
                tasks[rng.choice(pending)].cancel()  # queued or holding, whichever it is
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
            check()
        check()

    for event in release.values():
        event.set()
    await finished(*tasks.values(), return_exceptions=True)
    check()
    assert entered > 300  # the run really exercised grants, not just cancellations
    assert scheduler.snapshot() == {}
    # every slot came back: max_in_flight uncontended grants again
    assert all(granted_without_suspending(scheduler.slot("x")) for _ in range(max_in_flight))
    assert not granted_without_suspending(scheduler.slot("x"))


async def grant_order(scheduler: FairScheduler, queued: list[tuple[str, int, int]]) -> list[str]:
    """Fill the scheduler with blockers, queue ``count`` lanes per (tenant, count, weight) in that order,
    release the blockers, and return the tenants in the order their lanes were granted."""
    blockers = [await hold(scheduler, "blocker") for _ in range(scheduler.max_in_flight)]
    order: list[str] = []

    async def lane(tenant: str, weight: int) -> None:
        async with scheduler.slot(tenant, weight=weight):
            order.append(tenant)
            await asyncio.sleep(0)

    tasks = []
    for tenant, count, weight in queued:
        tasks += [asyncio.create_task(lane(tenant, weight)) for _ in range(count)]
        await settle()
        assert scheduler.waiting(tenant) == count
    for blocker in blockers:
        await blocker.aclose()
    await finished(*tasks)
    assert scheduler.snapshot() == {}
    return order


async def test_noisy_tenant_cannot_starve_quiet_one() -> None:
    order = await grant_order(FairScheduler(max_in_flight=2), [("A", 100, 1), ("B", 5, 1)])
    assert len(order) == 105
    # interleaved A, B until B is done, although all of A's lanes queued first
    assert order[:10] == ["A", "B"] * 5
    assert order[10:] == ["A"] * 95


async def test_weights_give_proportional_grants() -> None:
    order = await grant_order(FairScheduler(max_in_flight=1), [("A", 600, 3), ("B", 600, 1)])
    assert order[:8] == ["A", "A", "A", "B"] * 2
    first = order[:800]
    assert (first.count("A"), first.count("B")) == (600, 200)


async def test_idle_tenant_accumulates_no_credit() -> None:
    scheduler = FairScheduler(max_in_flight=1)
    blocker = await hold(scheduler, "blocker")
    order: list[str] = []
    finish = asyncio.Event()

    async def lane(tenant: str, weight: int) -> None:
        async with scheduler.slot(tenant, weight=weight):
            order.append(tenant)
            await finish.wait()

    async def let_one_finish() -> None:
        finish.set()  # wakes the one holder; the next one granted waits on the cleared event
        await asyncio.sleep(0)
        finish.clear()
        await settle()

    lanes = [asyncio.create_task(lane("A", 1)) for _ in range(20)]
    await settle()
    lanes.append(asyncio.create_task(lane("B", 3)))
    await settle()
    await blocker.aclose()
    await settle()
    for _ in range(6):  # B's one lane is served, then B sits out while A is served alone
        await let_one_finish()
    assert order == ["A", "B", "A", "A", "A", "A", "A"]
    # B queues 6 lanes: it gets its 3 per round, not a catch-up burst for the rounds it sat out, and
    # joins the end of the round (behind A, whose turn it is)
    lanes += [asyncio.create_task(lane("B", 3)) for _ in range(6)]
    await settle()
    finish.set()
    await finished(*lanes)
    assert "".join(order[7:17]) == "ABBBABBBAA"
    assert scheduler.snapshot() == {}


async def test_shared_tells_a_tenant_whether_another_was_granted_lately() -> None:
    clock = AutoClock()
    scheduler = FairScheduler(max_in_flight=2, clock=lambda: clock.now)
    assert not scheduler.shared("A")  # nobody yet
    async with scheduler.slot("A"):
        pass
    assert not scheduler.shared("A") and scheduler.shared("B")
    clock.now = 0.5
    async with scheduler.slot("B"):  # uncontended grant
        pass
    assert scheduler.shared("A") and scheduler.shared("B") and scheduler.shared("C")
    clock.now = 1.2  # A's grant is 1.2 s old, B's 0.7 s
    assert not scheduler.shared("B") and scheduler.shared("A")
    async with scheduler.slot("B"):  # B again: A stays the last other tenant
        pass
    assert not scheduler.shared("B")
    clock.now = 2.1
    assert scheduler.shared("A")  # B's last grant is 0.9 s old
    clock.now = 2.3
    assert not scheduler.shared("A")
    blocker = await hold(scheduler, "A")
    second = await hold(scheduler, "A")
    waiter = asyncio.create_task(hold(scheduler, "C"))  # contended: granted when A releases
    await settle()
    clock.now = 5.0
    await blocker.aclose()
    await settle()
    assert scheduler.shared("A")  # C's grant came through the queue, at 5.0
    assert not scheduler.shared("C")  # A's last grant was at 2.3
    clock.now = 6.5
    assert not scheduler.shared("A")
    await second.aclose()
    await (await waiter).aclose()


async def test_cancelled_waiter_leaves_queue_and_never_holds() -> None:
    scheduler = FairScheduler(max_in_flight=1)
    blocker = await hold(scheduler, "blocker")
    ran: list[str] = []

    async def lane(name: str, tenant: str) -> None:
        async with scheduler.slot(tenant):
            ran.append(name)

    w1 = asyncio.create_task(lane("w1", "A"))
    w2 = asyncio.create_task(lane("w2", "A"))
    w3 = asyncio.create_task(lane("w3", "B"))
    await settle()
    assert (scheduler.waiting("A"), scheduler.waiting("B")) == (2, 1)
    w1.cancel()
    await settle()
    assert w1.cancelled()
    assert (scheduler.waiting("A"), scheduler.in_flight("A")) == (1, 0)
    await blocker.aclose()
    await finished(w2, w3)
    assert ran == ["w2", "w3"]
    assert scheduler.snapshot() == {}


async def test_cancelled_holder_frees_its_slot_for_the_next_waiter() -> None:
    scheduler = FairScheduler(max_in_flight=1)
    holding = asyncio.Event()
    ran: list[str] = []

    async def holder() -> None:
        async with scheduler.slot("A"):
            holding.set()
            await asyncio.Event().wait()  # forever, until cancelled

    async def waiter() -> None:
        async with scheduler.slot("B"):
            ran.append("waiter")

    h = asyncio.create_task(holder())
    await holding.wait()
    w = asyncio.create_task(waiter())
    await settle()
    assert scheduler.snapshot() == {"A": (1, 0), "B": (0, 1)}
    h.cancel()
    await finished(w)
    assert h.cancelled()
    assert ran == ["waiter"]
    assert scheduler.snapshot() == {}


async def test_waiter_cancelled_after_its_grant_passes_the_slot_on() -> None:
    """The race: a slot is granted to a queued waiter, which is cancelled before it gets to run."""
    scheduler = FairScheduler(max_in_flight=1)
    cm = scheduler.slot("H")
    await cm.__aenter__()
    ran: list[str] = []

    async def lane(name: str) -> None:
        async with scheduler.slot("A"):
            ran.append(name)

    w1 = asyncio.create_task(lane("w1"))
    w2 = asyncio.create_task(lane("w2"))
    await settle()
    await cm.__aexit__(None, None, None)  # grants w1 (does not suspend) ...
    assert scheduler.snapshot() == {"A": (1, 1)}
    w1.cancel()  # ... which is cancelled before it resumes
    await finished(w1, w2, return_exceptions=True)
    assert w1.cancelled()
    assert ran == ["w2"]
    assert scheduler.snapshot() == {}


async def test_slot_released_while_a_cancelled_waiter_has_not_run_yet() -> None:
    """The other race: the only waiter is cancelled, and a slot is released before the waiter gets to run
    (so it has not left its queue yet). The slot must come back free, not go to nobody."""
    scheduler = FairScheduler(max_in_flight=1)
    cm = scheduler.slot("H")
    await cm.__aenter__()
    waiter = asyncio.create_task(scheduler.slot("A").__aenter__())
    await settle()
    waiter.cancel()
    await cm.__aexit__(None, None, None)  # the waiter is cancelled but still queued
    await finished(waiter, return_exceptions=True)
    assert waiter.cancelled()
    assert scheduler.snapshot() == {}
    assert granted_without_suspending(scheduler.slot("B"))


def test_scheduler_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        FairScheduler(max_in_flight=0)
    with pytest.raises(ValueError, match="weight"):
        FairScheduler(max_in_flight=1).slot("a", weight=0)


# --- TokenBucket -----------------------------------------------------------------------------------------


async def test_bucket_burst_goes_at_once_then_paces() -> None:
    clock = AutoClock()
    bucket = TokenBucket(rate_per_s=100, burst=100, clock=clock, sleep=clock.sleep)
    assert await bucket.acquire(100) == 0.0
    assert clock.sleeps == []
    assert bucket.delay_for(50) == pytest.approx(0.5)
    assert await bucket.acquire(50) == pytest.approx(0.5)
    assert clock.now == pytest.approx(0.5)
    assert bucket.throttled_s_total == pytest.approx(0.5)


async def test_bucket_batch_larger_than_burst_waits_for_the_deficit() -> None:
    clock = AutoClock()
    bucket = TokenBucket(rate_per_s=100, burst=100, clock=clock, sleep=clock.sleep)
    assert await bucket.acquire(250) == pytest.approx(1.5)  # 100 in the bucket, 150 more at 100/s
    assert bucket.tokens == pytest.approx(0.0)
    assert await bucket.acquire(100) == pytest.approx(1.0)


async def test_bucket_refill_is_capped_at_burst() -> None:
    clock = AutoClock()
    bucket = TokenBucket(rate_per_s=100, clock=clock, sleep=clock.sleep)  # burst defaults to 1 s worth
    assert await bucket.acquire(100) == 0.0
    clock.now += 60  # idle for a minute: 100 tokens, not 6,000
    assert bucket.tokens == pytest.approx(100)
    assert await bucket.acquire(100) == 0.0
    assert await bucket.acquire(1) == pytest.approx(0.01)


async def test_bucket_delay_for_does_not_take_tokens() -> None:
    clock = AutoClock()
    bucket = TokenBucket(rate_per_s=100, burst=100, clock=clock, sleep=clock.sleep)
    assert bucket.delay_for(150) == pytest.approx(0.5)
    assert bucket.delay_for(150) == pytest.approx(0.5)
    assert await bucket.acquire(100) == 0.0


async def test_unlimited_bucket_never_waits() -> None:
    clock = AutoClock()
    bucket = TokenBucket(rate_per_s=None, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        assert await bucket.acquire(10**9) == 0.0
    assert (bucket.delay_for(10**9), clock.sleeps, bucket.tokens) == (0.0, [], None)


async def test_concurrent_acquirers_are_paced_in_call_order() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate_per_s=10, burst=10, clock=clock, sleep=clock.sleep)
    done: list[int] = []

    async def take(n: int) -> None:
        await bucket.acquire(10)
        done.append(n)

    tasks = [asyncio.create_task(take(n)) for n in range(3)]
    await settle()
    assert done == [0]
    await clock.advance(0.9)
    assert done == [0]
    await clock.advance(0.1)
    assert done == [0, 1]
    await clock.advance(1.0)
    assert done == [0, 1, 2]
    await finished(*tasks)


async def test_cancelled_acquire_gives_its_tokens_back() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate_per_s=100, burst=100, clock=clock, sleep=clock.sleep)
    await bucket.acquire(100)
    waiter = asyncio.create_task(bucket.acquire(50))
    await settle()
    assert bucket.delay_for(50) == pytest.approx(1.0)  # behind the waiter's reservation
    waiter.cancel()
    await settle()
    assert waiter.cancelled()
    assert bucket.delay_for(50) == pytest.approx(0.5)


def test_bucket_refuses_nonsense() -> None:
    for rate in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rate_per_s"):
            TokenBucket(rate_per_s=rate)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate_per_s=1, burst=0)


# --- TargetLimits ----------------------------------------------------------------------------------------


async def test_target_limits_update_applies_the_new_rate_to_waiters_and_later_batches() -> None:
    clock = ManualClock()
    limits = TargetLimits(rate_per_s=10, max_in_flight=None, clock=clock, sleep=clock.sleep)
    async with limits.batch(10):
        pass
    published: list[str] = []

    async def publish(name: str, messages: int) -> None:
        async with limits.batch(messages):
            published.append(name)

    slow = asyncio.create_task(publish("slow", 10))  # 1 s at 10/s
    await settle()
    assert published == []
    limits.update(rate_per_s=1000, max_in_flight=None)
    await clock.advance(0.011)  # 10 tokens at 1000/s: 0.01 s, not the 1 s it was waiting for
    assert published == ["slow"]
    await slow
    snap = limits.snapshot()
    assert snap["rate_per_s"] == 1000
    assert snap["throttled_s_total"] == pytest.approx(0.011)
    # a later batch is paced by the new rate: the bucket holds 1,000 now (burst follows the rate)
    clock.now += 1
    later = asyncio.create_task(publish("later", 1500))
    await settle()
    await clock.advance(0.49)
    assert published == ["slow"]
    await clock.advance(0.01)
    assert published == ["slow", "later"]
    await later
    # unlimited releases a waiter at once
    limits.update(rate_per_s=1, max_in_flight=None)
    stuck = asyncio.create_task(publish("stuck", 100))
    await settle()
    assert published == ["slow", "later"]
    limits.update(rate_per_s=None, max_in_flight=None)
    await settle()
    assert published == ["slow", "later", "stuck"]
    await stuck
    assert limits.snapshot()["tokens"] is None


async def test_target_limits_max_in_flight_1_serialises_batches() -> None:
    limits = TargetLimits(rate_per_s=None, max_in_flight=1)
    concurrent = 0
    peak = 0
    finish = asyncio.Event()
    order: list[int] = []

    async def publish(n: int) -> None:
        nonlocal concurrent, peak
        async with limits.batch(1):
            concurrent += 1
            peak = max(peak, concurrent)
            order.append(n)
            await finish.wait()
            concurrent -= 1

    tasks = [asyncio.create_task(publish(n)) for n in range(4)]
    await settle()
    assert (order, limits.snapshot()["in_flight"]) == ([0], 1)
    finish.set()
    await finished(*tasks)
    assert (order, peak, limits.snapshot()["in_flight"]) == ([0, 1, 2, 3], 1, 0)


async def test_target_limits_raising_max_in_flight_admits_waiters_and_cancelled_ones_release() -> None:
    clock = ManualClock()
    limits = TargetLimits(rate_per_s=10, max_in_flight=1, clock=clock, sleep=clock.sleep)
    finish = asyncio.Event()
    inside: list[int] = []

    async def publish(n: int, messages: int) -> None:
        async with limits.batch(messages):
            inside.append(n)
            await finish.wait()

    tasks = [asyncio.create_task(publish(n, 1)) for n in range(3)]
    await settle()
    assert inside == [0]
    limits.update(rate_per_s=10, max_in_flight=3)
    await settle()
    assert inside == [0, 1, 2]
    # a batch stuck waiting for tokens holds an in-flight slot; cancelling it frees the slot
    throttled = asyncio.create_task(publish(3, 100))
    await settle()
    assert limits.snapshot()["in_flight"] == 3  # the bound is 3: it waits for a slot first
    limits.update(rate_per_s=10, max_in_flight=4)
    await settle()
    assert limits.snapshot()["in_flight"] == 4 and inside == [0, 1, 2]  # now waits for tokens
    throttled.cancel()
    await settle()
    assert limits.snapshot()["in_flight"] == 3
    finish.set()
    await finished(*tasks)
    assert limits.snapshot()["in_flight"] == 0


async def test_target_slot_released_while_a_cancelled_waiter_has_not_run_yet() -> None:
    limits = TargetLimits(rate_per_s=None, max_in_flight=1)
    first = limits.batch(1)
    await first.__aenter__()
    waiter = asyncio.create_task(limits.batch(1).__aenter__())
    await settle()
    waiter.cancel()
    await first.__aexit__(None, None, None)
    await finished(waiter, return_exceptions=True)
    assert waiter.cancelled()
    assert limits.snapshot()["in_flight"] == 0
    assert granted_without_suspending(limits.batch(1))
    assert limits.snapshot()["in_flight"] == 1


def test_target_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        TargetLimits(rate_per_s=None, max_in_flight=0)
    limits = TargetLimits(rate_per_s=None, max_in_flight=None)
    with pytest.raises(ValueError, match="rate_per_s"):
        limits.update(rate_per_s=-5, max_in_flight=None)
    with pytest.raises(ValueError, match="messages"):
        limits.batch(-1)
