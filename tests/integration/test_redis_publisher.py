"""The Redis Streams adapter's own XADD path against the real server: ``maxlen`` trims the stream
(approximately, as XADD's ``MAXLEN ~``), and every message lands with the entry layout."""

from __future__ import annotations

import uuid

import redis.asyncio as redis

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.brokers.redis_streams import RedisStreamsPublisher
from outbox_relay.netguard import AddressPolicy

URL = "redis://127.0.0.1:6379/0"
LOCAL = AddressPolicy(allow_private=True)


def message(i: int, stream: str) -> OutgoingMessage:
    return OutgoingMessage(
        id=i, message_id=f"m-{i}", destination=stream, key=f"k{i % 3}", payload=b"x" * 10, headers={"n": str(i)}
    )


async def test_maxlen_trims_the_stream_and_entries_keep_their_layout() -> None:
    trimmed, full = f"it:redis:trim:{uuid.uuid4().hex}", f"it:redis:full:{uuid.uuid4().hex}"
    client = redis.Redis.from_url(URL)
    try:
        async with RedisStreamsPublisher(url=URL, policy=LOCAL, maxlen=10) as publisher:
            for start in range(0, 2000, 500):
                result = await publisher.publish_batch([message(i, trimmed) for i in range(start, start + 500)])
                assert result.acked == 500 and result.rejected is None
        async with RedisStreamsPublisher(url=URL, policy=LOCAL) as publisher:
            assert (await publisher.publish_batch([message(i, full) for i in range(300)])).acked == 300
        # MAXLEN ~ trims whole macro nodes (100 entries by default): far below 2,000, not exactly 10
        assert await client.xlen(trimmed) < 500
        assert await client.xlen(full) == 300
        (_, last), *_ = await client.xrevrange(trimmed, count=1)
        assert last == {b"payload": b"x" * 10, b"outbox-id": b"m-1999", b"key": b"k1", b"h:n": b"1999"}
    finally:
        await client.delete(trimmed, full)
        await client.aclose()
