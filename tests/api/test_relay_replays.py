"""``POST /v1/relays/{name}/replays`` over the API, on a real control DB and a real tenant database: a dry
run counts and samples what a replay would publish (and publishes nothing); bad input is a 4xx problem
that says what is wrong, never a 500; a tenant sees only its own relays and targets; the limits answer
with a message; a queued replay is audited and shows on the replay-job status endpoint.

The replay itself, through a worker and a broker, is ``tests/e2e/test_history_replay_e2e.py``."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from outbox_relay.client import add
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from service.app import create_app
from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import RedisAccount
from tests.helpers import TenantClient, make_tenant
from workers.replay import replay_history

ROWS = 30
TOPICS = ("orders", "users", "audit")
"""``audit`` is not routed by the relay's topic mapping."""


@pytest.fixture(scope="module", autouse=True)
def _example_seed_restored() -> Iterator[None]:
    """As in tests/api/test_dead_letters.py: building apps moves litestar's shared example generator,
    which tests/api/test_openapi.py relies on; put it back."""
    yield
    from litestar._openapi.schema_generation.examples import ExampleFactory

    ExampleFactory.seed_random(ExampleFactory.__random_seed__)


@pytest.fixture(scope="module")
def replay_settings(settings: Settings) -> Settings:
    """Small limits, and a queue no worker reads: a queued replay stays queued (in flight)."""
    return dataclasses.replace(
        settings, queue_name=f"{settings.queue_name}-history-api", replay_max_rows=25, replay_max_in_flight=1
    )


@pytest.fixture(scope="module")
async def api(replay_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(replay_settings)) as c:
        yield c
    redis = aioredis.Redis.from_url(replay_settings.redis_url)
    try:  # the queued jobs no worker took
        keys = [k async for k in redis.scan_iter(f"arq:queue:{replay_settings.queue_name}*")]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@dataclasses.dataclass
class Outbox:
    tenant: TenantClient
    dsn: str
    ids: list[int]
    """Row ids, in write order (row ``i`` is ``ids[i]``)."""
    message_ids: list[str]
    times: list[datetime]
    """Insert times."""


def row(i: int) -> tuple[str, str, dict[str, Any], dict[str, str]]:
    return (
        TOPICS[i % 3],
        f"key-{i % 4}",
        {"n": i, "country": "DE" if i % 2 else "US"},
        {"vip": "yes" if i % 5 == 0 else "no"},
    )


@pytest.fixture(scope="module")
async def outbox(api: AsyncTestClient[Any], databases: DatabaseFactory, redis_account: RedisAccount) -> Outbox:
    tenant = await make_tenant(api, "replays")
    dsn = pg_dsn(await databases.create("replays_app"))
    assert (await tenant.put("/v1/databases/app", {"dsn": dsn})).status_code == 201
    assert (await tenant.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    assert (await tenant.put("/v1/targets/stream", target)).status_code == 201
    assert (await tenant.put("/v1/targets/other", target)).status_code == 201
    relay = {
        "database": "app",
        "target": "stream",
        "topic_mapping": {"orders": f"{redis_account.prefix}api-orders", "users": f"{redis_account.prefix}api-users"},
        "partitions": 2,
    }
    assert (await tenant.put("/v1/relays/r", relay)).status_code == 201
    conn = await asyncpg.connect(dsn)
    try:
        for i in range(ROWS):
            topic, key, payload, headers = row(i)
            await add(conn, topic, key, payload, headers=headers)
        rows = await conn.fetch("SELECT id, message_id::text AS m, created_at FROM outbox_relay.outbox ORDER BY id")
    finally:
        await conn.close()
    return Outbox(tenant, dsn, [r["id"] for r in rows], [r["m"] for r in rows], [r["created_at"] for r in rows])


def routed(i: int) -> bool:
    return TOPICS[i % 3] != "audit"


async def test_a_dry_run_counts_and_samples_what_a_replay_would_publish(outbox: Outbox) -> None:
    t, ids = outbox.tenant, outbox.ids
    r = await t.post("/v1/relays/r/replays", {"ids": {"from": ids[3], "to": ids[22]}, "dry_run": True})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = [i for i in range(3, 23) if routed(i)]
    assert (body["in_range"], body["matching"]) == (20, len(expected))
    assert [s["outbox_id"] for s in body["sample"]] == [ids[i] for i in expected[:10]]
    first = body["sample"][0]
    assert first["message_id"] == outbox.message_ids[expected[0]]
    assert (first["topic"], first["key"]) == (row(expected[0])[0], row(expected[0])[1])
    assert first["destination"].endswith("api-orders") and first["payload_preview"].startswith('{"n":')
    assert "payload" not in first and first["payload_size"] > 0
    assert (body["oldest_retained_id"], body["retention_hours"]) == (ids[0], 168)
    assert (body["relay"], body["target"], body["max_rows"]) == ("r", "stream", 25)

    # a time range (from inclusive, to exclusive) and a filter with a payload leaf and a header leaf
    times = outbox.times
    f = {"any": [{"payload": "country", "eq": "DE"}, {"header": "vip", "eq": "yes"}]}
    window = {"from": times[5].isoformat(), "to": times[25].isoformat()}
    r = await t.post("/v1/relays/r/replays", {"inserted_at": window, "filter": f, "dry_run": True})
    assert r.status_code == 200, r.text
    want = [i for i in range(5, 25) if routed(i) and (i % 2 or i % 5 == 0)]
    assert (r.json()["in_range"], r.json()["matching"]) == (20, len(want))
    assert [s["outbox_id"] for s in r.json()["sample"]] == [ids[i] for i in want[:10]]

    # another target and mapping: the mapping decides what is routed
    body2 = {
        "ids": {"from": ids[0], "to": ids[23]},
        "target": "other",
        "topic_mapping": {"audit": "a"},
        "dry_run": True,
    }
    r = await t.post("/v1/relays/r/replays", body2)
    assert r.status_code == 200, r.text
    assert (r.json()["target"], r.json()["matching"]) == ("other", 8)
    assert {s["destination"] for s in r.json()["sample"]} == {"a"}

    # a range that holds nothing, before anything was written
    empty = {"inserted_at": {"from": "2001-01-01T00:00:00Z", "to": "2001-01-02T00:00:00Z"}, "dry_run": True}
    r = await t.post("/v1/relays/r/replays", empty)
    assert r.status_code == 200, r.text
    assert (r.json()["in_range"], r.json()["matching"], r.json()["sample"]) == (0, 0, [])


@pytest.mark.parametrize(
    ("body", "status", "slug", "words"),
    [
        ({}, 422, "invalid-range", ["exactly one range"]),
        (
            {
                "ids": {"from": 1, "to": 2},
                "inserted_at": {"from": "2025-01-01T00:00:00Z", "to": "2025-01-02T00:00:00Z"},
            },
            422,
            "invalid-range",
            ["exactly one range"],
        ),
        ({"ids": {"from": 9, "to": 2}}, 422, "invalid-range", ["ids.from must not be above ids.to"]),
        (
            {"inserted_at": {"from": "2025-01-02T00:00:00Z", "to": "2025-01-02T00:00:00Z"}},
            422,
            "invalid-range",
            ["before inserted_at.to"],
        ),
        ({"ids": {"from": 0, "to": 2}}, 400, "invalid-request", ["ids.from"]),
        ({"ids": {"from": "a", "to": 2}}, 400, "invalid-request", ["ids.from"]),
        (
            {"inserted_at": {"from": "yesterday", "to": "2025-01-02T00:00:00Z"}},
            400,
            "invalid-request",
            ["inserted_at.from"],
        ),
        ({"ids": {"from": 1}}, 400, "invalid-request", ["to"]),
        ({"ids": {"from": 1, "to": 2}, "speed": "fast"}, 400, "invalid-request", ["speed"]),
        (
            {"ids": {"from": 1, "to": 2}, "filter": {"header": "h"}},
            422,
            "invalid-filter",
            ["filter: a header leaf takes exactly one of eq, in, exists"],
        ),
        (
            {"ids": {"from": 1, "to": 2}, "filter": {"any": [{"topic": {"eq": "a", "in": ["b"]}}]}},
            422,
            "invalid-filter",
            ["filter.any[0].topic"],
        ),
        ({"ids": {"from": 1, "to": 2}, "filter": {"python": "1"}}, 400, "invalid-request", ["python"]),
        ({"ids": {"from": 1, "to": 2}, "target": "nope"}, 422, "unknown-reference", ["target 'nope' not found"]),
        ({"ids": {"from": 1, "to": 2}, "target": "Not A Name"}, 400, "invalid-request", ["target"]),
        ({"ids": {"from": 1, "to": 2}, "topic_mapping": {}}, 400, "invalid-request", ["topic_mapping"]),
    ],
)
async def test_bad_input_is_a_4xx_problem_that_says_what(
    outbox: Outbox, body: dict[str, Any], status: int, slug: str, words: list[str]
) -> None:
    for dry_run in (True, False):
        r = await outbox.tenant.post("/v1/relays/r/replays", {**body, "dry_run": dry_run} if body else body)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        problem = r.json()
        assert problem["type"] == f"urn:outbox-relay:problem:{slug}", problem
        for word in words:
            assert word in problem["detail"], problem


async def test_a_tenant_sees_only_its_own_relays_and_targets(api: AsyncTestClient[Any], outbox: Outbox) -> None:
    other = await make_tenant(api, "replays-other")
    assert (await other.post("/v1/relays/r/replays", {"ids": {"from": 1, "to": 2}, "dry_run": True})).status_code == 404
    r = await other.post("/v1/relays/nope/replays", {"ids": {"from": 1, "to": 2}})
    assert (r.status_code, r.json()["type"]) == (404, "urn:outbox-relay:problem:not-found")
    # the first tenant's target names do not exist for the other, nor the other's for it
    target = {"kind": "redis_streams", "url": "redis://127.0.0.1:6379/0"}
    assert (await other.put("/v1/targets/theirs", target)).status_code == 201
    r = await outbox.tenant.post(
        "/v1/relays/r/replays", {"ids": {"from": 1, "to": 2}, "target": "theirs", "dry_run": True}
    )
    assert (r.status_code, r.json()["type"]) == (422, "urn:outbox-relay:problem:unknown-reference")
    r = await api.post("/v1/relays/r/replays", json={"ids": {"from": 1, "to": 2}})
    assert r.status_code == 401


async def test_the_limits_answer_with_a_message_and_a_queued_replay_is_audited(
    outbox: Outbox, api: AsyncTestClient[Any], control_dsn: str
) -> None:
    t, ids = outbox.tenant, outbox.ids
    r = await t.post("/v1/relays/r/replays", {"ids": {"from": ids[0], "to": ids[25]}, "dry_run": True})
    assert (r.status_code, r.json()["type"]) == (422, "urn:outbox-relay:problem:too-many"), r.text
    assert "more than 25 rows" in r.json()["detail"] and "replay_max_rows" in r.json()["detail"]

    body = {"ids": {"from": ids[0], "to": ids[9]}, "filter": {"topic": {"eq": "orders"}}}
    r = await t.post("/v1/relays/r/replays", body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["kind"], job["relay"], job["status"], job["total"], job["remaining"]) == (
        "history",
        "r",
        "queued",
        10,
        10,
    )
    assert job["history"]["ids"] == {"from": ids[0], "to": ids[9]} and job["history"]["oldest_retained_id"] == ids[0]
    # one status endpoint for every replay job; another tenant's reads as missing
    got = await t.get(f"/v1/dead-letters/replay-jobs/{job['id']}")
    assert got.status_code == 200 and got.json()["kind"] == "history"
    other = await make_tenant(api, "replays-peek")
    assert (await other.get(f"/v1/dead-letters/replay-jobs/{job['id']}")).status_code == 404

    # the tenant's limit of replays in flight is 1 here (no worker takes this queue): a second is refused
    r = await t.post("/v1/relays/r/replays", {"ids": {"from": ids[0], "to": ids[1]}})
    assert (r.status_code, r.json()["type"]) == (409, "urn:outbox-relay:problem:replays-in-flight"), r.text
    assert (r.json()["limit"], r.json()["in_flight"]) == (1, 1) and "wait for one to finish" in r.json()["detail"]
    # a dry run is not a replay: still answered
    r = await t.post("/v1/relays/r/replays", {"ids": {"from": ids[0], "to": ids[1]}, "dry_run": True})
    assert r.status_code == 200, r.text

    conn = await asyncpg.connect(control_dsn)
    try:
        audit = await conn.fetch(
            "SELECT a.actor, a.action, a.resource, a.detail::text AS detail FROM audit_log a "
            "JOIN tenants t ON t.id = a.tenant_id WHERE t.name = $1 AND a.resource LIKE 'relays/r/replays/%'",
            t.name,
        )
    finally:
        await conn.close()
    assert [(a["action"], a["resource"]) for a in audit] == [("replay", f"relays/r/replays/{job['id']}")]
    assert audit[0]["actor"].startswith("key:")
    detail = json.loads(audit[0]["detail"])
    assert (detail["ids"], detail["filter"], detail["in_range"], detail["via"]) == (
        {"from": ids[0], "to": ids[9]},
        {"topic": {"eq": "orders"}},
        10,
        "api",
    )


async def test_the_job_goes_through_the_address_policy(
    outbox: Outbox, replay_settings: Settings, control_dsn: str
) -> None:
    """The replay job left queued above, run by the worker's job function under a policy that refuses
    loopback addresses (a hosted deployment's): it fails with the refusal, publishes nothing, and no
    longer counts in flight."""
    t = outbox.tenant
    queued = [j for j in (await t.get("/v1/dead-letters/replay-jobs")).json()["items"] if j["status"] == "queued"]
    assert len(queued) == 1, queued
    store = await ControlStore.connect(control_dsn, min_size=0, max_size=2)
    try:
        ctx = {
            "store": store,
            "secrets": SecretBox(replay_settings.secret_keys),
            "policy": AddressPolicy(allow_private=False),
            "settings": replay_settings,
        }
        assert await replay_history(ctx, queued[0]["id"]) == "failed"
        assert await replay_history(ctx, queued[0]["id"]) == "not-queued", "a job runs once"
    finally:
        await store.close()
    job = (await t.get(f"/v1/dead-letters/replay-jobs/{queued[0]['id']}")).json()
    assert (job["status"], job["replayed"]) == ("failed", 0)
    assert "target 'stream'" in job["error"] and "127.0.0.1" in job["error"], job
    r = await t.post("/v1/relays/r/replays", {"ids": {"from": outbox.ids[0], "to": outbox.ids[1]}})
    assert r.status_code == 202, r.text


async def test_an_unreachable_database_is_a_502_not_a_500(
    api: AsyncTestClient[Any], redis_account: RedisAccount
) -> None:
    t = await make_tenant(api, "replays-down")
    assert (await t.put("/v1/databases/gone", {"dsn": "postgresql://postgres@127.0.0.1:1/none"})).status_code == 201
    assert (await t.put("/v1/targets/s", {"kind": "redis_streams", "url": redis_account.url})).status_code == 201
    assert (await t.put("/v1/relays/r", {"database": "gone", "target": "s"})).status_code == 201
    since = (datetime.now() - timedelta(hours=1)).isoformat()
    r = await t.post(
        "/v1/relays/r/replays", {"inserted_at": {"from": since, "to": datetime.now().isoformat()}, "dry_run": True}
    )
    assert (r.status_code, r.json()["type"]) == (502, "urn:outbox-relay:problem:database-unreachable"), r.text


async def test_the_dashboard_shows_a_replay_from_history_as_such(api: AsyncTestClient[Any], outbox: Outbox) -> None:
    page = await api.get("/ui/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None, page.text
    r = await api.post("/ui/login", data={"key": outbox.tenant.key, "csrf": csrf.group(1)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    jobs = (await outbox.tenant.get("/v1/dead-letters/replay-jobs")).json()["items"]
    if not any(j["status"] == "queued" for j in jobs):  # this test alone: queue one (the module leaves one)
        r = await outbox.tenant.post("/v1/relays/r/replays", {"ids": {"from": outbox.ids[0], "to": outbox.ids[1]}})
        assert r.status_code == 202, r.text
        jobs = (await outbox.tenant.get("/v1/dead-letters/replay-jobs")).json()["items"]
    assert jobs and all(j["kind"] == "history" for j in jobs)
    r = await api.get(f"/ui/jobs/{jobs[0]['id']}")
    assert r.status_code == 200, r.text
    rows = re.search(r"<dt>Rows</dt><dd>(.*?)</dd>", r.text, re.S)
    assert rows is not None, r.text
    assert rows.group(1).startswith(f"relay <code>r</code>'s retained outbox rows, ids {outbox.ids[0]} to "), rows
    assert "chosen by id" not in r.text
    assert (await api.get("/ui/jobs")).status_code == 200


async def test_an_unreachable_target_stops_the_job_and_says_why(
    outbox: Outbox, replay_settings: Settings, control_dsn: str, redis_account: RedisAccount
) -> None:
    """The worker's job function in this process (the policy allows loopback): the job the module left
    queued runs to the end; a replay to a target nobody listens on fails with the reason, publishing
    nothing, and frees its slot."""
    t = outbox.tenant
    down = {"kind": "redis_streams", "url": "redis://127.0.0.1:1/0"}
    assert (await t.put("/v1/targets/down", down)).status_code == 201
    store = await ControlStore.connect(control_dsn, min_size=0, max_size=2)
    ctx = {
        "store": store,
        "secrets": SecretBox(replay_settings.secret_keys),
        "policy": AddressPolicy(allow_private=True),
        "settings": replay_settings,
    }
    try:
        for queued in [
            j for j in (await t.get("/v1/dead-letters/replay-jobs")).json()["items"] if j["status"] == "queued"
        ]:
            assert await replay_history(ctx, queued["id"]) == "done"
            job = (await t.get(f"/v1/dead-letters/replay-jobs/{queued['id']}")).json()
            assert job["replayed"] + job["skipped"] == job["total"] and job["remaining"] == 0, job
        r = await t.post(
            "/v1/relays/r/replays", {"ids": {"from": outbox.ids[0], "to": outbox.ids[5]}, "target": "down"}
        )
        assert r.status_code == 202, r.text
        assert await replay_history(ctx, r.json()["id"]) == "failed"
    finally:
        await store.close()
    job = (await t.get(f"/v1/dead-letters/replay-jobs/{r.json()['id']}")).json()
    assert (job["status"], job["replayed"], job["target"]) == ("failed", 0, "down"), job
    assert job["error"].startswith("target 'down' unavailable: cannot reach Redis at 127.0.0.1:1"), job
    r = await t.post("/v1/relays/r/replays", {"ids": {"from": outbox.ids[0], "to": outbox.ids[1]}, "dry_run": False})
    assert r.status_code == 202, r.text
