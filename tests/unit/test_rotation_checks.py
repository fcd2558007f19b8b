"""Rotator: how soon it looks again. While a rotation is under way here (something to switch, a
refused credential to retry, a report not taken yet) it looks every ``CHECK_S``; otherwise every
``IDLE_CHECK_S``, the notifications doing the rest. Each look reads every database and target the
worker has open: every 2 s that was about 200 rows a second of the control DB at 1,000 idle relays."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from outbox_relay.rotation import Rotator

DB = uuid.uuid4()


class FakeStore:
    def __init__(self, *, member: bool = True) -> None:
        self.member = member
        self.due: list[Any] = []

    async def credentials_due(self, table: str, in_use: dict[uuid.UUID, int]) -> list[Any]:
        return self.due if table == "databases" else []

    async def report_credential(self, *args: Any, **kwargs: Any) -> bool:
        return self.member

    async def complete_rotations(self, ttl_s: float, actor: str) -> list[Any]:
        return []


def rotator(store: FakeStore) -> Rotator:
    return Rotator(
        store=store,  # type: ignore[arg-type]
        secrets=SimpleNamespace(),  # type: ignore[arg-type]
        tenants=SimpleNamespace(in_use=lambda: {DB: 1}),  # type: ignore[arg-type]
        publishers=SimpleNamespace(in_use=dict),  # type: ignore[arg-type]
        events=None,
        worker_key=lambda: "worker#1",
        ttl_s=10.0,
    )


async def test_a_look_that_finds_nothing_to_do_is_not_busy() -> None:
    r = rotator(FakeStore())
    await r.check()
    assert r._busy is False  # the next look in IDLE_CHECK_S, or at a notification


async def test_a_report_not_taken_yet_makes_it_look_again_soon() -> None:
    r = rotator(FakeStore(member=False))  # this worker's membership row is not written yet
    await r.check()
    assert r._busy is True
    r.store.member = True  # type: ignore[attr-defined]
    await r.check()
    assert r._busy is False
