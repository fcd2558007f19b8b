"""The walking skeleton end to end: configured through the API, relayed by a real worker process.

A tenant registers a fresh PostgreSQL database, provisions its outbox through the API, adds a
Redis Streams and a RabbitMQ target and one relay to each. Several application connections write
1,000 messages over 100 keys with the client helper, in transactions of which about a fifth roll
back. Both consumers must receive exactly the committed messages, each key's in the order written.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import RabbitMQAccount, RedisAccount
from tests.helpers import TenantClient, make_tenant
from tests.traffic import check_delivery, write_messages
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

MESSAGES = 1000


async def test_relay_end_to_end(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    rabbitmq: RabbitMQAccount,
    worker_pool: WorkerPool,
) -> None:
    t: TenantClient = await make_tenant(client, "e2e")
    app_db = await databases.create("e2e_app")
    stream = f"{redis_account.prefix}orders"
    queue_name = "orders-e2e"

    # the consumer's queue exists before the first message (mandatory publishes need a binding)
    admin_amqp = await aio_pika.connect(rabbitmq.admin_url)
    channel = await admin_amqp.channel()
    queue = await channel.declare_queue(queue_name, durable=True)

    r = await t.put("/v1/databases/app", {"dsn": pg_dsn(app_db)})
    assert r.status_code == 201, r.text
    r = await t.post("/v1/databases/app/provision")
    assert r.status_code == 200, r.text
    r = await t.put(
        "/v1/targets/stream", {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    )
    assert r.status_code == 201, r.text
    r = await t.put("/v1/targets/rabbit", {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password})
    assert r.status_code == 201, r.text
    policy = {"batch_size": 50, "poll_interval_ms": 200}
    for relay, target, destination, partitions in (
        ("to-stream", "stream", stream, 4),
        ("to-rabbit", "rabbit", queue_name, 1),
    ):
        body = {
            "database": "app",
            "target": target,
            "topic_mapping": {"orders": destination},
            "partitions": partitions,
            "policy": policy,
        }
        r = await t.put(f"/v1/relays/{relay}", body)
        assert r.status_code == 201, r.text

    worker_pool.start()
    committed, rolled_back = await write_messages(pg_dsn(app_db), seed=7)
    total = sum(len(v) for v in committed.values())
    assert 0 < len(rolled_back) < MESSAGES / 2 and total + len(rolled_back) == MESSAGES

    stream_received: list[tuple[str, uuid.UUID]] = []
    rabbit_received: list[tuple[str, uuid.UUID]] = []
    headers_seen: dict[str, Any] = {}
    redis = aioredis.Redis.from_url(redis_account.admin_url)
    last_id = "-"
    deadline = time.monotonic() + 90

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        rabbit_received.append((str(message.headers["outbox-key"]), uuid.UUID(message.message_id)))
        headers_seen.setdefault("rabbit", message.headers)

    def read_stream(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        nonlocal last_id
        for entry_id, fields in entries:
            if entry_id.decode() == last_id:
                continue
            last_id = entry_id.decode()
            stream_received.append((fields[b"key"].decode(), uuid.UUID(fields[b"outbox-id"].decode())))
            headers_seen.setdefault("stream", fields)

    try:
        await queue.consume(on_message, no_ack=True)
        while (len(stream_received) < total or len(rabbit_received) < total) and time.monotonic() < deadline:
            read_stream(await redis.xrange(stream, min=last_id, count=500))
            await asyncio.sleep(0.1)
        # anything beyond the committed set would arrive now and show up as a duplicate
        await asyncio.sleep(1.5)
        read_stream(await redis.xrange(stream, min=last_id))
    finally:
        await redis.aclose()
        await admin_amqp.close()

    assert len(stream_received) >= total and len(rabbit_received) >= total, worker_pool.logs()
    check_delivery("redis", stream_received, committed, rolled_back)
    check_delivery("rabbitmq", rabbit_received, committed, rolled_back)
    assert headers_seen["stream"][b"h:writer"] in {b"0", b"1", b"2", b"3", b"4"}
    assert headers_seen["stream"][b"h:outbox-relay"] == b"to-stream"
    assert headers_seen["rabbit"]["outbox-relay"] == "to-rabbit"
    assert headers_seen["rabbit"]["outbox-topic"] == "orders"

    status = (await t.get("/v1/relays/to-stream/status")).json()
    assert sum(p["published"] for p in status["partitions"]) == total, status
    for relay in ("to-stream", "to-rabbit"):  # later tests' workers need not run these
        assert (await t.delete(f"/v1/relays/{relay}")).status_code == 204
