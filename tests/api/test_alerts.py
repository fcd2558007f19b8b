"""Alert channels through the REST API: the signing secret write-only and never echoed (not even in a
refusal), bad input a 4xx naming what is wrong, a tenant's channels its own, the channel quota, and a
quota refusal recorded for the ``quota`` alert."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from service.app import create_app
from tests.harness.webhooks import new_secret
from tests.helpers import TenantClient, make_tenant

SECRET = new_secret(1)
ALERT = {"url": "http://127.0.0.1:9/alerts", "password": SECRET, "events": ["stall", "dead_letter"]}


async def test_alert_roundtrip_with_a_write_only_secret(tenant: TenantClient, control_dsn: str) -> None:
    r = await tenant.put("/v1/alerts/ops", ALERT)
    assert r.status_code == 201, r.text
    conn = await asyncpg.connect(control_dsn)
    try:  # at rest: the spec without the secret, the secret encrypted
        stored = await conn.fetchrow(
            "SELECT a.spec::text AS spec, a.secret FROM alerts a JOIN tenants t ON t.id = a.tenant_id "
            "WHERE t.name = $1 AND a.name = 'ops'",
            tenant.name,
        )
    finally:
        await conn.close()
    assert stored is not None and "password" not in stored["spec"] and SECRET.encode() not in bytes(stored["secret"])
    got = r.json()
    assert "password" not in got and got["password_set"] is True and SECRET not in r.text
    assert (got["url"], got["events"], got["relays"], got["stall_after_s"], got["period_s"]) == (
        ALERT["url"],
        ["stall", "dead_letter"],
        None,
        300,
        900,
    )
    again = (await tenant.get("/v1/alerts/ops")).json()
    assert again == got
    r = await tenant.put("/v1/alerts/ops", {**again, "relays": ["orders"], "stall_after_s": 5})  # keeps the secret
    assert r.status_code == 200 and r.json()["password_set"] is True and r.json()["relays"] == ["orders"]
    listed = await tenant.get("/v1/alerts")
    assert [a["name"] for a in listed.json()["items"]] == ["ops"] and SECRET not in listed.text
    r = await tenant.put("/v1/alerts/ops", {**again, "password": None})  # cleared: plain unsigned POSTs
    assert r.status_code == 200 and r.json()["password_set"] is False
    plain = await tenant.put("/v1/alerts/plain", {"url": "https://127.0.0.1/hook"})  # no secret at all
    assert plain.status_code == 201 and plain.json()["password_set"] is False
    assert plain.json()["events"] == ["stall", "dead_letter", "restore", "lease_lost", "quota"]
    assert (await tenant.delete("/v1/alerts/ops")).status_code == 204
    assert (await tenant.delete("/v1/alerts/ops")).status_code == 204  # idempotent
    assert (await tenant.get("/v1/alerts/ops")).status_code == 404


async def test_bad_alert_input_is_4xx_naming_the_field(tenant: TenantClient) -> None:
    cases = [
        ({"url": "ftp://127.0.0.1/x"}, 422, "http"),
        ({"url": "https://user:pw@127.0.0.1/x"}, 422, "password"),
        ({"url": "http://169.254.169.254/latest"}, 422, "denied"),
        ({"url": "not a url"}, 422, "url"),
        ({"password": "not-a-secret"}, 422, "whsec_"),
        ({"password": "whsec_!!!!"}, 422, "base64"),
        ({"password": "whsec_c2hvcnQ="}, 422, "24 to 64 bytes"),
        ({"events": ["stall", "fire"]}, 400, "events"),
        ({"events": []}, 400, "events"),
        ({"events": ["stall", "stall"]}, 422, "more than once"),
        ({"relays": ["Not A Name"]}, 400, "relays"),
        ({"relays": ["a", "a"]}, 422, "more than once"),
        ({"stall_after_s": 0}, 400, "stall_after_s"),
        ({"stall_after_s": 10**9}, 400, "stall_after_s"),
        ({"period_s": 0}, 400, "period_s"),
        ({"timeout_ms": 5}, 400, "timeout_ms"),
        ({"bogus": 1}, 400, "bogus"),
    ]
    for change, status, word in cases:
        r = await tenant.put("/v1/alerts/bad", {**ALERT, **change})
        assert r.status_code == status, (change, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert word in r.text, (change, r.text)
        assert SECRET not in r.text and "c2hvcnQ" not in r.text, r.text
    assert (await tenant.put("/v1/alerts/Bad_Name", ALERT)).status_code == 400
    assert (await tenant.get("/v1/alerts/bad")).status_code == 404


async def test_another_tenants_alert_is_not_found(client: AsyncTestClient[Any], tenant: TenantClient) -> None:
    assert (await tenant.put("/v1/alerts/mine", ALERT)).status_code == 201
    other = await make_tenant(client, "other")
    assert (await other.get("/v1/alerts/mine")).status_code == 404
    assert (await other.get("/v1/alerts")).json()["items"] == []
    assert (await other.delete("/v1/alerts/mine")).status_code == 204  # nothing of its own to delete
    assert (await tenant.get("/v1/alerts/mine")).status_code == 200  # still there
    r = await other.put("/v1/alerts/mine", {"url": "http://127.0.0.1:9/theirs"})  # its own, of the same name
    assert r.status_code == 201
    assert (await tenant.get("/v1/alerts/mine")).json()["url"] == ALERT["url"]


@pytest.fixture
async def strict_client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """An app whose network policy denies private and loopback addresses, with two channels a tenant."""
    strict = dataclasses.replace(settings, allow_private_networks=False, alert_channels_per_tenant=2)
    async with AsyncTestClient(app=create_app(strict)) as c:
        yield c


async def test_policy_quota_and_refusal_record(strict_client: AsyncTestClient[Any], control_dsn: str) -> None:
    t = await make_tenant(strict_client, "alert-strict")
    for url in ("http://127.0.0.1:9/x", "http://10.1.2.3/x", "https://localhost/x"):
        r = await t.put("/v1/alerts/private", {"url": url})
        assert r.status_code == 422 and "not allowed" in r.text, (url, r.text)
    for name in ("a", "b"):
        assert (await t.put(f"/v1/alerts/{name}", {"url": "https://93.184.216.34/hook"})).status_code == 201
    r = await t.put("/v1/alerts/c", {"url": "https://93.184.216.34/hook"})
    assert r.status_code == 409 and r.json()["quota"] == "alerts" and r.json()["limit"] == 2, r.text
    conn = await asyncpg.connect(control_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT q.quota, q.count FROM quota_refusals q JOIN tenants t ON t.id = q.tenant_id WHERE t.name = $1",
            t.name,
        )
        audit = await conn.fetch(
            "SELECT a.action, a.resource FROM audit_log a JOIN tenants t ON t.id = a.tenant_id "
            "WHERE t.name = $1 AND a.resource LIKE 'alerts/%' ORDER BY a.id",
            t.name,
        )
    finally:
        await conn.close()
    assert row is not None and (row["quota"], row["count"]) == ("alerts", 1)
    assert [(a["action"], a["resource"]) for a in audit] == [("create", "alerts/a"), ("create", "alerts/b")]
