"""A relay's filter over the API: a valid one reads back exactly as written; a bad one is a 4xx
problem whose message says what is wrong and where, never a 500."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import pg_dsn
from tests.helpers import TenantClient

RABBIT = {"kind": "rabbitmq", "url": "amqp://guest@127.0.0.1:5672/", "password": "guest"}
FILTER = {
    "all": [
        {"topic": {"prefix": "orders."}},
        {"any": [{"payload": "country", "in": ["DE", "FR", 49, None, True]}, {"header": "vip", "exists": True}]},
        {"not": {"header": "x-test", "eq": "1"}},
        {"payload": "amount", "eq": 12.5},
    ]
}


@pytest.fixture
async def relay_refs(tenant: TenantClient) -> TenantClient:
    assert (await tenant.put("/v1/databases/d", {"dsn": pg_dsn("x")})).status_code == 201
    assert (await tenant.put("/v1/targets/q", RABBIT)).status_code == 201
    return tenant


async def test_a_filter_reads_back_as_written_and_null_clears_it(relay_refs: TenantClient) -> None:
    tenant = relay_refs
    r = await tenant.put("/v1/relays/r", {"database": "d", "target": "q", "filter": FILTER})
    assert r.status_code == 201, r.text
    assert r.json()["filter"] == FILTER
    got = (await tenant.get("/v1/relays/r")).json()
    assert got["filter"] == FILTER
    r = await tenant.put("/v1/relays/r", {**got, "filter": None})  # GET -> edit -> PUT
    assert r.status_code == 200, r.text
    assert (await tenant.get("/v1/relays/r")).json()["filter"] is None
    status = (await tenant.get("/v1/relays/r/status")).json()
    assert status["filtered"] == 0 and all(p["filtered"] == 0 for p in status["partitions"])


def nested(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"header": "h", "exists": True}
    for _ in range(levels - 1):
        node = {"not": node}
    return node


@pytest.mark.parametrize(
    ("expr", "status", "words"),
    [
        ({}, 422, ["filter:", "exactly one of all, any, not, topic, header, payload"]),
        ({"any": [{"topic": {"eq": "a"}}, {"header": "h"}]}, 422, ["filter.any[1]", "eq, in, exists"]),
        ({"topic": {"eq": "a", "prefix": "b"}}, 422, ["filter.topic", "exactly one of eq, in, prefix"]),
        ({"header": "h", "eq": 7}, 422, ["filter.eq", "header values are strings"]),
        (nested(9), 422, ["nested deeper than 8 levels"]),
        ({"any": [{"topic": {"eq": str(i)}} for i in range(33)]}, 400, ["filter.any", "length <= 32"]),
        ({"all": [{"any": [{"topic": {"eq": str(i)}}] * 2} for i in range(17)]}, 422, ["34 leaves, at most 32"]),
        ({"topic": {"in": ["x"] * 65}}, 400, ["filter.topic.in"]),
        ({"payload": "p", "eq": "x" * 257}, 400, ["filter.eq"]),
        ({"payload": "p", "eq": {"nested": 1}}, 400, ["filter.eq"]),
        ({"topic": {"regex": ".*"}}, 400, ["regex"]),
        ({"python": "__import__('os')"}, 400, ["python"]),
        ("orders", 400, ["filter"]),
    ],
)
async def test_bad_filters_are_4xx_problems_that_say_where(
    relay_refs: TenantClient, expr: Any, status: int, words: list[str]
) -> None:
    tenant = relay_refs
    r = await tenant.put("/v1/relays/r", {"database": "d", "target": "q", "filter": expr})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, detail
    assert (await tenant.get("/v1/relays/r")).status_code == 404, "nothing was written"


async def test_a_filter_deeper_than_the_decoder_goes_is_a_400(relay_refs: TenantClient) -> None:
    levels = 5000
    body = b'{"database": "d", "target": "q", "filter": ' + b'{"not": ' * levels + b'{"topic": {"eq": "t"}}'
    body += b"}" * (levels + 1)
    r = await relay_refs.client.put(
        "/v1/relays/r", content=body, headers={**relay_refs.headers, "content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
