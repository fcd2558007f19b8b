"""The committed OpenAPI document is the contract: it must match what the app serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from service.openapi import normalized, spec

COMMITTED = Path(__file__).parents[2] / "openapi" / "openapi.json"


def differences(a: Any, b: Any, path: str = "$") -> list[str]:
    """Where two JSON documents differ, as JSON paths (the first few), for a readable failure."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in {'the app' if k in a else 'the file'}" for k in a.keys() ^ b.keys()]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: app {a!r:.120} != file {b!r:.120}"]


def test_committed_spec_matches_the_app() -> None:
    """What matters is the document, not its bytes: prose is compared dedented, so a library's
    docstring whitespace cannot fail it, while any change of a path, schema, field, type, status or
    word does."""
    diff = differences(normalized(spec()), normalized(msgspec.json.decode(COMMITTED.read_bytes())))
    assert not diff, "openapi/openapi.json is out of date (`make openapi`, then commit): " + "; ".join(diff[:10])


def test_the_comparison_sees_a_changed_word_but_not_indentation() -> None:
    app = {"a": {"description": "dead again\nwith the attempt", "type": "string"}}
    assert not differences(
        normalized(app), normalized({"a": {"description": "dead again\n    with the attempt", "type": "string"}})
    )
    assert differences(
        normalized(app), normalized({"a": {"description": "dead again\nwith an attempt", "type": "string"}})
    )
    assert differences(
        normalized(app), normalized({"a": {"description": "dead again\nwith the attempt", "type": "integer"}})
    )


async def test_served_spec_is_the_committed_one(client: AsyncTestClient[Any]) -> None:
    served = normalized((await client.get("/docs/openapi.json")).json())
    committed = normalized(msgspec.json.decode(COMMITTED.read_bytes()))
    assert served["paths"].keys() == committed["paths"].keys()
    assert not differences(served["components"]["schemas"], committed["components"]["schemas"])


def test_every_operation_has_an_operation_id() -> None:
    committed = msgspec.json.decode(COMMITTED.read_bytes())
    for path, item in committed["paths"].items():
        for method, op in item.items():
            assert op.get("operationId"), f"{method.upper()} {path} has no operationId"
