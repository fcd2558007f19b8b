"""The failed-authentication limit, on a fake clock."""

from __future__ import annotations

from service.throttle import AuthThrottle, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_blocks_after_the_limit_until_the_oldest_failure_leaves_the_window() -> None:
    clock = Clock()
    throttle = AuthThrottle(limit=3, window_s=60, clock=clock)
    for _ in range(2):
        throttle.failed("a")
        clock.now += 10
    assert throttle.retry_after_s("a") is None
    throttle.failed("a")  # failures at 1000, 1010, 1020
    assert throttle.retry_after_s("a") == 40  # now 1020: the first leaves at 1060
    assert throttle.retry_after_s("b") is None
    clock.now = 1059.5
    assert throttle.retry_after_s("a") == 1
    clock.now = 1060.0
    assert throttle.retry_after_s("a") is None  # one slot free: one more guess ...
    throttle.failed("a")
    assert throttle.retry_after_s("a") == 10  # ... then blocked until 1070
    clock.now = 1200
    assert throttle.retry_after_s("a") is None and len(throttle) == 0


def test_off_when_the_limit_is_zero_and_bounded_in_memory() -> None:
    off = AuthThrottle(limit=0, window_s=60)
    for _ in range(100):
        off.failed("a")
    assert off.retry_after_s("a") is None and len(off) == 0
    small = AuthThrottle(limit=2, window_s=60, max_clients=3)
    for client in "abcd":
        small.failed(client)
        small.failed(client)
    assert len(small) == 3 and small.retry_after_s("a") is None and small.retry_after_s("d") is not None


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1") == "192.0.2.1"
    assert client_key(None) == "-" and client_key("testclient") == "testclient"
