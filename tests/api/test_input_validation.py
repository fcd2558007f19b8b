"""Bad input is a 4xx problem that names the field or parameter, never a 500, and nothing of it is stored.

Connection strings take only the query parameters a tenant needs (allow-lists in
``outbox_relay.specs``); a password never rides in one; text never carries NUL; bodies are decoded
strictly and their size is capped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from tests.conftest import pg_dsn
from tests.helpers import TenantClient, admin

DSN = pg_dsn("nowhere")
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest@127.0.0.1:5672/"


@pytest.fixture
async def control(control_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(control_dsn)
    yield conn
    await conn.close()


def is_problem(r: Any, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    problem: dict[str, Any] = r.json()
    assert problem["status"] == status
    for word in words:
        assert word in problem["detail"], (word, problem)
    return problem


# --- 3: DSN and broker URL parameters outside the allow-lists --------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "parameter"),
    [
        ("/v1/databases/d", {"dsn": f"{DSN}?passfile=/etc/outbox-relay/pgpass"}, "passfile"),
        ("/v1/databases/d", {"dsn": f"{DSN}?sslrootcert=/etc/ssl/private/ca.pem"}, "sslrootcert"),
        ("/v1/databases/d", {"dsn": f"{DSN}?service=prod"}, "service"),
        ("/v1/databases/d", {"dsn": f"{DSN}?sslmode=require&sslkey=/root/.postgresql/key"}, "sslkey"),
        ("/v1/databases/d", {"dsn": f"{DSN}?host=169.254.169.254"}, "host"),
        ("/v1/databases/d", {"dsn": f"{DSN}?options=-c%20search_path%3Dx"}, "options"),
        ("/v1/databases/d", {"dsn": f"{DSN}?connect_timeout=5"}, "connect_timeout"),
        ("/v1/databases/d", {"dsn": f"{DSN}?sslmode=bogus"}, "sslmode"),
        ("/v1/targets/q", {"kind": "redis_streams", "url": f"{REDIS}?path=/tmp/x"}, "path"),
        ("/v1/targets/q", {"kind": "redis_streams", "url": f"{REDIS}?connection_class=x"}, "connection_class"),
        ("/v1/targets/q", {"kind": "redis_streams", "url": f"{REDIS}?ssl_cert_reqs=none"}, "ssl_cert_reqs"),
        ("/v1/targets/q", {"kind": "redis_streams", "url": "rediss://127.0.0.1:6379/0?ssl_keyfile=/k"}, "ssl_keyfile"),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": f"{AMQP}?certfile=/c&keyfile=/k"}, "certfile"),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": f"{AMQP}?auth=external"}, "auth"),
    ],
)
async def test_connection_string_parameters_outside_the_allow_list_are_refused(
    tenant: TenantClient, path: str, body: dict[str, Any], parameter: str
) -> None:
    problem = is_problem(await tenant.put(path, body), 422, f"query parameter {parameter!r}")
    assert problem["errors"][0]["key"] in ("dsn", "url")
    assert (await tenant.get(path)).status_code == 404  # nothing stored


async def test_allowed_parameters_are_taken_and_read_back(tenant: TenantClient) -> None:
    dsn = f"{DSN}?sslmode=prefer&target_session_attrs=read-write&application_name=shop"
    r = await tenant.put("/v1/databases/d", {"dsn": dsn})
    assert r.status_code == 201 and r.json()["dsn"] == dsn, r.text
    for url in ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=none", f"{REDIS}"):
        r = await tenant.put("/v1/targets/r", {"kind": "redis_streams", "url": url})
        assert r.status_code in (200, 201) and r.json()["url"] == url, r.text
    r = await tenant.put("/v1/targets/a", {"kind": "rabbitmq", "url": f"{AMQP}?heartbeat=30"})
    assert r.status_code == 201, r.text


async def test_provision_refuses_a_stored_dsn_with_a_refused_parameter(
    tenant: TenantClient, control: asyncpg.Connection, tmp_path: Path
) -> None:
    # written before the allow-list existed: provisioning must not hand it to asyncpg
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:a-password-of-the-relay-host\n")
    passfile.chmod(0o600)
    assert (await tenant.put("/v1/databases/old", {"dsn": pg_dsn("postgres")})).status_code == 201
    await control.execute(
        "UPDATE databases SET spec = jsonb_set(spec, '{dsn}', to_jsonb($1::text)) WHERE name = 'old' "
        "AND tenant_id = (SELECT id FROM tenants WHERE name = $2)",
        f"{pg_dsn('postgres')}?passfile={passfile}",
        tenant.name,
    )
    assert "passfile" in (await tenant.get("/v1/databases/old")).json()["dsn"]  # still reads back
    is_problem(await tenant.post("/v1/databases/old/provision"), 422, "'passfile'")


# --- 4: a password in the query string --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/databases/d", {"dsn": f"{DSN}?password=hunter2"}),
        ("/v1/databases/d", {"dsn": f"{DSN}?sslmode=require&pass%77ord=hunter2"}),
        ("/v1/targets/q", {"kind": "redis_streams", "url": f"{REDIS}?password=hunter2"}),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": f"{AMQP}?password=hunter2"}),
    ],
)
async def test_a_password_in_the_query_string_is_refused_and_not_stored(
    tenant: TenantClient, path: str, body: dict[str, Any]
) -> None:
    problem = is_problem(await tenant.put(path, body), 422, "`password` field", "'password'")
    assert "hunter2" not in json.dumps(problem)
    assert (await tenant.get(path)).status_code == 404
    listed = await tenant.get(path.rsplit("/", 1)[0])
    assert "hunter2" not in listed.text


# --- 7: every bad input is a 4xx --------------------------------------------------------------------

NUL = "a\u0000b"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/databases/d", {"dsn": f"{DSN}{NUL}"}, "dsn"),
        ("/v1/databases/d", {"dsn": DSN, "password": NUL}, "password"),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": AMQP, "exchange": NUL}, "exchange"),
        ("/v1/targets/q", {"kind": "kafka", "bootstrap_servers": ["k:9092", NUL]}, "bootstrap_servers[1]"),
        ("/v1/relays/r", {"database": "d", "target": "q", "topic_mapping": {NUL: "x"}}, "topic_mapping (a key)"),
        ("/v1/relays/r", {"database": "d", "target": "q", "topic_mapping": {"t": NUL}}, "topic_mapping['t']"),
    ],
)
async def test_nul_in_a_tenant_text_field_is_422(
    tenant: TenantClient, path: str, body: dict[str, Any], field: str
) -> None:
    problem = is_problem(await tenant.put(path, body), 422, f"invalid {field}:", "NUL")
    assert problem["errors"][0]["key"] == field


async def test_nul_in_admin_text_fields_is_422(client: AsyncTestClient[Any]) -> None:
    r = await client.put("/v1/tenants/nul", json={"display_name": NUL}, headers=admin())
    is_problem(r, 422, "invalid display_name:")
    assert (await client.get("/v1/tenants/nul", headers=admin())).status_code == 404
    assert (await client.put("/v1/tenants/nul", json={"display_name": "ok"}, headers=admin())).status_code == 201
    r = await client.post("/v1/tenants/nul/api-keys", json={"description": NUL}, headers=admin())
    is_problem(r, 422, "invalid description:")
    assert (await client.get("/v1/tenants/nul/api-keys", headers=admin())).json() == []


async def test_nul_in_a_query_parameter_is_400(tenant: TenantClient) -> None:
    is_problem(await tenant.get("/v1/dead-letters", params={"topic": NUL}), 400, "invalid topic:", "NUL")
    is_problem(await tenant.get("/v1/dead-letters", params={"key": NUL}), 400, "invalid key:")


@pytest.mark.parametrize(
    "path", ["/v1/databases/d", "/v1/targets/q", "/v1/relays/r", "/v1/dead-letters/discard", "/v1/tenants/deep"]
)
async def test_deeply_nested_bodies_are_400(tenant: TenantClient, path: str) -> None:
    depth = 100_000
    for body in ("[" * depth + "]" * depth, '{"topic_mapping": ' + "[" * depth + "]" * depth + "}"):
        headers = {**(admin() if "tenants" in path else tenant.headers), "content-type": "application/json"}
        method = tenant.client.post if path.endswith("discard") else tenant.client.put
        r = await method(path, content=body.encode(), headers=headers)
        is_problem(r, 400)


async def test_a_body_over_one_mib_is_413(tenant: TenantClient) -> None:
    mapping = {f"topic-{i}": "x" * 200 for i in range(6000)}
    r = await tenant.put("/v1/relays/r", {"database": "d", "target": "q", "topic_mapping": mapping})
    is_problem(r, 413, "over 1048576 bytes")


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/databases/d", {"dsn": "postgresql://u@127.0.0.1:99999/x"}, ("dsn", "port")),
        ("/v1/databases/d", {"dsn": "postgresql://u@127.0.0.1:0/x"}, ("dsn", "port")),
        ("/v1/databases/d", {"dsn": "postgresql://u@127.0.0.1:5432,127.0.0.2:70000/x"}, ("dsn", "port")),
        ("/v1/targets/q", {"kind": "redis_streams", "url": "redis://127.0.0.1:0/0"}, ("url", "port")),
        ("/v1/targets/q", {"kind": "redis_streams", "url": "redis://127.0.0.1:99999/0"}, ("url", "port")),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": "amqp://u@127.0.0.1:0/"}, ("url", "port")),
        ("/v1/targets/q", {"kind": "kafka", "bootstrap_servers": ["127.0.0.1:0"]}, ("bootstrap_servers[0]", "port")),
        ("/v1/targets/q", {"kind": "kafka", "bootstrap_servers": ["k:99999"]}, ("bootstrap_servers[0]", "port")),
        ("/v1/targets/q", {"kind": "kafka", "bootstrap_servers": ["[::1:9092"]}, ("bootstrap_servers[0]", "IPv6")),
        ("/v1/targets/q", {"kind": "kafka", "bootstrap_servers": ["::1:9092"]}, ("bootstrap_servers[0]", "IPv6")),
        ("/v1/targets/q", {"kind": "kafka", "bootstrap_servers": ["k:9092", "k k:9092"]}, ("bootstrap_servers[1]",)),
        (
            "/v1/targets/q",
            {"kind": "kafka", "bootstrap_servers": [f"k{i}:9092" for i in range(10_000)]},
            ("bootstrap_servers", "at most 32"),
        ),
        ("/v1/targets/q", {"kind": "redis_streams", "url": REDIS, "maxlen": 10**30}, ("maxlen", "XADD")),
        ("/v1/targets/q", {"kind": "redis_streams", "url": REDIS, "maxlen": 2**63}, ("maxlen",)),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": AMQP, "exchange": "é" * 200}, ("exchange", "255 bytes")),
    ],
)
async def test_out_of_range_ports_servers_and_caps_are_422(
    tenant: TenantClient, path: str, body: dict[str, Any], words: tuple[str, ...]
) -> None:
    is_problem(await tenant.put(path, body), 422, *words)
    assert (await tenant.get(path)).status_code == 404


async def test_edge_values_are_still_taken(tenant: TenantClient) -> None:
    r = await tenant.put(
        "/v1/targets/k", {"kind": "kafka", "bootstrap_servers": [f"127.0.0.{i}:9092" for i in range(32)]}
    )
    assert r.status_code == 201, r.text
    r = await tenant.put("/v1/targets/k6", {"kind": "kafka", "bootstrap_servers": ["[::1]:9092", "localhost"]})
    assert r.status_code == 201, r.text
    r = await tenant.put("/v1/targets/m", {"kind": "redis_streams", "url": REDIS, "maxlen": 2**63 - 1})
    assert r.status_code == 201 and r.json()["maxlen"] == 2**63 - 1, r.text
    r = await tenant.put("/v1/databases/p", {"dsn": "postgresql://u@127.0.0.1:65535,[::1]:1/x"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("/v1/relays/r", {"database": "d", "target": "q", "policy": {"batch_size": "5"}}, "policy.batch_size"),
        ("/v1/relays/r", {"database": "d", "target": "q", "partitions": "4"}, "partitions"),
        ("/v1/relays/r", {"database": "d", "target": "q", "enabled": "true"}, "enabled"),
        ("/v1/relays/r", {"database": "d", "target": "q", "enabled": 1}, "enabled"),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": AMQP, "timeout_ms": "1000"}, "timeout_ms"),
        ("/v1/targets/q", {"kind": "redis_streams", "url": REDIS, "maxlen": 10.0}, "maxlen"),
    ],
)
async def test_strings_and_floats_are_not_coerced_to_numbers(
    tenant: TenantClient, path: str, body: dict[str, Any], key: str
) -> None:
    problem = is_problem(await tenant.put(path, body), 400, f"invalid {key}:")
    assert problem["errors"][0]["key"] == key


async def test_a_get_result_can_still_be_put_back(tenant: TenantClient) -> None:
    """Strict decoding still takes what the API returns (timestamps as strings, read-only fields)."""
    assert (await tenant.put("/v1/databases/d", {"dsn": DSN})).status_code == 201
    assert (await tenant.put("/v1/targets/q", {"kind": "rabbitmq", "url": AMQP})).status_code == 201
    assert (await tenant.put("/v1/relays/r", {"database": "d", "target": "q"})).status_code == 201
    for path in ("/v1/databases/d", "/v1/targets/q", "/v1/relays/r"):
        got = (await tenant.get(path)).json()
        r = await tenant.put(path, got)
        assert r.status_code == 200, r.text
        assert {**r.json(), "updated_at": None} == {**got, "updated_at": None}
