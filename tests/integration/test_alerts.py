"""The alert evaluation in-process against the run's control DB: a quota refusal, lost leases and a
detected restore become ``quota``, ``lease_lost`` and ``restore`` alerts on the tenant's channels
(signed, or unsigned without a secret) and the operator's, never on another tenant's; a second
evaluation inside the period sends nothing more; an alert an endpoint refused is sent again, the same
id, once it takes it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.alerts import AlertEvaluator
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store import alerts as alerts_db
from outbox_relay.store.control import ControlStore
from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.webhooks import Answer, WebhookReceiver, new_secret
from tests.helpers import admin, make_tenant

TENANT_SECRET, OPERATOR_SECRET = new_secret(41), new_secret(42)


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[WebhookReceiver, WebhookReceiver, WebhookReceiver]]:
    async with (
        WebhookReceiver([TENANT_SECRET], path="/signed") as signed,
        WebhookReceiver([], path="/plain") as plain,
        WebhookReceiver([OPERATOR_SECRET], path="/operator") as operator,
    ):
        yield signed, plain, operator


def alerts_of(receiver: WebhookReceiver, tenant: str) -> list[dict[str, Any]]:
    return [b for b in (json.loads(d.payload) for d in receiver.all) if b["tenant"] == tenant]


async def test_quota_and_lease_lost_alerts(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    settings: Settings,
    store: ControlStore,
    receivers: tuple[WebhookReceiver, WebhookReceiver, WebhookReceiver],
) -> None:
    signed, plain, operator = receivers
    t = await make_tenant(client, "alerting")
    other = await make_tenant(client, "bystander")
    dsn = pg_dsn(await databases.create("alerting"))
    assert (await t.put("/v1/databases/app", {"dsn": dsn})).status_code == 201
    assert (
        await t.put("/v1/targets/q", {"kind": "redis_streams", "url": "redis://127.0.0.1:6379/0"})
    ).status_code == 201
    assert (await t.put("/v1/relays/orders", {"database": "app", "target": "q", "partitions": 2})).status_code == 201
    channel = {
        "url": signed.url,
        "password": TENANT_SECRET,
        "events": ["quota", "lease_lost", "restore"],
        "period_s": 3600,
    }
    assert (await t.put("/v1/alerts/signed", channel)).status_code == 201
    assert (await t.put("/v1/alerts/plain", {"url": plain.url, "events": ["quota"]})).status_code == 201
    assert (await other.put("/v1/alerts/theirs", {"url": signed.url, "password": TENANT_SECRET})).status_code == 201

    # a quota refuses a request of the tenant (recorded after the answer)
    r = await client.put(
        f"/v1/tenants/{t.name}", json={"display_name": t.name, "quotas": {"targets": 1}}, headers=admin()
    )
    assert r.status_code == 200, r.text
    refused = await t.put("/v1/targets/more", {"kind": "redis_streams", "url": "redis://127.0.0.1:6379/0"})
    assert refused.status_code == 409
    # workers lost the relay's leases three times (the threshold)
    relay_id = (await store.get_resource("relays", (await store.get_tenant(t.name)).id, "orders")).id  # type: ignore[union-attr]
    for partition in (0, 1, 0):
        await alerts_db.record_lease_losses(store.pool, [(relay_id, partition)])

    # a partition detects a restore of the database (the store's own write, as the engine makes it)
    lease = await store.acquire_lease(relay_id, 1, "test-holder", 10)
    assert lease is not None
    started = await store.start_restore(
        lease, "7000000000000000001", "system identifier changed", policy="skip", next_xid=1, max_id=9,
        max_created_at=datetime.now(UTC), rows=5,
    )  # fmt: skip
    assert started is not None
    await store.release_lease(lease)

    fast = dataclasses.replace(
        settings, alert_interval_s=0.2, alert_operator_url=operator.url, alert_operator_secret=OPERATOR_SECRET
    )
    evaluator = AlertEvaluator(
        settings=fast,
        store=store,
        secrets=SecretBox(settings.secret_keys),
        policy=AddressPolicy(allow_private=True),
        settle_s=0,  # read what this test just wrote at once
    )
    plain.outage = Answer(503)  # the unsigned channel is down for the first send
    await asyncio.sleep(0.2)  # the interval since any evaluation before this test
    assert await evaluator.evaluate() >= 5
    await evaluator.send()

    kinds = sorted(a["event"] for a in alerts_of(signed, t.name))
    assert kinds == ["lease_lost", "quota", "restore"], alerts_of(signed, t.name)
    [restore] = [a for a in alerts_of(signed, t.name) if a["event"] == "restore"]
    assert restore["relay"] == "orders" and restore["details"] == {"partitions": 1, "rows": 5, "policy": "skip"}
    assert restore["cause"] is None and "restore (or failover)" in restore["summary"]
    assert signed.bad_signatures == 0 and {d.signatures for d in signed.all} == {1}
    [quota] = [a for a in alerts_of(signed, t.name) if a["event"] == "quota"]
    assert quota["relay"] is None and quota["details"]["quota"] == "targets" and quota["details"]["count"] == 1
    assert "refused by its targets quota" in quota["summary"]
    [lost] = [a for a in alerts_of(signed, t.name) if a["event"] == "lease_lost"]
    assert lost["relay"] == "orders" and lost["details"]["count"] == 3 and lost["details"]["partitions"] == 2
    assert alerts_of(signed, other.name) == []  # the bystander's channel hears nothing of this tenant
    assert sorted(a["event"] for a in alerts_of(operator, t.name)) == ["lease_lost", "quota", "restore"]
    assert operator.bad_signatures == 0
    assert plain.refused[503] == 1 and plain.all == []
    [owed] = (await t.get("/v1/alerts/plain/deliveries")).json()["items"]  # not taken: it says why
    assert (owed["event"], owed["sent_at"], owed["attempts"]) == ("quota", None, 1) and "503" in owed["last_error"]
    assert (await other.get("/v1/alerts/plain/deliveries")).status_code == 404  # not the bystander's

    # the next evaluation, inside the period: nothing new; the unsigned channel's alert is sent again
    plain.outage = None
    await asyncio.sleep(0.2)
    await evaluator.evaluate()
    await evaluator.send()
    assert len(alerts_of(signed, t.name)) == 3 and len(alerts_of(operator, t.name)) == 3
    [unsigned] = alerts_of(plain, t.name)
    assert unsigned["event"] == "quota" and plain.all[0].signatures == 0 and plain.bad_signatures == 0
    assert plain.all[0].webhook_id == unsigned["id"]
    await asyncio.sleep(0.2)
    await evaluator.evaluate()
    await evaluator.send()
    assert len(alerts_of(plain, t.name)) == 1  # taken: never sent again
    [taken] = (await t.get("/v1/alerts/plain/deliveries")).json()["items"]
    assert taken["id"] == owed["id"] == unsigned["id"] and taken["sent_at"] and taken["attempts"] == 2
    assert taken["last_error"] is None
    signed_log = (await t.get("/v1/alerts/signed/deliveries")).json()["items"]
    assert sorted(d["event"] for d in signed_log) == ["lease_lost", "quota", "restore"]
    assert all(d["sent_at"] and d["attempts"] == 1 for d in signed_log)
    # the relay stays in a restore on a database without an outbox: a fleet engine of a later test
    # (every test shares the control DB) would run it as another tenant's active relay
    for name in (t.name, other.name):
        assert (await client.delete(f"/v1/tenants/{name}", headers=admin())).status_code == 204
