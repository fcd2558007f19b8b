"""The dashboard's relay pages: health, the cause of a stall, pause and resume.

A real worker process runs two relays of one tenant that cannot move: one publishes to a Redis target
on a port where nothing listens (``target_unreachable``), the other to a RabbitMQ routing key no
queue is bound to, retried without end (``poison_message``). A person in Chromium sees each relay's
state, the cause with its details and the partitions' owners, pauses one (the API then reads
``enabled: false``) and resumes it. Over plain HTTP: no tenant sees or reaches another's relays, the
forms need the session's CSRF token, the API's checks and audit apply, the admin key sees none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from playwright.async_api import Browser, Dialog, Page, async_playwright, expect

from outbox_relay.config import Settings
from outbox_relay.store.control import PartitionState
from service.app import create_app
from service.relays.status import relay_status
from service.ui.forms import duration
from service.ui.relays import CAUSE_LABELS
from service.ui.responses import ui_template_config
from tests.conftest import RUN_ID, DatabaseFactory, LiveServer, pg_dsn
from tests.e2e.test_dashboard import CHROMIUM_ARGS, SHOTS, sign_in, ui_login
from tests.faults import PgCluster
from tests.harness.brokers import RabbitMQAccount, free_port
from tests.helpers import ADMIN_KEY, TenantClient, make_tenant
from tests.integration.conftest import write
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

STALLED_SHOT = Path("/tmp/dash-stalled.png")
TARGET_PASSWORD = "never-shown-7f3a"


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


async def enabled(t: TenantClient, relay: str) -> bool:
    r = await t.get(f"/v1/relays/{relay}")
    assert r.status_code == 200, r.text
    value: bool = r.json()["enabled"]
    return value


async def status_until(
    t: TenantClient, relay: str, kind: str, worker_pool: WorkerPool, *, sampled: bool = True
) -> dict[str, Any]:
    """The relay's status once its cause is ``kind``, its partitions owned and (``sampled``) its
    backlog sampled (the worker needs a few slices to get there)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    s: dict[str, Any] = {}
    while loop.time() < deadline:
        s = (await t.get(f"/v1/relays/{relay}/status")).json()
        owned = all(p["lease_holder"] for p in s["partitions"])
        if (s.get("cause") or {}).get("kind") == kind and owned and (s["pending"] >= 1 or not sampled):
            return s
        await asyncio.sleep(0.2)
    raise AssertionError(f"relay {relay} never showed {kind}: {s}\n{worker_pool.logs()}")


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    live = LiveServer(settings)
    live.start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
async def page(chromium_path: str) -> AsyncIterator[Page]:
    async with async_playwright() as p:
        browser: Browser = await p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        context = await browser.new_context(
            timezone_id="Asia/Kolkata", locale="en-US", viewport={"width": 1440, "height": 1000}
        )
        pg = await context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        yield pg
        await context.close()
        await browser.close()
        assert not errors, f"JavaScript errors in the page: {errors}"


@pytest.fixture(scope="module")
def chromium_path() -> str:
    from tests.e2e.test_dashboard import CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.fail(f"no browser at {CHROMIUM}: `make browser` installs Debian's chromium")
    return CHROMIUM


async def test_relays_page_shows_the_stall_and_pauses_and_resumes(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    rabbitmq: RabbitMQAccount,
    worker_pool: WorkerPool,
    server: LiveServer,
    page: Page,
) -> None:
    t = await make_tenant(client, "ui-relays")
    db = await databases.create("ui_relays")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(db)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    dead_port = free_port()  # nothing listens there
    dead = {
        "kind": "redis_streams",
        "url": f"redis://relay@127.0.0.1:{dead_port}/0",
        "password": TARGET_PASSWORD,
        "timeout_ms": 500,
    }
    assert (await t.put("/v1/targets/cache", dead)).status_code == 201
    rabbit = {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password, "timeout_ms": 2000}
    assert (await t.put("/v1/targets/rabbit", rabbit)).status_code == 201
    policy = {"max_attempts": 1000, "backoff_base_ms": 20, "backoff_max_ms": 200, "poll_interval_ms": 50}
    for name, target, mapping in (("orders", "cache", {"*": "orders"}), ("billing", "rabbit", {"*": "nowhere"})):
        body = {"database": "app", "target": target, "partitions": 1, "topic_mapping": mapping, "policy": policy}
        assert (await t.put(f"/v1/relays/{name}", body)).status_code == 201
    (outbox_id,) = await write(pg_dsn(db), ("invoices", "inv-1", b'{"invoice": 1}'))

    worker = worker_pool.start()
    try:
        orders = await status_until(t, "orders", "target_unreachable", worker_pool)
        billing = await status_until(t, "billing", "poison_message", worker_pool)
        assert orders["state"] == "failing" and billing["state"] == "stalled"
        owner = orders["partitions"][0]["lease_holder"]

        # --- the list: both relays with their state and cause
        base = server.url
        await sign_in(page, base, t.key)
        await page.get_by_role("link", name="Relays", exact=True).click()
        await expect(page).to_have_url(re.compile(r"/ui/relays$"))
        await expect(page.locator("nav a[aria-current=page]")).to_have_text("Relays")
        cards = page.locator("section.relay")
        await expect(cards).to_have_count(2)
        billing_card = page.locator("#relay-billing")
        await expect(billing_card.locator("[data-field=state]")).to_have_text("stalled")
        await expect(billing_card.locator("[data-cause]")).to_contain_text("Poison message")
        await expect(billing_card.locator("[data-field=outbox_id]")).to_have_text(str(outbox_id))
        attempts = int((await billing_card.locator("[data-field=attempts]").inner_text()).replace(",", ""))
        assert attempts >= 1
        # the detail counts the attempts up while it retries: its stable part
        assert "unroutable" in billing["cause"]["detail"]
        await expect(billing_card.locator(".cause-detail")).to_contain_text(f"outbox message {outbox_id} refused")
        await expect(billing_card.locator(".cause-detail")).to_contain_text("unroutable")
        SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SHOTS / "09-relays.png"), full_page=True)

        # --- the stalled relay's own page: cause, its detail, the partition's owner
        await page.get_by_role("link", name="orders", exact=True).click()
        await expect(page).to_have_url(re.compile(r"/ui/relays/orders$"))
        card = page.locator("#relay-orders")
        await expect(card.locator("h1")).to_have_text("Relay orders")
        await expect(card.locator("[data-field=state]")).to_have_text("failing")
        cause = card.locator("[data-cause=target_unreachable]")
        await expect(cause).to_contain_text("Target unreachable")
        await expect(cause).to_contain_text("on partition 0")
        await expect(cause.locator(".cause-detail")).to_have_text(orders["cause"]["detail"])
        await expect(card.locator("[data-field=pending]")).to_contain_text("1 as last sampled")
        await expect(card.locator("[data-field=lag]")).to_contain_text("oldest waiting for")
        await expect(card.locator("tr[data-partition='0'] [data-field=owner]")).to_contain_text(owner)
        await expect(card.locator("tr[data-partition='0']")).to_contain_text("target_unavailable")
        assert TARGET_PASSWORD not in await page.content()
        STALLED_SHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(STALLED_SHOT), full_page=True)
        await page.screenshot(path=str(SHOTS / "10-relay-stalled.png"), full_page=True)

        # --- pause (it asks first), read back through the API, resume
        asked: list[str] = []

        async def accept(dialog: Dialog) -> None:
            asked.append(dialog.message)
            await dialog.accept()

        page.on("dialog", accept)
        await card.get_by_role("button", name="Pause").click()
        await expect(page.locator(".flash-notice")).to_contain_text("Paused relay 'orders'")
        assert asked and "Pause relay orders?" in asked[0]
        await expect(page).to_have_url(re.compile(r"/ui/relays/orders$"))
        await expect(card.locator("[data-field=state]")).to_have_text("paused")
        await expect(card.locator("[data-cause]")).to_have_count(0)
        assert await enabled(t, "orders") is False
        assert await enabled(t, "billing") is True
        await page.screenshot(path=str(SHOTS / "11-relay-paused.png"), full_page=True)

        await card.get_by_role("button", name="Resume").click()
        await expect(page.locator(".flash-notice")).to_contain_text("Resumed relay 'orders'")
        await expect(card.get_by_role("button", name="Pause")).to_be_visible()
        assert await enabled(t, "orders") is True
    finally:
        worker.stop()
    for name in ("orders", "billing"):  # later tests' workers need not run these
        assert (await t.delete(f"/v1/relays/{name}")).status_code == 204


async def test_relays_page_shows_a_long_running_transaction(
    client: AsyncTestClient[Any],
    rabbitmq: RabbitMQAccount,
    worker_pool: WorkerPool,
    server: LiveServer,
    page: Page,
) -> None:
    """A transaction held open in the tenant database stalls the relay (a real worker sees it); the
    page names its pid, age and database. The tenant database lives in a PostgreSQL cluster of this
    test's own: the xmin horizon is server-wide, and holding the shared server's would stall every
    other relay on it."""
    cluster = PgCluster(f"orly_dash_{RUN_ID}").create()
    try:
        admin_conn = await asyncpg.connect(cluster.dsn())
        await admin_conn.execute("CREATE DATABASE held_app")
        await admin_conn.close()
        dsn = cluster.dsn("held_app")
        t = await make_tenant(client, "ui-held")
        assert (await t.put("/v1/databases/app", {"dsn": dsn})).status_code == 201
        assert (await t.post("/v1/databases/app/provision")).status_code == 200
        rabbit = {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password, "timeout_ms": 2000}
        assert (await t.put("/v1/targets/rabbit", rabbit)).status_code == 201
        amqp = await aio_pika.connect(rabbitmq.admin_url)
        channel = await amqp.channel()
        await channel.declare_queue("ui-held-q", durable=True)
        body = {"database": "app", "target": "rabbit", "partitions": 1, "topic_mapping": {"*": "ui-held-q"}}
        assert (await t.put("/v1/relays/ledger", {**body, "policy": {"poll_interval_ms": 50}})).status_code == 201
        await write(dsn, ("entries", "e-1", b"before"))
        worker_pool.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (await t.get("/v1/relays/ledger/status")).json()["published"] < 1:
            assert loop.time() < deadline, worker_pool.logs()
            await asyncio.sleep(0.2)

        holder = await asyncpg.connect(dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.fetchval("SELECT pg_current_xact_id()")  # takes a transaction id, as any write would
            await write(dsn, ("entries", "e-2", b"behind the horizon"))
            # (the backlog sample counts only rows below the horizon: the one waiting behind it is not in it)
            s = await status_until(t, "ledger", "long_running_transaction", worker_pool, sampled=False)
            assert s["state"] == "stalled" and s["cause"]["pid"] == holder.get_server_pid()
            # the row behind the horizon is not counted, but its lag is sampled (it was shown as none)
            assert s["partitions"][0]["lag_s"] > 0 and s["oldest_pending_age_s"] is not None, s

            await sign_in(page, server.url, t.key)
            await page.goto(f"{server.url}/ui/relays/ledger")
            card = page.locator("#relay-ledger")
            await expect(card.locator("[data-field=state]")).to_have_text("stalled")
            cause = card.locator("[data-cause=long_running_transaction]")
            await expect(cause).to_contain_text("Long-running transaction")
            await expect(cause.locator("[data-field=pid]")).to_have_text(str(holder.get_server_pid()))
            await expect(cause.locator("[data-field=database]")).to_have_text("held_app")
            await expect(cause.locator("[data-field=age]")).to_have_text(re.compile(r"^\d+ (s|min)"))
            await expect(cause.locator(".cause-detail")).to_contain_text("holds the server-wide xmin horizon")
            await expect(cause).to_contain_text(f"pg_terminate_backend({holder.get_server_pid()})")
            await expect(card.locator("[data-field=lag]")).to_contain_text("oldest waiting for")
            SHOTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SHOTS / "12-relay-long-transaction.png"), full_page=True)
            await tx.rollback()
        finally:
            await holder.close()

        # the transaction ended: the relay moves on, and the page says so
        deadline = loop.time() + 60
        while (await t.get("/v1/relays/ledger/status")).json()["published"] < 2:
            assert loop.time() < deadline, worker_pool.logs()
            await asyncio.sleep(0.2)
        await page.reload()
        await expect(card.locator("[data-cause]")).to_have_count(0)
        await expect(card.locator("[data-field=published]")).to_have_text("2")
        worker_pool.stop_all()
        assert (await t.delete("/v1/relays/ledger")).status_code == 204
        await amqp.close()
    finally:
        worker_pool.stop_all()
        cluster.drop()


async def two_tenants_with_a_relay_each(client: AsyncTestClient[Any]) -> tuple[TenantClient, TenantClient]:
    """Tenants whose relays share the name ``shop``, A's with a second one and a target named apart."""
    out = []
    for prefix in ("ui-rel-a", "ui-rel-b"):
        t = await make_tenant(client, prefix)
        assert (await t.put("/v1/databases/app", {"dsn": pg_dsn("postgres")})).status_code == 201
        target = {"kind": "redis_streams", "url": f"redis://127.0.0.1:{free_port()}/0"}
        assert (await t.put(f"/v1/targets/{prefix}-target", target)).status_code == 201
        names = ("shop", "a-secret-relay") if prefix == "ui-rel-a" else ("shop",)
        for name in names:
            body = {"database": "app", "target": f"{prefix}-target", "partitions": 2, "enabled": False}
            assert (await t.put(f"/v1/relays/{name}", body)).status_code == 201, name
        out.append(t)
    return out[0], out[1]


async def test_relays_pages_keep_tenants_apart_and_need_the_csrf_token(
    client: AsyncTestClient[Any], settings: Settings, control_dsn: str
) -> None:
    a, b = await two_tenants_with_a_relay_each(client)
    async with AsyncTestClient(app=create_app(settings)) as browser:
        r = await browser.get("/ui/relays", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fui%2Frelays"
        await ui_login(browser, b.key)

        page = await browser.get("/ui/relays")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert 'id="relay-shop"' in page.text and "ui-rel-b-target" in page.text
        assert "a-secret-relay" not in page.text and "ui-rel-a-target" not in page.text
        assert page.text.count('class="card relay"') == 1
        assert page.text.count("<tr data-partition=") == 2
        csrf = csrf_of(page.text)

        # A's relay is not there for B, by page or by form
        r = await browser.get("/ui/relays/a-secret-relay")
        assert r.status_code == 404 and "not found" in r.text
        r = await browser.post("/ui/relays/a-secret-relay/resume", data={"csrf": csrf}, follow_redirects=False)
        assert r.status_code == 303
        shown = await browser.get(r.headers["location"])
        assert "Not resumed: relay &#39;a-secret-relay&#39; not found" in shown.text
        assert await enabled(a, "a-secret-relay") is False

        # B resumes its own "shop": A's "shop" stays paused
        r = await browser.post("/ui/relays/shop/resume", data={"csrf": csrf}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/relays"
        assert await enabled(b, "shop") is True and await enabled(a, "shop") is False
        again = await browser.post("/ui/relays/shop/resume", data={"csrf": csrf})
        assert "Relay &#39;shop&#39; was not paused." in again.text

        # no form without the session's token; a bad name or back link is refused, not a 500
        for data in ({}, {"csrf": "forged"}):
            r = await browser.post("/ui/relays/shop/pause", data=data, follow_redirects=False)
            assert r.status_code == 403 and "expired" in r.text
        assert await enabled(b, "shop") is True
        assert (await browser.get("/ui/relays/Not%20A%20Name")).status_code == 404
        r = await browser.post(
            "/ui/relays/shop/pause", data={"csrf": csrf, "back": "https://evil.example/"}, follow_redirects=False
        )
        assert r.status_code == 303 and r.headers["location"] == "/ui/relays"
        assert await enabled(b, "shop") is False

    # the audit log reads like the API's, by key, marked via ui; A's relays have no UI entries
    conn = await asyncpg.connect(control_dsn)
    try:
        rows = await conn.fetch(
            "SELECT t.name AS tenant, a.actor, a.action, a.resource, a.detail::text AS detail FROM audit_log a "
            "JOIN tenants t ON t.id = a.tenant_id WHERE t.name = ANY($1::text[]) AND a.detail->>'via' = 'ui' "
            "ORDER BY a.id",
            [a.name, b.name],
        )
    finally:
        await conn.close()
    assert [(r["tenant"], r["action"], r["resource"]) for r in rows] == [
        (b.name, "put", "relays/shop"),
        (b.name, "put", "relays/shop"),
    ]
    assert [json.loads(r["detail"]) for r in rows] == [{"via": "ui", "enabled": True}, {"via": "ui", "enabled": False}]
    assert all(r["actor"].startswith("key:") for r in rows)
    for t, names in ((a, ("shop", "a-secret-relay")), (b, ("shop",))):
        for name in names:
            assert (await t.delete(f"/v1/relays/{name}")).status_code == 204


async def test_relays_pause_goes_through_the_apis_checks(client: AsyncTestClient[Any], settings: Settings) -> None:
    """A relay the service's bounds now refuse (its poll interval below a raised minimum) is refused by
    the dashboard as by the API: a message, not a 500, and the relay unchanged."""
    t = await make_tenant(client, "ui-rel-bounds")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn("postgres")})).status_code == 201
    assert (await t.put("/v1/targets/q", {"kind": "redis_streams", "url": "redis://127.0.0.1:1/0"})).status_code == 201
    body = {"database": "app", "target": "q", "partitions": 1, "policy": {"poll_interval_ms": 20}}
    assert (await t.put("/v1/relays/fast", body)).status_code == 201
    stricter = dataclasses.replace(settings, min_poll_interval_ms=100)
    async with AsyncTestClient(app=create_app(stricter)) as browser:
        await ui_login(browser, t.key)
        csrf = csrf_of((await browser.get("/ui/relays/fast")).text)
        r = await browser.post("/ui/relays/fast/pause", data={"csrf": csrf})
        assert r.status_code == 200
        assert "Not paused: policy.poll_interval_ms: at least 100 ms on this service" in r.text
        api = await browser.put("/v1/relays/fast", json={**body, "enabled": False}, headers=t.headers)
        assert api.status_code == 422 and "at least 100 ms" in api.json()["detail"]
    assert await enabled(t, "fast") is True
    assert (await t.delete("/v1/relays/fast")).status_code == 204


async def test_relays_pause_never_undoes_a_change_written_meanwhile(
    client: AsyncTestClient[Any], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pausing writes the relay read back with ``enabled`` changed: a PUT landing between the read
    and the write (here: right after the read) is kept, and the pause is refused, not applied over it."""
    t = await make_tenant(client, "ui-rel-race")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn("postgres")})).status_code == 201
    assert (await t.put("/v1/targets/q", {"kind": "redis_streams", "url": "redis://127.0.0.1:1/0"})).status_code == 201
    body = {"database": "app", "target": "q", "partitions": 1, "topic_mapping": {"*": "before"}}
    assert (await t.put("/v1/relays/raced", body)).status_code == 201
    app = create_app(settings)
    async with AsyncTestClient(app=app) as browser:
        await ui_login(browser, t.key)
        csrf = csrf_of((await browser.get("/ui/relays/raced")).text)
        store = app.state.services.store
        read = store.get_resource

        async def read_then_someone_writes(table: Any, tenant_id: Any, name: str) -> Any:
            row = await read(table, tenant_id, name)
            r = await client.put(
                f"/v1/relays/{name}", json={**body, "topic_mapping": {"*": "after"}}, headers=t.headers
            )
            assert r.status_code == 200, r.text
            return row

        monkeypatch.setattr(store, "get_resource", read_then_someone_writes)
        r = await browser.post("/ui/relays/raced/pause", data={"csrf": csrf})
        monkeypatch.undo()
        assert r.status_code == 200
        assert "Not paused: relay &#39;raced&#39; was changed meanwhile; nothing was written, try again" in r.text
    relay = (await t.get("/v1/relays/raced")).json()
    assert relay["topic_mapping"] == {"*": "after"} and relay["enabled"] is True
    assert (await t.delete("/v1/relays/raced")).status_code == 204


async def test_relays_page_for_the_admin_key(settings: Settings) -> None:
    async with AsyncTestClient(app=create_app(settings)) as browser:
        await ui_login(browser, ADMIN_KEY)
        page = await browser.get("/ui/relays")
        assert page.status_code == 200 and "sign in with a tenant&#39;s API key" in page.text
        assert 'class="card relay"' not in page.text
        r = await browser.get("/ui/relays/shop")
        assert r.status_code == 403
        r = await browser.post("/ui/relays/shop/pause", data={"csrf": csrf_of(page.text)})
        assert "Relays belong to tenants" in r.text


def test_a_long_running_transaction_renders_with_pid_age_and_database() -> None:
    """The template alone (no server): every detail of the cause the status computes."""
    now = datetime.now(UTC)
    part = PartitionState(  # the columns the template shows; the rest at their defaults
        partition=3,
        cursor_txid=10,
        cursor_id=4,
        published_count=7,
        pending_estimate=2,
        oldest_pending_at=now - timedelta(seconds=75),
        lag_s=75.0,
        lease_holder="worker-9",
        lease_epoch=5,
        lease_expires_at=now + timedelta(seconds=5),
        last_published_at=now - timedelta(seconds=80),
        stall=json.dumps({"cause": "long_running_transaction", "pid": 4242, "age_s": 3725.0, "database": "<app>"}),
    )
    status = relay_status("shop", True, [part], now=now)
    assert status.cause is not None and status.cause.kind == "long_running_transaction"
    relay = type("R", (), {"name": "shop", "database": "app", "target": "q", "partitions": 4, "enabled": True})()
    template = ui_template_config().engine_instance.get_template("relays.html")
    html = template.render(
        relays=[(relay, status)],
        labels=CAUSE_LABELS,
        here="/ui/relays/shop",
        one=True,
        now=now,
        user=None,
        csrf="tok",
        flash=None,
        path="/ui/relays/shop",
    )
    assert 'data-cause="long_running_transaction"' in html and "Long-running transaction" in html
    assert '<dd data-field="pid"><code>4242</code></dd>' in html
    assert '<dd data-field="age">1 h 2 min</dd>' in html
    assert '<dd data-field="database"><code>&lt;app&gt;</code></dd>' in html  # escaped
    assert "pg_terminate_backend(4242)" in html
    assert "oldest waiting for 1 min 15 s" in html and "<code>worker-9</code>" in html


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, ""),
        (0.25, "250 ms"),
        (42.9, "42 s"),
        (60, "1 min"),
        (185, "3 min 5 s"),
        (7260, "2 h 1 min"),
        (90000, "1 d 1 h"),
    ],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


def test_the_filtered_count_shows_for_a_relay_with_a_filter() -> None:
    """The template alone: ``Filtered out`` for a relay with a filter (or rows it filtered before the
    filter was removed), and nothing of it for one that never had one."""
    now = datetime.now(UTC)
    part = PartitionState(
        partition=0,
        cursor_txid=10,
        cursor_id=4,
        published_count=7,
        pending_estimate=0,
        lease_epoch=1,
        last_published_at=now,
    )
    template = ui_template_config().engine_instance.get_template("relays.html")

    def render(filter_: object, filtered: int) -> str:
        status = relay_status("shop", True, [msgspec.structs.replace(part, filtered_count=filtered)], now=now)
        relay = type(
            "R",
            (),
            {"name": "shop", "database": "app", "target": "q", "partitions": 1, "enabled": True, "filter": filter_},
        )()
        return str(
            template.render(
                relays=[(relay, status)],
                labels=CAUSE_LABELS,
                here="/ui/relays/shop",
                one=True,
                now=now,
                user=None,
                csrf="tok",
                flash=None,
                path="/ui/relays/shop",
            )
        )

    assert '<dd data-field="filtered">1,234 ' in render({"topic": {"eq": "a"}}, 1234)
    assert '<dd data-field="filtered">0 ' in render({"topic": {"eq": "a"}}, 0)
    assert '<dd data-field="filtered">5 ' in render(None, 5)
    assert 'data-field="filtered"' not in render(None, 0)
