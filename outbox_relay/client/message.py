"""What one outbox message is, and the checks it passes before any SQL is sent.

Everything here is pure: a message that fails a check raises :class:`ClientError` (a
``ValueError``) and the database never sees it, so a bad message cannot abort the caller's
transaction half-way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from outbox_relay.errors import ClientError as ClientError

MAX_TOPIC_LENGTH = 249
"""The outbox table's ``CHECK`` (and Kafka's topic-name limit)."""
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
"""The default ``max_payload_bytes`` of :func:`add` and :func:`add_many`: 1 MiB, the relay's default."""
RESERVED_HEADER_PREFIX = "outbox-"
"""The relay sets ``outbox-id``, ``outbox-topic``, ``outbox-relay`` (and ``outbox-key`` on AMQP)."""


class Message(NamedTuple):
    """One message for :func:`~outbox_relay.client.add_many`; a plain ``(topic, key, payload)`` or
    ``(topic, key, payload, headers)`` tuple works as well."""

    topic: str
    key: str | None
    payload: Any
    headers: Mapping[str, str] | None = None


class Row(NamedTuple):
    """A checked message, as the insert statement takes it."""

    topic: str
    key: str | None
    payload: bytes
    headers: str  # a JSON object of strings


def encode_payload(payload: Any, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> bytes:
    """bytes as they are, str as UTF-8, anything else msgspec can encode as JSON.

    Refuses a payload longer than ``max_payload_bytes`` once encoded.
    """
    if isinstance(payload, bytes | bytearray | memoryview):
        body = bytes(payload)
    elif isinstance(payload, str):
        body = payload.encode()
    else:
        try:
            body = msgspec.json.encode(payload)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ClientError(f"payload cannot be encoded as JSON: {exc}") from exc
    if len(body) > max_payload_bytes:
        raise ClientError(f"payload is {len(body)} bytes, over the limit of {max_payload_bytes} (max_payload_bytes)")
    return body


def check_message(topic: str, key: str | None, headers: Mapping[str, str] | None) -> str:
    """Validate one message's topic, key and headers; returns the headers as a JSON object."""
    if not isinstance(topic, str) or not topic:
        raise ClientError("topic must be a non-empty string")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise ClientError(f"topic is longer than {MAX_TOPIC_LENGTH} characters")
    if "\x00" in topic:
        raise ClientError("topic must not contain NUL characters")
    if key is not None and not isinstance(key, str):
        raise ClientError("key must be a string or None")
    if key is not None and "\x00" in key:
        raise ClientError("key must not contain NUL characters")
    if headers is None:
        return "{}"
    if not isinstance(headers, Mapping) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
    ):
        raise ClientError("headers must map strings to strings")
    for name, value in headers.items():
        if not name:
            raise ClientError("header names must be non-empty")
        if name.lower().startswith(RESERVED_HEADER_PREFIX):
            raise ClientError(f"header {name!r}: names starting with {RESERVED_HEADER_PREFIX!r} are set by the relay")
        if "\x00" in name or "\x00" in value:
            raise ClientError(f"header {name!r} must not contain NUL characters")
    return msgspec.json.encode(dict(headers)).decode()


def check_limit(max_payload_bytes: int) -> None:
    if isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or max_payload_bytes < 0:
        raise ClientError(f"max_payload_bytes must be a non-negative int, got {max_payload_bytes!r}")


def prepare(
    topic: str,
    key: str | None,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    *,
    max_payload_bytes: int,
    trace: Mapping[str, str],
) -> Row:
    """Check and encode one message; ``trace`` (the active trace context) joins its headers, where
    the caller did not set those names."""
    headers_json = check_message(topic, key, headers)
    body = encode_payload(payload, max_payload_bytes=max_payload_bytes)
    if trace and not (headers and all(name in headers for name in trace)):
        headers_json = msgspec.json.encode({**trace, **(headers or {})}).decode()
    return Row(topic, key, body, headers_json)


def current_trace_headers() -> dict[str, str]:
    """W3C ``traceparent`` (and ``tracestate`` when set) of the active span; ``{}`` when no span is
    active or ``opentelemetry-api`` is not installed."""
    otel = _otel()
    if otel is None:
        return {}
    trace, propagator = otel
    if not trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    propagator.inject(carrier)
    return carrier


@functools.cache
def _otel() -> tuple[Any, Any] | None:
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    return trace, TraceContextTextMapPropagator()
