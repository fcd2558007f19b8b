"""One log line when a dependency goes away and one when it is back, however many tasks notice.

A worker has hundreds of tasks that use the same control DB, Redis or tenant database; when one of
those goes away, each task's failure is the same fact. :class:`Outages` turns them into a warning
at the first failure (no traceback: the cause is known) and an info line with the outage's length
at the first success after it; repeats in between go to DEBUG.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("outbox_relay.outages")
CONTROL_DB = "the control database"


class Outages:
    def __init__(self, *, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._clock = clock
        self._since: dict[str, float] = {}

    def down(self, dependency: str, exc: BaseException) -> bool:
        """Record a failure; True (and one warning) if it starts an outage."""
        if dependency in self._since:
            self._log.debug("%s still unavailable: %s", dependency, _describe(exc))
            return False
        self._since[dependency] = self._clock()
        self._log.warning("%s unavailable, retrying with backoff: %s", dependency, _describe(exc))
        return True

    def up(self, dependency: str) -> None:
        """Record a success; ends the outage (one info line) if there was one."""
        since = self._since.pop(dependency, None)
        if since is not None:
            self._log.info("%s is back after %.1f s", dependency, self._clock() - since)

    def is_down(self, dependency: str) -> bool:
        return dependency in self._since


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
