"""Ship each order once, however often a Redis stream delivers its entry (redis-py + the inbox).

Reads what Outbox Relay published to STREAM (the quick start's relay maps topic orders to shop:orders)
from its first entry, through a consumer group it makes for the run. Delivery is at least once, so an
entry can arrive twice: the inbox records its message id (outbox-id) in the same transaction as the
shipment and skips ids it has seen; the entry is acknowledged (XACK) only after that transaction
commits. Run it twice and the second run reads the same entries again and skips them all.

Stops after COUNT entries (unset: at Ctrl-C) and deletes the consumer group it made.
"""

import asyncio
import contextlib
import json
import os
from functools import partial

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from outbox_relay.client import Inbox, stream_ref

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/shop")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
STREAM = os.environ.get("STREAM", "shop:orders")
COUNT = int(os.environ["COUNT"]) if os.environ.get("COUNT") else None
GROUP, CONSUMER = os.environ.get("GROUP", "shipping"), "shipping-1"

inbox = Inbox(consumer="shipping")


async def ship(conn: asyncpg.Connection, body: bytes) -> None:
    """The business change: commits together with the inbox record, or not at all."""
    order = json.loads(body)
    await conn.execute("INSERT INTO shipments (order_id) VALUES ($1)", order["id"])


async def create_group(redis: Redis) -> bool:
    """Makes the group, reading from the stream's first entry (id "0"; "$" would read only entries added
    from now on). False when it exists already: someone else's, it stays. Waits for the relay to make
    the stream."""
    waiting = False
    while True:
        try:
            await redis.xgroup_create(STREAM, GROUP, id="0")
            return True
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            if "requires the key to exist" not in str(exc):
                raise
        if not waiting:
            print(f"waiting for stream {STREAM} (the relay makes it with its first message)", flush=True)
            waiting = True
        await asyncio.sleep(0.5)


async def delete_group(redis: Redis) -> None:
    try:
        await redis.xgroup_destroy(STREAM, GROUP)
    except ResponseError as exc:
        if "requires the key to exist" not in str(exc):  # else the stream, and the group, were deleted
            raise


async def consume(pool: asyncpg.Pool, redis: Redis, stop_after: int | None = None) -> None:
    # ">" reads entries never delivered to the group; after a crash, first re-read this consumer's
    # pending ones ("0") or take over others' (XAUTOCLAIM): the inbox skips what was handled.
    while True:
        for _stream, entries in await redis.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=10, block=5000):
            for entry_id, fields in entries:
                async with pool.acquire() as conn:
                    handled = await inbox.process(conn, stream_ref(fields), partial(ship, conn, fields[b"payload"]))
                await redis.xack(STREAM, GROUP, entry_id)  # after the commit
                print(f"message {stream_ref(fields).id}: {'shipped' if handled else 'duplicate, skipped'}", flush=True)
                if stop_after is not None and (stop_after := stop_after - 1) == 0:
                    return


async def main() -> None:
    async with asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=4) as pool, Redis.from_url(REDIS_URL) as redis:
        async with pool.acquire() as conn:
            await inbox.install(conn)  # creates outbox_relay.inbox if missing
            await conn.execute("CREATE TABLE IF NOT EXISTS shipments (order_id bigint, at timestamptz DEFAULT now())")
        created = await create_group(redis)
        try:
            print(f"reading {STREAM} as group {GROUP}", flush=True)
            await consume(pool, redis, stop_after=COUNT)
        finally:
            if created:  # a service keeps its group: it remembers what was read and acknowledged
                await delete_group(redis)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
