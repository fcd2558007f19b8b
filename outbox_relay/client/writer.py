"""``add`` and ``add_many``: write outbox messages inside the caller's own transaction.

Both take any connection the client supports (see :data:`SUPPORTED`). On an asynchronous one
(asyncpg, psycopg ``AsyncConnection``, SQLAlchemy ``AsyncSession``/``AsyncConnection``) they return
an awaitable; on a synchronous one (psycopg ``Connection``, SQLAlchemy ``Session``/``Connection``)
they run at once. Either way every message is checked and encoded when the function is called, so
bad input raises :class:`ClientError` before any SQL is sent.

The messages are part of the caller's transaction: committed with it, rolled back with it. With
SQLAlchemy they join the session's transaction (beginning it if needed; the session commits).
"""

from __future__ import annotations

import uuid
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from outbox_relay.client import sql
from outbox_relay.client._drivers import SUPPORTED, Target, fetch_async, fetch_sync, resolve
from outbox_relay.client.message import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    ClientError,
    Message,
    Row,
    check_limit,
    current_trace_headers,
    prepare,
)

if TYPE_CHECKING:
    import asyncpg
    import asyncpg.pool
    import asyncpg.transaction
    import psycopg
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
    from sqlalchemy.orm import Session, scoped_session

    SyncConnection: TypeAlias = psycopg.Connection[Any] | Session | scoped_session[Any] | SAConnection
    AsyncConnection: TypeAlias = (
        asyncpg.Connection
        | asyncpg.pool.PoolConnectionProxy
        | asyncpg.transaction.Transaction
        | psycopg.AsyncConnection[Any]
        | AsyncSession
        | async_scoped_session[Any]
        | SAAsyncConnection
    )

__all__ = ["SUPPORTED", "add", "add_many"]

STATEMENT_BYTES = 64 * 1024 * 1024
"""Payload bytes beyond which :func:`add_many` splits a batch over several statements."""


@overload
def add(
    conn: SyncConnection,
    topic: str,
    key: str | None,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    *,
    schema: str = "outbox_relay",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    trace_context: bool = True,
) -> uuid.UUID: ...
@overload
def add(
    conn: AsyncConnection,
    topic: str,
    key: str | None,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    *,
    schema: str = "outbox_relay",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    trace_context: bool = True,
) -> Coroutine[Any, Any, uuid.UUID]: ...
def add(
    conn: Any,
    topic: str,
    key: str | None,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    *,
    schema: str = "outbox_relay",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    trace_context: bool = True,
) -> uuid.UUID | Coroutine[Any, Any, uuid.UUID]:
    """Write one message into ``schema``'s outbox on ``conn``; returns its message id.

    The message id is what consumers see as ``outbox-id`` on every broker and dedupe on: a UUID,
    unique across restores, failovers and clusters (the outbox's ``message_id`` column; the outbox
    needs schema version 2, which the service's provision action installs or upgrades to).

    ``payload``: ``bytes``, ``str`` (UTF-8) or anything msgspec encodes as JSON, at most
    ``max_payload_bytes`` once encoded. ``key``: messages with the same key are published in the
    order they were written; ``None`` for no order. ``headers``: strings to strings; names starting
    with ``outbox-`` are the relay's. With ``trace_context`` (the default) the active OpenTelemetry
    span's ``traceparent``/``tracestate`` are added, when opentelemetry is installed and a span is
    active. Await the result on an asynchronous connection.
    """
    check_limit(max_payload_bytes)
    trace = current_trace_headers() if trace_context else {}
    row = prepare(topic, key, payload, headers, max_payload_bytes=max_payload_bytes, trace=trace)
    target = resolve(conn)
    statement = sql.insert_one(schema)
    if target.is_async:
        return _add_async(target, statement, row)
    return _uuid(fetch_sync(target, statement, row)[0][0])


async def _add_async(target: Target, statement: str, row: Row) -> uuid.UUID:
    return _uuid((await fetch_async(target, statement, row))[0][0])


def _uuid(value: Any) -> uuid.UUID:
    """The driver's UUID (asyncpg has its own type) as a :class:`uuid.UUID`."""
    if value is None:
        raise ClientError("the outbox gave no message id: upgrade it to schema version 2 (provision it again)")
    return value if type(value) is uuid.UUID else uuid.UUID(str(value))


def _in_order(rows: list[tuple[Any, ...]]) -> list[uuid.UUID]:
    """The message ids of one statement's ``(id, message_id)`` rows, in the order given: identity
    values are drawn in that order, whatever order ``RETURNING`` uses."""
    return [_uuid(message_id) for _, message_id in sorted(rows, key=lambda row: int(row[0]))]


@overload
def add_many(
    conn: SyncConnection,
    messages: Iterable[Message | tuple[Any, ...]],
    *,
    schema: str = "outbox_relay",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    trace_context: bool = True,
) -> list[uuid.UUID]: ...
@overload
def add_many(
    conn: AsyncConnection,
    messages: Iterable[Message | tuple[Any, ...]],
    *,
    schema: str = "outbox_relay",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    trace_context: bool = True,
) -> Coroutine[Any, Any, list[uuid.UUID]]: ...
def add_many(
    conn: Any,
    messages: Iterable[Message | tuple[Any, ...]],
    *,
    schema: str = "outbox_relay",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    trace_context: bool = True,
) -> list[uuid.UUID] | Coroutine[Any, Any, list[uuid.UUID]]:
    """Write a batch of messages in one statement (one round trip; a batch of more than 64 MiB takes
    one per 64 MiB); returns their message ids (see :func:`add`) in order.

    ``messages`` are :class:`Message` tuples or plain ``(topic, key, payload[, headers])`` tuples,
    each checked as :func:`add` checks one: if any is refused, none is written and the
    :class:`ClientError` names its index. Within the batch, ids (and so the publishing order of
    messages that share a key) follow the order given.
    """
    check_limit(max_payload_bytes)
    trace = current_trace_headers() if trace_context else {}
    rows: list[Row] = []
    for index, message in enumerate(messages):
        if not isinstance(message, tuple) or not 3 <= len(message) <= 4:
            raise ClientError(f"message {index}: expected a Message or a (topic, key, payload[, headers]) tuple")
        try:
            rows.append(prepare(*message, max_payload_bytes=max_payload_bytes, trace=trace))
        except ClientError as exc:
            raise ClientError(f"message {index}: {exc}") from exc
    target = resolve(conn)
    statement = sql.insert_many(schema)
    if target.is_async:
        return _add_many_async(target, statement, rows)
    ids: list[uuid.UUID] = []
    for columns in _chunks(rows):
        ids += _in_order(fetch_sync(target, statement, columns))
    return ids


async def _add_many_async(target: Target, statement: str, rows: list[Row]) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    for columns in _chunks(rows):
        ids += _in_order(await fetch_async(target, statement, columns))
    return ids


def _chunks(rows: list[Row]) -> Iterator[list[list[Any]]]:
    """The batch as column arrays, one statement's worth at a time: a statement carries at most
    ``STATEMENT_BYTES`` of payload (PostgreSQL caps one array at 1 GiB), usually all of it.

    Identity values are drawn in the order given, so sorting each statement's returned rows by id
    maps them back onto its messages whatever order ``RETURNING`` uses.
    """
    start, size = 0, 0
    for index, row in enumerate(rows):
        size += len(row.payload) + len(row.headers)
        if size > STATEMENT_BYTES and index > start:
            yield [list(column) for column in zip(*rows[start:index], strict=True)]
            start, size = index, len(row.payload) + len(row.headers)
    if start < len(rows):
        yield [list(column) for column in zip(*rows[start:], strict=True)]
