"""The relay status's ``throttled``, from the partitions' rows: each worker writes its wait on every
partition it owns, so the relay's wait sums the workers, not the partitions; only the last minute's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from outbox_relay.status import relay_status, relay_throttled
from outbox_relay.store.rows import PartitionState

NOW = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)


def part(n: int, holder: str, waited: float | None, ago_s: float | None) -> PartitionState:
    at = NOW - timedelta(seconds=ago_s) if ago_s is not None else None
    return PartitionState(partition=n, lease_holder=holder, throttled_s=waited, throttled_at=at)


def test_the_wait_sums_the_workers_not_their_partitions() -> None:
    parts = [part(0, "a", 1.5, 3), part(1, "a", 1.5, 3), part(2, "b", 0.5, 8), part(3, "b", 0.5, 8)]
    shown = relay_throttled(parts, NOW)
    assert shown is not None
    assert shown.waited_s == 2.0
    assert shown.last_at == NOW - timedelta(seconds=3)


def test_a_wait_older_than_a_minute_or_none_at_all_is_not_shown() -> None:
    assert relay_throttled([part(0, "a", 2.0, 61), part(1, "a", 0.0, 2), part(2, "a", None, None)], NOW) is None
    assert relay_status("r", True, [part(0, "a", None, None)], NOW).throttled is None
    assert relay_status("r", True, [part(0, "a", 1.0, 1)], NOW).throttled is not None
