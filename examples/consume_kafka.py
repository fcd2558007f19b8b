"""Ship each order once, however often Kafka delivers its record (aiokafka + the inbox).

Reads what Outbox Relay published to KAFKA_TOPIC (a relay to a Kafka target produces each message to
the topic its topic mapping gives, keyed by the outbox key), every partition from the first record.
Delivery is at least once, so a record can arrive twice (and a consumer that rewinds its offsets reads
old ones again): the inbox records its message id (outbox-id) in the same transaction as the shipment
and skips ids it has seen. Run it twice and the second run reads the same records again and skips
them all.

A service subscribes with a group_id and commits its offsets after the inbox commits. This example
joins no group, so it leaves nothing in the cluster; it waits for the relay to make the topic rather
than asking for it (a metadata request for a missing topic can create it). Stops after COUNT records
(unset: at Ctrl-C).
"""

import asyncio
import contextlib
import json
import os
from functools import partial

import asyncpg
from aiokafka import AIOKafkaConsumer

from outbox_relay.client import Inbox, kafka_ref

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")
KAFKA_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
TOPIC = os.environ.get("KAFKA_TOPIC", "shop.orders")
COUNT = int(os.environ["COUNT"]) if os.environ.get("COUNT") else None

inbox = Inbox(consumer="shipping")


async def ship(conn: asyncpg.Connection, body: bytes) -> None:
    """The business change: commits together with the inbox record, or not at all."""
    order = json.loads(body)
    await conn.execute("INSERT INTO shipments (order_id) VALUES ($1)", order["id"])


async def wait_for_topic(consumer: AIOKafkaConsumer) -> None:
    waiting = False
    while TOPIC not in await consumer.topics():  # lists the cluster's topics, creates none
        if not waiting:
            print(f"waiting for topic {TOPIC} (the relay makes it with its first message)", flush=True)
            waiting = True
        await asyncio.sleep(1)


async def consume(pool: asyncpg.Pool, consumer: AIOKafkaConsumer, stop_after: int | None = None) -> None:
    while True:
        for records in (await consumer.getmany(timeout_ms=1000, max_records=100)).values():
            for record in records:
                async with pool.acquire() as conn:
                    handled = await inbox.process(conn, kafka_ref(record), partial(ship, conn, record.value))
                print(f"message {kafka_ref(record).id}: {'shipped' if handled else 'duplicate, skipped'}", flush=True)
                if stop_after is not None and (stop_after := stop_after - 1) == 0:
                    return
        # with a group_id (and enable_auto_commit=False): await consumer.commit() here, after the commits


async def main() -> None:
    async with asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            await inbox.install(conn)  # creates outbox_relay.inbox if missing
            await conn.execute("CREATE TABLE IF NOT EXISTS shipments (order_id bigint, at timestamptz DEFAULT now())")
        async with AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP, auto_offset_reset="earliest") as consumer:
            await wait_for_topic(consumer)
            consumer.subscribe([TOPIC])  # no group_id: every partition is this consumer's
            print(f"reading topic {TOPIC}", flush=True)
            await consume(pool, consumer, stop_after=COUNT)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
