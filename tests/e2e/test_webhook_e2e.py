"""Webhooks end to end: a webhook target configured through the API, relayed by a real worker process
to a local receiver (``tests.harness.webhooks``) that verifies every request's signatures with the
``standardwebhooks`` package.

* 1,000 messages over 100 keys, about a fifth rolled back: exactly the committed ones arrive, each
  key's in the order written, never two requests of one key in flight at once, every request signed
  with both secrets of a rotation under way.
* The receiver answers 503 with a Retry-After: the relay pauses for it (its status says the target is
  unreachable), charges no attempt and dead-letters nothing; once it answers again everything arrives.
* The receiver answers 400 for one destination: that message is dead-lettered after the policy's
  attempts, the others arrive; replayed once the receiver takes it, it arrives; the dashboard's
  replay form offers the webhook target.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.client import add
from tests.conftest import DatabaseFactory, pg_dsn
from tests.e2e.test_dashboard import ui_login
from tests.harness.webhooks import Answer, WebhookReceiver, new_secret, receiver_thread
from tests.helpers import TenantClient, make_tenant
from tests.traffic import check_delivery, write_messages
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

DEADLINE_S = 90
FAST = {"batch_size": 50, "poll_interval_ms": 100, "backoff_base_ms": 50, "backoff_max_ms": 500}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    # two secrets: a rotation under way, so every request must carry (and verify under) both; on a
    # thread of its own, since the in-process API client's replay blocks the test's loop
    with receiver_thread([new_secret(11), new_secret(12)], hold_s=0.002) as r:
        yield r


async def until(check: Callable[[], Any], what: str, workers: WorkerPool) -> None:
    """Poll ``check`` (sync or async) until truthy; fail with the workers' logs at the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"{what}\n{workers.logs()}"
        await asyncio.sleep(0.1)


async def set_up(
    t: TenantClient, databases: DatabaseFactory, receiver: WebhookReceiver, label: str, *, policy: dict[str, Any]
) -> str:
    """A provisioned database, the webhook target ``hook`` and the relay ``to-hook``; the database's DSN."""
    dsn = pg_dsn(await databases.create(f"hook_{label}"))
    assert (await t.put("/v1/databases/app", {"dsn": dsn})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "webhook", "url": receiver.url, "password": " ".join(receiver.secrets), "timeout_ms": 3000}
    r = await t.put("/v1/targets/hook", target)
    assert r.status_code == 201, r.text
    relay = {
        "database": "app",
        "target": "hook",
        "topic_mapping": {"orders": "orders", "poison": "poison"},
        "partitions": 4,
        "policy": policy,
    }
    r = await t.put("/v1/relays/to-hook", relay)
    assert r.status_code == 201, r.text
    return dsn


async def test_committed_rows_arrive_signed_and_in_key_order(
    client: AsyncTestClient[Any], databases: DatabaseFactory, receiver: WebhookReceiver, worker_pool: WorkerPool
) -> None:
    t = await make_tenant(client, "hook-e2e")
    dsn = await set_up(t, databases, receiver, "order", policy=FAST)
    worker_pool.start()
    committed, rolled_back = await write_messages(dsn, seed=11)
    total = sum(len(v) for v in committed.values())

    await until(lambda: len(receiver.all) >= total, f"{len(receiver.all)} of {total} arrived", worker_pool)
    await asyncio.sleep(1.5)  # anything beyond the committed set would arrive now, as a duplicate

    received = [(d.key or "", uuid.UUID(d.webhook_id)) for d in receiver.all]
    check_delivery("webhook", received, committed, rolled_back)
    assert receiver.bad_signatures == 0 and {d.signatures for d in receiver.all} == {2}
    assert receiver.overlaps == 0, "two requests of one key were in flight at once"
    first = receiver.all[0]
    assert first.destination == "orders" and first.content_type == "application/json"
    assert first.headers["outbox-relay"] == "to-hook" and first.headers["outbox-topic"] == "orders"
    assert first.headers["outbox-id"] == first.webhook_id and first.headers["writer"] in {"0", "1", "2", "3", "4"}
    status = (await t.get("/v1/relays/to-hook/status")).json()
    assert status["published"] == total and status["dead_lettered"] == 0, status
    assert (await t.delete("/v1/relays/to-hook")).status_code == 204


async def write(dsn: str, topic: str, keys: list[str]) -> list[uuid.UUID]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            return [await add(conn, topic, key, {"n": n, "key": key}) for n, key in enumerate(keys)]
    finally:
        await conn.close()


async def test_503_with_retry_after_pauses_without_charging_attempts(
    client: AsyncTestClient[Any], databases: DatabaseFactory, receiver: WebhookReceiver, worker_pool: WorkerPool
) -> None:
    t = await make_tenant(client, "hook-503")
    dsn = await set_up(t, databases, receiver, "outage", policy={**FAST, "max_attempts": 2})
    receiver.outage = Answer(503, [("retry-after", "1")], b"down for maintenance")
    worker_pool.start()
    ids = await write(dsn, "orders", ["a", "a", "b", "a", "b"])

    await until(lambda: receiver.refused[503] >= 3, "the relay tried the unavailable receiver", worker_pool)

    async def unreachable() -> bool:
        status = (await t.get("/v1/relays/to-hook/status")).json()
        classes = {p["last_error_class"] for p in status["partitions"]}
        return status["state"] == "failing" and "target_unavailable" in classes

    await until(unreachable, "the status reports the target unreachable", worker_pool)
    status = (await t.get("/v1/relays/to-hook/status")).json()
    # more tries than max_attempts, and not one charged: no retry recorded, no dead letter
    assert all(p["retries"] == 0 and p["retrying"] is None for p in status["partitions"]), status
    assert status["dead_lettered"] == 0 and receiver.all == []
    assert (await t.get("/v1/dead-letters")).json()["items"] == []

    receiver.outage = None
    await until(lambda: len(receiver.all) >= len(ids), "everything arrived after the outage", worker_pool)
    by_key: dict[str, list[str]] = {}
    for d in receiver.all:
        by_key.setdefault(d.key or "", []).append(d.webhook_id)
    assert by_key == {"a": [str(ids[0]), str(ids[1]), str(ids[3])], "b": [str(ids[2]), str(ids[4])]}
    assert (await t.get("/v1/dead-letters")).json()["items"] == []
    assert (await t.delete("/v1/relays/to-hook")).status_code == 204


async def test_400_dead_letters_after_the_policys_attempts(
    client: AsyncTestClient[Any], databases: DatabaseFactory, receiver: WebhookReceiver, worker_pool: WorkerPool
) -> None:
    t = await make_tenant(client, "hook-400")
    dsn = await set_up(t, databases, receiver, "refusal", policy={**FAST, "max_attempts": 3})
    receiver.answers["poison"] = Answer(400, body=b"unknown order")
    worker_pool.start()
    [poison] = await write(dsn, "poison", ["p"])
    good = await write(dsn, "orders", ["p", "q"])

    async def dead() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (await t.get("/v1/dead-letters")).json()["items"]
        return items

    await until(dead, "the refused message was dead-lettered", worker_pool)
    [summary] = await dead()
    letter = (await t.get(f"/v1/dead-letters/{summary['id']}")).json()
    assert letter["message_id"] == str(poison) and letter["error_class"] == "refused", letter
    assert letter["target"] == "hook" and letter["destination"] == "poison" and len(letter["attempts"]) == 3
    assert "400" in letter["last_error"] and "unknown order" in letter["last_error"], letter
    assert receiver.refused[400] == 3  # each attempt one request, and none after the last
    await until(lambda: len(receiver.all) >= 2, "the messages behind it arrived", worker_pool)
    # either key first; a message that went out beside a refused one in one group may come twice (sent
    # again, as the batches after a refusal are: at least once)
    assert {d.webhook_id for d in receiver.all} == {str(i) for i in good}

    # the dashboard's replay form offers the webhook target by name
    await ui_login(client, t.key)
    detail = await client.get(f"/ui/dead-letters/{letter['id']}")
    assert detail.status_code == 200 and '<option value="hook"' in detail.text, detail.text

    # replayed once the receiver takes it: it arrives, signed, as the same message
    del receiver.answers["poison"]
    r = await t.post(f"/v1/dead-letters/{summary['id']}/replay")
    assert r.status_code == 200, r.text
    replayed = [d for d in receiver.all if d.webhook_id == str(poison)]
    assert len(replayed) == 1 and replayed[0].destination == "poison" and replayed[0].signatures == 2
    assert (await t.get(f"/v1/dead-letters/{summary['id']}")).json()["status"] == "replayed"
    assert (await t.delete("/v1/relays/to-hook")).status_code == 204


async def test_the_pause_is_the_retry_after_not_the_backoff(
    client: AsyncTestClient[Any], databases: DatabaseFactory, receiver: WebhookReceiver, worker_pool: WorkerPool
) -> None:
    """Retry-After 30 s against a backoff of at most 0.5 s: after the first 503 the relay stays away.
    (No timing bound: a slow machine can only send fewer requests; one that ignored the Retry-After
    would have sent several more within the two seconds.)"""
    t = await make_tenant(client, "hook-retry-after")
    dsn = await set_up(t, databases, receiver, "retry_after", policy=FAST)
    receiver.outage = Answer(503, [("retry-after", "30")])
    worker_pool.start()
    await write(dsn, "orders", ["only"])
    await until(lambda: receiver.refused[503] >= 1, "the relay tried the unavailable receiver", worker_pool)
    await asyncio.sleep(2.0)
    assert receiver.refused[503] == 1, f"{receiver.refused[503]} requests within 2 s of a Retry-After: 30"
    assert (await t.delete("/v1/relays/to-hook")).status_code == 204
