"""Tenant-side client: write outbox messages in your own transaction; receive them once.

Needs only ``msgspec`` (``pip install outbox-relay``, no extra), none of the service's dependencies,
and works over the PostgreSQL driver you already use: asyncpg, psycopg 3 (sync and async) or a
SQLAlchemy session (sync and async). On an asynchronous connection the functions return awaitables::

    async with conn.transaction():
        await conn.execute("UPDATE orders SET state = 'paid' WHERE id = $1", order_id)
        await add(conn, "orders", key=str(order_id), payload={"id": order_id, "state": "paid"})

    with Session(engine) as session, session.begin():
        session.add(order)
        add_many(session, [Message("orders", str(order.id), order_event)])

Writers: :func:`add`, :func:`add_many` (one statement per batch), :class:`Message`.
Receivers: :class:`Inbox` (idempotent consumer) with :class:`MessageRef` and the broker helpers
:func:`amqp_ref`, :func:`kafka_ref`, :func:`stream_ref`, :func:`nats_ref`.

Errors::

    OutboxRelayError (outbox_relay.errors)
    └── ClientError (also a ValueError)  bad input, refused before any SQL; an unsupported connection
"""

from __future__ import annotations

from outbox_relay.client.inbox import Inbox, MessageRef, amqp_ref, kafka_ref, nats_ref, stream_ref
from outbox_relay.client.message import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_TOPIC_LENGTH,
    ClientError,
    Message,
    check_message,
    current_trace_headers,
    encode_payload,
)
from outbox_relay.client.writer import SUPPORTED, add, add_many
from outbox_relay.tenant.sql import schema_sql

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "MAX_TOPIC_LENGTH",
    "SUPPORTED",
    "ClientError",
    "Inbox",
    "Message",
    "MessageRef",
    "add",
    "add_many",
    "amqp_ref",
    "check_message",
    "current_trace_headers",
    "encode_payload",
    "kafka_ref",
    "nats_ref",
    "schema_sql",
    "stream_ref",
]
