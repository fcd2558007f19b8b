"""Tenant-side client: write outbox messages inside your own transaction.

Importable with only ``msgspec`` installed (no service dependencies)::

    async with conn.transaction():
        await conn.execute("UPDATE orders SET state = 'paid' WHERE id = $1", order_id)
        await add(conn, "orders", key=str(order_id), payload={"id": order_id, "state": "paid"})

The message is committed or rolled back with the caller's transaction; Outbox Relay publishes
it only once that transaction has committed.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from outbox_relay.tenant.sql import insert_sql

MAX_TOPIC_LENGTH = 249


class ClientError(ValueError):
    """Bad input, refused before touching the database."""


class AsyncpgLike(Protocol):
    async def fetchval(self, query: str, *args: Any) -> Any: ...


def encode_payload(payload: Any) -> bytes:
    """bytes as they are, str as UTF-8, anything else msgspec can encode as JSON."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    try:
        return msgspec.json.encode(payload)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ClientError(f"payload cannot be encoded as JSON: {exc}") from exc


def check_message(topic: str, key: str | None, headers: dict[str, str] | None) -> str:
    """Validate one message's fields; returns the headers as a JSON document."""
    if not isinstance(topic, str) or not topic:
        raise ClientError("topic must be a non-empty string")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise ClientError(f"topic is longer than {MAX_TOPIC_LENGTH} characters")
    if key is not None and not isinstance(key, str):
        raise ClientError("key must be a string or None")
    headers = headers or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ClientError("headers must map strings to strings")
    return msgspec.json.encode(headers).decode()


async def add(
    conn: AsyncpgLike,
    topic: str,
    key: str | None,
    payload: Any,
    headers: dict[str, str] | None = None,
    *,
    schema: str = "outbox_relay",
) -> int:
    """Write one message into the outbox on ``conn`` (an asyncpg connection in a transaction).

    Returns the outbox id. Call it inside the transaction that makes the business change.
    """
    headers_json = check_message(topic, key, headers)
    body = encode_payload(payload)
    return int(await conn.fetchval(insert_sql(schema), topic, key, body, headers_json))
