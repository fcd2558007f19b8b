"""Ship each order once, however often RabbitMQ delivers its message (aio-pika + the inbox).

Delivery is at least once, so a message can arrive twice. The inbox records the message's id
(outbox-id) in the same transaction as the shipment and skips ids it has seen; the message is
acknowledged only after that transaction commits. On its own the script plays the relay's part first and
publishes one message twice, as a relay that retried a batch would.
"""

import asyncio
import json
import os
import time
import uuid
from functools import partial

import aio_pika
import asyncpg

from outbox_relay.client import Inbox, amqp_ref

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("QUEUE", "shop-orders")

inbox = Inbox(consumer="shipping")


async def ship(conn: asyncpg.Connection, body: bytes) -> None:
    """The business change: commits together with the inbox record, or not at all."""
    order = json.loads(body)
    await conn.execute("INSERT INTO shipments (order_id) VALUES ($1)", order["id"])


async def consume(pool: asyncpg.Pool, queue: aio_pika.abc.AbstractQueue, stop_after: int | None = None) -> None:
    async with queue.iterator() as messages:
        async for message in messages:
            # acknowledged when the block ends (after the commit); requeued if the handling raised
            async with message.process(requeue=True), pool.acquire() as conn:
                handled = await inbox.process(conn, amqp_ref(message), partial(ship, conn, message.body))
            print(f"message {amqp_ref(message).id}: {'shipped' if handled else 'duplicate, skipped'}")
            if stop_after is not None and (stop_after := stop_after - 1) == 0:
                return


async def publish_like_the_relay(
    channel: aio_pika.abc.AbstractChannel, message_id: uuid.UUID, order: dict[str, int]
) -> None:
    """Stands in for Outbox Relay: the same message, published twice."""
    message = aio_pika.Message(
        json.dumps(order).encode(),
        message_id=str(message_id),
        headers={"outbox-id": str(message_id), "outbox-relay": "shop-events", "outbox-topic": "orders"},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    for _ in range(2):
        await channel.default_exchange.publish(message, routing_key=QUEUE)


async def main() -> None:
    async with asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            await inbox.install(conn)  # creates outbox_relay.inbox if missing
            await conn.execute("CREATE TABLE IF NOT EXISTS shipments (order_id bigint, at timestamptz DEFAULT now())")
        async with await aio_pika.connect_robust(AMQP_URL) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(QUEUE, durable=True)
            order_id, message_id = time.time_ns() // 1000, uuid.uuid4()  # stand-ins for an order and its message
            await publish_like_the_relay(channel, message_id, {"id": order_id})
            await consume(pool, queue, stop_after=2)
        shipped = await pool.fetchval("SELECT count(*) FROM shipments WHERE order_id = $1", order_id)
        print(f"order {order_id} shipped {shipped} time(s)")


if __name__ == "__main__":
    asyncio.run(main())
