"""Group commit for a target: the batches that many partitions hand one publisher at the same time go
to the broker as one batch, in one round trip.

A worker publishes each partition's rows as its own batch (a partition's order is kept by having one
batch of it in flight at a time). When a wake-up gives a few rows to each of many partitions, that
would be one broker round trip, one socket write and one confirm wait per partition, for a message
or two each: the cost of a fleet under a trickle or a burst is then the number of partitions, not
the number of messages. :class:`GroupPublisher` wraps the target's adapter: a batch handed to it
waits for the current event-loop turn to end, so every partition woken by the same read joins it,
and is sent together with them (at most ``max_groups`` groups in flight; while they are, new batches
queue and go in the next group, so groups grow with the load and an idle target adds no wait).

The result of the group is split back per batch, within the contract of
:class:`~outbox_relay.brokers.base.Publisher`: the batches wholly before the first message that was
not acknowledged are acknowledged; the one holding it gets its acknowledged prefix and, when the
broker refused that message, the refusal with its index in that batch; the batches after it were
neither refused nor known to be delivered, and are sent again in the next group (at least once
allows the duplicates), so one partition's refused message never costs another partition an attempt.
An exception (the target is unavailable) is every batch's answer. One message id may come twice in
a group (two databases on outbox version 1, whose ids are row ids): every adapter answers per
message in order, and the RabbitMQ adapter pairs a ``basic.return`` with its publish by delivery tag
(aiormq's own pairing by message id alone was why groups once kept ids apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from outbox_relay.brokers.base import OutgoingMessage, Publisher, PublishResult
from outbox_relay.errors import MessageRejected

MAX_GROUP_MESSAGES = 2000
"""A group takes whole batches up to this many messages (at least one batch, whatever its size)."""
MAX_GROUPS_IN_FLIGHT = 2


@dataclass(slots=True)
class _Batch:
    messages: Sequence[OutgoingMessage]
    future: asyncio.Future[PublishResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupPublisher:
    """A :class:`Publisher` that sends the batches handed to it in the same turn as one (see above)."""

    def __init__(
        self,
        inner: Publisher,
        *,
        max_messages: int = MAX_GROUP_MESSAGES,
        max_groups: int = MAX_GROUPS_IN_FLIGHT,
    ) -> None:
        if max_messages < 1 or max_groups < 1:
            raise ValueError("max_messages and max_groups must be at least 1")
        self.inner = inner
        self.max_messages = max_messages
        self.max_groups = max_groups
        self._queue: deque[_Batch] = deque()
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        """Set while no batch is queued or in flight (:meth:`drain`)."""
        self._idle.set()
        self.groups = 0
        """Groups sent so far (for tests and the bench)."""

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        if not messages:
            return PublishResult(acked=0)
        batch = _Batch(messages)
        self._queue.append(batch)
        self._idle.clear()
        self._kick()
        return await batch.future  # a cancelled caller leaves its batch behind: it is skipped or its answer dropped

    def _kick(self) -> None:
        if not self._scheduled and self._queue and self._in_flight < self.max_groups:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)  # after every batch of this turn joined

    def _start(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < self.max_groups:
            group: list[_Batch] = []
            size = 0
            while self._queue:
                batch = self._queue[0]
                if batch.future.done():  # its caller was cancelled
                    self._queue.popleft()
                    continue
                if group and size + len(batch.messages) > self.max_messages:
                    break
                group.append(self._queue.popleft())
                size += len(batch.messages)
            if not group:
                return
            self._in_flight += 1
            task = asyncio.create_task(self._send(group), name="publish-group")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[_Batch]) -> None:
        try:
            self.groups += 1
            messages = [m for batch in group for m in batch.messages]
            try:
                result = await self.inner.publish_batch(messages)
            except Exception as exc:
                for batch in group:
                    if not batch.future.done():
                        batch.future.set_exception(exc)
                return
            except asyncio.CancelledError:
                for batch in group:
                    batch.future.cancel()
                raise
            again: list[_Batch] = []
            for batch, answer in zip(group, split(result, [len(b.messages) for b in group]), strict=True):
                if answer is None:  # after the first message not acknowledged: sent again
                    again.append(batch)
                elif not batch.future.done():
                    batch.future.set_result(answer)
            self._queue.extendleft(reversed(again))
        finally:
            self._in_flight -= 1
            self._kick()
            if not self._in_flight and not self._queue:
                self._idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until no batch is queued or in flight: a publisher replaced by
        one with a rotated credential answers what was handed to it before it is closed."""
        if self._in_flight or self._queue:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for batch in self._queue:
            batch.future.cancel()
        self._queue.clear()
        await self.inner.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def split(result: PublishResult, sizes: Sequence[int]) -> list[PublishResult | None]:
    """The answer to one publish of consecutive batches of these sizes, per batch (see the module
    docstring): acknowledged whole before the first message not acknowledged; its prefix and the
    refusal (indexed within it) for the batch holding that message; None for the batches after it,
    which were neither refused nor known to be delivered."""
    answers: list[PublishResult | None] = []
    offset = 0
    for size in sizes:
        if result.acked >= offset + size:
            answers.append(PublishResult(acked=size))
        elif result.acked >= offset:
            answers.append(PublishResult(acked=result.acked - offset, rejected=_local(result, offset)))
        else:
            answers.append(None)
        offset += size
    return answers


def _local(result: PublishResult, offset: int) -> MessageRejected | None:
    """The group's refusal as the refused batch sees it: its index counted from that batch's start."""
    if result.rejected is None:
        return None
    rejected = copy.copy(result.rejected)
    rejected.index = result.acked - offset
    return rejected
