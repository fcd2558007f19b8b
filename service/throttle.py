"""Failed authentications per client address: past a limit in a window, the client gets 429.

In memory, per API process, on purpose. Every request checks whether its client is blocked before it
authenticates, so the check must cost nothing: a dict lookup here, where a Redis counter would add a
round trip to every request of every tenant, and make the API fail (or fail open) whenever Redis does;
the API needs Redis for nothing else on its request path. The price: with N API replicas a client gets
N times the limit before every replica refuses it, which still bounds a key-guessing client to a few
guesses per second against 256-bit keys. Only failures are counted (a missing key is not a guess), and
a success resets nothing, so interleaving a valid key does not buy more guesses.

The client is the ASGI client address (behind a proxy, uvicorn takes it from ``X-Forwarded-For`` of
the proxies in ``FORWARDED_ALLOW_IPS``); an IPv6 client counts per /64, the block one host usually has.
The table is bounded: past ``max_clients`` addresses the one that failed longest ago is forgotten.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


def client_key(host: str | None) -> str:
    """The unit failures are counted in: the IPv4 address, the IPv6 /64, or the raw host string."""
    if not host:
        return "-"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class AuthThrottle:
    """Sliding window of failure times per client: ``limit`` failures within ``window_s`` block the
    client until the oldest of them is ``window_s`` old. ``limit`` 0 never blocks."""

    def __init__(
        self,
        *,
        limit: int,
        window_s: float,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window_s, self.max_clients, self._clock = limit, window_s, max_clients, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after_s(self, client: str) -> int | None:
        """Seconds until the client may try again (at least 1), or None when it is not blocked."""
        if self.limit <= 0:
            return None
        times = self._failures.get(client)
        if times is None:
            return None
        now = self._clock()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        if len(times) < self.limit:
            return None
        return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, client: str) -> None:
        """Count one failed authentication of the client."""
        if self.limit <= 0:
            return
        times = self._failures.get(client)
        if times is None:
            times = self._failures[client] = deque(maxlen=self.limit)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(client)
        times.append(self._clock())

    def __len__(self) -> int:
        return len(self._failures)
