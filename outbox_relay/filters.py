"""Relay filters: a relay's :class:`~outbox_relay.domain.Filter` checked (:func:`check`, at ``PUT``)
and compiled (:func:`compile_filter`, once per relay plan) into a plain predicate made of closures.
Nothing in a filter is evaluated as code; the work per row is bounded by the limits in
:mod:`outbox_relay.domain` (depth, leaves, values per ``in``, string sizes).

Semantics (docs/delivery.md, "Filters"):

- ``topic``: ``eq``, ``in`` (any of), ``prefix``; case-sensitive.
- ``header``: the row's own headers (not the ``outbox-*`` ones the relay adds); ``eq``/``in`` take
  strings; a header that is not a JSON string is compared as its JSON text. ``exists``.
- ``payload``: a top-level field of a payload that is a JSON object. ``eq``/``in`` compare JSON
  values: numbers by value (``1`` equals ``1.0``), ``true`` equals no number, an object or array
  field equals no value. ``exists: true`` matches a present field (``null`` included),
  ``exists: false`` an object without it. A payload that is not a JSON object (not JSON at all, an
  array, a scalar) matches **no** payload leaf: ``{"not": {"payload": ...}}`` matches it.
- The payload is decoded (``msgspec.json``) only for filters with a payload leaf, at most once per
  row, and only when evaluation reaches such a leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from msgspec import UNSET

from outbox_relay.domain import FILTER_MAX_DEPTH, FILTER_MAX_LEAVES, Filter, TopicTest
from outbox_relay.errors import InvalidFilter as InvalidFilter

Predicate = Callable[[str, Mapping[str, str], bytes], bool]
"""``accepts(topic, headers, payload)``: whether the relay publishes the row."""

_Node = Callable[["_Row"], bool]
_KINDS = ("all", "any", "not", "topic", "header", "payload")
_NO_FIELDS: dict[str, Any] = {}


class _Row:
    """One row as the predicate sees it; the payload's fields are decoded on first use."""

    __slots__ = ("_fields", "headers", "payload", "topic")

    def __init__(self, topic: str, headers: Mapping[str, str], payload: bytes) -> None:
        self.topic, self.headers, self.payload = topic, headers, payload
        self._fields: dict[str, Any] | None = None

    def fields(self) -> dict[str, Any] | None:
        """The payload's top-level fields; None when it is not a JSON object."""
        fields = self._fields
        if fields is None:
            try:
                doc = msgspec.json.decode(self.payload)
            except (msgspec.DecodeError, RecursionError):  # nested deeper than msgspec goes: not an object
                doc = None
            fields = self._fields = doc if isinstance(doc, dict) else _NO_FIELDS
        return None if fields is _NO_FIELDS else fields


_ATTRS = {"in": "in_", "not": "not_"}
"""JSON names -> attribute names (``in`` and ``not`` are Python keywords)."""


def _set(node: Filter | TopicTest, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (JSON names) ``node`` has."""
    return [n for n in names if getattr(node, _ATTRS.get(n, n)) is not UNSET]


def _value_key(value: Any) -> Any:
    """A JSON value as a set member: ``true`` must not equal ``1`` (Python's ``True == 1``)."""
    return ("bool", value) if isinstance(value, bool) else value


def check(expr: Filter) -> None:
    """Raise :class:`InvalidFilter` when ``expr`` breaks a rule (the types' own bounds, on value
    sizes and list lengths, are checked by msgspec as the spec is decoded)."""
    leaves = _check(expr, "filter", 1)
    if leaves > FILTER_MAX_LEAVES:
        raise InvalidFilter("filter", f"{leaves} leaves, at most {FILTER_MAX_LEAVES} allowed")


def _check(node: Filter, where: str, depth: int) -> int:
    """The number of leaves under ``node``, once it is known to be well formed."""
    if depth > FILTER_MAX_DEPTH:
        raise InvalidFilter(where, f"nested deeper than {FILTER_MAX_DEPTH} levels")
    kinds = _set(node, _KINDS)
    if len(kinds) != 1:
        got = f" (got {', '.join(kinds)})" if kinds else ""
        raise InvalidFilter(where, f"give exactly one of {', '.join(_KINDS)}{got}")
    kind = kinds[0]
    tests = _set(node, ("eq", "in", "exists"))
    if kind in ("all", "any", "not", "topic") and tests:
        place = "inside topic" if kind == "topic" else "in a header or payload leaf"
        raise InvalidFilter(where, f"{', '.join(tests)} belongs {place}, not beside {kind}")
    if kind in ("all", "any"):
        children: list[Filter] = getattr(node, kind)
        return sum(_check(child, f"{where}.{kind}[{i}]", depth + 1) for i, child in enumerate(children))
    if kind == "not":
        assert isinstance(node.not_, Filter)
        return _check(node.not_, f"{where}.not", depth + 1)
    if kind == "topic":
        assert isinstance(node.topic, TopicTest)
        ops = _set(node.topic, ("eq", "in", "prefix"))
        if len(ops) != 1:
            raise InvalidFilter(f"{where}.topic", "give exactly one of eq, in, prefix")
        return 1
    if len(tests) != 1:
        got = f" (got {', '.join(tests)})" if tests else ""
        raise InvalidFilter(where, f"a {kind} leaf takes exactly one of eq, in, exists{got}")
    if kind == "header":
        values = [node.eq] if node.eq is not UNSET else node.in_ if node.in_ is not UNSET else []
        if any(not isinstance(v, str) for v in values):
            raise InvalidFilter(f"{where}.{tests[0]}", "header values are strings")
    return 1


def compile_filter(expr: Filter | None) -> Predicate | None:
    """The predicate of ``expr`` (checked first), or None for no filter: build it once per relay
    plan, call it per row."""
    if expr is None:
        return None
    check(expr)
    node = _compile(expr)

    def accepts(topic: str, headers: Mapping[str, str], payload: bytes) -> bool:
        return node(_Row(topic, headers, payload))

    return accepts


def reads_payload(expr: Filter | None) -> bool:
    """Whether ``expr`` has a payload leaf: a reader that only counts what a filter matches fetches the
    payloads only then."""
    if expr is None:
        return False
    if expr.payload is not UNSET:
        return True
    children = [*(expr.all or ()), *(expr.any or ())] + ([expr.not_] if isinstance(expr.not_, Filter) else [])
    return any(reads_payload(child) for child in children)


def shared_filter(expr: Filter | None) -> Predicate | None:
    """:func:`compile_filter`, compiled once per filter (keyed by its JSON) and shared: a worker's
    partitions of a relay (their plan's filter) use one predicate. The cache is bounded."""
    return None if expr is None else _shared(msgspec.json.encode(expr))


@functools.lru_cache(maxsize=1024)
def _shared(encoded: bytes) -> Predicate | None:
    return compile_filter(msgspec.json.decode(encoded, type=Filter))


def _compile(node: Filter) -> _Node:
    if node.all is not UNSET:
        parts = tuple(_compile(c) for c in node.all)
        return lambda row: all(p(row) for p in parts)
    if node.any is not UNSET:
        parts = tuple(_compile(c) for c in node.any)
        return lambda row: any(p(row) for p in parts)
    if node.not_ is not UNSET:
        inner = _compile(node.not_)
        return lambda row: not inner(row)
    if node.topic is not UNSET:
        return _topic(node.topic)
    if node.header is not UNSET:
        return _header(node.header, node)
    assert isinstance(node.payload, str)
    return _payload(node.payload, node)


def _topic(test: TopicTest) -> _Node:
    if test.eq is not UNSET:
        eq = test.eq
        return lambda row: row.topic == eq
    if test.in_ is not UNSET:
        among = frozenset(test.in_)
        return lambda row: row.topic in among
    prefix = test.prefix
    assert isinstance(prefix, str)
    return lambda row: row.topic.startswith(prefix)


def _header(name: str, node: Filter) -> _Node:
    if node.exists is not UNSET:
        exists = node.exists
        return lambda row: (name in row.headers) is exists
    if node.eq is not UNSET:
        eq = node.eq
        return lambda row: row.headers.get(name) == eq
    among = frozenset(node.in_ if node.in_ is not UNSET else ())
    return lambda row: row.headers.get(name) in among


def _payload(name: str, node: Filter) -> _Node:
    if node.exists is not UNSET:
        exists = node.exists

        def has(row: _Row) -> bool:
            fields = row.fields()
            return fields is not None and (name in fields) is exists

        return has
    among = frozenset(_value_key(v) for v in ([node.eq] if node.eq is not UNSET else node.in_ or ()))
    missing = object()

    def equals(row: _Row) -> bool:
        fields = row.fields()
        if fields is None:
            return False
        value = fields.get(name, missing)
        if value is missing or isinstance(value, (dict, list)):
            return False
        return _value_key(value) in among

    return equals
