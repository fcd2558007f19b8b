"""Replay from history (outbox_relay.history) with plain values: the range checks, which rows a replay
selects (mapping, the relay's filter and the request's), its header, and how it counts a broker's
answers (a fake publisher: the real ones are in tests/e2e/test_history_replay_e2e.py)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import Filter, Relay
from outbox_relay.errors import MessageRejected
from outbox_relay.filters import reads_payload
from outbox_relay.history import REPLAY_HEADER, HistorySpec, IdRange, Selection, TimeRange, _publish, range_problem
from outbox_relay.replay import JobCounts
from outbox_relay.tenant.db import OutboxRow

T0 = datetime(2025, 1, 31, 6, 0, tzinfo=UTC)


def spec(**kw: Any) -> HistorySpec:
    return msgspec.convert(kw, HistorySpec)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({}, "exactly one range"),
        ({"ids": {"from": 1, "to": 2}, "inserted_at": {"from": T0, "to": T0 + timedelta(1)}}, "exactly one range"),
        ({"ids": {"from": 3, "to": 2}}, "ids.from must not be above ids.to"),
        ({"inserted_at": {"from": T0, "to": T0}}, "before inserted_at.to"),
        ({"inserted_at": {"from": T0.replace(tzinfo=None), "to": T0 - timedelta(seconds=1)}}, "before"),
        ({"ids": {"from": 2, "to": 2}}, None),
        ({"inserted_at": {"from": T0, "to": T0 + timedelta(microseconds=1)}}, None),
    ],
)
def test_range_problems(values: dict[str, Any], problem: str | None) -> None:
    found = range_problem(spec(**values))
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_bounds_are_utc_and_name_the_range() -> None:
    naive = spec(inserted_at={"from": T0.replace(tzinfo=None), "to": T0 + timedelta(hours=1)})
    assert naive.bounds() == ("inserted_at", T0, T0 + timedelta(hours=1))
    assert spec(ids={"from": 5, "to": 9}).bounds() == ("ids", 5, 9)
    assert msgspec.json.decode(msgspec.json.encode(spec(ids={"from": 5, "to": 9})), type=HistorySpec).ids == IdRange(
        from_=5, to=9
    )
    assert b'"from"' in msgspec.json.encode(TimeRange(from_=T0, to=T0))


def f(expr: dict[str, Any]) -> Filter:
    return msgspec.convert(expr, Filter)


def test_reads_payload_only_for_a_payload_leaf() -> None:
    assert not reads_payload(None)
    assert not reads_payload(f({"all": [{"topic": {"eq": "a"}}, {"not": {"header": "h", "exists": True}}]}))
    assert reads_payload(f({"payload": "p", "exists": True}))
    assert reads_payload(f({"any": [{"topic": {"eq": "a"}}, {"not": {"all": [{"payload": "p", "eq": 1}]}}]}))


def row(i: int, topic: str = "orders", headers: str = "{}", payload: bytes = b"{}") -> OutboxRow:
    return OutboxRow(1000 + i, i, topic, f"k{i % 2}", payload, headers, T0, str(uuid.UUID(int=i)))


def test_selection_applies_the_mapping_and_both_filters_and_adds_the_header() -> None:
    mapping = {"orders": "o", "users": "u"}
    own_filter = {"not": {"header": "x", "exists": True}}
    relay = msgspec.convert({"database": "d", "target": "t", "topic_mapping": mapping, "filter": own_filter}, Relay)
    rows = [
        row(1),
        row(2, topic="audit"),  # not routed
        row(3, headers='{"x": "1"}'),  # the relay's filter leaves it out
        row(4, payload=b'{"country": "DE"}'),
        row(5, topic="users", payload=b'{"country": "US"}'),
    ]
    own = Selection.of(relay, "r", spec(ids={"from": 1, "to": 5}))
    assert [m.destination if m else None for m in own.messages(rows, "job-1")] == ["o", None, None, "o", "u"]
    asked = Selection.of(relay, "r", spec(ids={"from": 1, "to": 5}, filter={"payload": "country", "eq": "DE"}))
    assert asked.reads_payload and not own.reads_payload
    messages = asked.messages(rows, "job-1")
    assert [m.id if m else None for m in messages] == [None, None, None, 4, None]
    message = messages[3]
    assert message is not None
    assert message.headers == {
        "outbox-id": str(uuid.UUID(int=4)),
        "outbox-topic": "orders",
        "outbox-relay": "r",
        REPLAY_HEADER: "job-1",
    }
    mapped = Selection.of(relay, "r", spec(ids={"from": 1, "to": 5}, topic_mapping={"audit": "a"}))
    assert [m.destination if m else None for m in mapped.messages(rows, None)] == [None, "a", None, None, None]
    assert all(REPLAY_HEADER not in m.headers for m in mapped.messages(rows, None) if m), "a dry run adds none"


class Broker:
    """Acknowledges everything but the messages it was told to refuse (once each); records what it got."""

    def __init__(self, refuse: set[int]) -> None:
        self.refuse = refuse
        self.sent: list[int] = []

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        for index, message in enumerate(messages):
            if message.id in self.refuse:
                self.refuse.discard(message.id)
                return PublishResult(acked=index, rejected=MessageRejected("no", index=index))
            self.sent.append(message.id)
        return PublishResult(acked=len(messages))


async def test_a_refused_message_counts_as_failed_and_the_rest_follow_in_order() -> None:
    messages = [OutgoingMessage(id=i, destination="d", key="k", payload=b"", headers={}) for i in range(1, 7)]
    broker, counts = Broker({2, 5}), JobCounts()
    await _publish(broker, messages, counts)  # type: ignore[arg-type]
    assert broker.sent == [1, 3, 4, 6]
    assert (counts.replayed, counts.failed, counts.errors) == (4, 2, {"refused": 2})
