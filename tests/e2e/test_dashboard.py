"""The dead-letter dashboard in a real headless Chromium (Debian's, driven by Playwright).

A RabbitMQ target refuses messages (a topic mapped to a routing key no queue is bound to), the
relay engine dead-letters them, and a person in a browser in Kolkata signs in, filters, replays one
(it reaches the broker), reads a letter, replays the rest in bulk through the confirmation page and
watches the job finish. Another tenant with 1,200 dead letters pages through them. Screenshots
land in ``test-output/dashboard/`` (``make browser`` installs the browser).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from playwright.async_api import Browser, Page, async_playwright, expect

from outbox_relay.brokers.factory import open_publisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.engine import PublisherCache, RelayRunner, TenantConnections
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from service.app import create_app
from service.ui.session import FLASH_COOKIE, SESSION_COOKIE
from tests.conftest import DatabaseFactory, LiveServer, pg_dsn
from tests.harness.brokers import RabbitMQAccount
from tests.helpers import ADMIN_KEY, admin, make_tenant
from tests.integration.conftest import FAST_RETRY, write
from tests.workers import OUTPUT_DIR, run_replay_jobs

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("OUTBOX_RELAY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = OUTPUT_DIR / "dashboard"


@pytest.fixture(scope="module")
def ui_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, queue_name=f"{settings.queue_name}-dashboard")


@pytest.fixture(scope="module")
def server(ui_settings: Settings) -> Iterator[LiveServer]:
    live = LiveServer(ui_settings)
    live.start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no browser at {CHROMIUM}: `make browser` installs Debian's chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        await b.close()


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    # a browser somewhere else than UTC, to see times shown in its zone
    context = await browser.new_context(
        timezone_id="Asia/Kolkata", locale="en-US", viewport={"width": 1440, "height": 1000}
    )
    p = await context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield p
    await context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


async def shot(page: Page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def sign_in(page: Page, base: str, key: str) -> None:
    await page.goto(f"{base}/ui")
    await expect(page).to_have_url(re.compile(r"/ui/login"))
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(re.compile(r"/ui/dead-letters"))


async def login_csrf(client: AsyncTestClient[Any]) -> str:
    """The sign-in form's CSRF token (its cookie lands in the client's jar)."""
    page = await client.get("/ui/login")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


async def ui_login(client: AsyncTestClient[Any], key: str) -> str:
    """Sign in through the form; the session cookie's value. The API client is shared by the session:
    a sign-in an earlier test left in its jar is dropped first (signed in, ``/ui/login`` redirects to
    the dashboard, whose forms carry the session's CSRF token, not the sign-in form's)."""
    client.cookies.clear()
    r = await client.post("/ui/login", data={"key": key, "csrf": await login_csrf(client)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    token = client.cookies.get(SESSION_COOKIE)
    assert token
    return str(token)


async def drain(queue: aio_pika.abc.AbstractQueue, expect_n: int) -> list[Any]:
    got = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while len(got) < expect_n and loop.time() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.02)
        else:
            got.append(message)
    return got


async def dead_letter_for_real(settings: Settings, store: ControlStore, relay_id: Any, dsn: str, count: int) -> None:
    """Run the relay engine until the target has refused ``count`` messages max_attempts times."""
    policy = AddressPolicy(allow_private=True)
    tenants = TenantConnections(policy=policy, timeout_s=2)
    publishers = PublisherCache(lambda target, password: open_publisher(target, password=password, policy=policy))
    runner = RelayRunner(
        settings=dataclasses.replace(settings, slice_s=0.4),
        store=store,
        secrets=SecretBox(settings.secret_keys),
        tenants=tenants,
        publishers=publishers,
    )
    try:
        for _ in range(30):
            await runner.run_slice(relay_id, 0, "dashboard-test")
            dead = await store.pool.fetchval("SELECT count(*) FROM dead_letters WHERE relay_id = $1", relay_id)
            if dead >= count:
                return
        raise AssertionError(f"only {dead} of {count} messages were dead-lettered")
    finally:
        await publishers.close()
        await tenants.close()


async def test_dashboard_filter_replay_and_bulk_replay(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    rabbitmq: RabbitMQAccount,
    server: LiveServer,
    page: Page,
    ui_settings: Settings,
    control_dsn: str,
) -> None:
    # --- a relay whose target refuses the "poison" topic, and three messages dead-lettered for real
    t = await make_tenant(client, "ui")
    db = await databases.create("ui")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(db)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password, "timeout_ms": 2000}
    assert (await t.put("/v1/targets/rabbit", target)).status_code == 201
    relay = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "policy": FAST_RETRY,
        "topic_mapping": {"orders": "ui-orders-q", "poison": "no-such-queue"},
    }
    assert (await t.put("/v1/relays/shop", relay)).status_code == 201
    connection = await aio_pika.connect(rabbitmq.admin_url)
    channel = await connection.channel()
    await channel.declare_queue("ui-orders-q", durable=True)
    fixed = await channel.declare_queue("ui-fixed-q", durable=True)
    await write(
        pg_dsn(db),
        ("orders", "order-0", b'{"order": 0}'),
        *(("poison", f"order-{i}", f'{{"order": {i}, "note": "refused <b>{i}</b>"}}'.encode()) for i in (1, 2, 3)),
    )
    store = await ControlStore.connect(control_dsn)
    try:
        tenant = await store.get_tenant(t.name)
        assert tenant is not None
        row = await store.get_resource("relays", tenant.id, "shop")
        assert row is not None
        await dead_letter_for_real(ui_settings, store, row.id, pg_dsn(db), 3)
    finally:
        await store.close()
    # the operator fixes the relay: "poison" now has a queue; nothing is redelivered by itself
    relay["topic_mapping"] = {"orders": "ui-orders-q", "poison": "ui-fixed-q"}
    relay["enabled"] = False
    assert (await t.put("/v1/relays/shop", relay)).status_code == 200

    # --- sign in, see the three, times in the browser's zone
    base = server.url
    await sign_in(page, base, t.key)
    rows = page.locator("table.letters tbody tr")
    await expect(rows).to_have_count(3)
    await expect(page.locator("#total")).to_have_text("3")
    await expect(page.locator("#tz")).to_have_text(re.compile(r"Asia/(Kolkata|Calcutta)"))
    first_time = page.locator("table.letters tbody tr time").first
    await expect(first_time).to_contain_text("GMT+5:30")
    assert (await first_time.get_attribute("title") or "").endswith("UTC")
    await expect(page.locator(".chips").first).to_contain_text("shop")

    # --- filter by key, replay that one from the list
    await page.get_by_label("Key").fill("order-2")
    await page.get_by_role("button", name="Apply filters").click()
    await expect(page).to_have_url(re.compile(r"key=order-2"))
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("order-2")
    await expect(rows.first).to_contain_text("refused <b>2</b>")  # shown as text, not markup
    await rows.first.get_by_role("button", name=re.compile("Replay")).click()
    await expect(page.locator(".flash-notice")).to_contain_text("Replayed dead letter")
    await expect(page.locator(".flash-notice")).to_contain_text("ui-fixed-q")
    await expect(page.locator(".empty")).to_contain_text("No dead letters match")
    (message,) = await drain(fixed, 1)
    assert message.body == b'{"order": 2, "note": "refused <b>2</b>"}'
    assert message.headers["outbox-key"] == "order-2" and message.headers["outbox-replay-count"] == "1"
    assert message.headers["outbox-relay"] == "shop"

    # --- errors show in the page
    await page.get_by_label("Relay").fill("Not A Name")
    await page.get_by_role("button", name="Apply filters").click()
    await expect(page.locator(".flash-error")).to_contain_text("relay")
    await page.get_by_role("link", name="Clear").click()
    await expect(rows).to_have_count(2)
    await shot(page, "01-list-after-replay")

    # --- a letter's detail: readable payload, headers, every attempt
    await rows.first.get_by_role("link", name="View").click()
    await expect(page.locator("h1")).to_contain_text("Dead letter")
    payload = page.locator("#payload")
    await expect(payload).to_contain_text('"order": 3')
    assert "\n" in (await payload.inner_text())  # indented JSON
    await expect(page.locator("table.attempts tbody tr")).to_have_count(3)
    await expect(page.locator("table.attempts")).to_contain_text("unroutable")
    await expect(page.locator("table.attempts time").first).to_contain_text("GMT+5:30")
    await shot(page, "02-detail")
    await page.get_by_role("link", name="← Dead letters").click()
    await expect(rows).to_have_count(2)

    # --- bulk replay of everything still dead, through the confirmation page, as a job
    await page.get_by_role("button", name=re.compile(r"Replay all 2 matching")).click()
    await expect(page.locator("h1")).to_have_text("Replay 2 dead letters?")
    await shot(page, "03-confirm")
    await page.locator("#confirm").click()
    await expect(page).to_have_url(re.compile(r"/ui/jobs/"))
    await expect(page.locator("[data-field=status]")).to_have_text("queued")
    await shot(page, "04-job-queued")
    await run_replay_jobs(ui_settings)
    await expect(page.locator("[data-field=status]")).to_have_text("done", timeout=10_000)
    await expect(page.locator("[data-field=replayed]")).to_have_text("2")
    assert await page.locator("#job-progress").get_attribute("value") == "2"
    await shot(page, "05-job-done")
    bodies = sorted(m.body for m in await drain(fixed, 2))
    assert bodies == [b'{"order": 1, "note": "refused <b>1</b>"}', b'{"order": 3, "note": "refused <b>3</b>"}']

    # --- nothing left: the empty state; the replayed ones under "replayed"
    await page.get_by_role("link", name="← Dead letters").click()
    await expect(page.locator(".empty")).to_contain_text("No dead letters")
    await page.goto(f"{base}/ui/dead-letters?status=replayed")
    await expect(rows).to_have_count(3)
    await connection.close()


async def test_dashboard_pages_through_1200_dead_letters(
    client: AsyncTestClient[Any], server: LiveServer, page: Page, control_dsn: str
) -> None:
    t = await make_tenant(client, "ui-many")
    conn = await asyncpg.connect(control_dsn)
    try:
        await conn.execute(
            "INSERT INTO dead_letters (tenant_id, relay_name, target_name, partition, outbox_id, outbox_txid, topic, "
            "key, destination, payload, error_class, last_error, attempts, created_at) "
            "SELECT t.id, 'relay-' || (i % 3), 'rabbit', 0, i, 1, 'orders', 'k-' || i, 'q', "
            "convert_to('{\"n\": ' || i || '}', 'UTF8'), CASE WHEN i % 10 = 0 THEN 'too_large' ELSE 'refused' END, "
            "'refused', '[]', $2::timestamptz - make_interval(secs => i) "
            "FROM tenants t, generate_series(1, 1200) i WHERE t.name = $1",
            t.name,
            datetime.now(UTC),
        )
    finally:
        await conn.close()
    await sign_in(page, server.url, t.key)
    rows = page.locator("table.letters tbody tr")
    await expect(rows).to_have_count(50)
    await expect(page.locator(".pager")).to_contain_text("Showing 1\u201350 of 1,200")
    await expect(rows.first).to_contain_text("k-1")
    await expect(page.locator(".chips").nth(1)).to_contain_text("too_large 120")
    await shot(page, "06-many")
    await page.get_by_role("link", name="Older »").click()
    await expect(page.locator(".pager")).to_contain_text("Showing 51\u2013100 of 1,200")
    await expect(rows.first).to_contain_text("k-51")
    await page.get_by_label("Per page").select_option("200")
    await page.get_by_role("button", name="Apply filters").click()
    await expect(rows).to_have_count(200)
    # select two, and the confirmation says two
    await page.locator("input[name=ids]").nth(0).check()
    await page.locator("input[name=ids]").nth(1).check()
    await expect(page.locator("#selected-count")).to_have_text("2 selected")
    await page.get_by_role("button", name="Discard selected…").click()
    await expect(page.locator("h1")).to_have_text("Discard 2 dead letters?")
    await page.locator("#confirm").click()
    await expect(page.locator(".flash-notice")).to_have_text("Discarded 2 dead letters.")
    await expect(page.locator(".pager")).to_contain_text("of 1,198")


async def test_dashboard_sign_in_admin_view_and_form_protection(client: AsyncTestClient[Any], control_dsn: str) -> None:
    """Without a browser: what the pages promise at the HTTP level."""
    t = await make_tenant(client, "ui-http")
    conn = await asyncpg.connect(control_dsn)
    try:
        letter_id = await conn.fetchval(
            "INSERT INTO dead_letters (tenant_id, relay_name, target_name, partition, outbox_id, outbox_txid, topic, "
            "payload, error_class, last_error) SELECT id, 'r', 'rabbit', 0, 1, 1, 'orders', '\\x00ff'::bytea, "
            "'refused', '<script>alert(1)</script>' FROM tenants WHERE name = $1 RETURNING id",
            t.name,
        )
    finally:
        await conn.close()

    r = await client.get("/ui/dead-letters?relay=r", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fui%2Fdead-letters%3Frelay%3Dr"
    r = await client.post("/ui/login", data={"key": "orly_wrong", "csrf": await login_csrf(client)})
    assert r.status_code == 401 and "not valid" in r.text
    r = await client.post(
        "/ui/login",
        data={"key": t.key, "next": "//evil.example/", "csrf": await login_csrf(client)},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/dead-letters"  # no open redirect
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}="))
    assert "HttpOnly" in cookie and "Path=/ui" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    assert t.key not in cookie and "Secure" not in cookie  # a random token; plain http here

    page = await client.get("/ui/dead-letters")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert" not in page.text
    # the time range: UTC from ui.js (since=...Z), or the bare field without JavaScript (read as UTC)
    assert "No dead letters match" in (await client.get("/ui/dead-letters?since=2999-01-01T00:00:00Z")).text
    assert "No dead letters match" in (await client.get("/ui/dead-letters?since_local=2999-01-01T00:00")).text
    assert str(letter_id) in (await client.get("/ui/dead-letters?until_local=2999-01-01T00:00")).text
    assert "since: not a date and time" in (await client.get("/ui/dead-letters?since=someday")).text
    detail = await client.get(f"/ui/dead-letters/{letter_id}")
    assert detail.status_code == 200 and "00000000  00 ff" in detail.text  # binary as a hex dump
    raw = await client.get(f"/ui/dead-letters/{letter_id}/payload")
    assert raw.content == b"\x00\xff" and "attachment" in raw.headers["content-disposition"]
    assert (await client.get(f"/ui/dead-letters/{uuid.uuid4()}")).status_code == 404

    # every form needs the session's CSRF token
    r = await client.post(f"/ui/dead-letters/{letter_id}/discard", data={"csrf": "forged"}, follow_redirects=False)
    assert r.status_code == 403 and "expired" in r.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    r = await client.post(f"/ui/dead-letters/{letter_id}/discard", data={"csrf": csrf.group(1)}, follow_redirects=False)
    assert r.status_code == 303
    assert (await client.get(f"/v1/dead-letters/{letter_id}", headers=t.headers)).json()["status"] == "discarded"

    # the admin key sees every tenant, with a tenant column and filter
    r = await client.post("/ui/logout", data={"csrf": csrf.group(1)}, follow_redirects=False)
    assert r.status_code == 303 and f'{SESSION_COOKIE}=""' in r.headers["set-cookie"]
    r = await client.post(
        "/ui/login", data={"key": ADMIN_KEY, "csrf": await login_csrf(client)}, follow_redirects=False
    )
    assert r.status_code == 303
    page = await client.get(f"/ui/dead-letters?tenant={t.name}&status=any")
    assert page.status_code == 200 and "admin (all tenants)" in page.text and "<th>Tenant</th>" in page.text
    assert str(letter_id) in page.text
    await client.post("/ui/logout", data={"csrf": re.findall(r'name="csrf" value="([^"]+)"', page.text)[0]})


async def test_dashboard_sign_out_ends_the_session_everywhere(client: AsyncTestClient[Any], settings: Settings) -> None:
    """A copied session cookie stops working once its session signs out, or its key is revoked."""
    t = await make_tenant(client, "ui-out")
    async with AsyncTestClient(app=create_app(settings)) as first, AsyncTestClient(app=create_app(settings)) as other:
        token = await ui_login(first, t.key)
        copied = {"Cookie": f"{SESSION_COOKIE}={token}"}
        assert (await other.get("/ui/dead-letters", headers=copied)).status_code == 200
        page = await first.get("/ui/dead-letters")
        csrf = re.findall(r'name="csrf" value="([^"]+)"', page.text)[0]
        assert (await first.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)).status_code == 303
        r = await other.get("/ui/dead-letters", headers=copied, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"

        # revoking the key ends its sessions too
        token = await ui_login(first, t.key)
        assert (await other.get("/ui/dead-letters", headers={"Cookie": f"{SESSION_COOKIE}={token}"})).status_code == 200
        (key,) = (await client.get(f"/v1/tenants/{t.name}/api-keys", headers=admin())).json()
        await client.delete(f"/v1/tenants/{t.name}/api-keys/{key['id']}", headers=admin())
        r = await other.get("/ui/dead-letters", headers={"Cookie": f"{SESSION_COOKIE}={token}"}, follow_redirects=False)
        assert r.status_code == 303


async def test_dashboard_sign_in_form_needs_its_csrf_token(client: AsyncTestClient[Any], settings: Settings) -> None:
    """A cross-site form cannot sign a browser in (login CSRF): the POST must carry the token of the
    sign-in cookie this browser was given with the form."""
    t = await make_tenant(client, "ui-csrf")
    async with AsyncTestClient(app=create_app(settings)) as browser, AsyncTestClient(app=create_app(settings)) as evil:
        r = await browser.post("/ui/login", data={"key": t.key}, follow_redirects=False)
        assert r.status_code == 403 and "expired" in r.text
        assert SESSION_COOKIE not in browser.cookies
        stolen = await login_csrf(evil)  # a valid token, but of another browser's sign-in cookie
        r = await browser.post("/ui/login", data={"key": t.key, "csrf": stolen}, follow_redirects=False)
        assert r.status_code == 403 and SESSION_COOKIE not in browser.cookies
        r = await browser.post(
            "/ui/login", data={"key": t.key, "csrf": await login_csrf(browser)}, follow_redirects=False
        )
        assert r.status_code == 303 and browser.cookies.get(SESSION_COOKIE)


async def test_dashboard_cookies_are_secure_when_the_setting_says_so(
    client: AsyncTestClient[Any], settings: Settings
) -> None:
    t = await make_tenant(client, "ui-secure")
    secure = dataclasses.replace(settings, ui_cookie_secure=True)
    async with AsyncTestClient(app=create_app(secure)) as browser:
        page = await browser.get("/ui/login")
        assert "Secure" in page.headers["set-cookie"]
        csrf = re.findall(r'name="csrf" value="([^"]+)"', page.text)[0]
        # httpx keeps Secure cookies off plain http: hand the sign-in cookie over by hand
        login_cookie = page.headers["set-cookie"].split(";", 1)[0]
        r = await browser.post(
            "/ui/login", data={"key": t.key, "csrf": csrf}, headers={"Cookie": login_cookie}, follow_redirects=False
        )
        assert r.status_code == 303
        cookies = r.headers.get_list("set-cookie")
        session = next(c for c in cookies if c.startswith(f"{SESSION_COOKIE}="))
        assert "Secure" in session and "HttpOnly" in session


async def test_dashboard_ignores_a_forged_flash(client: AsyncTestClient[Any], settings: Settings) -> None:
    t = await make_tenant(client, "ui-flash")
    forged = base64.urlsafe_b64encode(json.dumps({"kind": "error", "text": "FORGED: call 555-0100"}).encode()).decode()
    async with AsyncTestClient(app=create_app(settings)) as browser:
        await ui_login(browser, t.key)
        cookies = f"{SESSION_COOKIE}={browser.cookies.get(SESSION_COOKIE)}; {FLASH_COOKIE}={forged}"
        page = await browser.get("/ui/dead-letters", headers={"Cookie": cookies})
        assert page.status_code == 200 and "FORGED" not in page.text
        # a flash the service sealed still shows, once
        r = await browser.post(
            "/ui/dead-letters/confirm",
            data={"csrf": re.findall(r'name="csrf" value="([^"]+)"', page.text)[0], "intent": "bogus"},
            follow_redirects=False,
        )
        assert r.status_code == 303 and browser.cookies.get(FLASH_COOKIE)
        shown = await browser.get("/ui/dead-letters")
        assert "Unknown action." in shown.text
        assert "Unknown action." not in (await browser.get("/ui/dead-letters")).text


async def test_dashboard_shows_what_the_operations_refuse(
    client: AsyncTestClient[Any], settings: Settings, control_dsn: str
) -> None:
    """Without a browser: a refused action goes back with the reason as an error flash; a page of
    something missing is the 404 error page saying what is missing (never problem JSON, never a 500)."""
    t = await make_tenant(client, "ui-refused")
    other = await make_tenant(client, "ui-refused-other")
    conn = await asyncpg.connect(control_dsn)
    try:
        done = await conn.fetchval(
            "INSERT INTO dead_letters (tenant_id, relay_name, target_name, partition, outbox_id, outbox_txid, topic, "
            "payload, error_class, last_error, status) SELECT id, 'gone', 'rabbit', 0, 1, 1, 'orders', 'x'::bytea, "
            "'refused', 'no', 'discarded' FROM tenants WHERE name = $1 RETURNING id",
            t.name,
        )
    finally:
        await conn.close()
    missing = uuid.uuid4()
    async with AsyncTestClient(app=create_app(settings)) as browser:
        await ui_login(browser, t.key)
        page = await browser.get("/ui/dead-letters")
        csrf = re.findall(r'name="csrf" value="([^"]+)"', page.text)[0]

        async def flash_after(path: str, data: dict[str, str], back: str) -> str:
            r = await browser.post(path, data={"csrf": csrf, "back": back, **data}, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"] == back, r.text
            shown = await browser.get(back)
            found = re.search(r'<div class="flash flash-error" role="alert">([^<]*)</div>', shown.text)
            assert found is not None, shown.text
            return found.group(1)

        text = await flash_after(f"/ui/dead-letters/{missing}/replay", {}, "/ui/dead-letters")
        assert text == f"Not replayed: dead letter {missing} not found"
        text = await flash_after(f"/ui/dead-letters/{done}/replay", {}, "/ui/dead-letters?status=any")
        assert text == f"Not replayed: dead letter {done} is discarded, not dead"
        text = await flash_after(f"/ui/dead-letters/{done}/discard", {}, "/ui/dead-letters?status=any")
        assert text == f"Not discarded: dead letter {done} is discarded; only dead letters can be discarded"
        form = {"intent": "replay-matching", "tenant": other.name}
        text = await flash_after("/ui/dead-letters/confirm", form, "/ui/jobs")
        assert text == "a tenant API key sees only its own tenant&#39;s dead letters"
        form = {"action": "discard", "scope": "matching", "tenant": other.name}
        text = await flash_after("/ui/dead-letters/bulk", form, "/ui/jobs")
        assert text == "a tenant API key sees only its own tenant&#39;s dead letters"

        for path, what in [
            (f"/ui/dead-letters/{missing}", f"dead letter {missing} not found"),
            (f"/ui/dead-letters/{missing}/payload", f"dead letter {missing} not found"),
            (f"/ui/jobs/{missing}", f"replay job {missing} not found"),
            (f"/ui/jobs/{missing}/progress", f"replay job {missing} not found"),
        ]:
            r = await browser.get(path)
            assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), (path, r.text)
            assert f'<div class="flash flash-error" role="alert">{what}</div>' in r.text


async def test_api_reference_renders_offline(server: LiveServer, page: Page) -> None:
    """/docs in a browser that may reach nothing but this service: the reference renders in full."""
    base = server.url
    elsewhere: list[str] = []

    async def only_this_service(route: Any) -> None:
        if route.request.url.startswith(base + "/"):
            await route.continue_()
        else:
            elsewhere.append(route.request.url)
            await route.abort()

    await page.route("**/*", only_this_service)
    await page.goto(f"{base}/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("Outbox Relay", timeout=20_000)
    operations = page.locator(".opblock")
    await expect(operations.first).to_be_visible()
    assert await operations.count() >= 30
    await expect(page.locator(".opblock-summary-path", has_text="/v1/relays/{name}").first).to_be_visible()
    await expect(page.get_by_role("button", name=re.compile("Authorize"))).to_be_visible()
    await shot(page, "07-api-reference")
    assert not elsewhere, f"the reference asked other origins for {elsewhere}"
