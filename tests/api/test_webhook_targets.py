"""Webhook targets through the REST API: the signing secrets write-only and never echoed (not even in
a refusal), the URL and every bound checked with a 4xx naming the field."""

from __future__ import annotations

from tests.harness.webhooks import new_secret
from tests.helpers import TenantClient

SECRET, NEXT = new_secret(1), new_secret(2)
HOOK = {"kind": "webhook", "url": "http://127.0.0.1:9/hooks", "password": SECRET}


async def test_webhook_roundtrip_with_write_only_secrets(tenant: TenantClient) -> None:
    r = await tenant.put("/v1/targets/hook", HOOK)
    assert r.status_code == 201, r.text
    got = r.json()
    assert "password" not in got and got["password_set"] is True and SECRET not in r.text
    assert got["kind"] == "webhook" and got["url"] == HOOK["url"]
    assert (got["content_type"], got["max_concurrent_requests"], got["connect_timeout_ms"]) == (
        "application/json",
        16,
        5000,
    )
    again = (await tenant.get("/v1/targets/hook")).json()
    assert again == got
    r = await tenant.put("/v1/targets/hook", again)  # GET -> PUT keeps the stored secret
    assert r.status_code == 200 and r.json()["password_set"] is True
    r = await tenant.put("/v1/targets/hook", {**HOOK, "password": f"{NEXT} {SECRET}"})  # a rotation
    assert r.status_code == 200 and SECRET not in r.text and NEXT not in r.text
    listed = (await tenant.get("/v1/targets")).json()["items"]
    assert [t["name"] for t in listed if t["kind"] == "webhook"] == ["hook"]
    assert SECRET not in str(listed)


async def test_bad_webhook_input_is_4xx_naming_the_field(tenant: TenantClient) -> None:
    cases = [
        ({"url": "ftp://127.0.0.1/x"}, 422, "http"),
        ({"url": "https://user@127.0.0.1/x"}, 422, "user"),
        ({"url": "https://user:pw@127.0.0.1/x"}, 422, "password"),
        ({"url": "https://127.0.0.1/x#frag"}, 422, "fragment"),
        ({"url": "https://127.0.0.1:99999/x"}, 422, "port"),
        ({"url": "https://127.0.0.1/a b"}, 422, "spaces"),
        ({"url": "http://169.254.169.254/latest"}, 422, "denied"),
        ({"password": None}, 422, "signing secret"),
        ({"password": "__omitted__"}, 422, "signing secret"),  # a new webhook target, no secret to keep
        ({"password": "not-a-secret"}, 422, "whsec_"),
        ({"password": "whsec_!!!!"}, 422, "base64"),
        ({"password": "whsec_c2hvcnQ="}, 422, "24 to 64 bytes"),
        ({"password": f"{SECRET} {NEXT} {new_secret(3)}"}, 422, "two"),
        ({"password": f"{SECRET} {SECRET}"}, 422, "differ"),
        ({"max_concurrent_requests": 0}, 400, "max_concurrent_requests"),
        ({"max_concurrent_requests": 257}, 400, "max_concurrent_requests"),
        ({"connect_timeout_ms": 10}, 400, "connect_timeout_ms"),
        ({"timeout_ms": 500_000}, 400, "timeout_ms"),
        ({"content_type": ""}, 400, "content_type"),
        ({"content_type": "text/plain\r\nx-evil: 1"}, 422, "control"),
        ({"bogus": 1}, 400, "bogus"),
    ]
    for change, status, word in cases:
        body = {k: v for k, v in {**HOOK, **change}.items() if v != "__omitted__"}
        r = await tenant.put("/v1/targets/bad-hook", body)
        assert r.status_code == status, (change, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert word in r.text, (change, r.text)
        assert SECRET not in r.text and "c2hvcnQ" not in r.text, r.text
    assert (await tenant.get("/v1/targets/bad-hook")).status_code == 404
