"""Ship each order once, however often Kafka delivers its record (aiokafka + the inbox).

Delivery is at least once, so a record can arrive twice (and a consumer that rewinds its offsets
reads old ones again). The inbox records the record's message id (outbox-id) in the same
transaction as the shipment and skips ids it has seen. On its own the script plays the relay's part first and
produces one message twice, as a relay that retried a batch would.
"""

import asyncio
import json
import os
import time
import uuid
from functools import partial

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from outbox_relay.client import Inbox, kafka_ref

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")
KAFKA_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = os.environ.get("KAFKA_TOPIC", "shop.orders")

inbox = Inbox(consumer="shipping")


async def ship(conn: asyncpg.Connection, body: bytes) -> None:
    """The business change: commits together with the inbox record, or not at all."""
    order = json.loads(body)
    await conn.execute("INSERT INTO shipments (order_id) VALUES ($1)", order["id"])


async def consume(pool: asyncpg.Pool, consumer: AIOKafkaConsumer, stop_after: int | None = None) -> None:
    while True:
        for records in (await consumer.getmany(timeout_ms=1000, max_records=100)).values():
            for record in records:
                async with pool.acquire() as conn:
                    handled = await inbox.process(conn, kafka_ref(record), partial(ship, conn, record.value))
                print(f"message {kafka_ref(record).id}: {'shipped' if handled else 'duplicate, skipped'}")
                if stop_after is not None and (stop_after := stop_after - 1) == 0:
                    return
        # with a group_id (and enable_auto_commit=False): await consumer.commit() here, after the commits


async def publish_like_the_relay(producer: AIOKafkaProducer, message_id: uuid.UUID, order: dict[str, int]) -> None:
    """Stands in for Outbox Relay: the same message, produced twice."""
    headers = [("outbox-id", str(message_id).encode()), ("outbox-relay", b"shop-events"), ("outbox-topic", b"orders")]
    for _ in range(2):
        await producer.send_and_wait(TOPIC, json.dumps(order).encode(), key=str(order["id"]).encode(), headers=headers)


async def main() -> None:
    async with asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            await inbox.install(conn)  # creates outbox_relay.inbox if missing
            await conn.execute("CREATE TABLE IF NOT EXISTS shipments (order_id bigint, at timestamptz DEFAULT now())")
        order_id, message_id = time.time_ns() // 1000, uuid.uuid4()  # stand-ins for an order and its message
        async with (
            AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP) as producer,
            AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP, enable_auto_commit=False) as consumer,
        ):
            # A service would subscribe() with a group_id; here: every partition, from now on.
            partitions = [TopicPartition(TOPIC, p) for p in await producer.partitions_for(TOPIC)]
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for partition in partitions:
                await consumer.position(partition)
            await publish_like_the_relay(producer, message_id, {"id": order_id})
            await consume(pool, consumer, stop_after=2)
        shipped = await pool.fetchval("SELECT count(*) FROM shipments WHERE order_id = $1", order_id)
        print(f"order {order_id} shipped {shipped} time(s)")


if __name__ == "__main__":
    asyncio.run(main())
