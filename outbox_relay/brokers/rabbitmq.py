"""RabbitMQ adapter: aio-pika with publisher confirms.

Each message is published persistent (delivery mode 2) to the target's exchange ('' is the default
exchange) with ``routing_key = message.destination``, ``message_id = str(message.id)``, the
message's headers copied into the AMQP headers and the key in the header ``outbox-key``.

A batch is pipelined: every publish is written to the channel in batch order before any confirm is
awaited (aiormq serialises writes under a FIFO lock, so the order on the wire is the batch order).
How the broker's answers map onto the seam's contract:

* ``basic.ack`` → acknowledged.
* ``basic.return`` (``mandatory`` and no queue is bound for the routing key) and ``basic.nack``
  → :class:`MessageRejected` at that message.
* A channel closed by the broker because of what was published (404 exchange not found, 403 access
  refused, 406 precondition failed, e.g. a message over ``max_message_size``) → the channel is
  reopened, and since RabbitMQ does not say which publish closed it, the unconfirmed tail of the
  batch is published again one message at a time to find it; that one is :class:`MessageRejected`.
  (The tail may reach the broker twice, which at-least-once delivery allows.)
* Anything else (connection refused or lost, authentication, no answer within ``timeout_ms``
  between two confirms) → :class:`TargetUnavailable`; the connection is dropped and opened again
  by the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Self

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, DeliveryMode
from yarl import URL

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import RabbitMQTarget
from outbox_relay.errors import MessageRejected, TargetUnavailable

KEY_HEADER = "outbox-key"

# Channel closes that blame what was published rather than the broker's health.
_REFUSING_CLOSES = (
    aiormq.exceptions.ChannelNotFoundEntity,  # 404: the exchange does not exist
    aiormq.exceptions.ChannelAccessRefused,  # 403: no write permission on the exchange
    aiormq.exceptions.ChannelPreconditionFailed,  # 406: e.g. message larger than max_message_size
    aiormq.exceptions.ChannelLockedResource,  # 405
)


class RabbitMQPublisher:
    """Publishes batches to one RabbitMQ exchange; see the module docstring for the mapping."""

    def __init__(
        self,
        *,
        url: str,
        password: str | None = None,
        exchange: str = "",
        mandatory: bool = True,
        timeout_ms: int = 10_000,
        connection_name: str = "outbox-relay",
    ) -> None:
        """``url`` is ``amqp[s]://user@host:port/vhost`` without the password; ``password`` is set
        into it as a URL component (so any character is safe). Nothing connects before
        :meth:`connect` or the first batch."""
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        parsed = URL(url)
        if parsed.scheme not in ("amqp", "amqps"):
            raise ValueError(f"url must be amqp:// or amqps://, got scheme {parsed.scheme!r}")
        if password is not None:
            parsed = parsed.with_password(password)
        self._url = parsed
        self._exchange_name = exchange
        self._mandatory = mandatory
        self._timeout_s = timeout_ms / 1000
        self._connection_name = connection_name
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._closed = False

    @classmethod
    def from_target(cls, target: RabbitMQTarget, *, password: str | None) -> Self:
        return cls(
            url=target.url,
            password=password,
            exchange=target.exchange,
            mandatory=target.mandatory,
            timeout_ms=target.timeout_ms,
        )

    async def connect(self) -> None:
        """Open the connection and the confirm-mode channel now; raise :class:`TargetUnavailable`
        when the broker cannot be reached."""
        await self._ensure_exchange()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        total = len(messages)
        if total == 0:
            return PublishResult(acked=0)
        index, error = await self._send(messages, 0, total)
        if error is None:
            return PublishResult(acked=total)
        rejection = await self._rejection_or_raise(error, index)
        if not isinstance(error, _REFUSING_CLOSES) or index == total - 1:
            return PublishResult(acked=index, rejected=rejection)
        # The channel closed with several publishes unconfirmed: find the one it refuses.
        for i in range(index, total):
            _, error = await self._send(messages, i, i + 1)
            if error is not None:
                return PublishResult(acked=i, rejected=await self._rejection_or_raise(error, i))
        return PublishResult(acked=total)

    async def close(self) -> None:
        """Close the connection; safe to call more than once."""
        self._closed = True
        await self._drop_connection()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- internals ---------------------------------------------------------------------------------

    async def _send(
        self, messages: Sequence[OutgoingMessage], start: int, stop: int
    ) -> tuple[int, BaseException | None]:
        """Publish ``messages[start:stop]`` pipelined and wait for their confirms in order.

        Returns the index of the first message not confirmed and why (``None`` when all were). Waits
        at most ``timeout_ms`` for each next confirm, so a slow but progressing batch is not cut.
        """
        exchange = await self._ensure_exchange()
        tasks = [
            asyncio.ensure_future(
                exchange.publish(
                    self._amqp_message(message),
                    routing_key=message.destination,
                    mandatory=self._mandatory,
                )
            )
            for message in messages[start:stop]
        ]
        try:
            for offset, task in enumerate(tasks):
                done, _ = await asyncio.wait((task,), timeout=self._timeout_s)
                if not done:
                    return start + offset, TimeoutError(f"no publisher confirm within {self._timeout_s:g}s")
                if task.cancelled():
                    return start + offset, aiormq.exceptions.ChannelInvalidStateError(
                        "publish cancelled: the channel closed"
                    )
                error = task.exception()
                if error is not None:
                    return start + offset, error
            return stop, None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _rejection_or_raise(self, error: BaseException, index: int) -> MessageRejected:
        """Map a publish failure to the message's rejection, or raise TargetUnavailable."""
        if isinstance(error, aiormq.exceptions.PublishError):
            return MessageRejected(
                f"unroutable: no queue is bound for this routing key on exchange "
                f"{self._exchange_name!r} (mandatory publish returned: {_reply_text(error)})",
                index=index,
            )
        if isinstance(error, aiormq.exceptions.DeliveryError):
            return MessageRejected("the broker nacked the message", index=index)
        if isinstance(error, _REFUSING_CLOSES) and not self._connection_lost():
            await self._drop_channel()
            return MessageRejected(f"the broker closed the channel: {error}", index=index)
        await self._drop_connection()
        raise TargetUnavailable(f"RabbitMQ at {self._safe_url()}: {error!r}") from error

    async def _ensure_exchange(self) -> AbstractExchange:
        if self._closed:
            raise RuntimeError("publisher is closed")
        if self._exchange is not None and self._channel is not None and not self._channel.is_closed:
            return self._exchange
        if self._connection_lost():
            await self._drop_connection()
        else:
            await self._drop_channel()
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._connection is None:
                    # aio-pika's own timeout does not cover waiting for an unblocked connection.
                    self._connection = await aio_pika.connect(
                        self._url,
                        timeout=self._timeout_s,
                        client_properties={"connection_name": self._connection_name},
                    )
                channel = self._connection.channel(publisher_confirms=True, on_return_raises=True)
                await channel.initialize(timeout=self._timeout_s)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError, RuntimeError) as exc:
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

    def _connection_lost(self) -> bool:
        return self._connection is not None and self._connection.is_closed

    async def _drop_channel(self) -> None:
        channel, self._channel, self._exchange = self._channel, None, None
        if channel is not None and not channel.is_closed:
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

    @staticmethod
    def _amqp_message(message: OutgoingMessage) -> aio_pika.Message:
        headers: dict[str, aio_pika.abc.FieldValue] = dict(message.headers)
        if message.key is not None:
            headers[KEY_HEADER] = message.key
        return aio_pika.Message(
            message.payload,
            headers=headers,
            message_id=str(message.id),
            delivery_mode=DeliveryMode.PERSISTENT,
        )


def _reply_text(error: aiormq.exceptions.PublishError) -> str:
    delivery = error.message.delivery if error.message is not None else None
    return f"{getattr(delivery, 'reply_code', '?')} {getattr(delivery, 'reply_text', '')}".strip()
