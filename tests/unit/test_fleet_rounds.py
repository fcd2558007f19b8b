"""FleetEngine._run_rounds with a stub engine: when every round slot is taken and one round ends,
the rows still buffered go in a new round. The round's own ``rows.set()`` wakes the publisher
before the round's task is done; a publisher that counted rounds in flight by the tasks' done
callbacks still saw every slot taken, cleared ``rows`` and waited for a wake-up that never came
(test_fleet's short-rounds test stalled at 1,794-1,800 of 3,000 messages, 1 run in 3)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from outbox_relay.fleet import ROUNDS_IN_FLIGHT, SHARED_ROUNDS_IN_FLIGHT, FleetEngine


@dataclass
class StubLane:
    partition: int


@dataclass
class StubPlan:
    tenant_name: str = "t"


@dataclass
class StubScheduler:
    """``shared``: whether another tenant is active in the worker (as FairScheduler.shared answers)."""

    is_shared: bool = False

    def shared(self, tenant: str) -> bool:
        return self.is_shared


@dataclass
class StubReader:
    plan: StubPlan = field(default_factory=StubPlan)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    rows: asyncio.Event = field(default_factory=asyncio.Event)
    in_round: set[int] = field(default_factory=set)
    failures: int = 0


class StubEngine:
    """Hands out one single-lane round per buffered partition; each round waits for its gate. The
    round's bookkeeping is the engine's own."""

    _round_in_flight = FleetEngine._round_in_flight

    def __init__(self, partitions: int, *, shared: bool = False) -> None:
        self.scheduler = StubScheduler(shared)
        self.waiting = list(range(partitions))
        self.gates = {p: asyncio.Event() for p in range(partitions)}
        self.started: list[int] = []

    def _round(self, reader: StubReader) -> tuple[list[StubLane], float | None]:
        free = [p for p in self.waiting if p not in reader.in_round]
        if not free:
            return [], None
        self.waiting.remove(free[0])
        return [StubLane(free[0])], None

    async def _publish_round(self, reader: StubReader, lanes: list[StubLane]) -> None:
        (lane,) = lanes
        self.started.append(lane.partition)
        try:
            await self.gates[lane.partition].wait()
        finally:  # as FleetEngine._publish_round ends
            reader.in_round.discard(lane.partition)
            reader.rows.set()


@contextlib.asynccontextmanager
async def publishing(engine: StubEngine, reader: StubReader) -> AsyncIterator[None]:
    """FleetEngine._run_rounds over the stub engine, woken once; stopped and every round let go after."""
    run_rounds: Any = FleetEngine._run_rounds
    publisher = asyncio.create_task(run_rounds(engine, reader))
    try:
        reader.rows.set()
        await turns()
        yield
    finally:
        reader.stop.set()
        for gate in engine.gates.values():
            gate.set()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_round_that_ends_while_every_slot_is_taken_lets_the_next_one_start() -> None:
    engine, reader = StubEngine(ROUNDS_IN_FLIGHT + 1), StubReader()
    async with publishing(engine, reader):
        assert engine.started == list(range(ROUNDS_IN_FLIGHT))  # every slot taken, one lane waits
        engine.gates[0].set()
        await turns()
        assert engine.started == list(range(ROUNDS_IN_FLIGHT + 1))


async def test_a_relay_sharing_the_worker_with_another_tenant_has_one_round_in_flight() -> None:
    """Beside another tenant a relay's rounds go one at a time (four joined into one group publish
    held the loop for milliseconds); once alone again it fills every slot."""
    engine, reader = StubEngine(ROUNDS_IN_FLIGHT + 1, shared=True), StubReader()
    async with publishing(engine, reader):
        assert engine.started == list(range(SHARED_ROUNDS_IN_FLIGHT))
        engine.scheduler.is_shared = False
        engine.gates[0].set()
        await turns()
        assert engine.started == list(range(ROUNDS_IN_FLIGHT + 1))


class PrepareFails:
    """An engine whose ``prepare`` raises (a relay spec the worker cannot use): the round's own
    bookkeeping is the engine's."""

    _publish_round = FleetEngine._publish_round
    _round_failed = FleetEngine._round_failed
    _back_off = FleetEngine._back_off

    def __init__(self) -> None:
        self.runner = SimpleNamespace(prepare=self._prepare)
        self.tick = asyncio.Event()

    def _prepare(self, part: Any, rows: Any) -> Any:
        raise ValueError("a stored spec this worker cannot use")


async def test_a_round_whose_batches_cannot_be_prepared_leaves_its_lanes_free() -> None:
    """prepare() ran before the round's try: what it raised left the lanes marked in a round for
    ever (the relay stopped publishing them, silently)."""
    part = SimpleNamespace(
        relay=SimpleNamespace(policy=SimpleNamespace(batch_size=10)), stop=asyncio.Event(), cursor=(0, 0), lease=None
    )
    lane = SimpleNamespace(partition=3, part=part, buffer=deque(), starved=False, capacity=lambda: 10)
    reader = SimpleNamespace(
        plan=SimpleNamespace(relay_name="r", tenant_name="t"),
        sending=0,
        in_round={3},
        round_done=asyncio.Event(),
        rows=asyncio.Event(),
        stop=asyncio.Event(),
        wake=asyncio.Event(),
        failures=0,
    )
    reader.stop.set()  # the backoff after the failure returns at once
    publish_round: Any = FleetEngine._publish_round
    await publish_round(PrepareFails(), reader, [lane])
    assert reader.in_round == set() and reader.sending == 0 and reader.failures == 1
