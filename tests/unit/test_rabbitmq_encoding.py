"""The RabbitMQ adapter's own content-header encoder writes exactly what pamqp writes for the same
properties, and leaves to pamqp (and its refusals) what it does not handle."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import header as amqp_header

from outbox_relay.brokers.base import CloudEvent, OutgoingMessage
from outbox_relay.brokers.rabbitmq import _content_header, _encode_content_header, _properties


def pamqp_header(message: OutgoingMessage) -> bytes:
    return amqp_header.ContentHeader(0, len(message.payload), _properties(message)).marshal()


def msg(**overrides: Any) -> OutgoingMessage:
    fields: dict[str, Any] = {
        "id": 42,
        "destination": "orders",
        "key": "k",
        "payload": b"payload",
        "headers": {"outbox-id": "42", "outbox-topic": "orders", "outbox-relay": "r"},
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


CASES = [
    msg(),
    msg(key=None),
    msg(key=None, headers={}),
    msg(headers={}),
    msg(payload=b""),
    msg(payload=bytes(300_000)),
    msg(message_id="0b7e2a8e-4c1a-4c39-9d0e-0f3e4d7c1a22"),
    msg(id=9_007_199_254_740_993),
    msg(key="ключ ✓/#?", headers={"ünï code": "välue ✓", "empty": "", "z": "last", "a": "first"}),
    msg(headers={"h" * 128: "v" * 70_000, "traceparent": "00-ab-01"}),
    msg(headers={"outbox-key": "overridden by the key"}),
    msg(
        cloudevent=CloudEvent(
            id="e1", source="/relays/r", type="orders", time="2026-12-03T10:00:00Z", datacontenttype="application/json"
        )
    ),
    msg(
        key=None,
        headers={},
        cloudevent=CloudEvent(id="ü", source="s", type="t", time="x", datacontenttype="text/plain; charset=utf-8"),
    ),
]


@pytest.mark.parametrize("message", CASES)
def test_the_same_bytes_as_pamqp(message: OutgoingMessage) -> None:
    assert _encode_content_header(message) == pamqp_header(message)
    assert _content_header(message, 131_072 * 8) == (pamqp_header(message), None)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (msg(headers={"h" * 129: "v"}), "longer than AMQP's 128 bytes"),
        (msg(message_id="m" * 256), "headers cannot be encoded in AMQP"),
        (msg(headers={"big": "v" * 200_000}), "more than one AMQP frame carries"),
    ],
)
def test_what_amqp_cannot_carry_is_still_refused(message: OutgoingMessage, reason: str) -> None:
    header, why = _content_header(message, 131_072)
    assert header is None and why is not None and reason in why


def test_values_other_than_strings_go_to_pamqp() -> None:
    message = msg(headers={"n": 3, "flag": True})  # not what the relay builds; still what pamqp makes of it
    assert _encode_content_header(message) is None
    assert _content_header(message, 131_072) == (pamqp_header(message), None)
