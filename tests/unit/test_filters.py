"""Relay filters (outbox_relay.filters): the checks a filter passes at PUT, and the compiled
predicate, with plain values."""

from __future__ import annotations

import types
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import FILTER_MAX_DEPTH, FILTER_MAX_LEAVES, Filter, Relay
from outbox_relay.engine import OutboxBatch, RelayRunner, _Partition, build_messages
from outbox_relay.filters import InvalidFilter, Predicate, _Row, check, compile_filter, shared_filter
from outbox_relay.tenant.db import OutboxRow


def predicate(expr: dict[str, Any]) -> Predicate:
    accepts = compile_filter(msgspec.convert(expr, type=Filter))
    assert accepts is not None
    return accepts


def test_no_filter_compiles_to_none() -> None:
    assert compile_filter(None) is None


@pytest.mark.parametrize(
    ("test", "matching", "other"),
    [
        ({"eq": "orders"}, "orders", "orders.eu"),
        ({"in": ["a", "b"]}, "b", "c"),
        ({"prefix": "orders."}, "orders.eu", "order"),
    ],
)
def test_topic_leaves(test: dict[str, Any], matching: str, other: str) -> None:
    accepts = predicate({"topic": test})
    assert accepts(matching, {}, b"{}")
    assert not accepts(other, {}, b"{}")


def test_header_leaves() -> None:
    headers = {"tenant": "acme", "x-test": "1"}
    assert predicate({"header": "tenant", "eq": "acme"})("t", headers, b"")
    assert not predicate({"header": "tenant", "eq": "other"})("t", headers, b"")
    assert predicate({"header": "tenant", "in": ["x", "acme"]})("t", headers, b"")
    assert not predicate({"header": "missing", "in": ["x", "acme"]})("t", headers, b"")
    assert predicate({"header": "x-test", "exists": True})("t", headers, b"")
    assert not predicate({"header": "x-test", "exists": False})("t", headers, b"")
    assert predicate({"header": "X-Test", "exists": False})("t", headers, b""), "header names are case-sensitive"


@pytest.mark.parametrize(
    ("leaf", "payload", "expected"),
    [
        ({"payload": "country", "eq": "DE"}, b'{"country": "DE"}', True),
        ({"payload": "country", "eq": "DE"}, b'{"country": "FR"}', False),
        ({"payload": "n", "eq": 1}, b'{"n": 1.0}', True),
        ({"payload": "n", "eq": 1}, b'{"n": true}', False),
        ({"payload": "flag", "eq": True}, b'{"flag": 1}', False),
        ({"payload": "flag", "in": [True]}, b'{"flag": true}', True),
        ({"payload": "v", "eq": None}, b'{"v": null}', True),
        ({"payload": "v", "eq": None}, b"{}", False),
        ({"payload": "v", "in": ["a", 2]}, b'{"v": 2}', True),
        ({"payload": "v", "in": ["a", 2]}, b'{"v": {"a": 2}}', False),
        ({"payload": "v", "in": ["a", 2]}, b'{"v": ["a"]}', False),
        ({"payload": "v", "exists": True}, b'{"v": null}', True),
        ({"payload": "v", "exists": False}, b'{"w": 1}', True),
        ({"payload": "v", "exists": False}, b'{"v": 1}', False),
        # a payload that is not a JSON object matches no payload leaf, exists: false included
        ({"payload": "v", "exists": False}, b"not json", False),
        ({"payload": "v", "exists": False}, b"[1, 2]", False),
        ({"payload": "v", "eq": 3}, b"3", False),
        ({"payload": "v", "exists": True}, b"", False),
        ({"not": {"payload": "v", "exists": True}}, b"not json", True),
        # nested fields are not reached: only top-level ones
        ({"payload": "a.b", "eq": 1}, b'{"a": {"b": 1}}', False),
    ],
)
def test_payload_leaves(leaf: dict[str, Any], payload: bytes, expected: bool) -> None:
    assert predicate(leaf)("t", {}, payload) is expected


def test_combinators() -> None:
    accepts = predicate(
        {
            "all": [
                {"topic": {"prefix": "orders."}},
                {"any": [{"payload": "country", "in": ["DE", "FR"]}, {"header": "vip", "exists": True}]},
                {"not": {"header": "x-test", "eq": "1"}},
            ]
        }
    )
    assert accepts("orders.created", {}, b'{"country": "DE"}')
    assert accepts("orders.created", {"vip": "y"}, b'{"country": "US"}')
    assert not accepts("orders.created", {}, b'{"country": "US"}')
    assert not accepts("users.created", {}, b'{"country": "DE"}')
    assert not accepts("orders.created", {"x-test": "1"}, b'{"country": "DE"}')


def test_payload_decoded_only_when_a_payload_leaf_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []

    def counting(self: _Row) -> dict[str, Any] | None:
        decoded.append(self.payload)
        return {"a": 1, "b": 2}

    monkeypatch.setattr(_Row, "fields", counting)
    topic_only = predicate({"any": [{"topic": {"eq": "t"}}, {"header": "h", "exists": True}]})
    assert topic_only("t", {}, b"x") and not topic_only("u", {}, b"y")
    assert decoded == []
    short_circuit = predicate({"all": [{"topic": {"eq": "t"}}, {"payload": "a", "eq": 1}]})
    assert not short_circuit("u", {}, b"z")
    assert decoded == []
    assert short_circuit("t", {}, b"w")
    assert decoded == [b"w"]


def test_payload_decoded_once_per_row() -> None:
    row = _Row("t", {}, b'{"a": 1}')
    first = row.fields()
    assert first == {"a": 1}
    assert row.fields() is first
    not_object = _Row("t", {}, b"[1]")
    assert not_object.fields() is None and not_object.fields() is None


def deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"topic": {"eq": "t"}}
    for _ in range(levels - 1):
        node = {"not": node}
    return node


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ({}, "filter: give exactly one of all, any, not, topic, header, payload"),
        ({"topic": {"eq": "a"}, "header": "h", "exists": True}, "filter: give exactly one of"),
        ({"any": [{"topic": {"eq": "a"}}, {"header": "h"}]}, "filter.any[1]: a header leaf takes exactly one of"),
        ({"payload": "p", "eq": 1, "exists": True}, "(got eq, exists)"),
        ({"all": [{"topic": {}}]}, "filter.all[0].topic: give exactly one of eq, in, prefix"),
        ({"topic": {"eq": "a", "prefix": "b"}}, "filter.topic: give exactly one of eq, in, prefix"),
        ({"topic": {"eq": "a"}, "eq": "a"}, "eq belongs inside topic"),
        ({"not": {"topic": {"eq": "a"}}, "exists": True}, "exists belongs in a header or payload leaf"),
        ({"header": "h", "eq": 1}, "filter.eq: header values are strings"),
        ({"header": "h", "in": ["a", None]}, "filter.in: header values are strings"),
        (deep(FILTER_MAX_DEPTH + 1), f"nested deeper than {FILTER_MAX_DEPTH} levels"),
        (
            {"any": [{"all": [{"topic": {"eq": str(i)}}] * 2} for i in range(FILTER_MAX_LEAVES // 2 + 1)]},
            f"filter: {FILTER_MAX_LEAVES + 2} leaves, at most {FILTER_MAX_LEAVES} allowed",
        ),
    ],
)
def test_invalid_filters_say_what_and_where(expr: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidFilter) as info:
        check(msgspec.convert(expr, type=Filter))
    assert message in str(info.value)


def test_the_limits_themselves_pass() -> None:
    check(msgspec.convert(deep(FILTER_MAX_DEPTH), type=Filter))
    check(msgspec.convert({"any": [{"topic": {"eq": str(i)}} for i in range(FILTER_MAX_LEAVES)]}, type=Filter))


@pytest.mark.parametrize(
    ("expr", "where"),
    [
        ({"topic": {"in": ["x"] * 65}}, "$.topic.in"),
        ({"payload": "p", "eq": "x" * 257}, "$.eq"),
        ({"header": "", "exists": True}, "$.header"),
        ({"payload": "p", "eq": [1]}, "$.eq"),
        ({"all": []}, "$.all"),
        ({"topic": {"in": []}}, "$.topic.in"),
        ({"payload": "p", "in": []}, "$.in"),
        ({"topic": {"eq": "a"}, "regex": ".*"}, "regex"),
    ],
)
def test_value_sizes_and_shapes_are_bounded_by_the_types(expr: dict[str, Any], where: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(msgspec.json.encode(expr), type=Filter)
    assert where in str(info.value)


def test_build_messages_leaves_out_what_the_filter_rejects_and_says_which() -> None:
    relay = Relay(
        database="d",
        target="t",
        topic_mapping={"orders": "o", "users": "u"},
        filter=msgspec.convert({"any": [{"header": "vip", "eq": "y"}, {"payload": "n", "eq": 2}]}, type=Filter),
    )
    now = datetime.now(UTC)
    rows = [
        OutboxRow(txid=1, id=1, topic="orders", key=None, payload=b'{"n": 2}', headers="{}", created_at=now),
        OutboxRow(txid=1, id=2, topic="orders", key=None, payload=b'{"n": 3}', headers="{}", created_at=now),
        OutboxRow(txid=1, id=3, topic="other", key=None, payload=b'{"n": 2}', headers="{}", created_at=now),
        OutboxRow(txid=1, id=4, topic="users", key=None, payload=b"not json", headers='{"vip": "y"}', created_at=now),
        OutboxRow(txid=1, id=5, topic="users", key=None, payload=b"not json", headers='{"vip": 1}', created_at=now),
    ]
    accepts = compile_filter(relay.filter)
    filtered: list[int] = []
    messages = build_messages(relay, "r", rows, accepts=accepts, filtered=filtered)
    assert [m.id if m else None for m in messages] == [1, None, None, 4, None]
    assert filtered == [1, 4], "the unrouted row (index 2) is not counted as filtered"
    assert messages[3] is not None and messages[3].headers["vip"] == "y"
    assert build_messages(relay, "r", rows)[1] is not None, "no predicate given: nothing filtered"


def test_a_batch_counts_the_filtered_rows_the_cursor_passes() -> None:
    batch = OutboxBatch(part=None, rows=[], messages=[], sendable=[], too_big=None, filtered=[1, 4])  # type: ignore[arg-type]
    assert [batch.filtered_within(passed) for passed in range(7)] == [0, 0, 1, 1, 1, 2, 2]
    assert OutboxBatch(None, [], [], [], None).filtered_within(5) == 0  # type: ignore[arg-type]


def test_the_documented_example_is_a_valid_relay() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "delivery.md").read_text()
    section = text.split("## Filters", 1)[1].split("\n## ", 1)[0]
    example = section.split("```json\n", 1)[1].split("```", 1)[0]
    relay = msgspec.json.decode(example, type=Relay)
    accepts = compile_filter(relay.filter)
    assert accepts is not None
    assert accepts("orders.created", {"priority": "high"}, b'{"country": "US"}')
    assert not accepts("orders.created", {"x-test": "1"}, b'{"country": "DE"}')


def test_partitions_of_a_relay_share_one_compiled_filter() -> None:
    def decoded() -> Filter:  # each partition decodes the plan's spec on its own
        return msgspec.json.decode(b'{"all": [{"topic": {"eq": "a"}}, {"payload": "p", "exists": true}]}', type=Filter)

    first, second = shared_filter(decoded()), shared_filter(decoded())
    assert first is not None and first is second
    assert first("a", {}, b'{"p": 1}') and not first("b", {}, b'{"p": 1}')
    assert shared_filter(None) is None
    other = shared_filter(msgspec.convert({"topic": {"eq": "b"}}, type=Filter))
    assert other is not None and other is not first
    with pytest.raises(InvalidFilter):
        shared_filter(msgspec.convert({"topic": {}}, type=Filter))


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than msgspec decodes: RecursionError, not DecodeError
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
        b'{"v": 1e999999}',  # a number out of range
        b"\xff\xfe",
    ],
)
def test_a_payload_the_decoder_refuses_matches_no_payload_leaf_and_raises_nothing(payload: bytes) -> None:
    assert not predicate({"payload": "v", "exists": True})("t", {}, payload)
    assert predicate({"not": {"payload": "v", "exists": False}})("t", {}, payload)


class _Acks:
    """A publisher that acknowledges the first ``acked`` messages of a batch and answers nothing more."""

    def __init__(self, acked: int) -> None:
        self.acked = acked
        self.sent: list[OutgoingMessage] = []

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        self.sent += messages
        return PublishResult(acked=min(self.acked, len(messages)))


class _Cursors(RelayRunner):
    """The runner's delivery policy with the cursor writes recorded instead of stored."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int, int]] = []

    async def _advance_cursors(self, writes: list[tuple[_Partition, int, int, int, int]]) -> list[bool]:
        self.writes += [(txid, row_id, sent, filtered) for _, txid, row_id, sent, filtered in writes]
        return [True] * len(writes)


@pytest.mark.parametrize(
    ("acked", "write", "counts"),
    [
        # rows: 1 sent, 2 filtered, 3 sent, 4 unrouted, 5 filtered, 6 sent; counts (published, filtered, skipped)
        (3, (1, 6, 3, 2), (3, 2, 1)),
        # the broker took the first message only: the cursor passes rows 1-2 (row 2 counted), not
        # row 5, which is counted once the cursor passes it (after row 3 is taken)
        (1, (1, 2, 1, 1), (1, 1, 0)),
        (0, None, (0, 0, 0)),
    ],
)
async def test_the_cursor_write_counts_the_filtered_rows_it_passes(
    acked: int, write: tuple[int, int, int, int] | None, counts: tuple[int, int, int]
) -> None:
    relay = Relay(
        database="d",
        target="t",
        topic_mapping={"a": "x"},
        filter=msgspec.convert({"not": {"payload": "drop", "exists": True}}, type=Filter),
    )
    now = datetime.now(UTC)
    payloads = [b"{}", b'{"drop": 1}', b"{}", b"{}", b'{"drop": 1}', b"{}"]
    rows = [
        OutboxRow(txid=1, id=i, topic="b" if i == 4 else "a", key=None, payload=p, headers="{}", created_at=now)
        for i, p in enumerate(payloads, start=1)
    ]
    plan = types.SimpleNamespace(tenant_name="t", relay_name="r", target_name="q", relay_id=uuid.uuid4())
    part = _Partition(plan=plan, lease=None, relay=relay, cursor=(0, 0), retry=None)  # type: ignore[arg-type]
    runner = _Cursors()
    batch = runner.prepare(part, rows)
    assert batch.filtered == [1, 4]
    publisher = _Acks(acked)
    assert await runner.publish_batches(publisher, [batch]) == []  # type: ignore[arg-type]
    assert [m.id for m in publisher.sent] == [1, 3, 6]
    assert runner.writes == ([write] if write else [])
    assert (part.published, part.filtered, part.skipped) == counts
