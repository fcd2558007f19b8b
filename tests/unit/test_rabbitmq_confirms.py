"""The RabbitMQ adapter's pairing of confirms and returns with its publishes (by delivery tag), on a
fake aiormq channel: the orders of answers a real broker can give but a test cannot provoke at will
(returns waiting for their acks while other acks pass them, a ``multiple`` ack over a returned
publish, a close with some answered). The contract suite covers the adapter on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiormq.exceptions
import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.brokers.rabbitmq import _Batch, _Confirms


class FakeChannel:
    """What :class:`_Confirms` uses of an aiormq channel; frames written go to ``written``."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._closing: asyncio.Future[None] = loop.create_future()
        self.number = 1
        self.max_content_size = 4096
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue()
        self.content: list[tuple[ContentHeader, DeliveredMessage]] = []
        self.closed_by: list[spec.Channel.Close] = []

    @property
    def closing(self) -> asyncio.Future[None]:
        return self._closing

    @property
    def is_closed(self) -> bool:
        return self._closing.done()

    @property
    @contextlib.asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        yield

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _on_close_frame(self, frame: spec.Channel.Close) -> None:
        self.closed_by.append(frame)

    async def _Channel__get_content_header(self) -> ContentHeader:
        return self.content[0][0]

    async def _read_content(self, frame: spec.Basic.Return, header: ContentHeader) -> DeliveredMessage:
        return self.content.pop(0)[1]

    def returned(self, message_id: str, routing_key: str) -> spec.Basic.Return:
        """Queue the content of a ``basic.return`` of ``message_id``; returns its method frame."""
        frame = spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key=routing_key)
        header = ContentHeader(0, 0, spec.Basic.Properties(message_id=message_id))
        self.content.append((header, DeliveredMessage(delivery=frame, header=header, body=b"", channel=None)))  # type: ignore[arg-type]
        return frame


def msg(n: int, destination: str = "q", message_id: str = "") -> OutgoingMessage:
    return OutgoingMessage(id=n, message_id=message_id, destination=destination, key="k", payload=b"p", headers={})


async def write(confirms: _Confirms, messages: list[OutgoingMessage]) -> _Batch:
    batch, drain = await confirms.write(messages, [b"h"] * len(messages), "", True)
    drain.set_result(None)
    return batch


def ack(tag: int, multiple: bool = False) -> spec.Basic.Ack:
    return spec.Basic.Ack(delivery_tag=tag, multiple=multiple)


async def test_a_return_waits_for_its_ack_while_earlier_acks_pass_it() -> None:
    """Tags 1-3 in one batch, 4-6 in another with the same message ids; the return of tag 5 comes
    first (its ack does not wait for the disk), then the acks of 1-4 (multiple), 5, then 6."""
    channel = FakeChannel()
    confirms = _Confirms(channel, None)
    first = await write(confirms, [msg(n, "q") for n in range(3)])
    second = await write(confirms, [msg(0, "q"), msg(1, "nowhere"), msg(2, "q")])
    await confirms._on_return(channel.returned("1", "nowhere"))
    await confirms._on_confirm(ack(4, multiple=True))
    assert first.done.done() and first.outcome() == (3, None)
    assert not second.done.done()
    await confirms._on_confirm(ack(5))
    await confirms._on_confirm(ack(6))
    index, error = second.outcome()
    assert index == 1 and isinstance(error, aiormq.exceptions.PublishError)
    assert confirms.idle.is_set() and confirms.returns == []


async def test_a_multiple_ack_over_returned_and_nacked_publishes() -> None:
    channel = FakeChannel()
    confirms = _Confirms(channel, None)
    batch = await write(confirms, [msg(n, "nowhere" if n == 3 else "q") for n in range(6)])
    await confirms._on_return(channel.returned("3", "nowhere"))
    await confirms._on_confirm(spec.Basic.Nack(delivery_tag=2))  # out of order: tag 2 alone
    await confirms._on_confirm(ack(6, multiple=True))
    index, error = batch.outcome()
    assert index == 1 and isinstance(error, aiormq.exceptions.DeliveryError)
    assert not isinstance(error, aiormq.exceptions.PublishError)
    assert confirms.returns == []  # the return was paired with tag 4, after the nack


async def test_a_return_is_paired_by_routing_key_among_equal_message_ids() -> None:
    channel = FakeChannel()
    confirms = _Confirms(channel, None)
    batch = await write(confirms, [msg(7, "q"), msg(7, "nowhere"), msg(7, "q")])
    await confirms._on_return(channel.returned("7", "nowhere"))
    await confirms._on_confirm(ack(3, multiple=True))
    assert batch.outcome()[0] == 1


async def test_a_close_stops_every_batch_at_its_first_unanswered_publish() -> None:
    channel = FakeChannel()
    confirms = _Confirms(channel, None)
    first = await write(confirms, [msg(n) for n in range(4)])
    second = await write(confirms, [msg(n) for n in range(4)])
    await confirms._on_confirm(ack(2, multiple=True))
    await confirms._on_confirm(ack(6))  # out of order: in the second batch, after unanswered ones
    close = spec.Channel.Close(reply_code=403, reply_text="ACCESS_REFUSED")
    await channel._on_close_frame(close)  # replaced by _Confirms: marks the channel closed first
    assert isinstance(confirms.closed, aiormq.exceptions.ChannelAccessRefused)
    assert channel.closed_by == [close]  # and still runs aiormq's handler
    channel._closing.set_exception(aiormq.exceptions.ChannelAccessRefused(close))
    await asyncio.sleep(0)  # the done callback
    assert first.done.done() and second.done.done()
    assert first.outcome()[0] == 2 and isinstance(first.outcome()[1], aiormq.exceptions.ChannelAccessRefused)
    assert second.outcome()[0] == 0
    assert confirms.unsettled_at_close == 5  # tags 3, 4, 5, 7, 8
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await write(confirms, [msg(9)])
    assert channel.write_queue.qsize() == 2  # the two batches, nothing after the close


async def test_a_late_answer_for_a_batch_given_up_is_ignored() -> None:
    """aiormq 7.2.4's reader died when a publish it had cancelled came back returned."""
    channel = FakeChannel()
    confirms = _Confirms(channel, None)
    batch = await write(confirms, [msg(1, "nowhere"), msg(2, "nowhere")])
    confirms.give_up(batch)
    batch.done.cancel()
    await confirms._on_return(channel.returned("1", "nowhere"))
    await confirms._on_confirm(ack(1))
    await confirms._on_return(channel.returned("2", "nowhere"))
    await confirms._on_confirm(ack(2))
    assert confirms.idle.is_set() and confirms.pending == {}
    after = await write(confirms, [msg(3)])
    await confirms._on_confirm(ack(3))
    assert after.outcome() == (1, None)
