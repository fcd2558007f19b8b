"""The idempotent receiver: a message delivered many times, also concurrently, is handled once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from types import SimpleNamespace

import aio_pika
import asyncpg
import psycopg
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.brokers.kafka import KafkaPublisher
from outbox_relay.brokers.rabbitmq import RabbitMQPublisher
from outbox_relay.brokers.redis_streams import RedisStreamsPublisher
from outbox_relay.client import ClientError, Inbox, MessageRef, amqp_ref, kafka_ref, nats_ref, stream_ref
from outbox_relay.domain import Relay
from outbox_relay.engine import build_messages
from outbox_relay.tenant.db import OutboxRow
from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import RabbitMQAccount, RedisAccount, TansuBroker
from tests.helpers import LOCAL


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
async def dsn(databases: DatabaseFactory) -> str:
    """The consumer's database: the inbox and a ledger the handlers write their side effect to."""
    dsn = pg_dsn(await databases.create("inbox"))
    conn = await asyncpg.connect(dsn)
    try:
        await Inbox(consumer="setup").install(conn)
        await conn.execute("CREATE TABLE ledger (consumer text, message_id text, handled_at timestamptz DEFAULT now())")
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def conns(dsn: str) -> AsyncIterator[list[asyncpg.Connection]]:
    opened = [await asyncpg.connect(dsn) for _ in range(4)]
    yield opened
    for conn in opened:
        await conn.close()


def new_ref(relay: str = "orders-relay") -> MessageRef:
    return MessageRef(new_id(), relay)


async def times_handled(conn: asyncpg.Connection, consumer: str, message_id: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM ledger WHERE consumer = $1 AND message_id = $2", consumer, message_id
    )
    return count


async def handle(inbox: Inbox, conn: asyncpg.Connection, ref: MessageRef, *, delay_s: float = 0.0) -> bool:
    async def side_effect() -> None:
        await conn.execute("INSERT INTO ledger (consumer, message_id) VALUES ($1, $2)", inbox.consumer, ref.id)
        await asyncio.sleep(delay_s)

    return bool(await inbox.process(conn, ref, side_effect))


async def test_a_message_delivered_again_and_again_is_handled_once(conns: list[asyncpg.Connection]) -> None:
    inbox, ref, conn = Inbox(consumer="billing"), new_ref(), conns[0]
    assert [await handle(inbox, conn, ref) for _ in range(5)] == [True, False, False, False, False]
    assert await times_handled(conn, "billing", ref.id) == 1
    assert await inbox.seen(conn, ref)


async def test_two_connections_racing_for_one_message(conns: list[asyncpg.Connection]) -> None:
    inbox, ref = Inbox(consumer="billing"), new_ref()
    first = asyncio.create_task(handle(inbox, conns[0], ref, delay_s=0.3))
    await asyncio.sleep(0.1)  # the first holds the uncommitted inbox row ...
    second = asyncio.create_task(handle(inbox, conns[1], ref))
    await asyncio.sleep(0.1)
    assert not second.done()  # ... so the second waits for it, then sees the message as handled
    assert list(await asyncio.gather(first, second)) == [True, False]
    assert await times_handled(conns[2], "billing", ref.id) == 1


async def test_many_deliveries_racing_on_four_connections(conns: list[asyncpg.Connection]) -> None:
    inbox, refs = Inbox(consumer="billing"), [new_ref() for _ in range(30)]

    async def consumer(conn: asyncpg.Connection, order: list[MessageRef]) -> int:
        return sum([await handle(inbox, conn, ref) for ref in order])

    # every connection delivers every message (twice), in its own order
    orders = [refs * 2, refs[::-1] * 2, refs[::2] + refs[1::2] + refs, refs[10:] + refs[:10] + refs]
    handled = await asyncio.gather(*(consumer(conn, order) for conn, order in zip(conns, orders, strict=True)))
    assert sum(handled) == len(refs)
    counts = await conns[0].fetch(
        "SELECT message_id, count(*) AS n FROM ledger WHERE message_id = ANY($1::text[]) GROUP BY message_id",
        [ref.id for ref in refs],
    )
    assert sorted((row["message_id"], row["n"]) for row in counts) == sorted((ref.id, 1) for ref in refs)


async def test_a_failed_handler_leaves_the_message_to_a_redelivery(conns: list[asyncpg.Connection]) -> None:
    inbox, ref = Inbox(consumer="billing"), new_ref()

    async def failing() -> None:
        await conns[0].execute("INSERT INTO ledger (consumer, message_id) VALUES ('billing', $1)", ref.id)
        await asyncio.sleep(0.3)
        raise RuntimeError("handler failed")

    first = asyncio.create_task(inbox.process(conns[0], ref, failing))
    await asyncio.sleep(0.1)
    racing = asyncio.create_task(handle(inbox, conns[1], ref))  # waits for the first, which rolls back
    with pytest.raises(RuntimeError, match="handler failed"):
        await first
    assert await racing is True
    assert await handle(inbox, conns[0], ref) is False
    assert await times_handled(conns[2], "billing", ref.id) == 1


async def test_each_consumer_and_each_relay_is_counted_apart(conns: list[asyncpg.Connection]) -> None:
    billing, shipping, conn = Inbox(consumer="billing"), Inbox(consumer="shipping"), conns[0]
    message_id = new_id()
    from_a, from_b = MessageRef(message_id, "relay-a"), MessageRef(message_id, "relay-b")
    assert [await handle(billing, conn, from_a), await handle(shipping, conn, from_a)] == [True, True]
    assert [await handle(billing, conn, from_a), await handle(shipping, conn, from_a)] == [False, False]
    assert await handle(billing, conn, from_b) is True  # same id from another source database
    assert await times_handled(conn, "billing", message_id) == 2
    assert await times_handled(conn, "shipping", message_id) == 1


async def test_claim_outside_a_transaction_is_refused(dsn: str, conns: list[asyncpg.Connection]) -> None:
    inbox = Inbox(consumer="billing")
    with pytest.raises(ClientError, match="inside the transaction"):
        await inbox.claim(conns[0], new_ref())
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(ClientError, match="inside the transaction"):
        inbox.claim(conn, new_ref())
    async with conns[0].transaction():
        ref = new_ref()
        assert await inbox.claim(conns[0], ref) is True
        assert await inbox.claim(conns[0], ref) is False


async def test_synchronous_and_sqlalchemy_consumers(dsn: str, conns: list[asyncpg.Connection]) -> None:
    inbox = Inbox(consumer="sync")
    ref = new_ref()

    with psycopg.connect(dsn) as conn:
        inbox.install(conn)
        assert inbox.expire(conn) == 0
        conn.commit()

        def side_effect() -> None:
            conn.execute("INSERT INTO ledger (consumer, message_id) VALUES ('sync', %s)", (ref.id,))

        assert [inbox.process(conn, ref, side_effect) for _ in range(3)] == [True, False, False]

    engine = create_engine(dsn.replace("postgresql://", "postgresql+psycopg://"))
    with Session(engine) as session:
        inbox.install(session)
        session.commit()

        def orm_side_effect(message: MessageRef) -> None:
            session.execute(text("INSERT INTO ledger (consumer, message_id) VALUES ('sync', :id)"), {"id": message.id})

        assert inbox.process(session, ref, lambda: orm_side_effect(ref)) is False
        other = new_ref()
        assert [inbox.process(session, other, lambda: orm_side_effect(other)) for _ in range(2)] == [True, False]
    engine.dispose()

    async_engine = create_async_engine(dsn.replace("postgresql://", "postgresql+asyncpg://"))
    async with AsyncSession(async_engine) as async_session:

        async def async_side_effect() -> None:
            await async_session.execute(
                text("INSERT INTO ledger (consumer, message_id) VALUES ('sync', :id)"), {"id": third.id}
            )

        third = new_ref()
        assert [await inbox.process(async_session, third, async_side_effect) for _ in range(2)] == [True, False]
    await async_engine.dispose()
    assert [await times_handled(conns[0], "sync", r.id) for r in (ref, other, third)] == [1, 1, 1]


async def test_old_ids_expire_in_batches(conns: list[asyncpg.Connection]) -> None:
    conn = conns[0]
    inbox, other = Inbox(consumer="expiring", retention_s=3600), Inbox(consumer="expiring-other", retention_s=3600)
    old, recent = [new_ref() for _ in range(25)], [new_ref() for _ in range(5)]
    async with conn.transaction():
        for ref in old + recent:
            assert await inbox.claim(conn, ref)
            assert await other.claim(conn, ref)
    await conn.execute(
        "UPDATE outbox_relay.inbox SET received_at = now() - interval '2 hours' WHERE message_id = ANY($1::text[])",
        [ref.id for ref in old],
    )
    assert [await inbox.expire(conn, batch_size=10) for _ in range(4)] == [10, 10, 5, 0]
    assert not any([await inbox.seen(conn, ref) for ref in old])
    assert all([await inbox.seen(conn, ref) for ref in recent])
    assert all([await other.seen(conn, ref) for ref in old])  # another consumer's ids are its own business
    assert await handle(inbox, conn, old[0]) is True  # past the window, a redelivery counts as new


async def test_install_is_idempotent_and_safe_to_race(databases: DatabaseFactory) -> None:
    dsn = pg_dsn(await databases.create("inbox_install"))
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        inbox = Inbox(consumer="c", schema="consumer_side", table="seen_messages")
        await asyncio.gather(*(inbox.install(conn) for conn in conns))
        await inbox.install(conns[0])
        assert await conns[0].fetchval("SELECT count(*) FROM consumer_side.seen_messages") == 0
    finally:
        for conn in conns:
            await conn.close()


def test_inbox_settings_are_checked() -> None:
    with pytest.raises(ClientError, match="consumer"):
        Inbox(consumer="")
    with pytest.raises(ClientError, match="invalid SQL identifier"):
        Inbox(consumer="c", schema="Bad-Schema")
    with pytest.raises(ClientError, match="retention_s"):
        Inbox(consumer="c", retention_s=0)


def test_message_refs_from_each_broker() -> None:
    mid = "0b6e2a47-9c1d-4f0e-8a59-3f6d3c1b2a10"
    amqp = SimpleNamespace(headers={"outbox-id": mid, "outbox-relay": "r"}, message_id=mid)
    assert amqp_ref(amqp) == MessageRef(mid, "r")
    assert amqp_ref(SimpleNamespace(headers={}, message_id=mid.upper())) == MessageRef(mid, "")  # canonical form
    assert kafka_ref(SimpleNamespace(headers=[("outbox-id", mid.encode()), ("outbox-relay", b"r")])) == MessageRef(
        mid, "r"
    )
    assert stream_ref({b"outbox-id": mid.encode(), b"h:outbox-relay": b"r", b"payload": b"{}"}) == MessageRef(mid, "r")
    assert nats_ref(SimpleNamespace(headers={"outbox-id": mid, "Nats-Msg-Id": mid, "outbox-relay": "r"})) == MessageRef(
        mid, "r"
    )
    assert nats_ref(SimpleNamespace(headers={"Nats-Msg-Id": mid.upper()})) == MessageRef(mid, "")
    with pytest.raises(ClientError, match="NATS headers"):
        nats_ref(SimpleNamespace(headers=None))
    # what relays published before message ids (and still do for an outbox of schema version 1)
    assert stream_ref({"outbox-id": "42"}) == MessageRef("42", "")
    assert amqp_ref(SimpleNamespace(headers={}, message_id="007")) == MessageRef("7", "")
    with pytest.raises(ClientError, match="no outbox id"):
        kafka_ref(SimpleNamespace(headers=[]))
    with pytest.raises(ClientError, match="neither a UUID nor a decimal"):
        stream_ref({"outbox-id": "4e2"})


async def test_an_inbox_from_before_message_ids_is_upgraded_and_keeps_its_ids(databases: DatabaseFactory) -> None:
    """An inbox installed by an older client keyed on the bigint row id: install converts it to text
    ids, the ids it holds still count as seen, and UUID ids go in next to them."""
    conn = await asyncpg.connect(pg_dsn(await databases.create("inbox_upgrade")))
    try:
        await conn.execute(
            "CREATE SCHEMA outbox_relay; CREATE TABLE outbox_relay.inbox (consumer text NOT NULL, relay text NOT NULL, "
            "message_id bigint NOT NULL, received_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
            "PRIMARY KEY (consumer, relay, message_id)); "
            "INSERT INTO outbox_relay.inbox (consumer, relay, message_id) VALUES ('c', 'r', 501)"
        )
        inbox = Inbox(consumer="c")
        await inbox.install(conn)
        column_type = await conn.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'outbox_relay.inbox'::regclass AND attname = 'message_id'"
        )
        assert column_type == "text"
        assert await inbox.seen(conn, MessageRef("501", "r"))  # a redelivery of an old message: a duplicate
        fresh = MessageRef(new_id(), "r")
        async with conn.transaction():
            assert await inbox.claim(conn, fresh) is True
            assert await inbox.claim(conn, fresh) is False
        await inbox.install(conn)  # again: nothing left to convert
    finally:
        await conn.close()


async def test_rabbitmq_redeliveries_to_two_competing_consumers(
    dsn: str, rabbitmq: RabbitMQAccount, conns: list[asyncpg.Connection]
) -> None:
    """Each message is published three times; two consumers on one queue, each with its own database
    connection, take deliveries concurrently. Every message's side effect happens once."""
    queue_name = "inbox-race"
    admin = await aio_pika.connect(rabbitmq.admin_url)
    try:
        channel = await admin.channel()
        await channel.declare_queue(queue_name, auto_delete=False)
        message_ids = [new_id() for _ in range(20)]
        messages = [
            OutgoingMessage(
                id=i + 1,
                message_id=message_ids[i],
                destination=queue_name,
                key=f"k{i % 3}",
                payload=b"{}",
                headers={"outbox-id": message_ids[i], "outbox-relay": "race"},
            )
            for i in range(20)
        ]
        async with RabbitMQPublisher(url=rabbitmq.url, password=rabbitmq.password, policy=LOCAL) as publisher:
            for _ in range(3):
                assert (await publisher.publish_batch(messages)).acked == 20

        inbox = Inbox(consumer="race")
        delivered = 0
        done = asyncio.Event()

        def consumer(conn: asyncpg.Connection) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
            lock = asyncio.Lock()  # one connection handles one message at a time

            async def on_message(message: AbstractIncomingMessage) -> None:
                nonlocal delivered
                async with message.process(requeue=True), lock:
                    await handle(inbox, conn, amqp_ref(message), delay_s=0.005)
                delivered += 1
                if delivered == 60:
                    done.set()

            return on_message

        consumers = []
        for conn in conns[:2]:
            consumer_channel = await admin.channel()
            await consumer_channel.set_qos(prefetch_count=5)
            queue = await consumer_channel.get_queue(queue_name)
            consumers.append((queue, await queue.consume(consumer(conn))))
        await asyncio.wait_for(done.wait(), timeout=20)
        for queue, tag in consumers:
            await queue.cancel(tag)
    finally:
        await admin.close()
    counts = await conns[2].fetch(
        "SELECT message_id, count(*) AS n FROM ledger WHERE consumer = 'race' GROUP BY message_id"
    )
    assert sorted((row["message_id"], row["n"]) for row in counts) == sorted((m.message_id, 1) for m in messages)


async def test_refs_of_what_the_relay_publishes(redis_account: RedisAccount, tansu: TansuBroker) -> None:
    """The broker helpers read the id and relay name from the relay's own messages."""
    mid = new_id()
    row = OutboxRow(
        txid=1,
        id=987,
        topic="orders",
        key="k",
        payload=b"{}",
        headers="{}",
        created_at=datetime.now(UTC),
        message_id=mid,
    )
    stream, topic = f"{redis_account.prefix}refs", "inbox-refs"
    (to_stream,) = build_messages(Relay(database="d", target="t", topic_mapping={"*": stream}), "relay-a", [row])
    (to_kafka,) = build_messages(Relay(database="d", target="t", topic_mapping={"*": topic}), "relay-a", [row])
    assert to_stream is not None and to_kafka is not None

    async with RedisStreamsPublisher(url=redis_account.url, password=redis_account.password, policy=LOCAL) as publisher:
        assert (await publisher.publish_batch([to_stream])).acked == 1
    async with Redis.from_url(redis_account.admin_url) as redis:
        [(_, fields)] = await redis.xrange(stream)
    assert stream_ref(fields) == MessageRef(mid, "relay-a")

    async with KafkaPublisher(bootstrap_servers=[tansu.bootstrap], policy=LOCAL, enable_idempotence=False) as publisher:
        assert (await publisher.publish_batch([to_kafka])).acked == 1
    async with AIOKafkaConsumer(bootstrap_servers=tansu.bootstrap, auto_offset_reset="earliest") as consumer:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            await consumer.topics()
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        records = [r for batch in (await consumer.getmany(timeout_ms=3000)).values() for r in batch]
    assert [kafka_ref(record) for record in records] == [MessageRef(mid, "relay-a")]
