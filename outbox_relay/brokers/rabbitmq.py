"""RabbitMQ adapter: aio-pika's connection and confirm-mode channel; the publishes as aiormq frames.

Each message is published persistent (delivery mode 2) to the target's exchange ('' is the default
exchange) with ``routing_key = message.destination``, ``message_id = message.dedupe_id``, the
message's headers copied into the AMQP headers and the key in the header ``outbox-key``. A
CloudEvent's attributes go into ``ce-<name>`` headers and its ``datacontenttype`` into the
``content_type`` property (the CloudEvents RabbitMQ binding, binary content mode).

A publisher has ``LINKS`` (2) connections with one confirm-mode channel each; concurrent callers
(the worker shares one publisher between the partitions it runs) spread over them, and each keeps up
to ``DEPTH`` batches in flight: a batch's publishes are written in batch order as one frame sequence,
batches in turn, and the confirms of all of them are awaited together. Order per key holds because a
channel's publishes reach the queues in the order written.

Confirms and returns are paired with their publishes by delivery tag in the adapter
(:class:`_Confirms`, installed as the channel's handler of ``basic.ack``/``basic.nack``,
``basic.return`` and ``channel.close``), not by aiormq, for three reasons (aiormq 7.2.4):
aiormq pairs a ``basic.return`` with its publish by ``message_id`` alone, which with several batches
in flight (two databases relaying the same outbox ids to one target) can blame the wrong one; its
return handler kills the channel's reader (InvalidStateError) when the publish's future was
cancelled; and nothing stops a publish being queued after aiormq queued ``channel.close-ok`` for a
channel the broker closed, over which RabbitMQ closes the whole *connection* (504
``CHANNEL_ERROR - expected 'channel.open'``). A ``basic.return`` always comes before the ack of its
publish, so a return waits for that ack and is paired with the acked publish of the same message id
and routing key; the close handler marks the channel closed before the close-ok is queued, and no
batch is written on it after that.

The publishes go as aiormq frames on the connection's write queue (``basic_publish`` costs a task, a
lock turn, a write and a drain per message). This relies on aiormq 7.2's channel internals (``lock``,
``write_queue``, the reader's ``_on_*_frame`` handlers, the content readers), pinned by the lock
file; the contract suite covers every answer.

How the broker's answers map onto the seam's contract:

* ``basic.ack`` → acknowledged.
* ``basic.return`` (``mandatory`` and no queue is bound for the routing key) and ``basic.nack``
  → :class:`MessageRejected` at that message.
* A channel closed by the broker because of what was published (404 exchange not found, 403 access
  refused, e.g. a topic permission, 406 precondition failed, e.g. a message over
  ``max_message_size``) → the close fails every batch in flight on the channel; since RabbitMQ does
  not say which publish closed it, each such batch publishes its unconfirmed tail again one message
  at a time, alone on the connection (nothing else in flight), on a new channel, to find it; that one
  is :class:`MessageRejected`. (Unless only one publish was unconfirmed: that one.) The tails may
  reach the broker twice, also those of the other batches, which at-least-once delivery allows.
* A message AMQP cannot carry is refused before anything is sent for it, as :class:`MessageRejected`:
  a routing key over 255 bytes, a header name over 128 bytes (pamqp would silently truncate it), or
  headers too large for one frame (``frame_max``; RabbitMQ would close the connection with 501
  ``FRAME_ERROR``, failing the batch as unavailable for ever).
* Anything else (connection refused or lost, authentication, no answer within ``timeout_ms``
  between two confirms, a broker address the address policy refuses) → :class:`TargetUnavailable`;
  the connection is dropped and opened again by the next batch.

Every connection (the first and each reconnect) is dialled by :class:`GuardedTransport`: the URL's
host is resolved once by the :class:`~outbox_relay.netguard.AddressPolicy`, every address checked,
and the TCP connection made to a checked IP address (TLS verifies, and sends SNI for, the host name).

A return or a nack leaves the channel as it is (the answers still due for the batch's other
publishes are paired by delivery tag); an outage or a timeout drops the connection, which fails the
batches in flight on it as :class:`TargetUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import aio_pika
import aiormq.channel
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, DeliveryMode
from aiormq.abc import ChannelFrame
from aiormq.connection import DEFAULT_PORTS, TransportFactory
from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header
from pamqp.constants import FRAME_BODY, FRAME_END_CHAR, FRAME_HEADER
from yarl import URL

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import RabbitMQTarget
from outbox_relay.errors import AddressNotAllowed, MessageRejected, TargetUnavailable
from outbox_relay.netguard import AddressPolicy

KEY_HEADER = "outbox-key"
CE_PREFIX = "ce-"
"""CloudEvents attributes as headers (the CloudEvents RabbitMQ binding, binary content mode)."""
MAX_ROUTING_KEY_BYTES = 255  # shortstr
MAX_HEADER_NAME_BYTES = 128  # field-table names; pamqp truncates longer ones

_FRAME_START = struct.Struct(">BHI")  # frame type, channel, payload size
_FRAME_OVERHEAD = _FRAME_START.size + len(FRAME_END_CHAR)
# Channel closes that blame what was published rather than the broker's health.
_REFUSING_CLOSES = (
    aiormq.exceptions.ChannelNotFoundEntity,  # 404: the exchange does not exist
    aiormq.exceptions.ChannelAccessRefused,  # 403: no write permission on the exchange or topic
    aiormq.exceptions.ChannelPreconditionFailed,  # 406: e.g. message larger than max_message_size
    aiormq.exceptions.ChannelLockedResource,  # 405
)


LINKS = 2
"""Connections (each with one confirm-mode channel) a publisher spreads concurrent batches over.
Measured before pipelining (one batch at a time per connection), 4 batches of 1,000 in flight on one
publisher: one link 15,000 msg/s, two 16,600; persistent confirms wait for the broker's disk writes,
so what helps is more in flight."""

DEPTH = 4
"""Batches one connection keeps in flight (written, their confirms awaited) at once; a fifth waits
(at most ``timeout_ms``) for one of them to finish."""


class RabbitMQPublisher:
    """Publishes batches to one RabbitMQ exchange over up to ``links`` connections; see the module
    docstring for the mapping. A batch goes to a connection with nothing to do, or else to the one
    with the fewest batches (up to ``DEPTH`` in flight on each; more wait their turn)."""

    def __init__(
        self,
        *,
        url: str,
        policy: AddressPolicy,
        password: str | None = None,
        exchange: str = "",
        mandatory: bool = True,
        timeout_ms: int = 10_000,
        connection_name: str = "outbox-relay",
        links: int = LINKS,
    ) -> None:
        """``url`` is ``amqp[s]://user@host:port/vhost`` without the password; ``password`` is set
        into it as a URL component (so any character is safe); ``policy`` checks every address the
        host has, at each connect. Nothing connects before :meth:`connect` or the first batch."""
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        if links < 1:
            raise ValueError(f"links must be at least 1, got {links}")
        parsed = URL(url)
        if parsed.scheme not in ("amqp", "amqps"):
            raise ValueError(f"url must be amqp:// or amqps://, got scheme {parsed.scheme!r}")
        if password is not None:
            parsed = parsed.with_password(password)
        options = _LinkOptions(
            url=parsed,
            exchange=exchange,
            mandatory=mandatory,
            timeout_s=timeout_ms / 1000,
            transport=GuardedTransport(policy),
        )
        self._links = [
            _Link(options, connection_name if i == 0 else f"{connection_name}-{i + 1}") for i in range(links)
        ]
        self._queued = [0] * links

    @classmethod
    def from_target(cls, target: RabbitMQTarget, *, password: str | None, policy: AddressPolicy) -> Self:
        return cls(
            url=target.url,
            policy=policy,
            password=password,
            exchange=target.exchange,
            mandatory=target.mandatory,
            timeout_ms=target.timeout_ms,
        )

    async def connect(self) -> None:
        """Open the first connection and its channel now (the others open when first needed);
        raise :class:`TargetUnavailable` when the broker cannot be reached."""
        await self._links[0].connect()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        if not messages:
            return PublishResult(acked=0)
        index = min(range(len(self._links)), key=self._queued.__getitem__)  # the first idle one, if any
        self._queued[index] += 1
        try:
            return await self._links[index].publish_batch(messages)
        finally:
            self._queued[index] -= 1

    async def close(self) -> None:
        """Close every connection; safe to call more than once."""
        for link in self._links:
            await link.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class _LinkOptions:
    """What every connection of a publisher shares (checked once, by :class:`RabbitMQPublisher`)."""

    url: URL
    """With the password set."""
    exchange: str
    mandatory: bool
    timeout_s: float
    transport: GuardedTransport


class _Link:
    """One connection and its confirm-mode channel, with up to ``DEPTH`` batches in flight."""

    def __init__(self, options: _LinkOptions, connection_name: str) -> None:
        self._url = options.url
        self._exchange_name = options.exchange
        self._mandatory = options.mandatory
        self._timeout_s = options.timeout_s
        self._transport = options.transport
        self._connection_name = connection_name
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._confirms: _Confirms | None = None
        self._frame_max = 0
        """The broker's, once connected (kept across reconnects: the same broker)."""
        self._writing = asyncio.Lock()
        """Held to open a connection or channel and to put a batch's frames on the write queue (so
        batches go out whole and in turn), and for the whole of a probe (see ``_probe``)."""
        self._slots = asyncio.Semaphore(DEPTH)
        self._closed = False

    async def connect(self) -> None:
        """Open the connection and the confirm-mode channel now; raise :class:`TargetUnavailable`
        when the broker cannot be reached."""
        async with self._turn(self._writing, "the batches ahead were not written"):
            await self._ensure_exchange()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        if not messages:
            return PublishResult(acked=0)
        async with self._turn(self._slots, f"{DEPTH} batches in flight were not confirmed"):
            return await self._publish(messages)

    async def close(self) -> None:
        """Close the connection; safe to call more than once."""
        self._closed = True
        await self._drop_connection()

    # --- internals ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _turn(self, lock: asyncio.Lock | asyncio.Semaphore, what: str) -> AsyncIterator[None]:
        """Wait (at most ``timeout_ms``) for ``lock``; see the module docstring."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await lock.acquire()
        except TimeoutError as exc:
            raise TargetUnavailable(f"RabbitMQ at {self._safe_url()}: {what} within {self._timeout_s:g}s") from exc
        try:
            yield
        finally:
            lock.release()

    async def _publish(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        total = len(messages)
        if not self._frame_max:
            async with self._turn(self._writing, "the batches ahead were not written"):
                await self._ensure_exchange()  # connected, so frame_max is known
        sendable, refusal, encoded = self._sendable_prefix(messages)
        index, error, confirms = await self._send(messages, encoded, 0, sendable)
        if error is None:
            if refusal is None:
                return PublishResult(acked=total)
            return PublishResult(acked=sendable, rejected=MessageRejected(refusal, index=sendable))
        if not isinstance(error, _REFUSING_CLOSES) or (confirms is not None and confirms.unsettled_at_close == 1):
            # a return, a nack or an outage names its message; a channel closed with one publish
            # unconfirmed on it was closed over that one
            return PublishResult(acked=index, rejected=await self._rejection_or_raise(error, index, confirms))
        return await self._probe(messages, encoded, index, sendable, refusal)

    async def _probe(
        self,
        messages: Sequence[OutgoingMessage],
        encoded: Sequence[bytes],
        start: int,
        sendable: int,
        refusal: str | None,
    ) -> PublishResult:
        """The channel closed with several publishes unconfirmed (of this batch or of others in
        flight): publish this batch's unconfirmed tail again one message at a time, alone on the
        link (no other batch writes meanwhile, and none is in flight), to find the one refused."""
        async with self._turn(self._writing, "the batches ahead were not written"):
            for i in range(start, sendable):
                await self._ensure_exchange()
                confirms = self._confirms
                assert confirms is not None
                try:
                    async with asyncio.timeout(self._timeout_s):
                        await confirms.idle.wait()
                except TimeoutError as exc:
                    error: BaseException | None = exc
                else:
                    _, error, confirms = await self._send(messages, encoded, i, i + 1, locked=True)
                if error is not None:
                    return PublishResult(acked=i, rejected=await self._rejection_or_raise(error, i, confirms))
        if refusal is None:
            return PublishResult(acked=len(messages))
        return PublishResult(acked=sendable, rejected=MessageRejected(refusal, index=sendable))

    async def _send(
        self,
        messages: Sequence[OutgoingMessage],
        encoded: Sequence[bytes],
        start: int,
        stop: int,
        *,
        locked: bool = False,
    ) -> tuple[int, BaseException | None, _Confirms | None]:
        """Publish ``messages[start:stop]`` (their content headers ``encoded``) and wait for their
        confirms.

        Returns the index of the first message not confirmed, why (``None`` when all were: then the
        index is ``stop``), and the channel's confirms. Waits at most ``timeout_ms`` while no confirm
        at all arrives on the channel, so a slow but progressing link does not cut a batch.
        ``locked``: the caller holds ``_writing``.
        """
        if start >= stop:
            return stop, None, None
        async with contextlib.AsyncExitStack() as stack:
            if not locked:
                await stack.enter_async_context(self._turn(self._writing, "the batches ahead were not written"))
            await self._ensure_exchange()
            confirms = self._confirms
            assert confirms is not None
            try:
                async with asyncio.timeout(self._timeout_s):
                    batch, drain = await confirms.write(
                        messages[start:stop], encoded[start:stop], self._exchange_name, self._mandatory
                    )
            except Exception as exc:  # nothing was written: the channel or connection closed, or a full queue
                closed = confirms.closed
                return start, closed if isinstance(closed, _REFUSING_CLOSES) else exc, None
        try:
            async with asyncio.timeout(self._timeout_s):
                await drain
        except TimeoutError:
            confirms.give_up(batch)
            return start + batch.outcome()[0], TimeoutError(f"not written within {self._timeout_s:g}s"), confirms
        except Exception:  # the channel or connection closed: the batch's answer says how
            pass
        while not batch.done.done():
            progress = confirms.progress
            await asyncio.wait((batch.done,), timeout=self._timeout_s)
            if not batch.done.done() and confirms.progress == progress:
                confirms.give_up(batch)
                index, error = batch.outcome()
                if error is None:
                    error = TimeoutError(f"no publisher confirm within {self._timeout_s:g}s")
                return start + index, error, confirms
        index, error = batch.outcome()
        return start + index, error, confirms

    async def _rejection_or_raise(
        self, error: BaseException, index: int, confirms: _Confirms | None
    ) -> MessageRejected:
        """Map a publish failure to the message's rejection, or raise TargetUnavailable (dropping
        the connection the failure happened on, unless it was replaced meanwhile).

        The channel stays after a return or a nack: its confirms are paired with their publishes by
        delivery tag, so those still due for this batch are not taken for the next one's."""
        if isinstance(error, aiormq.exceptions.PublishError):
            return MessageRejected(
                f"unroutable: no queue is bound for this routing key on exchange "
                f"{self._exchange_name!r} (mandatory publish returned: {_reply_text(error)})",
                index=index,
            )
        if isinstance(error, aiormq.exceptions.DeliveryError):
            return MessageRejected("the broker nacked the message", index=index)
        if isinstance(error, _REFUSING_CLOSES):
            return MessageRejected(f"the broker closed the channel: {error}", index=index)
        if confirms is None or confirms.connection is self._connection:
            await self._drop_connection()
        raise TargetUnavailable(f"RabbitMQ at {self._safe_url()}: {error!r}") from error

    def _sendable_prefix(self, messages: Sequence[OutgoingMessage]) -> tuple[int, str | None, list[bytes]]:
        """How many messages from the start AMQP can carry, why the next one cannot, and the
        content header (properties) of each that can, encoded once for the check and the write."""
        frame_max = self._frame_max
        encoded: list[bytes] = []
        for index, message in enumerate(messages):
            header, reason = _content_header(message, frame_max)
            if header is None:
                return index, reason, encoded
            encoded.append(header)
        return len(messages), None, encoded

    async def _ensure_exchange(self) -> AbstractExchange:
        """The exchange on an open channel (connecting first when needed). Called holding
        ``_writing``."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        if (
            self._exchange is not None
            and self._channel is not None
            and not self._channel.is_closed
            and self._confirms is not None
            and self._confirms.closed is None
            and self._connection_usable()
        ):
            return self._exchange
        if self._connection is not None and not self._connection_usable():
            await self._drop_connection()
        else:
            await self._drop_channel()
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._connection is None:
                    # aio-pika's own timeout does not cover waiting for an unblocked connection.
                    connection = _GuardedConnection(
                        self._url,
                        transport_factory=self._transport,
                        client_properties={"connection_name": self._connection_name},
                    )
                    await connection.connect(timeout=self._timeout_s)
                    self._connection = connection
                channel = self._connection.channel(publisher_confirms=True, on_return_raises=True)
                await channel.initialize(timeout=self._timeout_s)
                underlay = await channel.get_underlay_channel()
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError, RuntimeError, AddressNotAllowed) as exc:
            await self._drop_connection()
            raise TargetUnavailable(f"cannot open RabbitMQ at {self._safe_url()}: {exc!r}") from exc
        self._channel = channel
        self._confirms = _Confirms(underlay, self._connection)
        self._frame_max = self._connection_frame_max()
        if self._exchange_name == "":
            self._exchange = channel.default_exchange
        else:
            # Not declared passively: a missing exchange closes the channel, which the publish
            # reports against its message.
            self._exchange = await channel.get_exchange(self._exchange_name, ensure=False)
        return self._exchange

    def _connection_frame_max(self) -> int:
        transport = self._connection.transport if self._connection is not None else None
        if transport is None:
            return 0
        return int(transport.connection.connection_tune.frame_max or 0)

    def _connection_usable(self) -> bool:
        """aio-pika's ``is_closed`` stays False when the *broker* closed the connection (only
        ``close()`` sets it), so look at the transport too."""
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return False
        transport = connection.transport
        return transport is not None and not transport.connection.is_closed

    async def _drop_channel(self) -> None:
        channel, self._channel, self._exchange, self._confirms = self._channel, None, None, None
        if channel is not None and not channel.is_closed and self._connection_usable():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout_s):
                    await channel.close()

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = self._confirms = None
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout_s):
                    await connection.close()

    def _safe_url(self) -> str:
        return str(self._url.with_password(None))


class _Batch:
    """The publishes of one :meth:`_Confirms.write`, delivery tags ``first_tag`` on, and what the
    broker answered for them; ``done`` resolves once each is answered or the channel closed."""

    __slots__ = ("done", "error", "failed_at", "first_tag", "messages", "remaining", "unsettled_at")

    def __init__(self, messages: Sequence[OutgoingMessage], first_tag: int, done: asyncio.Future[None]) -> None:
        self.messages = messages
        self.first_tag = first_tag
        self.remaining = len(messages)
        self.failed_at = len(messages)
        """The first message refused (returned or nacked); the length when none was."""
        self.error: BaseException | None = None
        self.unsettled_at = len(messages)
        """The first message without an answer when the channel closed (or the wait gave up)."""
        self.done = done

    def refuse(self, offset: int, error: BaseException) -> None:
        if offset < self.failed_at:
            self.failed_at, self.error = offset, error

    def outcome(self) -> tuple[int, BaseException | None]:
        """The first message not acknowledged, and why (None: all were)."""
        if self.failed_at <= self.unsettled_at:
            return self.failed_at, self.error
        return self.unsettled_at, None


class _Confirms:
    """Publisher confirms and returns of one confirm-mode aiormq channel, paired with the publishes
    by delivery tag in the adapter (aiormq's own pairing is by ``message_id``: see the module
    docstring). Installs itself as the channel's handler of ``basic.ack``/``basic.nack``,
    ``basic.return`` and ``channel.close``; the adapter is the only one publishing on the channel."""

    def __init__(self, channel: Any, connection: AbstractConnection | None) -> None:
        self.channel = channel
        self.connection = connection
        self.pending: dict[int, _Batch] = {}
        """Delivery tag -> its batch, for each publish written and not answered yet."""
        self.low = 1
        """No publish below this tag is pending (a ``multiple`` ack settles from here on)."""
        self.last_tag = 0
        self.returns: list[tuple[str, str, aiormq.exceptions.PublishError]] = []
        """``basic.return`` not yet paired with the ack of its publish: message id, routing key, error."""
        self.progress = 0
        """Counts the confirms received (a wait gives up only while it stands still)."""
        self.closed: BaseException | None = None
        self.unsettled_at_close = 0
        self.idle = asyncio.Event()
        self.idle.set()
        channel._on_confirm_frame = self._on_confirm
        channel._on_return_frame = self._on_return
        on_close_frame = channel._on_close_frame

        async def close_frame(frame: spec.Channel.Close) -> None:
            # before aiormq queues its channel.close-ok: nothing more may be written for this channel
            # (RabbitMQ closes the connection over a publish on a channel it closed: 504)
            self.closed = aiormq.channel.exception_by_code(frame)
            await on_close_frame(frame)

        channel._on_close_frame = close_frame
        channel.closing.add_done_callback(self._on_channel_closed)

    async def write(
        self, messages: Sequence[OutgoingMessage], encoded: Sequence[bytes], exchange: str, mandatory: bool
    ) -> tuple[_Batch, asyncio.Future[Any]]:
        """Put the publishes of ``messages`` on the connection's write queue as one frame sequence
        (under the channel's lock) and register them; returns the batch and the drain future. Nothing
        is registered for a write that did not happen."""
        channel = self.channel
        async with channel.lock:
            if self.closed is not None or channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            number, chunk = channel.number, channel.max_content_size
            parts: list[bytes] = []
            publish_frames: dict[str, bytes] = {}  # one marshalled basic.publish per routing key
            for message, header in zip(messages, encoded, strict=True):
                publish = publish_frames.get(message.destination)
                if publish is None:
                    method = spec.Basic.Publish(exchange=exchange, routing_key=message.destination, mandatory=mandatory)
                    publish = publish_frames[message.destination] = amqp_frame.marshal(method, number)
                parts.append(publish)
                parts.append(_frame(FRAME_HEADER, number, header))
                body = message.payload
                for offset in range(0, len(body), chunk):
                    parts.append(_frame(FRAME_BODY, number, body[offset : offset + chunk]))
            drain = channel.create_future()
            await channel.write_queue.put(ChannelFrame(payload=b"".join(parts), should_close=False, drain_future=drain))
            # registered only once queued (the put can wait when the queue is full, and be cancelled)
            first = self.last_tag + 1
            self.last_tag += len(messages)
            batch = _Batch(messages, first, asyncio.get_running_loop().create_future())
            self.pending.update(dict.fromkeys(range(first, self.last_tag + 1), batch))
            self.idle.clear()
            return batch, drain

    async def _on_confirm(self, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
        self.progress += 1
        pending, tag = self.pending, frame.delivery_tag
        nack = isinstance(frame, spec.Basic.Nack)
        tags: Iterable[int]
        if frame.multiple:
            tags, self.low = range(self.low, tag + 1), max(self.low, tag + 1)
        else:
            tags = (tag,)
        for t in tags:
            batch = pending.pop(t, None)
            if batch is None:
                continue
            offset = t - batch.first_tag
            if nack:
                batch.refuse(offset, aiormq.exceptions.DeliveryError(None, frame))
            elif self.returns:
                self._pair_return(batch, offset)
            batch.remaining -= 1
            if not batch.remaining and not batch.done.done():
                batch.done.set_result(None)
        if not pending:
            self.idle.set()

    def _pair_return(self, batch: _Batch, offset: int) -> None:
        """A ``basic.return`` comes before the ack of its publish; several can wait for their acks
        (acks of persistent messages wait for the disk, a return's does not), so the one for this
        publish is the first with its message id and routing key. (Two publishes in flight with the
        same id and routing key go to the same queues: either both are returned or neither.)"""
        message = batch.messages[offset]
        for i, (message_id, routing_key, error) in enumerate(self.returns):
            if message_id == message.dedupe_id and routing_key == message.destination:
                del self.returns[i]
                batch.refuse(offset, error)
                return

    async def _on_return(self, frame: spec.Basic.Return) -> None:
        # aiormq's own handler sets the exception of a future found by message id, and its channel
        # reader dies (InvalidStateError) when that future was cancelled (aiormq 7.2.4)
        channel = self.channel
        header = await channel._Channel__get_content_header()
        message = await channel._read_content(frame, header)
        message_id = message.header.properties.message_id or ""
        self.returns.append((message_id, frame.routing_key or "", aiormq.exceptions.PublishError(message, frame)))

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        error = None if closing.cancelled() else closing.exception()
        if self.closed is None:
            self.closed = error or aiormq.exceptions.ChannelInvalidStateError("the channel closed")
        self.unsettled_at_close = len(self.pending)
        for tag, batch in self.pending.items():  # in tag order: a batch's first is its lowest
            if batch.unsettled_at == len(batch.messages):
                batch.unsettled_at = tag - batch.first_tag
                batch.refuse(batch.unsettled_at, self.closed)
                if not batch.done.done():
                    batch.done.set_result(None)
        self.pending.clear()
        self.returns.clear()
        self.idle.set()

    def give_up(self, batch: _Batch) -> None:
        """Stop waiting for ``batch``: its first publish without an answer is where it stops."""
        stop = batch.first_tag + len(batch.messages)
        first = next((t for t in range(batch.first_tag, stop) if self.pending.get(t) is batch), stop)
        batch.unsettled_at = first - batch.first_tag


class GuardedTransport(TransportFactory):
    """aiormq's transport factory, dialling only addresses the address policy checked just now.

    aiormq's own factories hand the URL's host to ``asyncio.open_connection``, which resolves it
    again; this one resolves it once through the policy (AddressNotAllowed when any address is
    refused) and connects to the checked addresses in turn, with ``server_hostname`` the host name
    so that an ``amqps`` certificate is verified (and SNI sent) for the name, not the address.
    """

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        provider = kwargs.pop("ssl_context_provider", None)
        context = await provider.get_context() if url.scheme == "amqps" and provider is not None else None
        endpoints = await self.policy.resolve(url.host or "", url.port or DEFAULT_PORTS[url.scheme])
        error: OSError | None = None
        for endpoint in endpoints:
            try:
                return await asyncio.open_connection(
                    host=endpoint.address,
                    port=endpoint.port,
                    ssl=context,
                    server_hostname=endpoint.server_name if context is not None else None,
                    **kwargs,
                )
            except OSError as exc:
                error = exc
        assert error is not None  # resolve() answers at least one endpoint
        raise aiormq.exceptions.AMQPConnectionError(*error.args) from error


class _GuardedConnection(aio_pika.Connection):
    """aio-pika's connection with a transport factory of our choosing (``aio_pika.connect`` would
    put keyword arguments it does not know into the URL's query instead of passing them on)."""

    def __init__(self, url: URL, *, transport_factory: TransportFactory, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.kwargs["transport_factory"] = transport_factory


def _properties(message: OutgoingMessage) -> spec.Basic.Properties:
    """The AMQP properties of ``message`` (what ``aio_pika.Message`` set for it before: persistent,
    ``message_id``, the headers with the key in ``outbox-key``, priority 0, an empty cluster id)."""
    event = message.cloudevent
    return spec.Basic.Properties(
        content_type=None if event is None else event.datacontenttype,
        headers=_header_table(message),
        delivery_mode=int(DeliveryMode.PERSISTENT),
        priority=0,
        message_id=message.dedupe_id,
        cluster_id="",
    )


def _header_table(message: OutgoingMessage) -> dict[str, Any]:
    """The message's headers, its key as ``outbox-key`` and a CloudEvent's attributes as ``ce-<name>``
    (the CloudEvents RabbitMQ binding, binary content mode; the content type is the property)."""
    headers: dict[str, Any] = dict(message.headers)
    if message.key is not None:
        headers[KEY_HEADER] = message.key
    if message.cloudevent is not None:
        headers.update((CE_PREFIX + name, value) for name, value in message.cloudevent.attributes())
    return headers


def _content_header(message: OutgoingMessage, frame_max: int) -> tuple[bytes | None, str | None]:
    """``message``'s content header frame payload, or None and why AMQP cannot carry the message."""
    if len(message.destination.encode()) > MAX_ROUTING_KEY_BYTES:
        return None, f"routing key longer than {MAX_ROUTING_KEY_BYTES} bytes (UTF-8)"
    payload = _encode_content_header(message)
    if payload is None:  # a name too long, or a value other than a string: pamqp's encoder says why
        properties = _properties(message)
        for name in properties.headers or {}:
            if len(name.encode()) > MAX_HEADER_NAME_BYTES:
                return None, f"header name {name[:40]!r}... longer than AMQP's {MAX_HEADER_NAME_BYTES} bytes (UTF-8)"
        try:
            payload = amqp_header.ContentHeader(0, len(message.payload), properties).marshal()
        except (TypeError, ValueError, struct.error) as exc:
            return None, f"headers cannot be encoded in AMQP: {exc}"
    size = len(payload) + _FRAME_OVERHEAD
    if frame_max and size > frame_max:
        return None, f"headers take {size} bytes, more than one AMQP frame carries (frame_max {frame_max})"
    return payload, None


_HEADER_START = struct.Struct(">HxxQHI")  # class id, weight 0, body size, property flags, table size
_PROPERTY_FLAGS = sum(
    spec.Basic.Properties.flags[name] for name in ("headers", "delivery_mode", "priority", "message_id")
)
_DELIVERY_AND_PRIORITY = bytes((int(DeliveryMode.PERSISTENT), 0))
_HEADER_START_TYPED = struct.Struct(">HxxQH")  # class id, weight 0, body size, property flags
_TYPED_PROPERTY_FLAGS = _PROPERTY_FLAGS + spec.Basic.Properties.flags["content_type"]


def _encode_content_header(message: OutgoingMessage) -> bytes | None:
    """What ``ContentHeader(0, len(payload), _properties(message)).marshal()`` gives (pamqp costs
    some 50 us a message), for headers whose values are all strings and names at most 128 bytes,
    and a message id of 1 to 255 bytes; None for anything else (then pamqp encodes it, or says why
    it cannot). The field table's names in sorted order, as pamqp writes them."""
    headers = _header_table(message)
    parts: list[bytes] = []
    for name, value in sorted(headers.items()):
        if type(value) is not str:
            return None
        field = _FIELD_NAMES.get(name)
        if field is None:
            field = _field_name(name)
            if field is None:
                return None
        encoded_value = value.encode()
        parts.append(field)
        parts.append(_LONG.pack(len(encoded_value)))
        parts.append(encoded_value)
    message_id = message.dedupe_id.encode()
    if not 0 < len(message_id) <= MAX_ROUTING_KEY_BYTES:  # a shortstr, like the routing key
        return None
    table = b"".join(parts)
    event = message.cloudevent
    if event is None:
        start = _HEADER_START.pack(spec.Basic.frame_id, len(message.payload), _PROPERTY_FLAGS, len(table))
    else:  # the content type (a shortstr) comes first, before the headers' table
        content_type = event.datacontenttype.encode()
        if len(content_type) > MAX_ROUTING_KEY_BYTES:
            return None
        start = b"".join(
            (
                _HEADER_START_TYPED.pack(spec.Basic.frame_id, len(message.payload), _TYPED_PROPERTY_FLAGS),
                len(content_type).to_bytes(1, "big"),
                content_type,
                _LONG.pack(len(table)),
            )
        )
    return b"".join(
        (
            start,
            table,
            _DELIVERY_AND_PRIORITY,
            len(message_id).to_bytes(1, "big"),
            message_id,
        )
    )


_LONG = struct.Struct(">I")
_FIELD_NAMES: dict[str, bytes] = {}
"""A header name's encoding in a field table, with the long-string tag after it: a relay's headers
repeat (outbox-id, traceparent, outbox-key), so each is encoded once."""


def _field_name(name: str) -> bytes | None:
    """``name`` as a field table's shortstr plus the ``S`` tag (remembered in ``_FIELD_NAMES``, up
    to a bound), or None when it is longer than AMQP allows."""
    encoded = name.encode()
    if len(encoded) > MAX_HEADER_NAME_BYTES:
        return None
    field = len(encoded).to_bytes(1, "big") + encoded + b"S"
    if len(_FIELD_NAMES) < 4096:
        _FIELD_NAMES[name] = field
    return field


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    """One AMQP frame (pamqp's ``frame._marshal``)."""
    return _FRAME_START.pack(frame_type, channel, len(payload)) + payload + FRAME_END_CHAR


def _reply_text(error: aiormq.exceptions.PublishError) -> str:
    delivery = error.message.delivery if error.message is not None else None
    return f"{getattr(delivery, 'reply_code', '?')} {getattr(delivery, 'reply_text', '')}".strip()
