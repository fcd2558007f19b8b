"""FleetEngine._balance with a fake fleet store: what only a change of a relay or of the fleet can
move (the partitions to share, this worker's count, disabled relays' partitions) is read after such a
change and now and then, not on every tick. At 1,000 idle relays the fleet bench found each tick
reading every relay twice (the sum of enabled relays' partitions, the disabled relays to free), most
of the control DB's reads."""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace
from typing import Any

from outbox_relay.fleet import FleetEngine
from outbox_relay.store.fleet import BalanceView

TOTAL = 32
OWNED = 32  # this worker's share, all of it (one live worker)


class FakeFleet:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.owned = OWNED

    async def reap(self, ttl_s: float) -> int:
        return 0

    async def claim(self, key: str, limit: int) -> list[Any]:
        self.calls.append(("claim", limit))
        return []

    async def release_disabled(self, key: str) -> int:
        self.calls.append("release_disabled")
        return 0

    async def balance(
        self, key: str, ttl_s: float, *, count_owned: bool = True, total: int | None = None
    ) -> BalanceView:
        self.calls.append(("balance", count_owned, total))
        return BalanceView(
            live=(key,),
            total_partitions=TOTAL if total is None else total,
            owned=self.owned if count_owned else None,
        )


def engine(*, events: object | None) -> Any:
    stub = SimpleNamespace(
        fleet=FakeFleet(),
        settings=SimpleNamespace(lease_ttl_s=10.0),
        key="worker#1",
        events=events,
        readers={"relay": SimpleNamespace(lanes=dict.fromkeys(range(OWNED)), stop=asyncio.Event())},
        live_workers=1,
        _recount=True,
        _recount_at=0.0,
        _total=None,
    )
    stub._drop_disabled = functools.partial(FleetEngine._drop_disabled, stub)
    return stub


async def tick(stub: Any) -> list[Any]:
    stub.fleet.calls.clear()
    await FleetEngine._balance(stub)
    return list(stub.fleet.calls)


async def test_a_quiet_tick_reads_neither_the_relays_nor_the_disabled_ones() -> None:
    stub = engine(events=object())
    assert await tick(stub) == ["release_disabled", ("balance", True, None)]  # the first tick counts
    assert await tick(stub) == [("balance", False, TOTAL)]  # then the count it made is used
    assert await tick(stub) == [("balance", False, TOTAL)]
    stub._recount = True  # a relay or the fleet changed (a notification)
    assert await tick(stub) == ["release_disabled", ("balance", True, None)]
    stub._recount_at = 0.0  # and once every OWNED_RECOUNT_S anyway
    assert await tick(stub) == ["release_disabled", ("balance", True, None)]


async def test_a_worker_under_its_share_claims_and_one_at_it_does_not() -> None:
    """The free partitions are found by the claim itself: a count of them each tick read the
    claim's dead entries in their partial index until autovacuum removed them."""
    stub = engine(events=object())
    stub.readers["relay"].lanes = dict.fromkeys(range(OWNED - 2))
    stub.fleet.owned = OWNED - 2
    calls = await tick(stub)
    assert ("claim", 2) in calls


async def test_without_notifications_every_tick_counts() -> None:
    stub = engine(events=None)
    for _ in range(3):
        assert await tick(stub) == ["release_disabled", ("balance", True, None)]
