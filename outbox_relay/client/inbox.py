"""The idempotent receiver: handle each relayed message once, however often it is delivered.

Delivery is at least once, so a consumer sees some messages twice (a relay retried a batch, a
broker redelivered an unacknowledged message, two consumers raced for it). :class:`Inbox` records
``(consumer, relay, message id)`` in a table of the **consumer's own** database, in the same
transaction as the consumer's handling:

* new id: the row is inserted and the handler runs; both commit together, or neither does (a
  failed handler leaves no trace, so the redelivery is handled);
* seen id: nothing runs; acknowledge the message to the broker, it is a duplicate;
* the same id in two transactions at once: the second ``INSERT ... ON CONFLICT DO NOTHING`` waits
  for the first to finish, then sees the row (skip) or, if the first rolled back, handles it.

The message id and relay name come from what the relay publishes: header ``outbox-id`` (and the AMQP
``message_id``) on RabbitMQ, header ``outbox-id`` on Kafka, field ``outbox-id`` on Redis Streams,
and header ``outbox-relay`` (stream field ``h:outbox-relay``) for the relay. The message id is a
UUID stored in the outbox row when it was written, so it is unique across restores, failovers and
clusters (the outbox's row ids are not: a database restored from a dump hands out again the ids
that the old cluster used after the dump). A decimal id (what relays published before message ids,
and still publish for an outbox not yet upgraded) is accepted too. ``consumer`` lets several
consumers each handle the same message once.

Retention: ids older than ``retention_s`` are removed by :meth:`Inbox.expire` in batches; after
that, a redelivery of such an old message would be handled again, so keep the window longer than
any redelivery you expect (relay retries, a Kafka consumer rewinding its offsets). Batched deletes
rather than dropped partitions, because a unique key across time partitions would have to contain
the time, and then a late duplicate landing in a newer partition would not conflict.

Under ``REPEATABLE READ`` or ``SERIALIZABLE`` a racing duplicate raises a serialization failure
instead of waiting; let the message be redelivered (it is then skipped).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, overload

from outbox_relay.client import sql
from outbox_relay.client._drivers import (
    Target,
    fetch_async,
    fetch_sync,
    in_transaction,
    resolve,
    transaction_async,
    transaction_sync,
)
from outbox_relay.client.message import ClientError

if TYPE_CHECKING:
    from outbox_relay.client.writer import AsyncConnection, SyncConnection

ID_HEADER = "outbox-id"
RELAY_HEADER = "outbox-relay"
STREAM_ID_FIELD = "outbox-id"
STREAM_RELAY_FIELD = "h:outbox-relay"
MAX_CONSUMER_LENGTH = 200


class MessageRef(NamedTuple):
    """What identifies a relayed message: its message id (``outbox-id``) and the relay that published it."""

    id: str
    """The message id in canonical form: a UUID in lower-case hex with hyphens, or (published for an
    outbox of schema version 1) a decimal row id."""
    relay: str = ""


def message_id(value: str | uuid.UUID | int) -> str:
    """A message id in the canonical form the inbox stores: raises :class:`ClientError` for anything
    that is neither a UUID nor a (legacy) decimal id."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ClientError(f"message id {value} is negative")
        return str(value)
    if not isinstance(value, str):
        raise ClientError(f"expected a message id (str, UUID or int), got {type(value).__name__}")
    text = value.strip()
    if text.isascii() and text.isdecimal():
        return str(int(text))
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ClientError(f"message id {text!r} is neither a UUID nor a decimal id") from None


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode()
    return str(value)


def _ref(raw_id: Any, relay: Any, where: str) -> MessageRef:
    if raw_id is None:
        raise ClientError(f"no outbox id in the {where}: was this message published by Outbox Relay?")
    try:
        canonical = message_id(_text(raw_id))
    except ClientError as exc:
        raise ClientError(f"{exc} (in the {where})") from None
    return MessageRef(canonical, "" if relay is None else _text(relay))


def amqp_ref(message: Any) -> MessageRef:
    """The :class:`MessageRef` of an aio-pika (or aiormq) incoming message: header ``outbox-id``,
    else the AMQP ``message_id``; relay from header ``outbox-relay``."""
    headers: Mapping[str, Any] = getattr(message, "headers", None) or {}
    raw_id = headers.get(ID_HEADER)
    if raw_id is None:
        raw_id = getattr(message, "message_id", None)
    return _ref(raw_id, headers.get(RELAY_HEADER), "AMQP headers or message_id")


def kafka_ref(record: Any) -> MessageRef:
    """The :class:`MessageRef` of an aiokafka ``ConsumerRecord`` (headers are ``(str, bytes)``)."""
    headers = dict(getattr(record, "headers", None) or ())
    return _ref(headers.get(ID_HEADER), headers.get(RELAY_HEADER), "Kafka headers")


def nats_ref(message: Any) -> MessageRef:
    """The :class:`MessageRef` of a nats-py message (JetStream or core NATS): header ``outbox-id``,
    else ``Nats-Msg-Id``; relay from header ``outbox-relay``."""
    headers: Mapping[str, Any] = getattr(message, "headers", None) or {}
    raw_id = headers.get(ID_HEADER)
    if raw_id is None:
        raw_id = headers.get("Nats-Msg-Id")
    return _ref(raw_id, headers.get(RELAY_HEADER), "NATS headers")


def stream_ref(fields: Mapping[Any, Any]) -> MessageRef:
    """The :class:`MessageRef` of a Redis Streams entry's fields (``str`` or ``bytes`` keys)."""

    def get(name: str) -> Any:
        value = fields.get(name)
        return fields.get(name.encode()) if value is None else value

    return _ref(get(STREAM_ID_FIELD), get(STREAM_RELAY_FIELD), "stream entry")


Ref = MessageRef | str | uuid.UUID | int
"""What the inbox methods take: a :class:`MessageRef`, or a bare message id (relay ``""``)."""


def _as_ref(message: Ref) -> MessageRef:
    if isinstance(message, MessageRef):
        return MessageRef(message_id(message.id), message.relay)
    if isinstance(message, str | uuid.UUID | int) and not isinstance(message, bool):
        return MessageRef(message_id(message))
    raise ClientError(f"expected a MessageRef or a message id, got {type(message).__name__}")


@dataclass(frozen=True, kw_only=True)
class Inbox:
    """An idempotent receiver's memory, in table ``schema.table`` of the consumer's database.

    Each method takes the consumer's connection (the drivers :func:`~outbox_relay.client.add`
    takes) and, like ``add``, returns an awaitable on an asynchronous one.
    """

    consumer: str
    """Who handles the messages; two consumers of one message each handle it once."""
    schema: str = "outbox_relay"
    table: str = "inbox"
    retention_s: float = 7 * 24 * 3600.0
    """How long an id is remembered (see the module docstring); 7 days by default."""

    def __post_init__(self) -> None:
        if not isinstance(self.consumer, str) or not self.consumer:
            raise ClientError("consumer must be a non-empty string")
        if len(self.consumer) > MAX_CONSUMER_LENGTH or "\x00" in self.consumer:
            raise ClientError(f"consumer must be at most {MAX_CONSUMER_LENGTH} characters, without NUL")
        sql.inbox_claim(self.schema, self.table)  # checks the identifiers
        if not self.retention_s > 0:
            raise ClientError(f"retention_s must be positive, got {self.retention_s!r}")

    # --- install ---------------------------------------------------------------------------------

    @overload
    def install(self, conn: SyncConnection) -> None: ...
    @overload
    def install(self, conn: AsyncConnection) -> Coroutine[Any, Any, None]: ...
    def install(self, conn: Any) -> Coroutine[Any, Any, None] | None:
        """Create the inbox table if it is missing (safe to run at every start, concurrently)."""
        target = resolve(conn)
        statement = sql.inbox_install(self.schema, self.table)
        if target.is_async:
            return _discard(fetch_async(target, statement))
        fetch_sync(target, statement)
        return None

    # --- claim -----------------------------------------------------------------------------------

    @overload
    def claim(self, conn: SyncConnection, message: Ref) -> bool: ...
    @overload
    def claim(self, conn: AsyncConnection, message: Ref) -> Coroutine[Any, Any, bool]: ...
    def claim(self, conn: Any, message: Ref) -> bool | Coroutine[Any, Any, bool]:
        """Record ``message`` as handled, in the caller's open transaction; ``True`` when it is new
        (handle it in this transaction), ``False`` for a duplicate (acknowledge, do nothing).

        Refuses a connection in autocommit outside a transaction: the record would commit before
        the handling and a failure would lose the message.
        """
        ref = _as_ref(message)
        target = resolve(conn)
        if in_transaction(target) is False:
            raise ClientError("Inbox.claim must run inside the transaction that handles the message")
        args = (self.consumer, ref.relay, ref.id)
        statement = sql.inbox_claim(self.schema, self.table)
        if target.is_async:
            return _nonempty(fetch_async(target, statement, args))
        return bool(fetch_sync(target, statement, args))

    # --- seen ------------------------------------------------------------------------------------

    @overload
    def seen(self, conn: SyncConnection, message: Ref) -> bool: ...
    @overload
    def seen(self, conn: AsyncConnection, message: Ref) -> Coroutine[Any, Any, bool]: ...
    def seen(self, conn: Any, message: Ref) -> bool | Coroutine[Any, Any, bool]:
        """Whether ``message`` is recorded (committed, or by this transaction); records nothing."""
        ref = _as_ref(message)
        target = resolve(conn)
        args = (self.consumer, ref.relay, ref.id)
        statement = sql.inbox_seen(self.schema, self.table)
        if target.is_async:
            return _nonempty(fetch_async(target, statement, args))
        return bool(fetch_sync(target, statement, args))

    # --- process ---------------------------------------------------------------------------------

    @overload
    def process(self, conn: SyncConnection, message: Ref, handler: Callable[[], object]) -> bool: ...
    @overload
    def process(
        self, conn: AsyncConnection, message: Ref, handler: Callable[[], Awaitable[object]]
    ) -> Coroutine[Any, Any, bool]: ...
    def process(self, conn: Any, message: Ref, handler: Callable[[], Any]) -> bool | Coroutine[Any, Any, bool]:
        """Claim ``message`` and run ``handler`` in one transaction on ``conn``; ``True`` when it ran,
        ``False`` for a duplicate. The handler does its database work on ``conn``.

        Opens and commits the transaction itself; when ``conn`` is already in one, it uses a
        savepoint and the caller's commit decides. If the handler raises, everything rolls back, the
        exception propagates, and a redelivery will be handled: do not acknowledge the message then.
        """
        ref = _as_ref(message)
        target = resolve(conn)
        if target.is_async:
            return self._process_async(target, ref, handler)
        with transaction_sync(target):
            if not fetch_sync(target, sql.inbox_claim(self.schema, self.table), (self.consumer, ref.relay, ref.id)):
                return False
            handler()
        return True

    async def _process_async(self, target: Target, ref: MessageRef, handler: Callable[[], Awaitable[object]]) -> bool:
        async with transaction_async(target):
            claimed = await fetch_async(
                target, sql.inbox_claim(self.schema, self.table), (self.consumer, ref.relay, ref.id)
            )
            if not claimed:
                return False
            await handler()
        return True

    # --- expire ----------------------------------------------------------------------------------

    @overload
    def expire(self, conn: SyncConnection, *, batch_size: int = 5000) -> int: ...
    @overload
    def expire(self, conn: AsyncConnection, *, batch_size: int = 5000) -> Coroutine[Any, Any, int]: ...
    def expire(self, conn: Any, *, batch_size: int = 5000) -> int | Coroutine[Any, Any, int]:
        """Delete up to ``batch_size`` of this consumer's ids older than ``retention_s``; returns how
        many went. Call it again (committing in between, so locks stay short) while it returns
        ``batch_size``; rows another expiry is deleting are skipped, not waited for."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ClientError(f"batch_size must be a positive int, got {batch_size!r}")
        target = resolve(conn)
        args = (self.consumer, float(self.retention_s), batch_size)
        statement = sql.inbox_expire(self.schema, self.table)
        if target.is_async:
            return _count(fetch_async(target, statement, args))
        return int(fetch_sync(target, statement, args)[0][0])


async def _discard(rows: Awaitable[list[tuple[Any, ...]]]) -> None:
    await rows


async def _nonempty(rows: Awaitable[list[tuple[Any, ...]]]) -> bool:
    return bool(await rows)


async def _count(rows: Awaitable[list[tuple[Any, ...]]]) -> int:
    return int((await rows)[0][0])
