"""CloudEvents binary content mode end to end: one worker process relays the same rows to Kafka
(Tansu), RabbitMQ, Redis Streams, NATS JetStream and a webhook receiver with ``cloudevents`` set,
and every message that arrives parses with the CloudEvents SDK in its broker's binding: ``id`` the
message id, ``source`` the relay (or the configured one), ``type`` the named header or the topic,
``time`` the row's insert time, ``datacontenttype`` as configured, the payload as the event's data;
per-key order kept."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import nats
import nats.js.api
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from litestar.testing import AsyncTestClient

from outbox_relay.client import add
from tests.conftest import DatabaseFactory, pg_dsn
from tests.e2e.test_nats_relay import stored_headers
from tests.harness.brokers import NatsServer, RabbitMQAccount, RedisAccount, TansuBroker
from tests.harness.webhooks import WebhookReceiver, new_secret, receiver_thread
from tests.helpers import TenantClient, make_tenant
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

ROWS = 40
KEYS = 4


def typed(i: int) -> bool:
    """Rows with an ``event-type`` header (its value is ``ce-type``); the others use the topic."""
    return i % 3 == 0


async def write_rows(dsn: str) -> tuple[dict[uuid.UUID, int], datetime]:
    ids: dict[uuid.UUID, int] = {}
    conn = await asyncpg.connect(dsn)
    try:
        started = await conn.fetchval("SELECT now()")
        for start in range(0, ROWS, 10):
            async with conn.transaction():
                for i in range(start, start + 10):
                    headers = {"event-type": f"com.example.order.v{i % 2}"} if typed(i) else {}
                    ids[await add(conn, "orders", f"k{i % KEYS}", {"n": i}, headers=headers)] = i
    finally:
        await conn.close()
    return ids, started


def check_event(event: Any, ids: dict[uuid.UUID, int], source: str, after: datetime) -> int:
    """The row index the event stands for, after checking its attributes and data."""
    i = ids[uuid.UUID(event.get_id())]
    assert event.get_specversion() == "1.0"
    assert event.get_source() == source
    assert event.get_type() == (f"com.example.order.v{i % 2}" if typed(i) else "orders")
    assert event.get_datacontenttype() == "application/json"
    at = event.get_time()
    assert at is not None and after - timedelta(seconds=5) <= at <= datetime.now(UTC), at
    assert event.get_data() == {"n": i}
    return i


def check_order(name: str, received: list[int]) -> None:
    assert sorted(set(received)) == list(range(ROWS)), f"{name}: {len(set(received))} of {ROWS} rows"
    by_key: dict[int, list[int]] = defaultdict(list)
    for i in dict.fromkeys(received):  # first arrival of each (at least once)
        by_key[i % KEYS].append(i)
    for key, order in by_key.items():
        assert order == sorted(order), f"{name}: key k{key} out of order: {order}"


async def kafka_events(tansu: TansuBroker, topic: str, deadline: float) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, enable_auto_commit=False)
    await consumer.start()
    events: list[Any] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        assert partitions
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        while len(events) < ROWS and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    message = ce_kafka.KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value)
                    events.append(ce_kafka.from_binary(message, JSONFormat()))
    finally:
        await consumer.stop()
    return events


async def rabbitmq_events(queue: aio_pika.abc.AbstractQueue, deadline: float) -> list[Any]:
    events: list[Any] = []
    while len(events) < ROWS and time.monotonic() < deadline:
        incoming = await queue.get(no_ack=True, fail=False)
        if incoming is None:
            await asyncio.sleep(0.1)
            continue
        headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (incoming.headers or {}).items()}
        message = ce_rabbitmq.RabbitMQMessage(headers=headers, content_type=incoming.content_type, body=incoming.body)
        events.append(ce_rabbitmq.from_binary(message, JSONFormat()))
    return events


async def redis_events(redis_account: RedisAccount, stream: str) -> list[Any]:
    """Redis has no binding: its ``h:ce-*`` / ``h:content-type`` fields are read as the HTTP binding's
    headers."""
    redis = aioredis.Redis.from_url(redis_account.admin_url)
    try:
        entries = await redis.xrange(stream)
    finally:
        await redis.aclose()
    events = []
    for _, fields in entries:
        headers = {k.decode()[2:]: v.decode() for k, v in fields.items() if k.startswith(b"h:")}
        events.append(ce_http.from_binary(ce_http.HTTPMessage(headers=headers, body=fields[b"payload"]), JSONFormat()))
    return events


async def nats_events(js: Any, stream: str) -> list[Any]:
    """The Python SDK has no NATS binding: its binary mode's ``ce-`` headers and ``content-type`` are
    the HTTP binding's names."""
    info = await js.stream_info(stream)
    events = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(stream, seq)
        message = ce_http.HTTPMessage(headers=stored_headers(raw.hdrs), body=raw.data or b"")
        events.append(ce_http.from_binary(message, JSONFormat()))
    return events


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with receiver_thread([new_secret(21)]) as r:
        yield r


def webhook_events(receiver: WebhookReceiver) -> list[Any]:
    events = []
    for delivery in receiver.all:
        headers = {k: v for k, v in delivery.headers.items() if k.lower().startswith("ce-")}
        headers["content-type"] = delivery.content_type
        events.append(ce_http.from_binary(ce_http.HTTPMessage(headers=headers, body=delivery.payload), JSONFormat()))
    return events


async def put_relay(t: TenantClient, name: str, target: str, destination: str, cloudevents: dict[str, Any]) -> None:
    body = {
        "database": "app",
        "target": target,
        "partitions": 2,
        "topic_mapping": {"orders": destination},
        "cloudevents": cloudevents,
        "policy": {"batch_size": 8, "poll_interval_ms": 100},
    }
    r = await t.put(f"/v1/relays/{name}", body)
    assert r.status_code == 201, r.text
    assert r.json()["cloudevents"] == {"data_content_type": "application/json", "source": None, **cloudevents}


async def test_every_broker_receives_cloudevents_in_its_binding(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    tansu: TansuBroker,
    rabbitmq: RabbitMQAccount,
    redis_account: RedisAccount,
    nats_server: NatsServer,
    receiver: WebhookReceiver,
    worker_pool: WorkerPool,
) -> None:
    t = await make_tenant(client, "cloudevents")
    app_db = await databases.create("cloudevents")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(app_db)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    kafka_target = {"kind": "kafka", "bootstrap_servers": [tansu.bootstrap], "enable_idempotence": False}
    rabbit_target = {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password}
    redis_target = {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    nats_target = {"kind": "nats", "servers": [nats_server.url]}
    webhook_target = {"kind": "webhook", "url": receiver.url, "password": receiver.secrets[0]}
    targets = {"kafka": kafka_target, "rabbit": rabbit_target, "redis": redis_target, "nats": nats_target}
    targets["hook"] = webhook_target
    for name, target in targets.items():
        assert (await t.put(f"/v1/targets/{name}", target)).status_code == 201
    topic, queue_name, stream = f"ce-{t.name}", f"ce-{t.name}", f"{redis_account.prefix}ce"
    js_stream = f"{nats_server.prefix}-{t.name}-ce"
    subject = js_stream.replace("-", ".")
    connection = await aio_pika.connect(rabbitmq.admin_url)
    nats_admin = await nats.connect(nats_server.url, connect_timeout=5, allow_reconnect=False)
    js = nats_admin.jetstream(timeout=10)
    await js.add_stream(nats.js.api.StreamConfig(name=js_stream, subjects=[subject]))
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)  # mandatory publishes need it
        await put_relay(t, "ce-kafka", "kafka", topic, {"type_header": "event-type"})
        await put_relay(t, "ce-rabbit", "rabbit", queue_name, {"type_header": "event-type"})
        await put_relay(t, "ce-redis", "redis", stream, {"type_header": "event-type", "source": "urn:example:shop"})
        await put_relay(t, "ce-nats", "nats", subject, {"type_header": "event-type"})
        await put_relay(t, "ce-hook", "hook", "hooks", {"type_header": "event-type"})
        ids, started = await write_rows(pg_dsn(app_db))
        worker_pool.start()
        deadline = time.monotonic() + 90  # a bound on the wait, not an assertion about speed
        for relay in ("ce-kafka", "ce-rabbit", "ce-redis", "ce-nats", "ce-hook"):
            while time.monotonic() < deadline:
                if (await t.get(f"/v1/relays/{relay}/status")).json()["published"] >= ROWS:
                    break
                await asyncio.sleep(0.2)
        received = {
            "kafka": await kafka_events(tansu, topic, deadline),
            "rabbitmq": await rabbitmq_events(queue, deadline),
            "redis": await redis_events(redis_account, stream),
            "nats": await nats_events(js, js_stream),
            "webhook": webhook_events(receiver),
        }
        await queue.delete(if_empty=False)
    finally:
        await connection.close()
        await js.delete_stream(js_stream)
        await nats_admin.close()
    sources = {
        "kafka": "/relays/ce-kafka",
        "rabbitmq": "/relays/ce-rabbit",
        "redis": "urn:example:shop",
        "nats": "/relays/ce-nats",
        "webhook": "/relays/ce-hook",
    }
    for broker, events in received.items():
        assert len(events) >= ROWS, (broker, len(events), worker_pool.logs())
        check_order(broker, [check_event(e, ids, sources[broker], started) for e in events])


async def test_cloudevents_options_are_validated(client: AsyncTestClient[Any]) -> None:
    t = await make_tenant(client, "cloudevents-bad")
    body: dict[str, Any] = {"database": "app", "target": "t", "topic_mapping": {"*": "x"}}
    for bad in ({"source": "has space"}, {"data_content_type": "json"}, {"colour": "red"}, {"type_header": ""}):
        r = await t.put("/v1/relays/r", {**body, "cloudevents": bad})
        assert r.status_code in (400, 422), (bad, r.status_code, r.text)
        assert "cloudevents" in r.text, r.text
    assert json.loads((await t.get("/v1/relays")).text)["items"] == []
