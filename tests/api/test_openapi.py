"""The committed OpenAPI document is the contract: it must match what the app serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient

from service.openapi import render

COMMITTED = Path(__file__).parents[2] / "openapi" / "openapi.json"


def test_committed_spec_matches_the_app() -> None:
    assert COMMITTED.read_bytes() == render(), (
        "openapi/openapi.json is out of date: run `make openapi` and commit the result"
    )


async def test_served_spec_is_the_committed_one(client: AsyncTestClient[Any]) -> None:
    served = (await client.get("/docs/openapi.json")).json()
    committed = msgspec.json.decode(COMMITTED.read_bytes())
    assert served["paths"].keys() == committed["paths"].keys()
    assert served["components"]["schemas"] == committed["components"]["schemas"]


def test_every_operation_has_an_operation_id() -> None:
    committed = msgspec.json.decode(COMMITTED.read_bytes())
    for path, item in committed["paths"].items():
        for method, op in item.items():
            assert op.get("operationId"), f"{method.upper()} {path} has no operationId"
