"""The REST API over a real control DB: CRUD, read-back, secrets, errors, tenant isolation."""

from __future__ import annotations

from typing import Any

import asyncpg
from litestar.testing import AsyncTestClient

from tests.conftest import pg_dsn
from tests.helpers import TenantClient, admin, make_tenant

RABBIT = {"kind": "rabbitmq", "url": "amqp://guest@127.0.0.1:5672/", "password": "guest"}


async def test_health(client: AsyncTestClient[Any]) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_tenant_key_shown_once_and_hashed(client: AsyncTestClient[Any]) -> None:
    t = await make_tenant(client)
    assert t.key.startswith("orly_")
    keys = (await client.get(f"/v1/tenants/{t.name}/api-keys", headers=admin())).json()
    assert len(keys) == 1 and "key" not in keys[0] and t.key.startswith(keys[0]["prefix"])
    r = await client.delete(f"/v1/tenants/{t.name}/api-keys/{keys[0]['id']}", headers=admin())
    assert r.status_code == 204
    assert (await t.get("/v1/databases")).status_code == 401


async def test_admin_routes_need_admin_key(client: AsyncTestClient[Any], tenant: TenantClient) -> None:
    r = await client.get("/v1/tenants")
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    r = await tenant.get("/v1/tenants")
    assert r.status_code == 403
    assert "admin" in r.json()["detail"]
    r = await client.get("/v1/databases", headers=admin())
    assert r.status_code == 403


async def test_database_roundtrip_and_write_only_password(tenant: TenantClient) -> None:
    body = {"dsn": pg_dsn("nowhere"), "password": "s3cret", "schema": "events"}
    r = await tenant.put("/v1/databases/main", body)
    assert r.status_code == 201, r.text
    got = r.json()
    assert "password" not in got and got["password_set"] is True
    assert got["dsn"] == body["dsn"] and got["schema"] == "events" and got["name"] == "main"
    # read back exactly as written; a GET result can be PUT back unchanged (password kept)
    again = (await tenant.get("/v1/databases/main")).json()
    assert again == got
    r = await tenant.put("/v1/databases/main", again)
    assert r.status_code == 200 and r.json()["password_set"] is True
    assert "s3cret" not in r.text
    # null clears the password
    r = await tenant.put("/v1/databases/main", {"dsn": body["dsn"], "password": None})
    assert r.json()["password_set"] is False and r.json()["schema"] == "outbox_relay"


async def test_list_pagination(tenant: TenantClient) -> None:
    for i in range(5):
        r = await tenant.put(f"/v1/targets/t{i}", {**RABBIT, "exchange": f"x{i}"})
        assert r.status_code == 201, r.text
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await tenant.get("/v1/targets", params=params)).json()
        seen += [item["name"] for item in page["items"]]
        assert all("password" not in item for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"t{i}" for i in range(5)]


async def test_delete_is_idempotent_and_guarded(tenant: TenantClient) -> None:
    await tenant.put("/v1/databases/d", {"dsn": pg_dsn("x")})
    await tenant.put("/v1/targets/q", RABBIT)
    r = await tenant.put("/v1/relays/r", {"database": "d", "target": "q"})
    assert r.status_code == 201, r.text
    r = await tenant.delete("/v1/databases/d")
    assert r.status_code == 409 and "r" in r.json()["detail"]
    assert (await tenant.delete("/v1/relays/r")).status_code == 204
    assert (await tenant.delete("/v1/relays/r")).status_code == 204
    assert (await tenant.delete("/v1/databases/d")).status_code == 204
    assert (await tenant.get("/v1/databases/d")).status_code == 404


async def test_relay_roundtrip_and_fixed_fields(tenant: TenantClient) -> None:
    await tenant.put("/v1/databases/d", {"dsn": pg_dsn("x")})
    await tenant.put("/v1/databases/d2", {"dsn": pg_dsn("y")})
    await tenant.put("/v1/targets/q", RABBIT)
    body = {
        "database": "d",
        "target": "q",
        "topic_mapping": {"orders": "orders-events", "*": "misc.{topic}"},
        "partitions": 4,
        "policy": {"batch_size": 50, "poll_interval_ms": 200},
    }
    r = await tenant.put("/v1/relays/r", body)
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["topic_mapping"] == body["topic_mapping"] and got["partitions"] == 4
    assert got["policy"]["batch_size"] == 50 and got["policy"]["max_attempts"] == 10
    r = await tenant.put("/v1/relays/r", {**body, "partitions": 8})
    assert r.status_code == 409 and "partitions" in r.json()["detail"]
    assert r.json()["type"] == "urn:outbox-relay:problem:immutable-field"
    r = await tenant.put("/v1/relays/r", {**body, "database": "d2"})
    assert r.status_code == 409 and r.json()["type"] == "urn:outbox-relay:problem:immutable-field"
    r = await tenant.put("/v1/relays/r", {**body, "target": "missing"})
    assert r.status_code == 422 and r.json()["detail"] == "target 'missing' does not exist"
    assert r.json()["type"] == "urn:outbox-relay:problem:unknown-reference"
    status = (await tenant.get("/v1/relays/r/status")).json()
    assert [p["partition"] for p in status["partitions"]] == [0, 1, 2, 3]


async def test_bad_input_is_4xx_problem(tenant: TenantClient) -> None:
    cases = [
        ("/v1/databases/d", {"dsn": "postgresql://u:pw@127.0.0.1/x"}, 422, "password"),
        ("/v1/databases/d", {"dsn": "mysql://u@h/x"}, 422, "postgresql"),
        ("/v1/databases/d", {"dsn": pg_dsn("x"), "bogus": 1}, 400, "bogus"),
        ("/v1/databases/d", {"dsn": pg_dsn("x"), "schema": "Bad-Name"}, 400, "schema"),
        ("/v1/databases/Bad_Name", {"dsn": pg_dsn("x")}, 400, "name"),
        ("/v1/targets/q", {"kind": "carrier-pigeon", "url": "x"}, 400, "kind"),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": "http://h"}, 422, "amqp"),
        ("/v1/targets/q", {"kind": "redis_streams", "url": "redis://:pw@h:6379"}, 422, "password"),
        ("/v1/targets/q", {"kind": "kafka", "bootstrap_servers": []}, 400, "bootstrap_servers"),
        ("/v1/relays/r", {"database": "d", "target": "q", "policy": {"batch_size": 0}}, 400, "batch_size"),
        ("/v1/relays/r", {"database": "nope", "target": "q"}, 422, "nope"),
    ]
    for path, body, status, word in cases:
        r = await tenant.put(path, body)
        assert r.status_code == status, (path, body, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["status"] == status and word in r.text, (path, problem)
    r = await tenant.client.put(
        "/v1/databases/d", content=b"{not json", headers={**tenant.headers, "content-type": "application/json"}
    )
    assert r.status_code == 400


async def test_a_refused_spec_names_its_problem_type_and_field(tenant: TenantClient) -> None:
    cases = [
        ("/v1/databases/d", {"dsn": "postgresql://u:pw@127.0.0.1/x"}, "invalid-dsn", "dsn"),
        ("/v1/targets/q", {"kind": "rabbitmq", "url": "http://h"}, "invalid-target", "url"),
        (
            "/v1/targets/q",
            {"kind": "kafka", "bootstrap_servers": ["h:99999"]},
            "invalid-target",
            "bootstrap_servers[0]",
        ),
    ]
    for path, body, slug, field in cases:
        r = await tenant.put(path, body)
        assert r.status_code == 422, (path, r.text)
        problem = r.json()
        assert problem["type"] == f"urn:outbox-relay:problem:{slug}", problem
        assert problem["title"] == "Unprocessable Entity" and problem["detail"].startswith(f"invalid {field}")
        assert [(e["key"], e["source"]) for e in problem["errors"]] == [(field, "body")]
    r = await tenant.put("/v1/targets/m", {"kind": "redis_streams", "url": "redis://169.254.169.254:6379/0"})
    assert r.json()["type"] == "urn:outbox-relay:problem:address-not-allowed"


async def test_nats_target_roundtrip_write_only_secret_and_refusals(tenant: TenantClient) -> None:
    """A NATS target reads back as written; its password (or token, without a username) is
    write-only; a server URL with credentials, a path or another scheme is a 422 naming the server."""
    body = {"kind": "nats", "servers": ["nats://127.0.0.1:4222", "tls://localhost"], "username": "relay"}
    r = await tenant.put("/v1/targets/js", {**body, "password": "nats-s3cret", "timeout_ms": 3000})
    assert r.status_code == 201, r.text
    got = r.json()
    assert "password" not in got and got["password_set"] is True and "nats-s3cret" not in r.text
    assert got["servers"] == body["servers"] and got["username"] == "relay" and got["timeout_ms"] == 3000
    again = (await tenant.get("/v1/targets/js")).json()
    assert again == got
    r = await tenant.put("/v1/targets/js", again)  # a GET result PUT back keeps the secret
    assert r.status_code == 200 and r.json()["password_set"] is True
    r = await tenant.put("/v1/targets/tok", {"kind": "nats", "servers": ["nats://127.0.0.1"], "password": "t0ken"})
    assert r.status_code == 201 and r.json()["password_set"] is True and r.json()["username"] is None
    assert "t0ken" not in (await tenant.get("/v1/targets")).text

    cases = [
        ({"servers": ["nats://relay:pw@127.0.0.1:4222"]}, "servers[0]", "password"),
        ({"servers": ["nats://127.0.0.1:4222", "nats://s3cret-token@127.0.0.1"]}, "servers[1]", "token"),
        ({"servers": ["http://127.0.0.1:4222"]}, "servers[0]", "nats://"),
        ({"servers": ["nats://127.0.0.1:4222/stream"]}, "servers[0]", "path"),
        ({"servers": ["nats://127.0.0.1:99999"]}, "servers[0]", "port"),
        ({"servers": ["nats://a:1,b:2"]}, "servers[0]", "one host"),
    ]
    for overrides, field, word in cases:
        r = await tenant.put("/v1/targets/bad", {"kind": "nats", **overrides})
        assert r.status_code == 422, (overrides, r.text)
        problem = r.json()
        assert problem["type"] == "urn:outbox-relay:problem:invalid-target", problem
        assert problem["detail"].startswith(f"invalid {field}") and word in problem["detail"], problem
        assert "s3cret" not in r.text
    for bad in ({"servers": []}, {"servers": ["nats://h"], "username": ""}, {"servers": ["nats://h"], "stream": "x"}):
        r = await tenant.put("/v1/targets/bad", {"kind": "nats", **bad})
        assert r.status_code == 400, (bad, r.text)
    r = await tenant.put("/v1/targets/bad", {"kind": "nats", "servers": ["nats://169.254.169.254:4222"]})
    assert r.status_code == 422 and r.json()["type"] == "urn:outbox-relay:problem:address-not-allowed"


async def test_address_policy_refuses_metadata(tenant: TenantClient) -> None:
    r = await tenant.put("/v1/targets/m", {"kind": "redis_streams", "url": "redis://169.254.169.254:6379/0"})
    assert r.status_code == 422 and "denied" in r.json()["detail"]
    r = await tenant.put("/v1/databases/m", {"dsn": "postgresql://u@169.254.169.254/x"})
    assert r.status_code == 422


async def test_tenant_isolation(client: AsyncTestClient[Any]) -> None:
    a = await make_tenant(client, "iso-a")
    b = await make_tenant(client, "iso-b")
    await a.put("/v1/databases/shared", {"dsn": pg_dsn("x"), "password": "a-secret"})
    await a.put("/v1/targets/shared", RABBIT)
    assert (await a.put("/v1/relays/shared", {"database": "shared", "target": "shared"})).status_code == 201
    for path in ("/v1/databases/shared", "/v1/targets/shared", "/v1/relays/shared", "/v1/relays/shared/status"):
        assert (await b.get(path)).status_code == 404, path
    assert (await b.post("/v1/databases/shared/provision")).status_code == 404
    assert (await b.get("/v1/databases/shared/schema.sql")).status_code == 404
    for path in ("/v1/databases", "/v1/targets", "/v1/relays"):
        assert (await b.get(path)).json()["items"] == []
    # B cannot reference A's resources from its own relay, and its deletes touch nothing of A's
    r = await b.put("/v1/relays/mine", {"database": "shared", "target": "shared"})
    assert r.status_code == 422
    assert (await b.delete("/v1/relays/shared")).status_code == 204
    assert (await a.get("/v1/relays/shared")).status_code == 200
    # B creating the same names gets its own resources
    assert (await b.put("/v1/databases/shared", {"dsn": pg_dsn("y")})).status_code == 201
    assert (await a.get("/v1/databases/shared")).json()["dsn"] == pg_dsn("x")


async def test_audit_names_the_key_that_changed_each_resource(client: AsyncTestClient[Any], control_dsn: str) -> None:
    """Every PUT and DELETE of a database, target and relay is audited as ``key:<id>`` of the key that
    made it: with two keys of one tenant, each row names its own."""
    first = await make_tenant(client, "audit")
    r = await client.post(f"/v1/tenants/{first.name}/api-keys", json={"description": "second"}, headers=admin())
    assert r.status_code == 201, r.text
    second, second_id = TenantClient(client, first.name, r.json()["key"]), r.json()["id"]
    keys = (await client.get(f"/v1/tenants/{first.name}/api-keys", headers=admin())).json()
    (first_id,) = [k["id"] for k in keys if k["id"] != second_id]

    assert (await first.put("/v1/databases/d", {"dsn": pg_dsn("x")})).status_code == 201
    assert (await second.put("/v1/databases/d", {"dsn": pg_dsn("x")})).status_code == 200
    assert (await first.put("/v1/targets/q", RABBIT)).status_code == 201
    assert (await second.put("/v1/targets/q", RABBIT)).status_code == 200
    assert (await second.put("/v1/relays/r", {"database": "d", "target": "q"})).status_code == 201
    assert (await first.put("/v1/relays/r", {"database": "d", "target": "q"})).status_code == 200
    assert (await first.delete("/v1/relays/r")).status_code == 204
    assert (await second.delete("/v1/targets/q")).status_code == 204
    assert (await first.delete("/v1/databases/d")).status_code == 204

    conn = await asyncpg.connect(control_dsn)
    try:
        rows = await conn.fetch(
            "SELECT a.actor, a.action, a.resource FROM audit_log a JOIN tenants t ON t.id = a.tenant_id "
            "WHERE t.name = $1 AND a.resource NOT LIKE 'tenants/%' ORDER BY a.id",
            first.name,
        )
    finally:
        await conn.close()
    one, two = f"key:{first_id}", f"key:{second_id}"
    assert [(a["actor"], a["action"], a["resource"]) for a in rows] == [
        (one, "create", "databases/d"),
        (two, "put", "databases/d"),
        (one, "create", "targets/q"),
        (two, "put", "targets/q"),
        (two, "create", "relays/r"),
        (one, "put", "relays/r"),
        (one, "delete", "relays/r"),
        (two, "delete", "targets/q"),
        (one, "delete", "databases/d"),
    ]


async def test_options_answers_every_method_of_the_path(tenant: TenantClient) -> None:
    r = await tenant.client.options("/v1/relays/r", headers=tenant.headers)
    assert r.status_code == 204, r.text
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "PUT", "DELETE", "OPTIONS"}
