"""Configuration changes as they commit: one LISTEN connection to the control DB per worker.

The control DB notifies ``outbox_relay_config`` with ``relays:<id>``, ``databases:<id>`` or
``targets:<id>`` when such a row changes (``store/migrations/0005_change_notifications.sql``). A
running relay subscribes to the keys of its plan and re-reads the plan when one fires, so a disabled
relay stops within a second instead of at the end of its slice. Notifications can be lost while the
connection is down, so every (re)connect fires every subscription: a spurious wake-up costs one
plan read, a missed one would leave a disabled relay running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

import asyncpg

from outbox_relay.tasks import cancel_and_wait

log = logging.getLogger("outbox_relay.store.events")
CHANNEL = "outbox_relay_config"


class ControlEvents:
    def __init__(self, dsn: str, *, timeout_s: float = 5.0, keepalive_s: float = 5.0) -> None:
        self.dsn = dsn
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self._subscribers: dict[asyncio.Event, frozenset[str]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="control-events")

    @contextlib.contextmanager
    def subscribe(self, keys: Iterable[str]) -> Iterator[asyncio.Event]:
        """An event set when one of ``keys`` (``"relays:<uuid>"``, or ``"relays:*"`` for any relay)
        changes, or on a reconnect."""
        event = asyncio.Event()
        self._subscribers[event] = frozenset(keys)
        try:
            yield event
        finally:
            self._subscribers.pop(event, None)

    def _fire(self, key: str | None) -> None:
        kind = key.split(":", 1)[0] + ":*" if key else None
        for event, keys in list(self._subscribers.items()):
            if key is None or key in keys or kind in keys:
                event.set()

    async def _listen(self) -> None:
        failures = 0

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            self._fire(payload)

        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.timeout_s)
            except Exception as exc:
                failures += 1
                log.debug("control DB LISTEN connection failed: %s", exc)
                await asyncio.sleep(random.uniform(0.5, 1.0) * min(10.0, 0.25 * 2 ** min(failures, 8)))
                continue
            failures = 0
            try:
                await conn.add_listener(CHANNEL, on_notify)
                self.connected.set()
                self._fire(None)  # what changed while we were not listening
                while not conn.is_closed():
                    await asyncio.sleep(self.keepalive_s)
                    await conn.fetchval("SELECT 1", timeout=self.timeout_s)
            except Exception as exc:
                log.debug("control DB LISTEN connection lost: %s", exc)
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await conn.close()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
