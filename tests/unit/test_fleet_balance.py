"""The fleet's share rule, pure: every live worker's share adds up to the total and differs by at most one."""

from __future__ import annotations

import pytest

from outbox_relay.store.fleet import BalanceView


@pytest.mark.parametrize(("total", "workers"), [(10, 3), (16, 1), (16, 5), (1, 4), (0, 2), (16_000, 7), (1024, 3)])
def test_shares_add_up_and_differ_by_at_most_one(total: int, workers: int) -> None:
    keys = tuple(sorted(f"w{i}" for i in range(workers)))
    view = BalanceView(live=keys, total_partitions=total, owned=0)
    shares = [view.share(k) for k in keys]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_a_worker_not_yet_seen_live_takes_the_smaller_share() -> None:
    view = BalanceView(live=("a", "b"), total_partitions=5, owned=0)
    assert view.share("a") == 3 and view.share("b") == 2 and view.share("zz") == 2
