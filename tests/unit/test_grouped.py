"""GroupPublisher: batches handed over in one event-loop turn go out as one, and the answer is split
back per batch within the Publisher contract (pure logic: the broker is a fake)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.brokers.grouped import GroupPublisher
from outbox_relay.errors import MessageRejected, TargetUnavailable


def msgs(prefix: str, n: int, *, ids: str | None = None) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(id=i, message_id=f"{ids or prefix}-{i}", destination="d", key=prefix, payload=b"", headers={})
        for i in range(n)
    ]


class FakeBroker:
    """Acknowledges every message, refuses the ones named in ``refuse``, or raises ``fail``."""

    def __init__(self, *, refuse: set[str] | None = None, fail: Exception | None = None) -> None:
        self.calls: list[list[str]] = []
        self.refuse = refuse or set()
        self.fail = fail
        self.gate: asyncio.Event | None = None

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        self.calls.append([m.message_id for m in messages])
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        for index, message in enumerate(messages):
            if message.message_id in self.refuse:
                return PublishResult(acked=index, rejected=MessageRejected("no route", index=index))
        return PublishResult(acked=len(messages))

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> FakeBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


async def test_batches_of_one_turn_go_in_one_round_trip() -> None:
    broker = FakeBroker()
    group = GroupPublisher(broker)
    results = await asyncio.gather(*(group.publish_batch(msgs(f"p{i}", 2)) for i in range(5)))
    assert [r.acked for r in results] == [2] * 5 and all(r.rejected is None for r in results)
    assert len(broker.calls) == 1 and len(broker.calls[0]) == 10
    # order inside the group is the order the batches were handed over, each batch contiguous
    assert broker.calls[0][:4] == ["p0-0", "p0-1", "p1-0", "p1-1"]


async def test_a_refusal_is_charged_to_its_batch_only_and_the_later_batches_are_sent_again() -> None:
    broker = FakeBroker(refuse={"b-1"})
    group = GroupPublisher(broker)
    a, b, c = await asyncio.gather(
        group.publish_batch(msgs("a", 2)), group.publish_batch(msgs("b", 3)), group.publish_batch(msgs("c", 2))
    )
    assert a == PublishResult(acked=2)
    assert b.acked == 1 and isinstance(b.rejected, MessageRejected) and b.rejected.index == 1
    assert c == PublishResult(acked=2)  # neither refused nor lost: sent again in the next group
    assert broker.calls == [
        ["a-0", "a-1", "b-0", "b-1", "b-2", "c-0", "c-1"],
        ["c-0", "c-1"],
    ]


async def test_an_outage_is_every_batchs_answer() -> None:
    group = GroupPublisher(FakeBroker(fail=TargetUnavailable("down")))
    results = await asyncio.gather(
        group.publish_batch(msgs("a", 1)), group.publish_batch(msgs("b", 1)), return_exceptions=True
    )
    assert all(isinstance(r, TargetUnavailable) for r in results)


async def test_groups_grow_while_one_is_in_flight_and_respect_the_size_bound() -> None:
    broker = FakeBroker()
    broker.gate = asyncio.Event()
    group = GroupPublisher(broker, max_messages=4, max_groups=1)
    first = asyncio.ensure_future(group.publish_batch(msgs("a", 1)))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(group.publish_batch(msgs(f"b{i}", 2))) for i in range(3)]
    await asyncio.sleep(0.01)
    assert len(broker.calls) == 1  # one group in flight; the others wait for it
    broker.gate.set()
    await asyncio.gather(first, *later)
    # the three waiting batches of 2 went as groups of at most 4 messages: [b0, b1] then [b2]
    assert [len(call) for call in broker.calls] == [1, 4, 2]


async def test_batches_sharing_a_message_id_go_in_one_group() -> None:
    """Two databases on outbox version 1 can hand over the same id: the RabbitMQ adapter pairs returns
    by delivery tag (the contract suite's refusals mid-batch with shared ids), so a group need not
    split at a repeated id (it did while aiormq paired them by id alone)."""
    broker = FakeBroker()
    group = GroupPublisher(broker)
    await asyncio.gather(group.publish_batch(msgs("x", 2, ids="same")), group.publish_batch(msgs("y", 2, ids="same")))
    assert [len(call) for call in broker.calls] == [4]


async def test_a_cancelled_caller_leaves_nothing_behind() -> None:
    broker = FakeBroker()
    broker.gate = asyncio.Event()
    group = GroupPublisher(broker, max_groups=1)
    first = asyncio.ensure_future(group.publish_batch(msgs("a", 1)))
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(group.publish_batch(msgs("b", 1)))
    await asyncio.sleep(0.01)
    waiting.cancel()
    broker.gate.set()
    assert (await first).acked == 1
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.01)
    assert broker.calls == [["a-0"]]  # the cancelled batch was never sent
    await group.close()
