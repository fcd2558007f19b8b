"""Ship each order once, however often a Redis stream delivers its entry (redis-py + the inbox).

Delivery is at least once, so an entry can arrive twice. The inbox records the entry's message
id (outbox-id) in the same transaction as the shipment and skips ids it has seen; the entry is
acknowledged (XACK) only after that transaction commits. On its own the script plays the relay's part first
and appends one message twice, as a relay that retried a batch would.
"""

import asyncio
import json
import os
import time
import uuid
from functools import partial

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from outbox_relay.client import Inbox, stream_ref

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
STREAM = os.environ.get("STREAM", "shop:orders")
GROUP, CONSUMER = "shipping", "shipping-1"

inbox = Inbox(consumer="shipping")


async def ship(conn: asyncpg.Connection, body: bytes) -> None:
    """The business change: commits together with the inbox record, or not at all."""
    order = json.loads(body)
    await conn.execute("INSERT INTO shipments (order_id) VALUES ($1)", order["id"])


async def consume(pool: asyncpg.Pool, redis: Redis, stop_after: int | None = None) -> None:
    # ">" reads entries never delivered to the group; after a crash, first re-read this consumer's
    # pending ones ("0") or take over others' (XAUTOCLAIM): the inbox skips what was handled.
    while True:
        for _stream, entries in await redis.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=10, block=5000):
            for entry_id, fields in entries:
                async with pool.acquire() as conn:
                    handled = await inbox.process(conn, stream_ref(fields), partial(ship, conn, fields[b"payload"]))
                await redis.xack(STREAM, GROUP, entry_id)  # after the commit
                print(f"message {stream_ref(fields).id}: {'shipped' if handled else 'duplicate, skipped'}")
                if stop_after is not None and (stop_after := stop_after - 1) == 0:
                    return


async def publish_like_the_relay(redis: Redis, message_id: uuid.UUID, order: dict[str, int]) -> None:
    """Stands in for Outbox Relay: the same message, appended twice."""
    fields: dict[FieldT, EncodableT] = {
        "payload": json.dumps(order),
        "outbox-id": str(message_id),
        "key": str(order["id"]),
        "h:outbox-relay": "shop-events",
        "h:outbox-topic": "orders",
    }
    for _ in range(2):
        await redis.xadd(STREAM, fields)


async def main() -> None:
    async with asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=4) as pool, Redis.from_url(REDIS_URL) as redis:
        async with pool.acquire() as conn:
            await inbox.install(conn)  # creates outbox_relay.inbox if missing
            await conn.execute("CREATE TABLE IF NOT EXISTS shipments (order_id bigint, at timestamptz DEFAULT now())")
        try:
            await redis.xgroup_create(STREAM, GROUP, id="$", mkstream=True)  # "0": the whole history
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists already
                raise
        order_id, message_id = time.time_ns() // 1000, uuid.uuid4()  # stand-ins for an order and its message
        await publish_like_the_relay(redis, message_id, {"id": order_id})
        await consume(pool, redis, stop_after=2)
        shipped = await pool.fetchval("SELECT count(*) FROM shipments WHERE order_id = $1", order_id)
        print(f"order {order_id} shipped {shipped} time(s)")


if __name__ == "__main__":
    asyncio.run(main())
