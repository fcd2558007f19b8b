"""The NATS adapter's encoding (header names, subjects, what NATS cannot carry) and the target's checks,
without a server; the contract suite checks the same against JetStream."""

from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import unquote

import pytest

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.brokers.nats import (
    ACKED,
    MAX_SUBJECT_BYTES,
    PENDING,
    REFUSED,
    UNAVAILABLE,
    _Link,
    header_name,
    invalid_subject,
    nats_headers,
)
from outbox_relay.domain import NatsTarget
from outbox_relay.errors import InvalidTargetSpec
from outbox_relay.netguard import Endpoint, target_endpoints
from outbox_relay.specs import check_target


def message(**overrides: object) -> OutgoingMessage:
    fields: dict[str, object] = {
        "id": 7,
        "message_id": "0190f3a2-7d7c-7c4e-9a51-8f0e6c1d2b3a",
        "destination": "orders.paid",
        "key": "order-1",
        "payload": b"{}",
        "headers": {"outbox-id": "0190f3a2-7d7c-7c4e-9a51-8f0e6c1d2b3a", "outbox-relay": "shop"},
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["outbox-id", "traceparent", "ünï code", "a%41", "Nats-Rollup", "nats-expected-stream", "x:y", "Ünï"]
)
def test_header_names_are_tokens_and_unquote_to_the_original(name: str) -> None:
    sent = header_name(name)
    assert sent.isascii() and ":" not in sent and " " not in sent
    assert not sent.lower().startswith("nats-")
    assert unquote(sent) == name


def test_plain_names_are_sent_as_they_are() -> None:
    assert header_name("outbox-id") == "outbox-id"
    assert header_name("X-Trace_Id.1") == "X-Trace_Id.1"


def test_headers_carry_the_id_key_and_msg_id() -> None:
    encoded = nats_headers(message())
    assert not isinstance(encoded, str)
    headers, size = encoded
    assert headers["Nats-Msg-Id"] == "0190f3a2-7d7c-7c4e-9a51-8f0e6c1d2b3a"
    assert headers["outbox-key"] == "order-1" and headers["outbox-relay"] == "shop"
    wire = b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
    assert size == len(wire)


def test_an_outbox_v1_row_id_is_no_msg_id() -> None:
    """Row ids repeat across databases and restores: JetStream would drop another message as a duplicate."""
    encoded = nats_headers(message(message_id="", headers={"x": "y"}))
    assert not isinstance(encoded, str)
    headers, _ = encoded
    assert "Nats-Msg-Id" not in headers and headers["outbox-id"] == "7"


@pytest.mark.parametrize("value", ["two\r\nlines", "line\nfeed", " leading", "trailing\t"])
def test_a_header_value_nats_cannot_carry_is_named(value: str) -> None:
    reason = nats_headers(message(headers={"h": value}))
    assert isinstance(reason, str) and "'h'" in reason
    assert isinstance(nats_headers(message(key=value)), str)
    assert isinstance(nats_headers(message(headers={"": "v"})), str)


@pytest.mark.parametrize(
    ("subject", "ok"),
    [
        ("orders.paid", True),
        ("ordres.ünï", True),
        ("", False),
        ("a b", False),
        ("a..b", False),
        (".a", False),
        ("a.", False),
        ("a.*", False),
        ("a.>", False),
        ("*", False),
        ("a.b*", True),  # a wildcard only as a whole token
        ("x" * MAX_SUBJECT_BYTES, True),
        ("x" * (MAX_SUBJECT_BYTES + 1), False),
    ],
)
def test_subjects(subject: str, ok: bool) -> None:
    assert (invalid_subject(subject) is None) == ok


def test_target_endpoints_and_checks() -> None:
    target = NatsTarget(servers=["nats://n1:4223", "tls://[::1]", "nats://n3"])
    assert target_endpoints(target) == [("n1", 4223), ("::1", 4222), ("n3", 4222)]
    check_target(target)
    for servers in (["nats://u:p@n1"], ["nats://token@n1"], ["amqp://n1"], ["nats://n1/x"], ["nats://n1?a=b"]):
        with pytest.raises(InvalidTargetSpec, match=r"servers\[0\]"):
            check_target(NatsTarget(servers=servers))
    with pytest.raises(InvalidTargetSpec, match="servers"):
        check_target(NatsTarget(servers=[f"nats://n{i}" for i in range(33)]))
    with pytest.raises(InvalidTargetSpec, match="username"):
        check_target(NatsTarget(servers=["nats://n1"], username="bad\nname"))


@pytest.mark.parametrize(
    ("data", "headers", "state", "words"),
    [
        (b'{"stream":"S","seq":1}', None, ACKED, ""),
        (b'{"stream":"S","seq":1,"duplicate": true}', None, ACKED, ""),
        (b"", {"Status": "503"}, REFUSED, "no responders"),
        (
            b'{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}',
            None,
            REFUSED,
            "message size exceeds",
        ),
        (
            b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}',
            None,
            REFUSED,
            "maximum messages exceeded",
        ),
        (
            b'{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}',
            None,
            UNAVAILABLE,
            "temporarily unavailable",
        ),
        (
            b'{"error":{"code":503,"err_code":10077,"description":"write error: no space left on device"}}',
            None,
            UNAVAILABLE,
            "no space",
        ),
        (b"not json", None, UNAVAILABLE, "not a JetStream ack"),
        (b"", {"Status": "408", "Description": "Request Timeout"}, UNAVAILABLE, "408"),
    ],
)
async def test_how_each_jetstream_answer_settles_its_publish(
    data: bytes, headers: dict[str, str] | None, state: int, words: str
) -> None:
    """What the server answers a publish with, as the adapter's reply handler reads it (a fake reply:
    the contract suite produces the common ones on a real server)."""
    link = _Link(SimpleNamespace(), Endpoint(name="n", address="127.0.0.1", port=4222))  # type: ignore[arg-type]
    link.prefix, link._cut = "_INBOX.x", len("_INBOX.x") + 1
    batch = link.register([message(), message()])
    await link._on_reply(SimpleNamespace(subject=f"_INBOX.x.{batch.first + 1}", headers=headers, data=data))  # type: ignore[arg-type]
    await link._on_reply(SimpleNamespace(subject="_INBOX.x.999", headers=None, data=b"{}"))  # type: ignore[arg-type]  # unknown: ignored
    assert batch.states[1] == state and batch.states[0] == PENDING
    assert words in batch.reasons.get(1, "")
    await link._on_reply(SimpleNamespace(subject=f"_INBOX.x.{batch.first}", headers=None, data=b'{"seq":2}'))  # type: ignore[arg-type]
    assert batch.done.done()
    assert batch.outcome() == ((2, ACKED, "") if state == ACKED else (1, state, batch.reasons[1]))
