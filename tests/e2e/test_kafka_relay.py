"""Kafka end to end: a worker process relays to a Kafka-protocol broker (Tansu), key = outbox key,
headers carried, every committed message once, in per-key order."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from litestar.testing import AsyncTestClient

from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import TansuBroker
from tests.helpers import make_tenant
from tests.traffic import check_delivery, write_messages
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e


async def test_relay_to_kafka(
    client: AsyncTestClient[Any], databases: DatabaseFactory, tansu: TansuBroker, worker_pool: WorkerPool
) -> None:
    t = await make_tenant(client, "kafka")
    app_db = await databases.create("kafka")
    topic = f"orders-{t.name}"
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(app_db)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    # Tansu refuses InitProducerId; a real cluster keeps the idempotent producer (the default)
    target = {"kind": "kafka", "bootstrap_servers": [tansu.bootstrap], "enable_idempotence": False, "timeout_ms": 5000}
    assert (await t.put("/v1/targets/kafka", target)).status_code == 201
    body = {
        "database": "app",
        "target": "kafka",
        "partitions": 4,
        "topic_mapping": {"orders": topic},
        "policy": {"batch_size": 100, "poll_interval_ms": 100},
    }
    assert (await t.put("/v1/relays/to-kafka", body)).status_code == 201
    worker_pool.start()
    committed, rolled_back = await write_messages(pg_dsn(app_db), seed=3, messages=600, keys=60, writers=3)
    total = sum(len(v) for v in committed.values())

    # wait for the relay to report everything published: a consumer's metadata only sees topics that
    # existed when it started
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = (await t.get("/v1/relays/to-kafka/status")).json()
        if status["published"] >= total:
            break
        await asyncio.sleep(0.2)
    received: list[tuple[str, uuid.UUID]] = []
    headers: dict[str, bytes] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        assert partitions, worker_pool.logs()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        while len(received) < total and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    hdrs = {k: v for k, v in record.headers}
                    headers.update(hdrs)
                    assert record.key is not None
                    received.append((record.key.decode(), uuid.UUID(hdrs["outbox-id"].decode())))
    finally:
        await consumer.stop()
    assert len(received) >= total, worker_pool.logs()
    check_delivery("kafka", received, committed, rolled_back)
    assert headers["outbox-relay"] == b"to-kafka" and headers["writer"] in {b"0", b"1", b"2"}
    assert (await t.delete("/v1/relays/to-kafka")).status_code == 204
