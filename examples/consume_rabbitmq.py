"""Ship each order once, however often RabbitMQ delivers its message (aio-pika + the inbox).

Reads what Outbox Relay publishes to QUEUE: a relay to a RabbitMQ target publishes each message to the
target's exchange ('' by default) with the destination of its topic as the routing key, so a relay
that maps topic orders to shop-orders fills the queue shop-orders. Delivery is at least once, so a
message can arrive twice: the inbox records its message id (outbox-id) in the same transaction as the
shipment and skips ids it has seen; the message is acknowledged only after that transaction commits.

A service declares its queue once, durable, so that it keeps messages while no consumer runs: the relay
publishes with mandatory routing, and a message no queue takes is refused, retried and at last
dead-lettered. This example reads QUEUE if it exists; if not, it makes a temporary one (exclusive: the
broker drops it when the example disconnects, and the example deletes it on the way out), so start it
before you write the messages. Stops after COUNT messages (unset: at Ctrl-C).
"""

import asyncio
import contextlib
import json
import os
from functools import partial

import aio_pika
import asyncpg

from outbox_relay.client import Inbox, amqp_ref

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("QUEUE", "shop-orders")
COUNT = int(os.environ["COUNT"]) if os.environ.get("COUNT") else None

inbox = Inbox(consumer="shipping")


async def ship(conn: asyncpg.Connection, body: bytes) -> None:
    """The business change: commits together with the inbox record, or not at all."""
    order = json.loads(body)
    await conn.execute("INSERT INTO shipments (order_id) VALUES ($1)", order["id"])


async def queue_exists(connection: aio_pika.abc.AbstractConnection) -> bool:
    channel = await connection.channel()  # a passive declare of a missing queue closes its channel
    try:
        await channel.declare_queue(QUEUE, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def consume(pool: asyncpg.Pool, queue: aio_pika.abc.AbstractQueue, stop_after: int | None = None) -> None:
    async with queue.iterator() as messages:
        async for message in messages:
            # acknowledged when the block ends (after the commit); requeued if the handling raised
            async with message.process(requeue=True), pool.acquire() as conn:
                handled = await inbox.process(conn, amqp_ref(message), partial(ship, conn, message.body))
            print(f"message {amqp_ref(message).id}: {'shipped' if handled else 'duplicate, skipped'}", flush=True)
            if stop_after is not None and (stop_after := stop_after - 1) == 0:
                return


async def main() -> None:
    async with asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            await inbox.install(conn)  # creates outbox_relay.inbox if missing
            await conn.execute("CREATE TABLE IF NOT EXISTS shipments (order_id bigint, at timestamptz DEFAULT now())")
        async with await aio_pika.connect(AMQP_URL) as connection:  # a service: connect_robust
            existed = await queue_exists(connection)
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(QUEUE, passive=existed, exclusive=not existed)
            try:
                print(f"reading queue {QUEUE}{'' if existed else ' (temporary)'}", flush=True)
                await consume(pool, queue, stop_after=COUNT)
            finally:
                if not existed:
                    await queue.delete(if_unused=False, if_empty=False)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
