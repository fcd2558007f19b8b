"""What one tenant may cost the shared service, and what a bad key gets.

Quotas per tenant (defaults from the settings, overrides by the operator on the tenant's PUT), counted
race-free; bounds on relay policies; 429 with Retry-After for a client that keeps presenting bad keys;
one answer (401) for a wrong or revoked key on every route; keys only in ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from service.app import create_app
from tests.conftest import pg_dsn
from tests.helpers import ADMIN_KEY, LiveServer, TenantClient, admin, make_tenant

RABBIT = {"kind": "rabbitmq", "url": "amqp://guest@127.0.0.1:5672/"}
COMMITTED = Path(__file__).parents[2] / "openapi" / "openapi.json"


async def _set_quotas(client: AsyncTestClient[Any], tenant: str, quotas: dict[str, Any]) -> dict[str, Any]:
    r = await client.put(f"/v1/tenants/{tenant}", json={"display_name": tenant, "quotas": quotas}, headers=admin())
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _quota_problem(r: Any, quota: str, limit: int, used: int) -> None:
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"] == "urn:outbox-relay:problem:quota-exceeded"
    assert (body["quota"], body["limit"], body["used"]) == (quota, limit, used), body
    assert quota.replace("_", " ") in body["detail"]


# --- quotas -----------------------------------------------------------------------------------------


async def test_tenant_shows_its_quotas_defaults_and_overrides(
    client: AsyncTestClient[Any], tenant: TenantClient, settings: Settings
) -> None:
    got = (await client.get(f"/v1/tenants/{tenant.name}", headers=admin())).json()
    assert got["quotas"]["relays"] == {"limit": settings.quota_relays, "used": 0, "default": True}
    assert got["quotas"]["api_keys"] == {"limit": settings.quota_api_keys, "used": 1, "default": True}
    assert set(got["quotas"]) == {"relays", "databases", "targets", "partitions", "api_keys"}

    put = await _set_quotas(client, tenant.name, {"relays": 3, "partitions": 40})
    assert put["quotas"]["relays"] == {"limit": 3, "used": 0, "default": False}
    assert put["quotas"]["targets"]["default"] is True
    # a PUT without `quotas` keeps them (Terraform's tenant resource sends only display_name) ...
    r = await client.put(f"/v1/tenants/{tenant.name}", json={"display_name": "renamed"}, headers=admin())
    assert r.json()["quotas"]["relays"]["limit"] == 3 and r.json()["display_name"] == "renamed"
    # ... the list shows them too, and an empty object goes back to the defaults
    page = (await client.get("/v1/tenants", params={"limit": 500}, headers=admin())).json()
    mine = next(t for t in page["items"] if t["name"] == tenant.name)
    assert mine["quotas"]["partitions"] == {"limit": 40, "used": 0, "default": False}
    assert (await _set_quotas(client, tenant.name, {}))["quotas"]["relays"]["default"] is True
    r = await client.put(f"/v1/tenants/{tenant.name}", json={"quotas": {"relays": -1}}, headers=admin())
    assert r.status_code == 400
    r = await client.put(f"/v1/tenants/{tenant.name}", json={"quotas": {"widgets": 1}}, headers=admin())
    assert r.status_code == 400


async def test_creating_past_a_quota_is_refused_with_409_naming_it(
    client: AsyncTestClient[Any], tenant: TenantClient
) -> None:
    await _set_quotas(client, tenant.name, {"databases": 1, "targets": 1, "relays": 2, "partitions": 10, "api_keys": 2})
    assert (await tenant.put("/v1/databases/d1", {"dsn": pg_dsn("x")})).status_code == 201
    _quota_problem(await tenant.put("/v1/databases/d2", {"dsn": pg_dsn("x")}), "databases", 1, 1)
    assert (await tenant.put("/v1/databases/d1", {"dsn": pg_dsn("y")})).status_code == 200  # replacing is free
    assert (await tenant.put("/v1/targets/t1", RABBIT)).status_code == 201
    _quota_problem(await tenant.put("/v1/targets/t2", RABBIT), "targets", 1, 1)

    relay = {"database": "d1", "target": "t1", "enabled": False}
    assert (await tenant.put("/v1/relays/r1", {**relay, "partitions": 8})).status_code == 201
    r = await tenant.put("/v1/relays/r2", {**relay, "partitions": 4})
    _quota_problem(r, "partitions", 10, 8)
    assert r.json()["requested"] == 4
    assert (await tenant.put("/v1/relays/r2", {**relay, "partitions": 2})).status_code == 201
    _quota_problem(await tenant.put("/v1/relays/r3", {**relay, "partitions": 1}), "relays", 2, 2)
    assert (await tenant.put("/v1/relays/r1", {**relay, "partitions": 8})).status_code == 200
    assert (await tenant.delete("/v1/relays/r2")).status_code == 204
    assert (await tenant.put("/v1/relays/r3", {**relay, "partitions": 1})).status_code == 201

    # one key from make_tenant, one more fits; revoking one makes room again
    keys = f"/v1/tenants/{tenant.name}/api-keys"
    second = await client.post(keys, json={}, headers=admin())
    assert second.status_code == 201
    _quota_problem(await client.post(keys, json={}, headers=admin()), "api_keys", 2, 2)
    assert (await client.delete(f"{keys}/{second.json()['id']}", headers=admin())).status_code == 204
    assert (await client.post(keys, json={}, headers=admin())).status_code == 201

    use = (await client.get(f"/v1/tenants/{tenant.name}", headers=admin())).json()["quotas"]
    assert {q: u["used"] for q, u in use.items()} == {
        "relays": 2,
        "databases": 1,
        "targets": 1,
        "partitions": 9,
        "api_keys": 2,
    }


@pytest.fixture
async def strict_client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """An app with the service's bounds and small default quotas."""
    strict = dataclasses.replace(
        settings, quota_targets=2, min_poll_interval_ms=100, max_relay_partitions=256, quota_partitions=1024
    )
    async with AsyncTestClient(app=create_app(strict)) as c:
        yield c


async def test_default_quotas_come_from_the_settings(strict_client: AsyncTestClient[Any]) -> None:
    t = await make_tenant(strict_client, "quota-default")
    for name in ("a", "b"):
        assert (await t.put(f"/v1/targets/{name}", RABBIT)).status_code == 201
    _quota_problem(await t.put("/v1/targets/c", RABBIT), "targets", 2, 2)
    # the operator lifts it for this tenant alone
    await _set_quotas(strict_client, t.name, {"targets": 3})
    assert (await t.put("/v1/targets/c", RABBIT)).status_code == 201


async def test_relay_policies_are_bounded_by_the_service(
    strict_client: AsyncTestClient[Any], client: AsyncTestClient[Any]
) -> None:
    t = await make_tenant(strict_client, "bounds")
    assert (await t.put("/v1/databases/d", {"dsn": pg_dsn("x")})).status_code == 201
    assert (await t.put("/v1/targets/q", RABBIT)).status_code == 201
    relay = {"database": "d", "target": "q", "enabled": False, "partitions": 1}

    r = await t.put("/v1/relays/fast", {**relay, "policy": {"poll_interval_ms": 10}})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"] == "urn:outbox-relay:problem:out-of-bounds"
    assert (body["field"], body["limit"]) == ("policy.poll_interval_ms", 100)
    assert (await t.put("/v1/relays/fast", {**relay, "policy": {"poll_interval_ms": 100}})).status_code == 201

    r = await t.put("/v1/relays/wide", {**relay, "partitions": 257})
    assert r.status_code == 422 and (r.json()["field"], r.json()["limit"]) == ("partitions", 256)
    assert (await t.put("/v1/relays/wide", {**relay, "partitions": 256})).status_code == 201

    # a relay made before the bound was lowered keeps its partitions and can still be updated
    big = dataclasses.replace(strict_client.app.state.services.settings, max_relay_partitions=1024)
    async with AsyncTestClient(app=create_app(big)) as roomy:
        old = TenantClient(roomy, t.name, t.key)
        assert (await old.put("/v1/relays/old", {**relay, "partitions": 300})).status_code == 201
    assert (await t.put("/v1/relays/old", {**relay, "partitions": 300, "enabled": True})).status_code == 200


@pytest.fixture
def live_strict(settings: Settings) -> Iterator[LiveServer]:
    """The API under uvicorn with a failure limit of 5 a minute (uvicorn trusts X-Forwarded-For from
    127.0.0.1, so a test can speak for several client addresses)."""
    server = LiveServer(dataclasses.replace(settings, auth_failure_limit=5, auth_failure_window_s=60.0))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_concurrent_creations_cannot_both_take_the_last_unit(live_strict: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_strict.url, timeout=30) as http:
        name = f"race-{uuid.uuid4().hex[:8]}"
        quotas = {"databases": 3, "relays": 2, "partitions": 100}
        r = await http.put(f"/v1/tenants/{name}", json={"quotas": quotas}, headers=admin())
        assert r.status_code == 201, r.text
        key = (await http.post(f"/v1/tenants/{name}/api-keys", json={}, headers=admin())).json()["key"]
        auth = {"Authorization": f"Bearer {key}"}

        puts = [http.put(f"/v1/databases/d{i}", json={"dsn": pg_dsn("x")}, headers=auth) for i in range(12)]
        codes = sorted(r.status_code for r in await asyncio.gather(*puts))
        assert codes == [201] * 3 + [409] * 9
        created = (await http.get("/v1/databases", headers=auth)).json()["items"]
        assert len(created) == 3
        database = created[0]["name"]  # whichever three won the race (d0 need not be one of them)

        assert (await http.put("/v1/targets/q", json=RABBIT, headers=auth)).status_code == 201
        relays = [
            http.put(f"/v1/relays/r{i}", json={"database": database, "target": "q", "enabled": False}, headers=auth)
            for i in range(8)
        ]
        codes = sorted(r.status_code for r in await asyncio.gather(*relays))
        assert codes == [201] * 2 + [409] * 6
        use = (await http.get(f"/v1/tenants/{name}", headers=admin())).json()["quotas"]
        assert use["relays"]["used"] == 2 and use["partitions"]["used"] == 32


# --- failed authentications -------------------------------------------------------------------------


async def test_repeated_bad_keys_get_429_with_retry_after(live_strict: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_strict.url, timeout=30) as http:
        name = f"auth-{uuid.uuid4().hex[:8]}"
        assert (await http.put(f"/v1/tenants/{name}", json={}, headers=admin())).status_code == 201
        key = (await http.post(f"/v1/tenants/{name}/api-keys", json={}, headers=admin())).json()["key"]
        attacker = {"X-Forwarded-For": "198.51.100.7"}
        bystander = {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {key}"}

        # a missing key is not a guess: not counted
        for _ in range(10):
            assert (await http.get("/v1/relays", headers=attacker)).status_code == 401
        for i in range(5):
            r = await http.get("/v1/relays", headers={**attacker, "Authorization": f"Bearer orly_guess{i}"})
            assert r.status_code == 401
        r = await http.get("/v1/relays", headers={**attacker, "Authorization": "Bearer orly_guess5"})
        assert r.status_code == 429 and r.headers["content-type"].startswith("application/problem+json")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.json()["type"] == "urn:outbox-relay:problem:too-many-failed-authentications"
        # every authenticated route, even with a good key, until the window passes: no key is looked up
        for path in ("/v1/tenants", "/v1/dead-letters", "/v1/status"):
            r = await http.get(path, headers={**attacker, "Authorization": f"Bearer {key}"})
            assert r.status_code == 429, path
        # the sign-in form too
        page = await http.get("/ui/login", headers=attacker)
        token = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        r = await http.post("/ui/login", data={"key": key, "csrf": token}, headers=attacker, follow_redirects=False)
        assert r.status_code == 429 and "Too many failed sign-ins" in r.text and int(r.headers["retry-after"]) >= 1
        # another client is not affected; probes need no key
        assert (await http.get("/v1/relays", headers=bystander)).status_code == 200
        assert (await http.get("/healthz", headers=attacker)).status_code == 200


async def test_bad_keys_at_the_sign_in_form_count_too(live_strict: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_strict.url, timeout=30) as http:
        me = {"X-Forwarded-For": "192.0.2.44"}
        page = await http.get("/ui/login", headers=me)
        token = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        for i in range(5):
            r = await http.post("/ui/login", data={"key": f"orly_x{i}", "csrf": token}, headers=me)
            assert r.status_code == 401
        assert (await http.get("/v1/relays", headers={**me, "Authorization": "Bearer orly_y"})).status_code == 429


def _operations() -> list[tuple[str, str]]:
    """Every (method, path) of the committed spec that takes a key, path parameters filled in."""
    spec = msgspec.json.decode(COMMITTED.read_bytes())
    out = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if op.get("security") == []:
                continue
            concrete = path
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    value = "x" if param["schema"].get("type") == "string" and "format" not in param["schema"] else ""
                    concrete = concrete.replace("{" + param["name"] + "}", value or str(uuid.uuid4()))
            out.append((method.upper(), concrete))
    return out


async def test_a_wrong_or_revoked_key_is_401_on_every_route(client: AsyncTestClient[Any]) -> None:
    t = await make_tenant(client, "revoked")
    (key,) = (await client.get(f"/v1/tenants/{t.name}/api-keys", headers=admin())).json()
    assert (await client.delete(f"/v1/tenants/{t.name}/api-keys/{key['id']}", headers=admin())).status_code == 204
    operations = [*_operations(), ("GET", "/metrics")]
    assert len(operations) > 20
    answers: dict[str, set[tuple[str, str, int]]] = {"wrong": set(), "revoked": set()}
    for label, bad in (("wrong", "orly_not-a-key"), ("revoked", t.key)):
        for method, path in operations:
            r = await client.request(method, path, headers={"Authorization": f"Bearer {bad}"}, json={})
            answers[label].add((method, path, r.status_code))
            if r.status_code == 401:
                assert r.json()["type"] == "urn:outbox-relay:problem:unauthorized"
                assert r.headers["www-authenticate"].startswith("Bearer")
    for label, seen in answers.items():
        assert {code for _, _, code in seen} == {401}, f"{label} key: {sorted(x for x in seen if x[2] != 401)}"
    # the wrong kind of valid key is 403: a tenant key on the admin routes, the admin key on a tenant's
    other = await make_tenant(client, "kind")
    assert (await other.get("/v1/tenants")).status_code == 403
    assert (await client.get("/v1/relays", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).status_code == 403


async def test_keys_go_only_in_the_authorization_header(client: AsyncTestClient[Any], tenant: TenantClient) -> None:
    """``X-API-Key`` is not a way in: the spec documents Bearer alone, and every client here sends it."""
    r = await client.get("/v1/relays", headers={"X-API-Key": tenant.key})
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
    r = await client.get("/v1/tenants", headers={"X-API-Key": ADMIN_KEY})
    assert r.status_code == 401
    schemes = msgspec.json.decode(COMMITTED.read_bytes())["components"]["securitySchemes"]
    assert schemes == {"apiKey": {"type": "http", "scheme": "bearer", "description": schemes["apiKey"]["description"]}}
    assert (await tenant.get("/v1/relays")).status_code == 200
