"""Stopping background tasks for sure.

Python 3.11's ``asyncio.wait_for`` (and asyncpg's copy of it, used by ``connect``) returns the inner
result when the inner awaitable finished just as the cancellation came: the cancellation is lost and
the task runs on. A task looping on connect/close (a LISTEN connection that keeps failing) then
outlived its ``cancel()``, and a worker's ``await task`` after it hung for ever: CI stopped at its
90-minute limit inside one test."""

from __future__ import annotations

import asyncio
from typing import Any

RETRY_CANCEL_S = 0.5


async def cancel_and_wait(task: asyncio.Task[Any] | None, *, retry_s: float = RETRY_CANCEL_S) -> None:
    """Cancel ``task`` and return once it has ended, cancelling it again each ``retry_s`` while it
    runs on. Its result or exception is retrieved and dropped: the caller is stopping it."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if not task.cancelled():
        task.exception()
