"""The benchmark's view of each broker: the target it configures, and how it reads back.

For every broker a *kit* knows the target (as the API's ``PUT /v1/targets`` body and as the spec
``open_publisher`` takes), prepares destinations (RabbitMQ queues, Kafka topics; streams need
nothing), counts what a destination holds (``XLEN``; a passive queue declare; the sum of end
offsets) and consumes a destination from its start, handing each message's payload and the time it
arrived to a callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import msgspec

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.domain import Target

OnMessage = Callable[[bytes, float], None]
"""Called with a message's payload and ``time.perf_counter()`` when it arrived."""
PlainSend = Callable[[list[OutgoingMessage]], Awaitable[None]]
"""Publish a batch with the broker's client library as a user would write it, acknowledged."""


class Kit(Protocol):
    name: str
    target_body: dict[str, Any]
    password: str | None

    def destination(self, purpose: str) -> str: ...

    async def prepare(self, destinations: list[str]) -> None: ...

    async def count(self, destination: str) -> int: ...

    async def consume(self, destination: str, on_message: OnMessage, stop: asyncio.Event) -> None: ...

    def plain(self) -> contextlib.AbstractAsyncContextManager[PlainSend]:
        """The plain library's publish (no adapter, no database): the ceiling a relay works under."""
        ...

    async def close(self) -> None: ...


def target_spec(kit: Kit) -> Target:
    body = {k: v for k, v in kit.target_body.items() if k != "password"}
    target: Target = msgspec.convert(body, type=Target)
    return target


class RedisKit:
    name = "redis"

    def __init__(self, *, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis

        self.url, self.prefix = url, prefix
        self.target_body: dict[str, Any] = {"kind": "redis_streams", "url": url}
        self.password: str | None = None
        self._redis = aioredis.Redis.from_url(url)

    def destination(self, purpose: str) -> str:
        return f"{self.prefix}{purpose}"

    async def prepare(self, destinations: list[str]) -> None:
        pass

    async def count(self, destination: str) -> int:
        return int(await self._redis.xlen(destination))

    async def consume(self, destination: str, on_message: OnMessage, stop: asyncio.Event) -> None:
        import redis.asyncio as aioredis

        reader = aioredis.Redis.from_url(self.url)
        last = "0-0"
        try:
            while not stop.is_set():
                reply = await reader.xread({destination: last}, count=1000, block=200)
                now = time.perf_counter()
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        on_message(fields[b"payload"], now)
        finally:
            await reader.aclose()

    @contextlib.asynccontextmanager
    async def plain(self) -> AsyncIterator[PlainSend]:
        """redis-py, one pipeline of XADDs per batch (no transaction)."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url)

        async def send(batch: list[OutgoingMessage]) -> None:
            pipe = client.pipeline(transaction=False)
            for m in batch:
                fields: dict[Any, Any] = {"payload": m.payload, "outbox-id": m.dedupe_id}
                if m.key is not None:
                    fields["key"] = m.key
                pipe.xadd(m.destination, fields)
            await pipe.execute()

        try:
            yield send
        finally:
            await client.aclose()

    async def close(self) -> None:
        await self._redis.aclose()


class RabbitMQKit:
    name = "rabbitmq"

    def __init__(self, *, vhost: str, host: str = "127.0.0.1", port: int = 5672) -> None:
        self.vhost = vhost
        self.admin_url = f"amqp://guest:guest@{host}:{port}/{vhost}"
        self.target_body: dict[str, Any] = {
            "kind": "rabbitmq",
            "url": f"amqp://guest@{host}:{port}/{vhost}",
            "password": "guest",
        }
        self.password: str | None = "guest"
        self._connection: Any = None
        self._channel: Any = None

    def destination(self, purpose: str) -> str:
        return f"bench-{purpose}"

    async def _admin_channel(self) -> Any:
        import aio_pika

        if self._channel is None or self._channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                self._connection = await aio_pika.connect(self.admin_url)
            self._channel = await self._connection.channel()
        return self._channel

    async def prepare(self, destinations: list[str]) -> None:
        """Durable queues on the default exchange: the relay publishes mandatory, so they must exist."""
        channel = await self._admin_channel()
        for name in destinations:
            await channel.declare_queue(name, durable=True)

    async def count(self, destination: str) -> int:
        channel = await self._admin_channel()
        queue = await channel.declare_queue(destination, passive=True)
        return int(queue.declaration_result.message_count)

    async def consume(self, destination: str, on_message: OnMessage, stop: asyncio.Event) -> None:
        import aio_pika

        connection = await aio_pika.connect(self.admin_url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(destination, passive=True)

            async def received(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                on_message(message.body, time.perf_counter())

            tag = await queue.consume(received, no_ack=True)
            await stop.wait()
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        finally:
            await connection.close()

    @contextlib.asynccontextmanager
    async def plain(self) -> AsyncIterator[PlainSend]:
        """aio-pika with publisher confirms: every message persistent and mandatory, a batch is one
        ``gather`` of publishes (each waits for its confirm)."""
        import aio_pika

        connection = await aio_pika.connect(self.admin_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = channel.default_exchange

            async def send(batch: list[OutgoingMessage]) -> None:
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                m.payload,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                message_id=m.dedupe_id,
                                headers=dict(m.headers),
                            ),
                            routing_key=m.destination,
                            mandatory=True,
                        )
                        for m in batch
                    )
                )

            yield send
        finally:
            await connection.close()

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()


class KafkaKit:
    """A private Tansu broker. Tansu refuses idempotent producers (no InitProducerId), hence
    ``enable_idempotence: false``; group joins are slow on it, so consumers ``assign()``."""

    name = "kafka"

    def __init__(self, *, bootstrap: str, topic_partitions: int = 3) -> None:
        self.bootstrap = bootstrap
        self.topic_partitions = topic_partitions
        self.target_body: dict[str, Any] = {
            "kind": "kafka",
            "bootstrap_servers": [bootstrap],
            "enable_idempotence": False,
        }
        self.password: str | None = None
        self._counts: dict[str, int] = {}
        self._counters: dict[str, asyncio.Task[None]] = {}

    def destination(self, purpose: str) -> str:
        return f"bench-{purpose}"

    async def prepare(self, destinations: list[str]) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(name, num_partitions=self.topic_partitions, replication_factor=1) for name in destinations]
            )
        finally:
            await admin.close()

    def _partitions(self, topic: str) -> list[Any]:
        from aiokafka import TopicPartition

        return [TopicPartition(topic, p) for p in range(self.topic_partitions)]

    async def count(self, destination: str) -> int:
        """Records readable from ``destination``, counted by a consumer that reads it from the start.

        Not the sum of end offsets: Tansu 0.6.0 (memory engine) answers ListOffsets short by about
        one record batch per partition (19,900 of 20,000 records, all of which a consumer fetches)."""
        if destination not in self._counts:
            self._counts[destination] = 0
            self._counters[destination] = asyncio.create_task(self._count(destination))
        task = self._counters[destination]
        if task.done():
            task.result()
        return self._counts[destination]

    async def _count(self, destination: str) -> None:
        def seen(_payload: bytes, _at: float) -> None:
            self._counts[destination] += 1

        await self.consume(destination, seen, asyncio.Event())

    async def consume(self, destination: str, on_message: OnMessage, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer

        # Tansu answers a fetch only after fetch_max_wait_ms, new records or not (a real broker returns
        # as soon as one arrives): at 50 ms the consumer added 13.5 ms to a delivery's p50 (one
        # producer, one message per 10 ms: p50 14.5 ms at 50, 3.0 ms at 5), which the relay was blamed for
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=5
        )
        await consumer.start()
        try:
            partitions = self._partitions(destination)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=1000)
                now = time.perf_counter()
                for records in batches.values():
                    for record in records:
                        on_message(record.value, now)
        finally:
            await consumer.stop()

    @contextlib.asynccontextmanager
    async def plain(self) -> AsyncIterator[PlainSend]:
        """aiokafka, ``acks=all``: a batch is sent, then every delivery awaited."""
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False)
        await producer.start()

        async def send(batch: list[OutgoingMessage]) -> None:
            deliveries = [
                await producer.send(m.destination, m.payload, key=m.key.encode() if m.key is not None else None)
                for m in batch
            ]
            await asyncio.gather(*deliveries)

        try:
            yield send
        finally:
            await producer.stop()

    async def close(self) -> None:
        for task in self._counters.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class NatsKit:
    """The local NATS server with JetStream: one stream per destination (subject = destination),
    deleted at close. Reads use ordered push consumers (no acks, no durable state)."""

    name = "nats"

    def __init__(self, *, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.target_body: dict[str, Any] = {"kind": "nats", "servers": [url]}
        self.password: str | None = None
        self._admin: Any = None
        self._streams: list[str] = []

    def destination(self, purpose: str) -> str:
        return f"{self.prefix}.{purpose}"

    @staticmethod
    def _stream(destination: str) -> str:
        return destination.replace(".", "-")

    async def _js(self) -> Any:
        import nats

        if self._admin is None:
            self._admin = await nats.connect(self.url, allow_reconnect=False, connect_timeout=5)
        return self._admin.jetstream(timeout=10)

    async def prepare(self, destinations: list[str]) -> None:
        from nats.js.api import StreamConfig

        js = await self._js()
        for destination in destinations:
            await js.add_stream(StreamConfig(name=self._stream(destination), subjects=[destination]))
            self._streams.append(self._stream(destination))

    async def count(self, destination: str) -> int:
        info = await (await self._js()).stream_info(self._stream(destination))
        return int(info.state.messages)

    async def consume(self, destination: str, on_message: OnMessage, stop: asyncio.Event) -> None:
        import nats

        reader = await nats.connect(self.url, allow_reconnect=False, connect_timeout=5)
        try:

            async def received(msg: Any) -> None:
                on_message(msg.data, time.perf_counter())

            sub = await reader.jetstream().subscribe(destination, cb=received, ordered_consumer=True)
            await stop.wait()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        finally:
            await reader.close()

    @contextlib.asynccontextmanager
    async def plain(self) -> AsyncIterator[PlainSend]:
        """nats-py's pipelined JetStream publish: a batch is one ``publish_async`` per message (with
        ``Nats-Msg-Id``), then every ack awaited together. Faster than a ``gather`` of
        ``js.publish`` (a request each): 20,400 against 13,800 msg/s for 1 KiB messages, 500 a batch,
        on the development machine."""
        import nats

        client = await nats.connect(self.url, allow_reconnect=False, connect_timeout=5)
        js = client.jetstream()

        async def send(batch: list[OutgoingMessage]) -> None:
            acks = [
                await js.publish_async(m.destination, m.payload, headers={"Nats-Msg-Id": m.dedupe_id}) for m in batch
            ]
            await asyncio.gather(*acks)

        try:
            yield send
        finally:
            await client.close()

    async def close(self) -> None:
        if self._admin is None:
            return
        js = await self._js()
        for name in self._streams:
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        with contextlib.suppress(Exception):
            await self._admin.close()


class WebhookKit:
    """A webhook receiver in the bench's process (``tests.harness.webhooks.WebhookReceiver``: it verifies every
    request's signature with the ``standardwebhooks`` package, as a real receiver would), the target
    signing with one secret and ``concurrency`` requests in flight. Destinations are what the receiver
    records per ``outbox-destination`` header."""

    name = "webhook"

    def __init__(self, *, concurrency: int = 16) -> None:
        from tests.harness.webhooks import WebhookReceiver, new_secret

        self.concurrency = concurrency
        self.secret = new_secret(42)
        self.receiver = WebhookReceiver([self.secret])
        self.target_body: dict[str, Any] = {}
        self.password: str | None = self.secret

    async def start(self) -> None:
        await self.receiver.start()
        self.target_body = {
            "kind": "webhook",
            "url": self.receiver.url,
            "password": self.secret,
            "max_concurrent_requests": self.concurrency,
        }

    def destination(self, purpose: str) -> str:
        return f"bench-{purpose}"

    async def prepare(self, destinations: list[str]) -> None:
        pass

    async def count(self, destination: str) -> int:
        if self.receiver.bad_signatures:
            raise RuntimeError(f"{self.receiver.bad_signatures} request(s) did not verify")
        return len(self.receiver.deliveries[destination])

    async def consume(self, destination: str, on_message: OnMessage, stop: asyncio.Event) -> None:
        def delivered(delivery: Any) -> None:
            if delivery.destination == destination:
                on_message(delivery.payload, time.perf_counter())

        self.receiver.listeners.append(delivered)
        try:
            await stop.wait()
        finally:
            self.receiver.listeners.remove(delivered)

    @contextlib.asynccontextmanager
    async def plain(self) -> AsyncIterator[PlainSend]:
        """httpx, ``concurrency`` POSTs in flight (as many connections), each signed with the
        ``standardwebhooks`` package's ``Webhook.sign``; no per-key order (the ceiling, not a relay)."""
        import datetime as dt
        from collections import deque

        import httpx
        from standardwebhooks import Webhook

        hook = Webhook(self.secret)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        client = httpx.AsyncClient(limits=limits, timeout=10.0)

        async def post(m: OutgoingMessage) -> None:
            now = dt.datetime.now(dt.UTC)
            headers = {
                "webhook-id": m.dedupe_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": hook.sign(m.dedupe_id, now, m.payload.decode()),
                "outbox-destination": m.destination,
                "content-type": "application/json",
            }
            response = await client.post(self.receiver.url, content=m.payload, headers=headers)
            response.raise_for_status()

        async def send(batch: list[OutgoingMessage]) -> None:
            queue = deque(batch)

            async def worker() -> None:
                while queue:
                    await post(queue.popleft())

            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(batch)))))

        try:
            yield send
        finally:
            await client.aclose()

    async def close(self) -> None:
        await self.receiver.close()
