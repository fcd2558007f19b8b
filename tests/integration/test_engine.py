"""The relay engine against real PostgreSQL and RabbitMQ, one slice at a time (no arq in between).

Covers the failure classes of docs/architecture.md (Delivery): a message the broker refuses is retried
holding only its partition and then dead-lettered; an unreachable broker or tenant database pauses the
partition and charges nothing; a restored or failed-over tenant database is detected and nothing is
skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from datetime import UTC, datetime

import asyncpg

from outbox_relay.domain import Database
from outbox_relay.engine import RelayRunner, TenantConnections
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from tests.conftest import pg_dsn
from tests.harness.brokers import RabbitMQAccount, free_port
from tests.integration.conftest import FAST_RETRY, Setup, partition_row, run_until, until, write, write_ids


async def test_refused_message_is_retried_then_dead_lettered(
    setup: Setup, runner: RelayRunner, store: ControlStore
) -> None:
    # "poison" routes to a queue nobody declared: with mandatory publishes RabbitMQ returns it
    await setup.channel.declare_queue("good-q", durable=True)
    body = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "policy": FAST_RETRY,
        "topic_mapping": {"good": "good-q", "poison": "no-such-queue"},
    }
    assert (await setup.tenant.put("/v1/relays/r1", body)).status_code == 201
    relay_id = await setup.relay_id(store, "r1")
    written = await write_ids(setup.dsn, ("good", "k", b"one"), ("poison", "k", b"bad"), ("good", "k", b"two"))
    ids = [row_id for row_id, _ in written]

    received: list[tuple[str, str, bytes]] = []

    async def delivered() -> bool:
        # "two" can arrive pipelined behind the refused message before its retries end: wait for
        # both the good messages and the poison message's dead letter
        received.extend(await setup.drain("good-q"))
        dead = await store.pool.fetchval("SELECT count(*) FROM dead_letters WHERE relay_id = $1", relay_id)
        return len(received) >= 2 and dead >= 1

    await run_until(runner, relay_id, 1, delivered)
    await asyncio.sleep(0.2)
    received.extend(await setup.drain("good-q"))
    # the first batch was pipelined, so "two" may have gone out once behind the refused message;
    # while it is retried, the poison message goes alone
    bodies = [m[2] for m in received]
    assert list(dict.fromkeys(bodies)) == [b"one", b"two"] and len(bodies) <= 3, bodies
    letters = await store.pool.fetch("SELECT * FROM dead_letters WHERE relay_id = $1", relay_id)
    assert len(letters) == 1
    letter = letters[0]
    assert (letter["outbox_id"], letter["payload"], letter["topic"], letter["key"]) == (ids[1], b"bad", "poison", "k")
    assert letter["message_id"] == str(written[1][1])  # the id it was published with, for a replay
    assert letter["error_class"] == "refused" and letter["destination"] == "no-such-queue"
    attempts = __import__("json").loads(letter["attempts"])
    assert len(attempts) == 3 and all("unroutable" in a["error"] for a in attempts)
    state = await partition_row(store, relay_id)
    assert (state["dead_count"], state["retry_outbox_id"], state["cursor_id"]) == (1, None, ids[2])
    assert state["retried_count"] == 2


async def test_oversize_payload_is_dead_lettered_without_retrying(
    setup: Setup, runner: RelayRunner, store: ControlStore
) -> None:
    await setup.channel.declare_queue("size-q", durable=True)
    body = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "topic_mapping": {"*": "size-q"},
        "policy": {**FAST_RETRY, "max_payload_bytes": 10},
    }
    assert (await setup.tenant.put("/v1/relays/r2", body)).status_code == 201
    relay_id = await setup.relay_id(store, "r2")
    await write(setup.dsn, ("t", "k", b"small"), ("t", "k", b"x" * 11), ("t", "k", b"small-2"))
    received: list[tuple[str, str, bytes]] = []

    async def delivered() -> bool:
        received.extend(await setup.drain("size-q"))
        return len(received) >= 2

    await run_until(runner, relay_id, 1, delivered)
    assert [m[2] for m in received] == [b"small", b"small-2"]
    letter = await store.pool.fetchrow("SELECT * FROM dead_letters WHERE relay_id = $1", relay_id)
    assert letter is not None and letter["error_class"] == "too_large" and "max_payload_bytes" in letter["last_error"]


async def test_unreachable_broker_pauses_without_charging_attempts(
    setup: Setup, runner: RelayRunner, store: ControlStore, rabbitmq: RabbitMQAccount
) -> None:
    await setup.channel.declare_queue("pause-q", durable=True)
    closed = f"amqp://{rabbitmq.user}@127.0.0.1:{free_port()}/{rabbitmq.vhost}"
    r = await setup.tenant.put(
        "/v1/targets/down", {"kind": "rabbitmq", "url": closed, "password": rabbitmq.password, "timeout_ms": 500}
    )
    assert r.status_code == 201
    body = {
        "database": "app",
        "target": "down",
        "partitions": 1,
        "topic_mapping": {"*": "pause-q"},
        "policy": {**FAST_RETRY, "max_attempts": 1},
    }
    assert (await setup.tenant.put("/v1/relays/r3", body)).status_code == 201
    relay_id = await setup.relay_id(store, "r3")
    await write(setup.dsn, ("t", "k", b"waits"))
    for _ in range(3):  # far more than max_attempts=1 would allow, were attempts charged
        await runner.run_slice(relay_id, 0, "test-holder")
    state = await partition_row(store, relay_id)
    assert "target unavailable" in state["last_error"]
    assert state["cursor_id"] == 0 and state["retry_attempts"] == 0 and state["dead_count"] == 0
    assert await store.pool.fetchval("SELECT count(*) FROM dead_letters WHERE relay_id = $1", relay_id) == 0

    # the broker is back (the target now names the live one): the message goes out
    r = await setup.tenant.put("/v1/targets/down", {"kind": "rabbitmq", "url": rabbitmq.url, "timeout_ms": 2000})
    assert r.status_code == 200 and r.json()["password_set"] is True
    received: list[tuple[str, str, bytes]] = []

    async def delivered() -> bool:
        received.extend(await setup.drain("pause-q"))
        return len(received) >= 1

    await run_until(runner, relay_id, 1, delivered)
    assert [m[2] for m in received] == [b"waits"]


async def test_tenant_database_refusing_connections_pauses(
    setup: Setup, runner: RelayRunner, store: ControlStore
) -> None:
    await setup.channel.declare_queue("db-q", durable=True)
    body = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "topic_mapping": {"*": "db-q"},
        "policy": {**FAST_RETRY, "max_attempts": 1},
    }
    assert (await setup.tenant.put("/v1/relays/r4", body)).status_code == 201
    relay_id = await setup.relay_id(store, "r4")
    await write(setup.dsn, ("t", "k", b"first"))
    await run_until(runner, relay_id, 1, lambda: _has(setup, "db-q", 1))

    admin = await asyncpg.connect(pg_dsn("postgres"))
    try:
        await write(setup.dsn, ("t", "k", b"second"))
        await admin.execute(f'ALTER DATABASE "{setup.db_name}" WITH ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", setup.db_name)
        await asyncio.sleep(0.2)
        for _ in range(2):
            await runner.run_slice(relay_id, 0, "test-holder")
        state = await partition_row(store, relay_id)
        assert state["last_error"] and "database" in state["last_error"]
        assert state["retry_attempts"] == 0 and state["dead_count"] == 0
    finally:
        await admin.execute(f'ALTER DATABASE "{setup.db_name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()
    await run_until(runner, relay_id, 1, lambda: _has(setup, "db-q", 1))


_seen: dict[str, list[bytes]] = {}


async def _has(setup: Setup, queue: str, n: int) -> bool:
    got = _seen.setdefault(queue, [])
    got.extend(m[2] for m in await setup.drain(queue))
    if len(got) >= n:
        del got[:n]
        return True
    return False


async def test_restore_and_failover_are_detected_and_nothing_is_skipped(
    setup: Setup, runner: RelayRunner, store: ControlStore
) -> None:
    await setup.channel.declare_queue("restore-q", durable=True)
    body = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "topic_mapping": {"*": "restore-q"},
        "policy": FAST_RETRY,
    }
    assert (await setup.tenant.put("/v1/relays/r5", body)).status_code == 201
    relay_id = await setup.relay_id(store, "r5")
    first = await write(setup.dsn, ("t", "k", b"before"))
    await run_until(runner, relay_id, 1, lambda: _has(setup, "restore-q", 1))
    state = await partition_row(store, relay_id)
    assert state["system_identifier"] and state["cursor_id"] == first[0]

    # a restore into the same cluster from a backup: the cursor's txid lies in the database's future
    await store.pool.execute(
        "UPDATE relay_partitions SET cursor_txid = cursor_txid + 1000000 WHERE relay_id = $1", relay_id
    )
    after = await write(setup.dsn, ("t", "k", b"after-restore"))
    got: list[bytes] = []

    async def both() -> bool:
        got.extend(m[2] for m in await setup.drain("restore-q"))
        return b"after-restore" in got

    await run_until(runner, relay_id, 1, both)
    assert got == [b"before", b"after-restore"]  # replayed from the start: a duplicate, nothing lost
    state = await partition_row(store, relay_id)
    assert state["resets"] == 1 and "backwards" in state["last_reset_reason"]
    assert state["cursor_id"] == after[0]

    # a failover to another cluster: the identity the partition recorded no longer matches
    await store.pool.execute("UPDATE relay_partitions SET system_identifier = '1/1' WHERE relay_id = $1", relay_id)
    got.clear()

    async def replayed() -> bool:
        got.extend(m[2] for m in await setup.drain("restore-q"))
        return len(got) >= 2

    await run_until(runner, relay_id, 1, replayed)
    state = await partition_row(store, relay_id)
    assert state["resets"] == 2 and "changed identity" in state["last_reset_reason"]
    assert got == [b"before", b"after-restore"]


async def test_notify_wakes_an_idle_partition(setup: Setup, runner: RelayRunner, store: ControlStore) -> None:
    queue = await setup.channel.declare_queue("wake-q", durable=True)
    body = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "topic_mapping": {"*": "wake-q"},
        "policy": {"poll_interval_ms": 600_000},
    }  # polling alone would wait ten minutes
    assert (await setup.tenant.put("/v1/relays/r6", body)).status_code == 201
    relay_id = await setup.relay_id(store, "r6")
    slow = dataclasses.replace(runner.settings, slice_s=8.0)
    idle_runner = RelayRunner(
        settings=slow, store=store, secrets=runner.secrets, tenants=runner.tenants, publishers=runner.publishers
    )
    task = asyncio.create_task(idle_runner.run_slice(relay_id, 0, "test-holder"))
    try:
        await asyncio.sleep(1.5)  # the slice has polled, found nothing, and waits
        loop = asyncio.get_running_loop()
        written = loop.time()
        await write(setup.dsn, ("t", "k", b"wake up"))
        message = None
        while message is None and loop.time() - written < 5:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.005)
        latency_ms = (loop.time() - written) * 1000
        assert message is not None and message.body == b"wake up", "the idle partition was not woken"
        assert not task.done()  # delivered by the waiting slice, not a new one
        print(f"commit-to-delivery on an idle relay: {latency_ms:.0f} ms (poll interval 600 s)")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_notify_wakes_only_the_partitions_that_read_the_written_buckets(setup: Setup) -> None:
    """An insert names the buckets it wrote; a worker wakes the partitions reading them, not all."""
    tenants = TenantConnections(policy=AddressPolicy(allow_private=True), timeout_s=2)
    database_id = uuid.uuid4()
    try:
        await tenants.pool(database_id, datetime.now(UTC), Database(dsn=setup.dsn), None)
        conn = await asyncpg.connect(setup.dsn)
        try:
            bucket = await conn.fetchval("SELECT hashtextextended('order-7', 0) & 4095")
        finally:
            await conn.close()
        hit, miss = bucket % 16, (bucket + 1) % 16
        async with tenants.waiter(database_id, 16, hit) as woken, tenants.waiter(database_id, 16, miss) as other:
            await asyncio.sleep(0.5)  # the LISTEN connection is up and its start-up wake is spent
            woken.clear()
            other.clear()
            await write(setup.dsn, ("t", "order-7", b"x"))
            await asyncio.wait_for(woken.wait(), timeout=5)
            await asyncio.sleep(0.2)
            assert not other.is_set(), "a partition that reads none of the written buckets was woken"
            # a statement writing more than 64 buckets names none: every partition wakes
            conn = await asyncpg.connect(setup.dsn)
            try:
                await conn.execute(
                    "INSERT INTO outbox_relay.outbox (topic, key, payload) "
                    "SELECT 't', 'k' || g, 'x' FROM generate_series(1, 500) AS g"
                )
            finally:
                await conn.close()
            await asyncio.wait_for(other.wait(), timeout=5)
    finally:
        await tenants.close()


async def test_the_listen_connection_stops_listening_while_every_watcher_reads_on_its_own(setup: Setup) -> None:
    """A relay whose reads keep finding rows reads at its pace without notifications: once every
    watcher of the database says it is hot, the LISTEN connection unlistens (no wake-up per commit);
    when one cools down, it listens again and wakes every watcher (what was committed in between is
    read after the LISTEN took effect)."""
    tenants = TenantConnections(policy=AddressPolicy(allow_private=True), timeout_s=2)
    database_id = uuid.uuid4()
    calls: list[list[int] | None] = []
    try:
        await tenants.pool(database_id, datetime.now(UTC), Database(dsn=setup.dsn), None)
        watch = tenants.watch(database_id, calls.append)
        await asyncio.sleep(0.5)  # the LISTEN connection is up and its start-up wake is spent
        calls.clear()
        await write(setup.dsn, ("t", "k1", b"x"))
        await until(lambda: bool(calls), 5)
        assert calls[-1] is not None, "an insert names its buckets"

        watch.hot(True)
        await asyncio.sleep(0.3)
        calls.clear()
        for i in range(3):
            await write(setup.dsn, ("t", f"k{i}", b"x"))
        await asyncio.sleep(0.5)
        assert calls == [], "notified while every watcher reads on its own"

        watch.hot(False)
        await until(lambda: None in calls, 5)  # listening again: everyone re-reads
        calls.clear()
        await write(setup.dsn, ("t", "k9", b"x"))
        await until(lambda: any(c is not None for c in calls), 5)

        # one hot watcher beside one that is not: the notifications go on
        other: list[list[int] | None] = []
        second = tenants.watch(database_id, other.append)
        watch.hot(True)
        await asyncio.sleep(0.3)
        calls.clear()
        await write(setup.dsn, ("t", "k10", b"x"))
        await until(lambda: any(c is not None for c in other), 5)
        second()
    finally:
        await tenants.close()


async def test_a_listen_connection_that_fails_after_connecting_backs_off() -> None:
    """A database the LISTEN connection reaches but cannot probe (no outbox schema, or a role that
    lost its grants) is retried with backoff. It reconnected in a busy loop: about 1,400 sessions a
    second against the tenant's database, and a close that could hang on a lost cancellation."""
    name = f"orly_listen_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_dsn("postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        tenants = TenantConnections(policy=AddressPolicy(allow_private=True), timeout_s=2)
        try:
            await tenants.pool(uuid.uuid4(), datetime.now(UTC), Database(dsn=pg_dsn(name)), None)
            await asyncio.sleep(2.0)
        finally:
            await asyncio.wait_for(tenants.close(), timeout=10)
        await asyncio.sleep(0.5)  # the last session's end reaches the statistics
        sessions = await admin.fetchval("SELECT sessions FROM pg_stat_database WHERE datname = $1", name)
        assert sessions is not None and 1 <= sessions <= 8, f"{sessions} sessions in 2 s"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
