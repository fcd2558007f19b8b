"""Alerts end to end, through a real worker process: a relay whose target's port is closed stalls
(``target_unreachable``) for longer than the channel's ``stall_after_s``, and one signed alert arrives
with the cause as the status shows it; the receiver is down at first (503), so the alert is sent again
at the next evaluation, arrives once taken and never again within the period however many
evaluations follow; a message the target refuses to the end is a ``dead_letter`` alert naming the
dead letter and its error, and a second one inside the period is none."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.alerts import SETTLE_S
from outbox_relay.client import add
from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.webhooks import Answer, WebhookReceiver, new_secret
from tests.helpers import TenantClient, make_tenant
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

DEADLINE_S = 90
FAST = {"batch_size": 50, "poll_interval_ms": 100, "backoff_base_ms": 50, "backoff_max_ms": 500}
ALERT_SECRET = new_secret(31)


@pytest.fixture
async def alerts() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver([ALERT_SECRET], path="/alerts") as receiver:
        yield receiver


async def until(check: Callable[[], Any], what: str, workers: WorkerPool) -> Any:
    """Poll ``check`` (sync or async) until truthy (returned); fail with the workers' logs at the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}\n{workers.logs()}"
        await asyncio.sleep(0.1)


def closed_port() -> int:
    """A local port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def evaluations(control_dsn: str) -> int:
    conn = await asyncpg.connect(control_dsn)
    try:
        return int(await conn.fetchval("SELECT evaluations FROM alert_marks"))
    finally:
        await conn.close()


async def set_up(t: TenantClient, databases: DatabaseFactory, label: str, url: str, policy: dict[str, Any]) -> str:
    dsn = pg_dsn(await databases.create(f"alert_{label}"))
    assert (await t.put("/v1/databases/app", {"dsn": dsn})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "webhook", "url": url, "password": new_secret(32), "timeout_ms": 2000}
    assert (await t.put("/v1/targets/hook", target)).status_code == 201
    relay = {"database": "app", "target": "hook", "partitions": 1, "policy": policy}
    r = await t.put("/v1/relays/orders", relay)
    assert r.status_code == 201, r.text
    return dsn


async def write(dsn: str, topic: str, key: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await add(conn, topic, key, {"key": key}))
    finally:
        await conn.close()


def bodies(receiver: WebhookReceiver, kind: str) -> list[dict[str, Any]]:
    return [json.loads(d.payload) for d in receiver.deliveries[f"alert/{kind}"]]


async def test_a_stalled_relay_sends_one_signed_alert_per_period(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    alerts: WebhookReceiver,
    worker_pool: WorkerPool,
    control_dsn: str,
) -> None:
    t = await make_tenant(client, "alert-stall")
    dsn = await set_up(t, databases, "stall", f"http://127.0.0.1:{closed_port()}/hooks", FAST)
    channel = {"url": alerts.url, "password": ALERT_SECRET, "events": ["stall"], "stall_after_s": 2, "period_s": 3600}
    assert (await t.put("/v1/alerts/ops", channel)).status_code == 201
    alerts.outage = Answer(503, body=b"down for a moment")  # the first attempt is not taken
    worker_pool.start(alert_interval_s=0.5)
    await write(dsn, "orders", "a")  # a row waits: the relay tries the closed port

    await until(lambda: alerts.refused[503] >= 1, "the alert was tried on the receiver while it was down", worker_pool)
    assert bodies(alerts, "stall") == []
    alerts.outage = None
    [alert] = await until(lambda: bodies(alerts, "stall"), "the stall alert arrived once taken", worker_pool)
    print("stall alert:", json.dumps(alert, indent=2))

    assert alerts.bad_signatures == 0 and alerts.deliveries["alert/stall"][0].signatures == 1
    assert alerts.deliveries["alert/stall"][0].webhook_id == alert["id"]
    assert (alert["event"], alert["tenant"], alert["relay"], alert["state"]) == ("stall", t.name, "orders", "failing")
    status = (await t.get("/v1/relays/orders/status")).json()
    assert alert["cause"]["kind"] == status["cause"]["kind"] == "target_unreachable", (alert, status)
    assert alert["cause"]["partition"] == 0 and "webhook at http://127.0.0.1" in alert["cause"]["detail"]
    assert alert["details"]["stalled_for_s"] >= 2 and "has been failing (target_unreachable)" in alert["summary"]
    first, last, raised = (datetime.fromisoformat(alert[f]) for f in ("first_seen", "last_seen", "raised_at"))
    assert first < last == raised

    # more evaluations inside the period (the relay still stalled): nothing more is sent
    seen = await evaluations(control_dsn)
    await until(lambda: _more(control_dsn, seen + 3), "three more evaluations ran", worker_pool)
    assert len(bodies(alerts, "stall")) == 1 and alerts.refused[503] >= 1
    assert (await t.get("/v1/relays/orders/status")).json()["cause"]["kind"] == "target_unreachable"


async def _more(control_dsn: str, at_least: int) -> bool:
    return await evaluations(control_dsn) >= at_least


async def test_a_dead_letter_sends_a_dead_letter_alert(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    alerts: WebhookReceiver,
    worker_pool: WorkerPool,
    control_dsn: str,
) -> None:
    t = await make_tenant(client, "alert-dead")
    async with WebhookReceiver([new_secret(32)]) as target:
        target.answers["poison"] = Answer(400, body=b"unknown order")
        dsn = await set_up(t, databases, "dead", target.url, {**FAST, "max_attempts": 2})
        channel = {"url": alerts.url, "password": ALERT_SECRET, "events": ["dead_letter"]}
        assert (await t.put("/v1/alerts/letters", channel)).status_code == 201
        worker_pool.start(alert_interval_s=0.5)
        message_id = await write(dsn, "poison", "p")

        [alert] = await until(lambda: bodies(alerts, "dead_letter"), "the dead-letter alert arrived", worker_pool)
        print("dead-letter alert:", json.dumps(alert, indent=2))
        [letter] = (await t.get("/v1/dead-letters")).json()["items"]
        assert (alert["event"], alert["tenant"], alert["relay"]) == ("dead_letter", t.name, "orders")
        assert alert["details"]["count"] == 1 and alert["details"]["newest"]["id"] == letter["id"]
        assert alert["details"]["newest"]["error_class"] == "refused"
        assert "400" in alert["details"]["newest"]["error"] and "unknown order" in alert["summary"]
        assert alert["details"]["newest"]["message_id"] == message_id
        assert bodies(alerts, "stall") == []  # not subscribed

        # a second dead letter inside the period (900 s by default): no second alert
        await write(dsn, "poison", "q")

        async def two_letters() -> bool:
            return len((await t.get("/v1/dead-letters")).json()["items"]) == 2

        await until(two_letters, "the second message was dead-lettered", worker_pool)
        await until(lambda: _read_past_letters(control_dsn, t.name), "an evaluation read past it", worker_pool)
        seen = await evaluations(control_dsn)
        await until(lambda: _more(control_dsn, seen + 2), "two more evaluations ran (and sent)", worker_pool)
        assert len(bodies(alerts, "dead_letter")) == 1


async def _read_past_letters(control_dsn: str, tenant: str) -> bool:
    """Whether an evaluation's window (a settle behind its time) has passed the tenant's newest dead letter."""
    conn = await asyncpg.connect(control_dsn)
    try:
        return bool(
            await conn.fetchval(
                "SELECT m.evaluated_at - make_interval(secs => $2) >= max(d.created_at) FROM alert_marks m, "
                "dead_letters d JOIN tenants t ON t.id = d.tenant_id WHERE t.name = $1 GROUP BY m.evaluated_at",
                tenant,
                SETTLE_S,
            )
        )
    finally:
        await conn.close()
