"""Faults the relay rides out, on real servers the test owns (never the machine's shared ones).

* arq's Redis restarted under two running workers: neither exits, and messages flow again soon
  after Redis is back (the figure is printed).
* The control DB restarted mid-drain: a slice that published a batch retries its fenced cursor
  write instead of failing, so the restart sends no batch twice.
* A relay disabled mid-drain publishes nothing more after a second, shows ``paused``, and resumes
  where it stopped when enabled again: nothing lost, per-key order kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from outbox_relay.store.migrate import migrate
from service.app import create_app
from tests.conftest import RUN_ID, DatabaseFactory, pg_dsn
from tests.faults import PgCluster, RedisServer
from tests.harness.brokers import RedisAccount
from tests.helpers import TenantClient, make_tenant
from tests.workers import WorkerPool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def relay_to_stream(
    t: TenantClient, dsn: str, redis_account: RedisAccount, tag: str, *, partitions: int = 4, batch: int = 50
) -> tuple[str, dict[str, Any]]:
    stream = f"{redis_account.prefix}{tag}"
    assert (await t.put("/v1/databases/app", {"dsn": dsn})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": redis_account.url, "password": redis_account.password}
    assert (await t.put("/v1/targets/stream", target)).status_code == 201
    body = {
        "database": "app",
        "target": "stream",
        "partitions": partitions,
        "topic_mapping": {"*": stream},
        "policy": {"batch_size": batch, "poll_interval_ms": 100},
    }
    assert (await t.put("/v1/relays/events", body)).status_code == 201
    return stream, body


async def write_numbered(dsn: str, first: int, count: int, *, keys: int = 50) -> None:
    """Messages ``first .. first+count-1`` (the payload is the number), over ``keys`` keys, in
    transactions of 100 rows."""
    conn = await asyncpg.connect(dsn)
    try:
        for start in range(first, first + count, 100):
            end = min(start + 100, first + count)
            await conn.execute(
                "INSERT INTO outbox_relay.outbox (topic, key, payload) "
                "SELECT 'orders', 'key-' || (g % $3::int), convert_to(g::text, 'UTF8') "
                "FROM generate_series($1::int, $2::int) g",
                start,
                end - 1,
                keys,
            )
    finally:
        await conn.close()


class StreamReader:
    """Reads the stream in the background: the numbers received, in order, per key."""

    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self.redis, self.stream = redis, stream
        self.received: list[tuple[str, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = "0-0"
        while True:
            entries = await self.redis.xread({self.stream: last}, count=1000, block=100)
            for _, items in entries:
                for entry_id, fields in items:
                    last = entry_id.decode()
                    self.received.append((fields[b"key"].decode(), int(fields[b"payload"])))

    def __enter__(self) -> StreamReader:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def until(self, count: int, timeout_s: float) -> float:
        """Wait until ``count`` distinct numbers arrived; returns the seconds it took."""
        started = time.monotonic()
        while len({n for _, n in self.received}) < count:
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"{len({n for _, n in self.received})} of {count} received in {timeout_s} s")
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    def check(self, expected: range) -> int:
        """Every number arrived, per key in order (duplicates allowed); returns the duplicates."""
        numbers = [n for _, n in self.received]
        assert set(numbers) == set(expected), f"missing {sorted(set(expected) - set(numbers))[:10]}"
        by_key: dict[str, list[int]] = defaultdict(list)
        for key, n in self.received:
            if n not in by_key[key]:
                by_key[key].append(n)
        for key, order in by_key.items():
            assert order == sorted(order), f"key {key} out of order"
        return len(numbers) - len(set(numbers))


@pytest.fixture
async def shared_redis() -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    yield redis
    await redis.aclose()


async def test_workers_ride_out_a_redis_restart(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    worker_pool: WorkerPool,
    shared_redis: aioredis.Redis,
) -> None:
    arq_redis = RedisServer().start()
    try:
        t = await make_tenant(client, "redis-fault")
        dsn = pg_dsn(await databases.create("redisfault"))
        stream, _ = await relay_to_stream(t, dsn, redis_account, "redis-fault")
        workers = [worker_pool.start(redis_url=arq_redis.url, slice_s=2) for _ in range(2)]
        with StreamReader(shared_redis, stream) as reader:
            await write_numbered(dsn, 0, 200)
            await reader.until(200, timeout_s=60)

            arq_redis.stop()
            await asyncio.sleep(6)  # longer than a slice: every partition needs a new job from Redis
            arq_redis.start()
            back = time.monotonic()
            await write_numbered(dsn, 200, 200)
            await reader.until(400, timeout_s=60)
            again_s = time.monotonic() - back
            for w in workers:
                assert w.process is not None and w.process.poll() is None, f"{w.name} exited:\n{w.log()[-3000:]}"
            reader.check(range(400))
        print(f"\nrelaying again {again_s:.2f} s after arq's Redis came back")
        for w in workers:
            log = w.log()
            assert "Traceback" not in log, log[-3000:]
            assert log.count("arq's Redis unavailable") <= 1, log[-3000:]
        assert (await t.delete("/v1/relays/events")).status_code == 204
    finally:
        arq_redis.remove()


async def test_a_control_db_restart_sends_no_batch_twice(
    settings: Settings,
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    shared_redis: aioredis.Redis,
    request: pytest.FixtureRequest,
) -> None:
    cluster = PgCluster(f"orly_ctl_{RUN_ID}").create()
    pool = WorkerPool(settings, request.node.name)
    try:
        control = cluster.dsn("control")
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE control")
        await admin.close()
        await migrate(control)
        own = dataclasses.replace(settings, database_url=control, queue_name=f"{settings.queue_name}-ctl")
        pool.settings = own
        async with AsyncTestClient(app=create_app(own)) as api:
            t = await make_tenant(api, "ctl-fault")
            dsn = pg_dsn(await databases.create("ctlfault"))
            stream, _ = await relay_to_stream(t, dsn, redis_account, "ctl-fault", partitions=4, batch=20)
            await write_numbered(dsn, 0, 20_000)
            # a lease TTL longer than the restart: nobody else could take a partition over meanwhile
            worker = pool.start(lease_ttl_s=10, slice_s=30)
            with StreamReader(shared_redis, stream) as reader:
                await reader.until(2_000, timeout_s=60)
                restart_started = time.monotonic()
                cluster.restart()
                restart_s = time.monotonic() - restart_started
                relayed_at_restart = len(reader.received)
                while len(reader.received) < relayed_at_restart + 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                again_s = time.monotonic() - restart_started - restart_s
                await reader.until(20_000, timeout_s=120)
                duplicates = reader.check(range(20_000))
            print(
                f"\ncontrol DB restart {restart_s:.2f} s, relaying again {again_s:.2f} s later, {duplicates} duplicates"
            )
            assert duplicates == 0, f"{duplicates} duplicates\n{worker.log()[-3000:]}"
            log = worker.log()
            assert "Traceback" not in log, log[-3000:]
            assert worker.process is not None and worker.process.poll() is None
    finally:
        pool.stop_all()
        cluster.drop()


async def test_a_disabled_relay_stops_within_a_second_and_resumes(
    client: AsyncTestClient[Any],
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    worker_pool: WorkerPool,
    shared_redis: aioredis.Redis,
) -> None:
    t = await make_tenant(client, "disable")
    dsn = pg_dsn(await databases.create("disable"))
    stream, body = await relay_to_stream(t, dsn, redis_account, "disable", partitions=4, batch=10)
    await write_numbered(dsn, 0, 20_000)
    worker_pool.start(slice_s=30)  # a slice far longer than the second the relay has to stop in
    with StreamReader(shared_redis, stream) as reader:
        await reader.until(300, timeout_s=60)
        assert (await t.put("/v1/relays/events", {**body, "enabled": False})).status_code == 200
        await asyncio.sleep(1.0)
        after_1s = len(reader.received)
        await write_numbered(dsn, 20_000, 100)
        await asyncio.sleep(3.0)
        assert len(reader.received) == after_1s, f"{len(reader.received) - after_1s} published after the disable"
        assert after_1s < 20_000, "the drain ended before the relay was disabled: nothing was shown"
        status = (await t.get("/v1/relays/events/status")).json()
        assert status["state"] == "paused", status

        assert (await t.put("/v1/relays/events", {**body, "enabled": True})).status_code == 200
        await reader.until(20_100, timeout_s=120)
        reader.check(range(20_100))
    assert (await t.delete("/v1/relays/events")).status_code == 204
