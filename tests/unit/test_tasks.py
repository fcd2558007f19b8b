"""``cancel_and_wait`` stops a task that survives one cancellation (Python 3.11's ``wait_for`` loses
a cancellation that lands as its inner awaitable finishes; a worker's close then hung for ever)."""

from __future__ import annotations

import asyncio

from outbox_relay.tasks import cancel_and_wait


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed == 2:
                    raise
                swallowed += 1  # what the lost cancellation looks like from outside: it runs on

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, retry_s=0.01), timeout=5)
    assert task.cancelled() and swallowed == 2


async def test_a_failed_or_missing_task_is_fine() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # its exception is retrieved, not raised
    await cancel_and_wait(None)
    assert task.done() and isinstance(task.exception(), RuntimeError)
