"""RabbitMQ adapter: aio-pika's connection and confirm-mode channel; the publishes as aiormq frames.

Each message is published persistent (delivery mode 2) to the target's exchange ('' is the default
exchange) with ``routing_key = message.destination``, ``message_id = message.dedupe_id``, the
message's headers copied into the AMQP headers and the key in the header ``outbox-key``.

One batch at a time per connection: a publisher has ``LINKS`` (2) connections with one channel each,
and each holds a lock for its whole batch, so concurrent callers (the worker shares one publisher
between the partitions it runs) spread over them and take turns on each. Why not a channel per
concurrent batch: a publish the broker refuses by closing the channel (403, 404, 406) makes aiormq
write the publishes queued behind it after its ``channel.close-ok``, and RabbitMQ then closes the
whole *connection* (504 ``CHANNEL_ERROR - expected 'channel.open'``), which would fail every other
batch in flight on it; aiormq also pairs a ``basic.return`` with its publish by ``message_id``
alone, so two batches in flight carrying the same outbox id (two databases relaying to one target)
could be confused. Serial batches are still pipelined inside, so the cost is one round trip per
batch; the wait for the lock is bounded by ``timeout_ms`` like every other wait.

A batch is pipelined: all its publishes are written to the channel in batch order, in one write
under the channel's lock, before any confirm is awaited; each registers its confirmation with aiormq
the way ``Channel.basic_publish`` does (delivery tag, future, message id), so aiormq's handlers settle
acks (also ``multiple``), nacks, returns and a channel close. This relies on aiormq 7.2's channel
internals (``lock``, ``delivery_tag``, ``confirmations``, ``message_id_delivery_tag``,
``write_queue``), pinned by the lock file; the contract suite covers every answer.
How the broker's answers map onto the seam's contract:

* ``basic.ack`` → acknowledged.
* ``basic.return`` (``mandatory`` and no queue is bound for the routing key) and ``basic.nack``
  → :class:`MessageRejected` at that message.
* A channel closed by the broker because of what was published (404 exchange not found, 403 access
  refused, e.g. a topic permission, 406 precondition failed, e.g. a message over
  ``max_message_size``) → since RabbitMQ does not say which publish closed it, and the connection may
  be about to die of the race above, the unconfirmed tail of the batch is published again one message
  at a time on a new connection to find it; that one is :class:`MessageRejected`. (The tail may reach
  the broker twice, which at-least-once delivery allows.)
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

After anything but a fully acknowledged batch the channel is replaced, so confirms and returns still
due for the publishes of that batch cannot be taken for those of the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import aio_pika
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
One batch at a time per connection (see the module docstring); a second lets a batch be written
while the one before waits for its confirms. Measured with 4 batches of 1,000 in flight on one
publisher: 15,000 -> 16,600 msg/s; the relay (relay_bench, 100k messages) 10,956 -> 11,499 msg/s.
Neither side is busy (RabbitMQ 0.36 of a core, the client 0.39): persistent confirms wait for the
broker's disk writes, so what helps is more in flight."""


class RabbitMQPublisher:
    """Publishes batches to one RabbitMQ exchange over up to ``links`` connections; see the module
    docstring for the mapping. A batch goes to a connection with nothing to do, or else queues
    behind the one with the fewest batches; each connection keeps the one-batch-at-a-time rule,
    so a refusal that closes a channel, or a reconnect, touches only its own batch."""

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
    """One connection and its confirm-mode channel, one batch at a time (the module docstring)."""

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
        self._turn = asyncio.Lock()
        self._closed = False

    async def connect(self) -> None:
        """Open the connection and the confirm-mode channel now; raise :class:`TargetUnavailable`
        when the broker cannot be reached."""
        async with self._my_turn():
            await self._ensure_exchange()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        if not messages:
            return PublishResult(acked=0)
        async with self._my_turn():
            return await self._publish(messages)

    async def close(self) -> None:
        """Close the connection; safe to call more than once."""
        self._closed = True
        await self._drop_connection()

    # --- internals ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _my_turn(self) -> AsyncIterator[None]:
        """Wait (at most ``timeout_ms``) for the batches ahead to finish; see the module docstring."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._turn.acquire()
        except TimeoutError as exc:
            raise TargetUnavailable(
                f"RabbitMQ at {self._safe_url()}: the batches ahead did not finish within {self._timeout_s:g}s"
            ) from exc
        try:
            yield
        finally:
            self._turn.release()

    async def _publish(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        total = len(messages)
        await self._ensure_exchange()  # connected, so frame_max is known
        sendable, refusal, encoded = self._sendable_prefix(messages)
        index, error = await self._send(messages, encoded, 0, sendable)
        if error is None:
            if refusal is None:
                return PublishResult(acked=total)
            return PublishResult(acked=sendable, rejected=MessageRejected(refusal, index=sendable))
        if not isinstance(error, _REFUSING_CLOSES) or index == sendable - 1:
            # a return, a nack or an outage names its message; a channel closed with one publish
            # unconfirmed was closed over that one
            return PublishResult(acked=index, rejected=await self._rejection_or_raise(error, index))
        # The channel closed with several publishes unconfirmed: find the one it refuses, on a new
        # connection (this one may be about to be closed by the broker: see the module docstring).
        await self._drop_connection()
        for i in range(index, sendable):
            _, error = await self._send(messages, encoded, i, i + 1)
            if error is not None:
                return PublishResult(acked=i, rejected=await self._rejection_or_raise(error, i))
        if refusal is None:
            return PublishResult(acked=total)
        return PublishResult(acked=sendable, rejected=MessageRejected(refusal, index=sendable))

    async def _send(
        self, messages: Sequence[OutgoingMessage], encoded: Sequence[bytes], start: int, stop: int
    ) -> tuple[int, BaseException | None]:
        """Publish ``messages[start:stop]`` (their content headers ``encoded``) pipelined and wait for
        their confirms in order.

        Returns the index of the first message not confirmed and why (``None`` when all were); when
        the broker closed the channel over one of these publishes, the why is that close. Waits at
        most ``timeout_ms`` for each next confirm, so a slow but progressing batch is not cut.

        The publishes go as aiormq frames, all of the batch in one write under the channel's lock,
        each with its confirmation registered as ``Channel.basic_publish`` registers it (delivery
        tag, confirmation future, message id for a ``basic.return``): the broker's acks, multiple
        or not, nacks, returns and a channel close resolve them through aiormq's own handlers.
        ``basic_publish`` itself costs a task, a lock turn, a write and a drain per message
        (aio-pika's ``gather`` of publishes kept 0.59 of what the broker takes).
        """
        if start >= stop:
            return stop, None
        await self._ensure_exchange()
        assert self._channel is not None
        channel = await self._channel.get_underlay_channel()
        confirmations: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._write(channel, messages[start:stop], encoded[start:stop], confirmations)
        except Exception as exc:  # the channel or connection closed, or the write did not drain in time
            return start, _refusing_close(confirmations) or exc
        try:
            for offset, confirmation in enumerate(confirmations):
                if not confirmation.done():
                    done, _ = await asyncio.wait((confirmation,), timeout=self._timeout_s)
                    if not done:
                        return start + offset, TimeoutError(f"no publisher confirm within {self._timeout_s:g}s")
                error: BaseException | None
                if confirmation.cancelled():
                    error = aiormq.exceptions.ChannelInvalidStateError("publish cancelled: the channel closed")
                else:
                    error = confirmation.exception()
                if error is not None:
                    return start + offset, _refusing_close(confirmations) or error
            return stop, None
        finally:
            for confirmation in confirmations:
                if not confirmation.done():
                    confirmation.cancel()

    async def _write(
        self,
        channel: Any,
        messages: Sequence[OutgoingMessage],
        encoded: Sequence[bytes],
        confirmations: list[asyncio.Future[Any]],
    ) -> None:
        """Write the publishes of ``messages`` in one frame sequence, registering a confirmation for
        each in ``confirmations`` (in order). Nothing is registered for a write that did not happen."""
        async with channel.lock:
            if channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            number, chunk = channel.number, channel.max_content_size
            parts: list[bytes] = []
            publish_frames: dict[str, bytes] = {}  # one marshalled basic.publish per routing key
            first_tag = channel.delivery_tag + 1
            for message, header in zip(messages, encoded, strict=True):
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                confirmation = channel.create_future()
                channel.confirmations[tag] = confirmation
                channel.message_id_delivery_tag[message.dedupe_id] = tag
                confirmation.add_done_callback(_forget_message_id(channel, message.dedupe_id, tag))
                confirmations.append(confirmation)
                publish = publish_frames.get(message.destination)
                if publish is None:
                    method = spec.Basic.Publish(
                        exchange=self._exchange_name, routing_key=message.destination, mandatory=self._mandatory
                    )
                    publish = publish_frames[message.destination] = amqp_frame.marshal(method, number)
                parts.append(publish)
                parts.append(_frame(FRAME_HEADER, number, header))
                body = message.payload
                for offset in range(0, len(body), chunk):
                    parts.append(_frame(FRAME_BODY, number, body[offset : offset + chunk]))
            drain = channel.create_future()
            try:
                await channel.write_queue.put(
                    ChannelFrame(payload=b"".join(parts), should_close=False, drain_future=drain)
                )
            except BaseException:
                # not written: the broker has not seen these publishes; give their tags back
                channel.delivery_tag = first_tag - 1
                for tag in range(first_tag, first_tag + len(messages)):
                    channel.confirmations.pop(tag, None)
                for confirmation in confirmations:
                    confirmation.cancel()
                confirmations.clear()
                drain.cancel()
                raise
            await drain

    async def _rejection_or_raise(self, error: BaseException, index: int) -> MessageRejected:
        """Map a publish failure to the message's rejection, or raise TargetUnavailable.

        Either way the channel goes: confirms and returns still due for the batch's other publishes
        must not be taken for those of the next batch."""
        rejection: MessageRejected
        if isinstance(error, aiormq.exceptions.PublishError):
            rejection = MessageRejected(
                f"unroutable: no queue is bound for this routing key on exchange "
                f"{self._exchange_name!r} (mandatory publish returned: {_reply_text(error)})",
                index=index,
            )
        elif isinstance(error, aiormq.exceptions.DeliveryError):
            rejection = MessageRejected("the broker nacked the message", index=index)
        elif isinstance(error, _REFUSING_CLOSES):
            rejection = MessageRejected(f"the broker closed the channel: {error}", index=index)
        else:
            await self._drop_connection()
            raise TargetUnavailable(f"RabbitMQ at {self._safe_url()}: {error!r}") from error
        await self._drop_channel()
        return rejection

    def _sendable_prefix(self, messages: Sequence[OutgoingMessage]) -> tuple[int, str | None, list[bytes]]:
        """How many messages from the start AMQP can carry, why the next one cannot, and the
        content header (properties) of each that can, encoded once for the check and the write."""
        frame_max = self._frame_max()
        encoded: list[bytes] = []
        for index, message in enumerate(messages):
            header, reason = _content_header(message, frame_max)
            if header is None:
                return index, reason, encoded
            encoded.append(header)
        return len(messages), None, encoded

    def _frame_max(self) -> int:
        transport = self._connection.transport if self._connection is not None else None
        if transport is None:
            return 0
        return int(transport.connection.connection_tune.frame_max or 0)

    async def _ensure_exchange(self) -> AbstractExchange:
        if self._closed:
            raise RuntimeError("publisher is closed")
        if self._exchange is not None and self._channel is not None and not self._channel.is_closed:
            if self._connection_usable():
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
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError, RuntimeError, AddressNotAllowed) as exc:
            await self._drop_connection()
            raise TargetUnavailable(f"cannot open RabbitMQ at {self._safe_url()}: {exc!r}") from exc
        self._channel = channel
        if self._exchange_name == "":
            self._exchange = channel.default_exchange
        else:
            # Not declared passively: a missing exchange closes the channel, which the publish
            # reports against its message.
            self._exchange = await channel.get_exchange(self._exchange_name, ensure=False)
        return self._exchange

    def _connection_usable(self) -> bool:
        """aio-pika's ``is_closed`` stays False when the *broker* closed the connection (only
        ``close()`` sets it), so look at the transport too."""
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return False
        transport = connection.transport
        return transport is not None and not transport.connection.is_closed

    async def _drop_channel(self) -> None:
        channel, self._channel, self._exchange = self._channel, None, None
        if channel is not None and not channel.is_closed and self._connection_usable():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout_s):
                    await channel.close()

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout_s):
                    await connection.close()

    def _safe_url(self) -> str:
        return str(self._url.with_password(None))


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
    headers: dict[str, Any] = dict(message.headers)
    if message.key is not None:
        headers[KEY_HEADER] = message.key
    return spec.Basic.Properties(
        headers=headers,
        delivery_mode=int(DeliveryMode.PERSISTENT),
        priority=0,
        message_id=message.dedupe_id,
        cluster_id="",
    )


def _content_header(message: OutgoingMessage, frame_max: int) -> tuple[bytes | None, str | None]:
    """``message``'s content header frame payload, or None and why AMQP cannot carry the message."""
    if len(message.destination.encode()) > MAX_ROUTING_KEY_BYTES:
        return None, f"routing key longer than {MAX_ROUTING_KEY_BYTES} bytes (UTF-8)"
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


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    """One AMQP frame (pamqp's ``frame._marshal``)."""
    return _FRAME_START.pack(frame_type, channel, len(payload)) + payload + FRAME_END_CHAR


def _forget_message_id(channel: Any, message_id: str, tag: int) -> Any:
    """A done callback: drop the message id -> delivery tag entry once its publish is settled (as
    ``Channel.basic_publish`` does), unless a later publish of the same id took it over."""

    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            channel.message_id_delivery_tag.pop(message_id)

    return forget


def _refusing_close(confirmations: Sequence[asyncio.Future[Any]]) -> BaseException | None:
    """The channel close that blames what was published, if one of ``confirmations`` failed with it."""
    return next(
        (
            error
            for confirmation in confirmations
            if confirmation.done() and not confirmation.cancelled()
            if isinstance(error := confirmation.exception(), _REFUSING_CLOSES)
        ),
        None,
    )


def _reply_text(error: aiormq.exceptions.PublishError) -> str:
    delivery = error.message.delivery if error.message is not None else None
    return f"{getattr(delivery, 'reply_code', '?')} {getattr(delivery, 'reply_text', '')}".strip()
