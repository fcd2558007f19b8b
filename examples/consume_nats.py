"""Ship each order once, however often JetStream delivers its message (nats-py + the inbox).

Reads what Outbox Relay published to NATS_SUBJECT (a relay to a NATS target publishes each message to
the subject its topic mapping gives; a JetStream stream must capture it, or the message is refused:
this example makes the stream NATS_STREAM for the subject when no stream captures it, and keeps it),
from the stream's first message, through an ephemeral pull consumer of its own. Delivery is at least
once, so a message can arrive twice: the inbox records its message id (header outbox-id) in the same
transaction as the shipment and skips ids it has seen; the message is acknowledged only after that
transaction commits. Run it twice and the second run reads the same messages again and skips them all.

A service uses a durable consumer (``durable=...``), which remembers what was acknowledged. Stops
after COUNT messages (unset: at Ctrl-C) and deletes its consumer.
"""

import asyncio
import contextlib
import json
import os
from functools import partial

import asyncpg
import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import NotFoundError

from outbox_relay.client import Inbox, nats_ref

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")
NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
SUBJECT = os.environ.get("NATS_SUBJECT", "shop.orders")
STREAM = os.environ.get("NATS_STREAM", "SHOP_ORDERS")
COUNT = int(os.environ["COUNT"]) if os.environ.get("COUNT") else None

inbox = Inbox(consumer="shipping")


async def ship(conn: asyncpg.Connection, body: bytes) -> None:
    """The business change: commits together with the inbox record, or not at all."""
    order = json.loads(body)
    await conn.execute("INSERT INTO shipments (order_id) VALUES ($1)", order["id"])


async def ensure_stream(js: JetStreamContext) -> str:
    """The stream that captures SUBJECT, made when there is none."""
    try:
        return await js.find_stream_name_by_subject(SUBJECT)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT]))
        print(f"made stream {STREAM} for {SUBJECT}", flush=True)
        return STREAM


async def consume(pool: asyncpg.Pool, js: JetStreamContext, stream: str, stop_after: int | None = None) -> None:
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)  # from the stream's first message
    sub = await js.pull_subscribe(SUBJECT, stream=stream, config=config)
    try:
        while True:
            try:
                messages = await sub.fetch(10, timeout=5)
            except NatsTimeout:
                continue
            for message in messages:
                async with pool.acquire() as conn:
                    handled = await inbox.process(conn, nats_ref(message), partial(ship, conn, message.data))
                await message.ack()  # after the commit
                print(f"message {nats_ref(message).id}: {'shipped' if handled else 'duplicate, skipped'}", flush=True)
                if stop_after is not None and (stop_after := stop_after - 1) == 0:
                    return
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, (await sub.consumer_info()).name)
        await sub.unsubscribe()


async def main() -> None:
    async with asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            await inbox.install(conn)  # creates outbox_relay.inbox if missing
            await conn.execute("CREATE TABLE IF NOT EXISTS shipments (order_id bigint, at timestamptz DEFAULT now())")
        client = await nats.connect(NATS_URL)
        try:
            js = client.jetstream()
            stream = await ensure_stream(js)
            print(f"reading {SUBJECT} from stream {stream}", flush=True)
            await consume(pool, js, stream, stop_after=COUNT)
        finally:
            await client.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
