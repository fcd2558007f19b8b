"""Every program in ``examples/`` runs, against a real database and real brokers, and the docs show
each one exactly as it is in the repository, so neither can rot. The consumers read what a worker
process relayed from the ``shop`` outbox, and leave no consumer group or queue behind."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import asyncpg
import msgspec
import nats
import nats.js.api
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis

from outbox_relay.client import add, schema_sql
from outbox_relay.config import Settings
from tests.conftest import RUN_ID, DatabaseFactory, pg_dsn
from tests.harness.brokers import NatsServer, RabbitMQAccount, RedisAccount, TansuBroker
from tests.helpers import TenantClient, admin, example, make_tenant, run_example
from tests.workers import WorkerPool

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
WRITERS = sorted(path.name for path in EXAMPLES.glob("write_*.py"))
MARKER = re.compile(r"<!-- example: (examples/[\w.]+) -->\n```python\n(.*?)```", re.DOTALL)


@pytest.fixture(scope="module")
async def shop_dsn(databases: DatabaseFactory) -> str:
    """The quick start's ``shop`` database: the outbox installed, nothing else."""
    dsn = pg_dsn(await databases.create("shop"))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(schema_sql())
    finally:
        await conn.close()
    return dsn


@pytest.mark.parametrize("name", WRITERS)
async def test_writer_example(name: str, shop_dsn: str) -> None:
    out = await run_example(name, DATABASE_URL=shop_dsn)
    match = re.fullmatch(r"order (\d+): outbox messages? ([0-9a-f-]{36}(?:, [0-9a-f-]{36})*)\n", out)
    assert match, out
    order_id, message_ids = match[1], [uuid.UUID(i) for i in match[2].split(", ")]
    conn = await asyncpg.connect(shop_dsn)
    try:
        rows = await conn.fetch(
            "SELECT message_id, topic, key, payload FROM outbox_relay.outbox WHERE message_id = ANY($1::uuid[]) "
            "ORDER BY id",
            message_ids,
        )
        assert await conn.fetchval("SELECT state FROM orders WHERE id = $1", int(order_id)) == "paid"
    finally:
        await conn.close()
    assert [row["message_id"] for row in rows] == message_ids
    assert (rows[0]["topic"], rows[0]["key"]) == ("orders", order_id)
    assert msgspec.json.decode(rows[0]["payload"]) == {"id": int(order_id), "state": "paid"}


@pytest.fixture(scope="module")
async def relaying(client: AsyncTestClient[Any], settings: Settings, shop_dsn: str) -> AsyncIterator[TenantClient]:
    """A tenant with the ``shop`` database registered, and a worker process relaying its relays."""
    tenant = await make_tenant(client, "examples")
    assert (await tenant.put("/v1/databases/shop", {"dsn": shop_dsn})).status_code == 201
    workers = WorkerPool(settings, "examples")
    workers.start()
    try:
        yield tenant
    finally:
        workers.stop_all()
        assert (await client.delete(f"/v1/tenants/{tenant.name}", headers=admin())).status_code == 204


async def relay_topic(tenant: TenantClient, name: str, target: dict[str, Any], topic: str, destination: str) -> None:
    """A target and a relay that sends the shop outbox's ``topic`` (and only it) to ``destination``."""
    assert (await tenant.put(f"/v1/targets/{name}", target)).status_code == 201
    relay = {"database": "shop", "target": name, "topic_mapping": {topic: destination}, "partitions": 2}
    assert (await tenant.put(f"/v1/relays/{name}", relay)).status_code == 201


async def write_order(dsn: str, topic: str) -> tuple[int, uuid.UUID]:
    """An order's message in the shop outbox, as a service writes it; the order id and the message id."""
    order_id = time.time_ns() // 1000
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            message_id = await add(conn, topic, key=str(order_id), payload={"id": order_id, "state": "paid"})
    finally:
        await conn.close()
    return order_id, message_id


async def check_shipped_once(dsn: str, order_id: int, message_id: uuid.UUID) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM shipments WHERE order_id = $1", order_id) == 1
        assert (
            await conn.fetchval("SELECT count(*) FROM outbox_relay.inbox WHERE message_id = $1", str(message_id)) == 1
        )
    finally:
        await conn.close()


@pytest.mark.e2e
async def test_redis_streams_consumer_example(
    shop_dsn: str, redis_account: RedisAccount, relaying: TenantClient
) -> None:
    """It reads the relay's entries from the start of the stream, in a group it deletes at the end: a
    second run reads the same entry again and the inbox skips it."""
    # a stream of its own: the quick start's tests relay to the run's shop:orders too
    stream = f"{redis_account.prefix}examples:{uuid.uuid4().hex[:8]}:orders"
    target = {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    await relay_topic(relaying, "to-redis", target, "orders-redis", stream)
    order_id, message_id = await write_order(shop_dsn, "orders-redis")
    url = f"redis://{redis_account.user}:{quote(redis_account.password, safe='')}@127.0.0.1:6379/0"
    env = {"DATABASE_URL": shop_dsn, "REDIS_URL": url, "STREAM": stream, "COUNT": "1"}
    first = await run_example("consume_redis_streams.py", **env)
    again = await run_example("consume_redis_streams.py", **env)
    assert f"message {message_id}: shipped" in first.splitlines(), first
    assert f"message {message_id}: duplicate, skipped" in again.splitlines(), again
    await check_shipped_once(shop_dsn, order_id, message_id)
    redis = Redis.from_url(redis_account.admin_url)
    try:
        assert await redis.xinfo_groups(stream) == []  # the group is gone; the stream is the relay's
    finally:
        await redis.aclose()


@pytest.mark.e2e
async def test_rabbitmq_consumer_example(shop_dsn: str, rabbitmq: RabbitMQAccount, relaying: TenantClient) -> None:
    """Started before the message is written, it makes its queue, takes the relayed message, and the
    queue is gone when it exits."""
    target = {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password}
    await relay_topic(relaying, "to-rabbitmq", target, "orders-rabbitmq", "shop-orders")
    env = {"DATABASE_URL": shop_dsn, "AMQP_URL": rabbitmq.admin_url, "QUEUE": "shop-orders", "COUNT": "1"}
    async with example("consume_rabbitmq.py", **env) as running:
        assert running.process.stdout is not None
        ready = await asyncio.wait_for(running.process.stdout.readline(), timeout=30)
        assert ready.decode() == "reading queue shop-orders (temporary)\n", ready
        order_id, message_id = await write_order(shop_dsn, "orders-rabbitmq")
    out = ready.decode() + running.output
    assert f"message {message_id}: shipped" in out.splitlines(), out
    await check_shipped_once(shop_dsn, order_id, message_id)
    connection = await aio_pika.connect(rabbitmq.admin_url)
    try:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue("shop-orders", passive=True)
    finally:
        await connection.close()


@pytest.mark.e2e
async def test_kafka_consumer_example(shop_dsn: str, tansu: TansuBroker, relaying: TenantClient) -> None:
    """It reads every partition of the relay's topic from the start, in no consumer group: a second run
    reads the same record again and the inbox skips it; the cluster has no group afterwards."""
    topic = f"shop.orders.{RUN_ID}"
    # Tansu refuses InitProducerId; a real cluster keeps the idempotent producer (the default)
    target = {"kind": "kafka", "bootstrap_servers": [tansu.bootstrap], "enable_idempotence": False, "timeout_ms": 5000}
    await relay_topic(relaying, "to-kafka", target, "orders-kafka", topic)
    order_id, message_id = await write_order(shop_dsn, "orders-kafka")
    admin_client = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await admin_client.start()
    try:
        groups = await admin_client.list_consumer_groups()  # the broker is the session's: others' may be there
        env = {"DATABASE_URL": shop_dsn, "KAFKA_BOOTSTRAP": tansu.bootstrap, "KAFKA_TOPIC": topic, "COUNT": "1"}
        first = await run_example("consume_kafka.py", **env)
        again = await run_example("consume_kafka.py", **env)
        assert await admin_client.list_consumer_groups() == groups
    finally:
        await admin_client.close()
    assert f"message {message_id}: shipped" in first.splitlines(), first
    assert f"message {message_id}: duplicate, skipped" in again.splitlines(), again
    await check_shipped_once(shop_dsn, order_id, message_id)


@pytest.mark.e2e
async def test_nats_consumer_example(shop_dsn: str, nats_server: NatsServer, relaying: TenantClient) -> None:
    """It reads the stream from its first message through an ephemeral pull consumer, acknowledging
    after the inbox commits: a second run reads the same message again and the inbox skips it; no
    consumer is left on the stream."""
    subject = f"{nats_server.prefix}.shop.orders".replace("-", ".")
    stream = subject.replace(".", "-")
    client = await nats.connect(nats_server.url, connect_timeout=5, allow_reconnect=False)
    js = client.jetstream(timeout=10)
    await js.add_stream(nats.js.api.StreamConfig(name=stream, subjects=[subject]))  # before the relay: it refuses
    try:
        target = {"kind": "nats", "servers": [nats_server.url], "timeout_ms": 5000}
        await relay_topic(relaying, "to-nats", target, "orders-nats", subject)
        order_id, message_id = await write_order(shop_dsn, "orders-nats")
        env = {"DATABASE_URL": shop_dsn, "NATS_URL": nats_server.url, "NATS_SUBJECT": subject, "COUNT": "1"}
        first = await run_example("consume_nats.py", **env)
        again = await run_example("consume_nats.py", **env)
        assert (await js.stream_info(stream)).state.consumer_count == 0
    finally:
        await js.delete_stream(stream)
        await client.close()
    assert f"message {message_id}: shipped" in first.splitlines(), first
    assert f"message {message_id}: duplicate, skipped" in again.splitlines(), again
    await check_shipped_once(shop_dsn, order_id, message_id)


def test_the_docs_show_every_example_as_it_is() -> None:
    """The README (or a page under docs/) embeds each example verbatim."""
    shown: dict[str, str] = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if doc.exists():
            for path, code in MARKER.findall(doc.read_text()):
                shown[path] = code
                assert code == (ROOT / path).read_text(), f"{doc.name} shows an outdated {path}"
    assert sorted(shown) == sorted(f"examples/{path.name}" for path in EXAMPLES.glob("*.py"))
