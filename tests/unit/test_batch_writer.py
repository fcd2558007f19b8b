"""The fleet's BatchWriter (cursor and identity writes): what is submitted together goes in one
statement, what comes while one runs goes in the next, a write the statement did not make resolves
False, and a control DB outage is retried only while ownership holds. A fake statement: the
batching is logic, the statements themselves run against the real control DB in the fleet tests."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest

from outbox_relay.fleet import BatchWriter

RELAY = uuid.uuid4()


class Statement:
    def __init__(self, *, fail: list[BaseException] | None = None, hold: asyncio.Event | None = None) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail or []
        self.hold = hold

    async def __call__(self, items: list[int]) -> set[tuple[uuid.UUID, int]]:
        self.calls.append(list(items))
        if self.fail:
            raise self.fail.pop(0)
        if self.hold is not None:
            await self.hold.wait()
        return {(RELAY, i) for i in items if i >= 0}  # a negative "partition" was taken over


def writer(statement: Statement, *, valid_for_s: float = 60.0) -> BatchWriter[int]:
    until = time.monotonic() + valid_for_s
    return BatchWriter(statement, lambda i: (RELAY, i), lease_until=lambda: until)


async def test_writes_submitted_together_go_in_one_statement() -> None:
    statement = Statement()
    w = writer(statement)
    results = await asyncio.gather(*(w.submit(i) for i in (1, 2, -3)))
    assert statement.calls == [[1, 2, -3]]
    assert results == [True, True, False]


async def test_writes_submitted_while_a_statement_runs_go_in_the_next_one() -> None:
    hold = asyncio.Event()
    statement = Statement(hold=hold)
    w = writer(statement)
    first = w.submit(1)
    while not statement.calls:  # noqa: ASYNC110 (until the first statement runs, held)
        await asyncio.sleep(0)
    later = [w.submit(2), w.submit(3)]
    hold.set()
    assert await first and all(await asyncio.gather(*later))
    assert statement.calls == [[1], [2, 3]]


async def test_an_unreachable_control_db_is_retried_while_ownership_holds() -> None:
    statement = Statement(fail=[ConnectionRefusedError()])
    assert await writer(statement).write(7)
    assert statement.calls == [[7], [7]]


async def test_an_error_reaches_every_write_once_ownership_may_have_lapsed() -> None:
    statement = Statement(fail=[ConnectionRefusedError()])
    w = writer(statement, valid_for_s=-1.0)
    futures = [w.submit(1), w.submit(2)]
    for future in futures:
        with pytest.raises(ConnectionRefusedError):
            await future
    assert statement.calls == [[1, 2]]


async def test_a_statement_error_that_no_retry_clears_is_not_retried() -> None:
    statement = Statement(fail=[asyncpg.UndefinedColumnError("no such column")])
    with pytest.raises(asyncpg.UndefinedColumnError):
        await writer(statement).write(1)
    assert statement.calls == [[1]]
