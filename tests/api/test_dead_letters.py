"""The dead-letter API over a real control DB, RabbitMQ and an arq worker: list, read, replay,
discard, bulk replay jobs, tenant scoping and the audit log.

Letters for the list and read tests are written straight into the control DB (the engine's way of
writing them is covered by tests/integration/test_replay.py); replays go to a real broker.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from service.app import create_app
from tests.conftest import pg_dsn
from tests.harness.brokers import RabbitMQAccount
from tests.helpers import TenantClient, admin, make_tenant
from tests.workers import run_replay_jobs

_outbox_ids = itertools.count(1)


@pytest.fixture(scope="module", autouse=True)
def _example_seed_restored() -> Iterator[None]:
    """Building an app's OpenAPI document draws litestar's response examples from one shared,
    once-seeded random generator, so the document depends on how many apps the process built before
    (tests/api/test_openapi.py compares a fresh build with the committed file, and runs after this
    module). Put the generator back as a fresh process has it."""
    yield
    from litestar._openapi.schema_generation.examples import ExampleFactory

    ExampleFactory.seed_random(ExampleFactory.__random_seed__)


@pytest.fixture(scope="module")
def dl_settings(settings: Settings) -> Settings:
    """The run's settings with a queue of their own, so the replay worker here sees only its jobs."""
    return dataclasses.replace(settings, queue_name=f"{settings.queue_name}-dead-letters")


@pytest.fixture(scope="module")
async def api(dl_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(dl_settings)) as c:
        yield c


@pytest.fixture(scope="module")
async def pool(control_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(control_dsn, min_size=1, max_size=4)
    assert p is not None
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def broker(rabbitmq: RabbitMQAccount) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(rabbitmq.admin_url)
    yield await connection.channel()
    await connection.close()


async def tenant_id(pool: asyncpg.Pool, name: str) -> uuid.UUID:
    value: uuid.UUID = await pool.fetchval("SELECT id FROM tenants WHERE name = $1", name)
    return value


async def relay_id(pool: asyncpg.Pool, tenant: str, name: str) -> uuid.UUID:
    value: uuid.UUID = await pool.fetchval(
        "SELECT r.id FROM relays r JOIN tenants t ON t.id = r.tenant_id WHERE t.name = $1 AND r.name = $2",
        tenant,
        name,
    )
    return value


async def bury(
    pool: asyncpg.Pool,
    tenant: str,
    n: int = 1,
    *,
    relay: str = "r1",
    relay_uuid: uuid.UUID | None = None,
    target: str = "rabbit",
    topic: str = "orders",
    key: str | None = "k",
    payload: bytes = b'{"id": 1}',
    headers: dict[str, Any] | None = None,
    error_class: str = "refused",
    status: str = "dead",
    destination: str | None = "orders-q",
    newest: datetime | None = None,
) -> list[uuid.UUID]:
    """``n`` dead letters as the engine writes them, one second apart, the first the newest."""
    newest = newest or datetime.now(UTC)
    tid = await tenant_id(pool, tenant)
    ids = []
    outbox_ids = sorted((next(_outbox_ids) for _ in range(n)), reverse=True)  # written in dead-letter order
    for i in range(n):
        attempts = [
            {"at": (newest - timedelta(seconds=i, milliseconds=5 * a)).isoformat(), "error": "unroutable"}
            for a in range(3)
        ]
        ids.append(
            await pool.fetchval(
                "INSERT INTO dead_letters (tenant_id, relay_id, relay_name, target_name, partition, outbox_id, "
                "outbox_txid, outbox_created_at, topic, key, destination, payload, headers, error_class, last_error, "
                "attempts, status, created_at) VALUES ($1, $2, $3, $4, 0, $5, 1000, $6, $7, $8, $9, $10, $11::jsonb, "
                "$12, $13, $14::jsonb, $15, $16) RETURNING id",
                tid,
                relay_uuid,
                relay,
                target,
                outbox_ids[i],
                newest - timedelta(seconds=i, minutes=1),
                topic,
                key,
                destination,
                payload,
                json.dumps(headers or {}),
                error_class,
                "unroutable: no queue is bound for this routing key",
                json.dumps(attempts),
                status,
                newest - timedelta(seconds=i),
            )
        )
    return ids


async def pages(t: TenantClient, query: str, limit: int) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        url = f"/v1/dead-letters?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        r = await t.get(url)
        assert r.status_code == 200, r.text
        body = r.json()
        out.append(body["items"])
        assert (body["counts"] is None) == (cursor is not None)
        cursor = body["next_cursor"]
        if cursor is None:
            return out


async def drain(channel: aio_pika.abc.AbstractChannel, queue: str, expect: int, timeout_s: float = 5) -> list[Any]:
    q = await channel.declare_queue(queue, durable=True)
    got = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(got) < expect and asyncio.get_running_loop().time() < deadline:
        message = await q.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.02)
            continue
        got.append(message)
    await asyncio.sleep(0.05)
    while (message := await q.get(no_ack=True, fail=False)) is not None:
        got.append(message)
    return got


async def relay_setup(
    t: TenantClient, rabbitmq: RabbitMQAccount, mapping: dict[str, str], *, name: str = "rel"
) -> None:
    """A RabbitMQ target and a (disabled: no worker runs it) relay using it."""
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn("unused")})).status_code in (200, 201)
    body = {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password, "timeout_ms": 2000}
    assert (await t.put("/v1/targets/rabbit", body)).status_code in (200, 201)
    relay = {"database": "app", "target": "rabbit", "partitions": 1, "topic_mapping": mapping, "enabled": False}
    r = await t.put(f"/v1/relays/{name}", relay)
    assert r.status_code in (200, 201), r.text


# --- listing -------------------------------------------------------------------------------------------


async def test_list_filters_pagination_counts_and_scope(api: AsyncTestClient[Any], pool: asyncpg.Pool) -> None:
    a = await make_tenant(api, "dla")
    b = await make_tenant(api, "dlb")
    now = datetime.now(UTC)
    r1 = await bury(pool, a.name, 7, relay="r1", topic="orders", newest=now)
    r2 = await bury(
        pool,
        a.name,
        3,
        relay="r2",
        topic="payments",
        key="p",
        error_class="too_large",
        newest=now - timedelta(minutes=10),
    )
    replayed = await bury(pool, a.name, 2, relay="r1", status="replayed", newest=now - timedelta(minutes=20))
    other = await bury(pool, b.name, 5, relay="r1")

    body = (await a.get("/v1/dead-letters")).json()
    assert [i["id"] for i in body["items"]] == [str(i) for i in r1 + r2]  # newest first
    assert body["counts"] == {
        "total": 10,
        "by_relay": {"r1": 7, "r2": 3},
        "by_error_class": {"refused": 7, "too_large": 3},
    }
    item = body["items"][0]
    assert item["tenant"] == a.name and item["attempts"] == 3 and item["payload_preview"] == '{"id": 1}'
    assert item["payload_size"] == 9 and item["status"] == "dead" and "payload" not in item

    async def ids(query: str) -> list[str]:
        r = await a.get(f"/v1/dead-letters?{query}")
        assert r.status_code == 200, r.text
        return [i["id"] for i in r.json()["items"]]

    assert await ids("relay=r2") == [str(i) for i in r2]
    assert await ids("topic=payments&key=p&error_class=too_large") == [str(i) for i in r2]
    assert await ids("target=rabbit&relay=r1") == [str(i) for i in r1]
    assert await ids("key=nope") == []
    since = (now - timedelta(seconds=2)).isoformat()
    assert await ids(f"since={since.replace('+', '%2B')}") == [str(i) for i in r1[:3]]
    until = (now - timedelta(minutes=5)).isoformat().replace("+", "%2B")
    assert await ids(f"until={until}") == [str(i) for i in r2]
    assert await ids("status=replayed") == [str(i) for i in replayed]
    assert len(await ids("status=any")) == 12

    # cursor pagination: every letter once, in order, counts on the first page only
    got = await pages(a, "", 4)
    assert [len(p) for p in got] == [4, 4, 2]
    assert [i["id"] for p in got for i in p] == [str(i) for i in r1 + r2]

    # scope: a tenant sees its own letters only; the admin key sees every tenant's, or one's
    assert {i["id"] for i in (await b.get("/v1/dead-letters")).json()["items"]} == {str(i) for i in other}
    r = await a.get(f"/v1/dead-letters?tenant={b.name}")
    assert r.status_code == 403
    assert (await a.get(f"/v1/dead-letters/{other[0]}")).status_code == 404
    r = await api.get(f"/v1/dead-letters?tenant={b.name}", headers=admin())
    assert r.status_code == 200 and r.json()["counts"]["total"] == 5
    assert r.json()["items"][0]["tenant"] == b.name
    r = await api.get("/v1/dead-letters?limit=500", headers=admin())
    assert r.status_code == 200 and r.json()["counts"]["total"] >= 15
    assert (await api.get("/v1/dead-letters?tenant=no-such-tenant", headers=admin())).json()["items"] == []
    assert (await api.get(f"/v1/dead-letters/{other[0]}", headers=admin())).status_code == 200

    # bad input: 400, not 500
    assert (await a.get("/v1/dead-letters?cursor=AAAA")).status_code == 400
    assert (await a.get("/v1/dead-letters?status=lost")).status_code == 400
    assert (await a.get("/v1/dead-letters?since=yesterday")).status_code == 400
    assert (await api.get("/v1/dead-letters")).status_code == 401


async def test_get_renders_json_text_and_binary_payloads(api: AsyncTestClient[Any], pool: asyncpg.Pool) -> None:
    t = await make_tenant(api, "dlget")
    (json_id,) = await bury(pool, t.name, payload=b'{"b": [1, 2], "a": "x"}', headers={"source": "shop", "n": 3})
    (text_id,) = await bury(pool, t.name, payload="h\u00e9llo\n\x07bell \u202e".encode())
    binary = bytes(range(0, 40)) + b"\xff\xfe"
    (bin_id,) = await bury(pool, t.name, payload=binary, key=None)

    got = (await t.get(f"/v1/dead-letters/{json_id}")).json()
    assert (
        got["payload"]["kind"] == "json"
        and got["payload"]["display"] == '{\n  "b": [\n    1,\n    2\n  ],\n  "a": "x"\n}'
    )
    assert base64.b64decode(got["payload"]["base64"]) == b'{"b": [1, 2], "a": "x"}'
    assert got["headers"] == {"source": "shop", "n": 3}
    assert len(got["attempts"]) == 3 and got["attempts"][0]["error"] == "unroutable"
    assert got["relay"] == "r1" and got["relay_exists"] is False and got["partition"] == 0
    assert got["outbox_txid"] == 1000 and got["outbox_created_at"] and got["topic"] == "orders"

    got = (await t.get(f"/v1/dead-letters/{text_id}")).json()["payload"]
    assert got["kind"] == "text" and got["text"] == "h\u00e9llo\n\x07bell \u202e"
    assert got["display"] == "h\u00e9llo\n\\u0007bell \\u202e"  # what is there, visibly

    got = (await t.get(f"/v1/dead-letters/{bin_id}")).json()
    assert got["key"] is None
    assert got["payload"]["kind"] == "binary" and got["payload"]["text"] is None
    assert base64.b64decode(got["payload"]["base64"]) == binary
    assert got["payload"]["display"].startswith("00000000  00 01 02 03")
    assert (await t.get(f"/v1/dead-letters/{bin_id}")).json()["payload"]["size"] == 42
    assert (await t.get(f"/v1/dead-letters/{uuid.uuid4()}")).status_code == 404
    assert (await t.get("/v1/dead-letters/not-a-uuid")).status_code in (400, 404)


# --- discarding and the audit log ----------------------------------------------------------------------


async def test_discard_one_and_many_audited(api: AsyncTestClient[Any], pool: asyncpg.Pool) -> None:
    t = await make_tenant(api, "dldis")
    one, *rest = await bury(pool, t.name, 4, relay="r1")
    by_filter = await bury(pool, t.name, 3, relay="r9", newest=datetime.now(UTC) - timedelta(hours=1))

    r = await t.post(f"/v1/dead-letters/{one}/discard")
    assert r.status_code == 200 and r.json()["status"] == "discarded" and r.json()["discarded_at"]
    assert (await t.post(f"/v1/dead-letters/{one}/discard")).status_code == 409
    assert (await t.post(f"/v1/dead-letters/{one}/replay")).status_code == 409
    assert (await t.post(f"/v1/dead-letters/{uuid.uuid4()}/discard")).status_code == 404

    r = await t.post("/v1/dead-letters/discard", {"ids": [str(i) for i in [*rest, one]]})
    assert r.status_code == 200 and r.json() == {"discarded": 3}  # the discarded one is left alone
    r = await t.post("/v1/dead-letters/discard", {"filter": {"relay": "r9"}})
    assert r.status_code == 200 and r.json() == {"discarded": 3}
    assert (await t.get("/v1/dead-letters")).json()["counts"]["total"] == 0
    listed = (await t.get("/v1/dead-letters?status=discarded")).json()["items"]
    assert {i["id"] for i in listed} == {str(i) for i in [one, *rest, *by_filter]}

    # selection errors
    assert (await t.post("/v1/dead-letters/discard", {})).status_code == 422
    both = {"ids": [str(one)], "filter": {"relay": "r9"}}
    assert (await t.post("/v1/dead-letters/discard", both)).status_code == 422
    assert (await t.post("/v1/dead-letters/discard", {"ids": []})).status_code == 400
    assert (await t.post("/v1/dead-letters/discard", {"filter": {"colour": "red"}})).status_code == 400

    audit = await pool.fetch(
        "SELECT actor, action, resource, detail::text AS detail FROM audit_log WHERE tenant_id = $1 "
        "AND resource LIKE 'dead-letter%' ORDER BY id",
        await tenant_id(pool, t.name),
    )
    assert [(a["action"], a["resource"]) for a in audit] == [
        ("discard", f"dead-letters/{one}"),
        ("discard", "dead-letters"),
        ("discard", "dead-letters"),
    ]
    key_id = await pool.fetchval(
        "SELECT k.id FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE t.name = $1", t.name
    )
    assert {a["actor"] for a in audit} == {f"key:{key_id}"}
    assert json.loads(audit[1]["detail"])["discarded"] == 3 and json.loads(audit[1]["detail"])["via"] == "api"
    assert json.loads(audit[2]["detail"])["filter"] == {"relay": "r9"}


# --- replaying ------------------------------------------------------------------------------------------


async def test_replay_publishes_to_the_relays_current_target(
    api: AsyncTestClient[Any], pool: asyncpg.Pool, rabbitmq: RabbitMQAccount, broker: aio_pika.abc.AbstractChannel
) -> None:
    t = await make_tenant(api, "dlrep")
    await broker.declare_queue("dl-fixed-q", durable=True)
    await relay_setup(t, rabbitmq, {"poison": "dl-fixed-q"})  # the mapping was fixed after the failure
    rid = await relay_id(pool, t.name, "rel")
    (letter,) = await bury(
        pool,
        t.name,
        relay="rel",
        relay_uuid=rid,
        topic="poison",
        key="k1",
        payload=b"fixed",
        headers={"source": "shop", "n": 3},
        destination="no-such-queue",
    )
    outbox_id = (await t.get(f"/v1/dead-letters/{letter}")).json()["outbox_id"]

    r = await t.post(f"/v1/dead-letters/{letter}/replay")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["status"] == "replayed" and got["replay_count"] == 1 and got["last_replayed_at"]
    assert got["attempts"][-1]["error"] is None and got["attempts"][-1]["destination"] == "dl-fixed-q"
    assert got["attempts"][-1]["replay"] == 1 and got["attempts"][-1]["target"] == "rabbit"

    messages = await drain(broker, "dl-fixed-q", 1)
    assert len(messages) == 1
    m = messages[0]
    assert m.body == b"fixed" and m.message_id == str(outbox_id)
    assert m.headers["outbox-id"] == str(outbox_id)  # the original id: consumers' dedupe still works
    assert m.headers["outbox-replay-count"] == "1" and m.headers["outbox-dead-letter-id"] == str(letter)
    assert m.headers["outbox-relay"] == "rel" and m.headers["outbox-topic"] == "poison"
    assert m.headers["outbox-key"] == "k1" and m.headers["source"] == "shop" and m.headers["n"] == "3"

    # a replayed letter is not replayed again by accident
    r = await t.post(f"/v1/dead-letters/{letter}/replay", {})
    assert r.status_code == 409 and "replayed" in r.json()["detail"]
    audit = await pool.fetchrow(
        "SELECT actor, detail::text AS detail FROM audit_log WHERE resource = $1 AND action = 'replay'",
        f"dead-letters/{letter}",
    )
    assert audit is not None and json.loads(audit["detail"])["outcome"] == "replayed"


async def test_two_concurrent_replays_one_wins(
    api: AsyncTestClient[Any], pool: asyncpg.Pool, rabbitmq: RabbitMQAccount, broker: aio_pika.abc.AbstractChannel
) -> None:
    t = await make_tenant(api, "dlrace")
    await broker.declare_queue("dl-race-q", durable=True)
    await relay_setup(t, rabbitmq, {"*": "dl-race-q"})
    rid = await relay_id(pool, t.name, "rel")
    letters = await bury(pool, t.name, 3, relay="rel", relay_uuid=rid)
    for letter in letters:
        results = await asyncio.gather(*(t.post(f"/v1/dead-letters/{letter}/replay") for _ in range(2)))
        assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
    assert len(await drain(broker, "dl-race-q", 3)) == 3  # each letter published once


async def test_failed_replay_returns_to_the_list_with_the_attempt(
    api: AsyncTestClient[Any], pool: asyncpg.Pool, rabbitmq: RabbitMQAccount, broker: aio_pika.abc.AbstractChannel
) -> None:
    t = await make_tenant(api, "dlfail")
    await relay_setup(t, rabbitmq, {"poison": "dl-still-nowhere"})  # still unroutable
    rid = await relay_id(pool, t.name, "rel")
    (letter,) = await bury(pool, t.name, relay="rel", relay_uuid=rid, topic="poison")

    r = await t.post(f"/v1/dead-letters/{letter}/replay")
    assert r.status_code == 502, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["dead_letter_id"] == str(letter) and problem["error_class"] == "refused"
    got = (await t.get(f"/v1/dead-letters/{letter}")).json()
    assert got["status"] == "dead" and got["replay_count"] == 1 and len(got["attempts"]) == 4
    assert got["attempts"][-1]["replay"] == 1 and "unroutable" in got["attempts"][-1]["error"]
    assert got["last_error"] == got["attempts"][-1]["error"]
    assert [i["id"] for i in (await t.get("/v1/dead-letters")).json()["items"]] == [str(letter)]

    # an explicit destination puts it right; the count says it is the second replay
    await broker.declare_queue("dl-explicit-q", durable=True)
    r = await t.post(f"/v1/dead-letters/{letter}/replay", {"destination": "dl-explicit-q"})
    assert r.status_code == 200 and r.json()["replay_count"] == 2
    (m,) = await drain(broker, "dl-explicit-q", 1)
    assert m.headers["outbox-replay-count"] == "2"

    # nowhere to go: refused before anything is attempted
    (other,) = await bury(pool, t.name, relay="gone", topic="poison")
    r = await t.post(f"/v1/dead-letters/{other}/replay")
    assert r.status_code == 422 and "name a target" in r.json()["detail"]
    r = await t.post(f"/v1/dead-letters/{other}/replay", {"target": "no-such-target"})
    assert r.status_code == 422 and "does not exist" in r.json()["detail"]
    refused = (await t.get(f"/v1/dead-letters/{other}")).json()
    assert refused["replay_count"] == 0 and refused["status"] == "dead"  # its claim given back, no attempt
    assert len(refused["attempts"]) == 3  # as buried: nothing appended


async def test_bulk_replay_job_by_filter_and_by_ids(
    api: AsyncTestClient[Any],
    pool: asyncpg.Pool,
    rabbitmq: RabbitMQAccount,
    broker: aio_pika.abc.AbstractChannel,
    dl_settings: Settings,
) -> None:
    t = await make_tenant(api, "dljob")
    await broker.declare_queue("dl-bulk-q", durable=True)
    await relay_setup(t, rabbitmq, {"poison": "dl-bulk-q"})
    rid = await relay_id(pool, t.name, "rel")
    chosen = await bury(pool, t.name, 230, relay="rel", relay_uuid=rid, topic="poison")
    left = await bury(pool, t.name, 4, relay="rel", relay_uuid=rid, topic="other")

    r = await t.post("/v1/dead-letters/replay-jobs", {"filter": {"relay": "rel", "topic": "poison"}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["total"] == 230 and job["remaining"] == 230
    assert job["filter"] == {"relay": "rel", "topic": "poison"}
    await run_replay_jobs(dl_settings)
    job = (await t.get(f"/v1/dead-letters/replay-jobs/{job['id']}")).json()
    assert (job["status"], job["replayed"], job["failed"], job["skipped"], job["remaining"]) == ("done", 230, 0, 0, 0)
    assert job["started_at"] and job["finished_at"]
    messages = await drain(broker, "dl-bulk-q", 230)
    assert len(messages) == 230
    # oldest first (the order they were dead-lettered in)
    assert [m.headers["outbox-dead-letter-id"] for m in messages] == [str(i) for i in reversed(chosen)]
    assert {i["id"] for i in (await t.get("/v1/dead-letters")).json()["items"]} == {str(i) for i in left}

    # by ids: one already replayed (skipped), one refused (no route: it returns to the list)
    ids = [str(chosen[0]), str(left[0]), str(left[1])]
    await t.put(
        "/v1/relays/rel",
        {
            "database": "app",
            "target": "rabbit",
            "partitions": 1,
            "enabled": False,
            "topic_mapping": {"poison": "dl-bulk-q", "other": "dl-nowhere"},
        },
    )
    r = await t.post("/v1/dead-letters/replay-jobs", {"ids": ids})
    assert r.status_code == 202 and r.json()["total"] == 3
    job_id = r.json()["id"]
    await run_replay_jobs(dl_settings)
    job = (await t.get(f"/v1/dead-letters/replay-jobs/{job_id}")).json()
    assert (job["status"], job["replayed"], job["failed"], job["skipped"]) == ("done", 0, 2, 1)
    assert (await t.get(f"/v1/dead-letters/{left[0]}")).json()["status"] == "dead"

    listed = (await t.get("/v1/dead-letters/replay-jobs")).json()["items"]
    assert [j["id"] for j in listed[:2]] == [job_id, job["id"]] or listed[0]["id"] == job_id
    other = await make_tenant(api, "dljob-other")
    assert (await other.get(f"/v1/dead-letters/replay-jobs/{job_id}")).status_code == 404
    assert (await api.get(f"/v1/dead-letters/replay-jobs/{job_id}", headers=admin())).status_code == 200

    # nothing matches: a finished job of none
    r = await t.post("/v1/dead-letters/replay-jobs", {"filter": {"relay": "nothing-here"}})
    assert r.status_code == 202 and (r.json()["status"], r.json()["total"]) == ("done", 0)

    finished = await pool.fetch(
        "SELECT detail::text AS detail FROM audit_log WHERE tenant_id = $1 AND action = 'replay-finished' ORDER BY id",
        await tenant_id(pool, t.name),
    )
    assert [json.loads(a["detail"])["replayed"] for a in finished] == [230, 0]
    started = await pool.fetch(
        "SELECT detail::text AS detail FROM audit_log WHERE tenant_id = $1 AND action = 'replay' "
        "AND resource LIKE 'dead-letter-jobs/%' ORDER BY id",
        await tenant_id(pool, t.name),
    )
    assert json.loads(started[0]["detail"])["filter"] == {"relay": "rel", "topic": "poison"}
    assert json.loads(started[0]["detail"])["total"] == 230


async def test_bulk_replay_of_interleaved_refusals_keeps_one_publisher_working(
    api: AsyncTestClient[Any],
    pool: asyncpg.Pool,
    rabbitmq: RabbitMQAccount,
    broker: aio_pika.abc.AbstractChannel,
    dl_settings: Settings,
) -> None:
    """Every other letter is unroutable: each refusal is reported against its letter, and what
    follows it is sent again on the same publisher (the adapter, not the replay, copes with the
    returns still due), so every routable letter arrives."""
    t = await make_tenant(api, "dlmix")
    await broker.declare_queue("dl-mix-q", durable=True)
    await relay_setup(t, rabbitmq, {"good": "dl-mix-q", "bad": "dl-mix-nowhere"})
    rid = await relay_id(pool, t.name, "rel")
    now = datetime.now(UTC)
    letters = [
        (await bury(pool, t.name, relay="rel", relay_uuid=rid, topic=topic, newest=now - timedelta(seconds=n)))[0]
        for n, topic in enumerate(["good", "bad", "bad", "good", "bad", "good", "good", "bad"])
    ]
    good = [letters[n] for n in (0, 3, 5, 6)]
    bad = [letters[n] for n in (1, 2, 4, 7)]
    r = await t.post("/v1/dead-letters/replay-jobs", {"ids": [str(i) for i in letters]})
    assert r.status_code == 202, r.text
    await run_replay_jobs(dl_settings)
    job = (await t.get(f"/v1/dead-letters/replay-jobs/{r.json()['id']}")).json()
    assert (job["status"], job["replayed"], job["failed"], job["skipped"]) == ("done", 4, 4, 0), job
    messages = await drain(broker, "dl-mix-q", 4)
    # each routable one at least once (what followed a refusal may have arrived before it is sent again)
    assert {m.headers["outbox-dead-letter-id"] for m in messages} == {str(i) for i in good}
    for letter in bad:
        got = (await t.get(f"/v1/dead-letters/{letter}")).json()
        assert got["status"] == "dead" and "unroutable" in got["attempts"][-1]["error"], got
    for letter in good:
        assert (await t.get(f"/v1/dead-letters/{letter}")).json()["status"] == "replayed"


async def test_replay_job_request_validation(api: AsyncTestClient[Any]) -> None:
    t = await make_tenant(api, "dlval")
    assert (await t.post("/v1/dead-letters/replay-jobs", {})).status_code == 422
    r = await t.post("/v1/dead-letters/replay-jobs", {"ids": [str(uuid.uuid4())], "filter": {}})
    assert r.status_code == 422
    r = await t.post("/v1/dead-letters/replay-jobs", {"filter": {"tenant": "someone-else"}})
    assert r.status_code == 403
    r = await t.post("/v1/dead-letters/replay-jobs", {"ids": ["nope"]})
    assert r.status_code == 400
    r = await t.post("/v1/dead-letters/replay-jobs", {"filter": {"relay": "Not A Name"}})
    assert r.status_code == 400
    assert (await t.get(f"/v1/dead-letters/replay-jobs/{uuid.uuid4()}")).status_code == 404


# --- how errors answer ---------------------------------------------------------------------------------


def problem(r: Any, status: int, slug: str) -> str:
    """Assert a problem-details answer and return its detail."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert (body["type"], body["status"]) == (f"urn:outbox-relay:problem:{slug}", status), body
    assert body["title"] and body["detail"]
    detail: str = body["detail"]
    return detail


async def test_each_error_of_the_operations_answers_with_its_problem_type(
    api: AsyncTestClient[Any], pool: asyncpg.Pool, rabbitmq: RabbitMQAccount
) -> None:
    t = await make_tenant(api, "dlerr")
    other = await make_tenant(api, "dlerr-other")
    missing = uuid.uuid4()
    r = await t.get(f"/v1/dead-letters/{missing}")
    assert problem(r, 404, "not-found") == f"dead letter {missing} not found" and r.json()["title"] == "Not Found"
    assert problem(await t.post(f"/v1/dead-letters/{missing}/replay"), 404, "not-found")
    assert problem(await t.post(f"/v1/dead-letters/{missing}/discard"), 404, "not-found")
    r = await t.get(f"/v1/dead-letters/replay-jobs/{missing}")
    assert problem(r, 404, "not-found") == f"replay job {missing} not found"
    r = await t.get(f"/v1/dead-letters?tenant={other.name}")
    assert "only its own tenant" in problem(r, 403, "forbidden")
    r = await t.post("/v1/dead-letters/discard", {"filter": {"tenant": other.name}})
    assert problem(r, 403, "forbidden")
    assert problem(await t.get("/v1/dead-letters?cursor=AAAA"), 400, "invalid-request") == "invalid pagination cursor"

    (gone,) = await bury(pool, t.name, relay="deleted-relay")  # its relay is gone: nowhere to replay to
    r = await t.post(f"/v1/dead-letters/{gone}/replay")
    assert "no longer exists" in problem(r, 422, "replay-unroutable")
    r = await t.post(f"/v1/dead-letters/{gone}/replay", {"target": "no-such-target"})
    assert "does not exist" in problem(r, 422, "replay-unroutable")
    await relay_setup(t, rabbitmq, {"*": "dl-err-q"})
    big = await bury(pool, t.name, relay="rel", relay_uuid=await relay_id(pool, t.name, "rel"), payload=b"x" * 2048)
    await t.put(
        "/v1/relays/rel",
        {
            "database": "app",
            "target": "rabbit",
            "partitions": 1,
            "topic_mapping": {"*": "dl-err-q"},
            "enabled": False,
            "policy": {"max_payload_bytes": 1024},
        },
    )
    r = await t.post(f"/v1/dead-letters/{big[0]}/replay")
    assert "max_payload_bytes" in problem(r, 422, "replay-too-large")

    (done,) = await bury(pool, t.name, status="replayed")
    assert "only dead letters" in problem(await t.post(f"/v1/dead-letters/{done}/discard"), 409, "conflict")
    assert "not dead" in problem(await t.post(f"/v1/dead-letters/{done}/replay"), 409, "conflict")


async def test_a_job_the_queue_cannot_take_is_503_queue_unavailable(dl_settings: Settings, pool: asyncpg.Pool) -> None:
    down = dataclasses.replace(dl_settings, redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    async with AsyncTestClient(app=create_app(down)) as c:
        t = await make_tenant(c, "dlq")
        await bury(pool, t.name, 2)
        r = await t.post("/v1/dead-letters/replay-jobs", {"filter": {}})
        assert "unavailable" in problem(r, 503, "queue-unavailable")
    tid = await tenant_id(pool, t.name)
    failed = await pool.fetchval(
        "SELECT count(*) FROM dead_letter_jobs WHERE tenant_id = $1 AND status = 'failed'", tid
    )
    assert failed == 1
