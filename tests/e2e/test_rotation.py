"""Rotating a database's and a target's password while a relay runs at about 1,000 msg/s.

A private PostgreSQL cluster where the tenant's role logs in with its password (SCRAM), and a Redis
ACL user of the test's own (a name unique to the run) on the shared Redis. The tenant rotates as
docs/api.md says: the new credential is made valid on the server next to the old one (PostgreSQL: a
second login role, since a role has one password; Redis: an ACL user takes two passwords), then PUT;
the old one goes once the resource's GET no longer shows the rotation. Checked: every message delivered,
in order per key, no partition error, the old secret gone from the control DB, the audit entries.
The longest delivery gap is printed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from tests.conftest import RUN_ID
from tests.faults import PgCluster, password_cluster
from tests.helpers import TenantClient, make_tenant
from tests.workers import WorkerPool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
__all__ = ["password_cluster"]  # the fixture

RATE = 1000
"""Messages a second the writer commits (in transactions of ``RATE // 100`` rows every 10 ms)."""
KEYS = 20


class TimedReader:
    """Reads the stream in the background: (key, number, arrival time) of every entry."""

    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self.redis, self.stream = redis, stream
        self.received: list[tuple[str, int, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = "0-0"
        while True:
            entries = await self.redis.xread({self.stream: last}, count=1000, block=50)
            now = time.monotonic()
            for _, items in entries:
                for entry_id, fields in items:
                    last = entry_id.decode()
                    self.received.append((fields[b"key"].decode(), int(fields[b"payload"]), now))

    def __enter__(self) -> TimedReader:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def until(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len({n for _, n, _ in self.received}) < count:
            assert time.monotonic() < deadline, f"{len({n for _, n, _ in self.received})} of {count} received"
            await asyncio.sleep(0.05)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time between two arrivals (or the window's edges and an arrival) in [start, end]."""
        times = sorted({t for _, _, t in self.received if start <= t <= end})
        edges = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(edges))

    def check(self, count: int) -> None:
        numbers = [n for _, n, _ in self.received]
        assert set(numbers) == set(range(count)), f"missing {sorted(set(range(count)) - set(numbers))[:10]}"
        by_key: dict[str, list[int]] = defaultdict(list)
        for key, n, _ in self.received:
            if n not in by_key[key]:
                by_key[key].append(n)
        for key, order in by_key.items():
            assert order == sorted(order), f"key {key} out of order"


async def write_steadily(dsn: str, seconds: float) -> int:
    """Commit ``RATE`` numbered messages a second for ``seconds``; returns how many."""
    conn = await asyncpg.connect(dsn)
    per_tx = RATE // 100
    written = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            await conn.execute(
                "INSERT INTO outbox_relay.outbox (topic, key, payload) "
                "SELECT 'orders', 'key-' || (g % $3::int), convert_to(g::text, 'UTF8') "
                "FROM generate_series($1::int, $2::int) g",
                written,
                written + per_tx - 1,
                KEYS,
            )
            written += per_tx
            await asyncio.sleep(max(0.0, started + written / RATE - time.monotonic()))
    finally:
        await conn.close()
    return written


async def partition_errors(control: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    """The tenant's partitions that recorded an error (a rotation with no gap records none)."""
    return list(
        await control.fetch(
            "SELECT p.partition, p.last_error FROM relay_partitions p JOIN relays r ON r.id = p.relay_id "
            "JOIN tenants t ON t.id = r.tenant_id WHERE t.name = $1 AND p.last_error IS NOT NULL",
            tenant,
        )
    )


async def rotation_of(t: TenantClient, path: str) -> Any:
    r = await t.get(path)
    assert r.status_code == 200, r.text
    assert "password" not in r.json()
    return r.json().get("rotation")


async def rotated(t: TenantClient, path: str, timeout_s: float = 30) -> float:
    """Wait until the resource's GET shows no rotation in progress; returns the seconds it took."""
    started = time.monotonic()
    while (rotation := await rotation_of(t, path)) is not None:
        assert time.monotonic() - started < timeout_s, f"{path}: still rotating: {rotation}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def balanced(settings: Settings, tenant: str, *, workers: int) -> None:
    """Wait until ``workers`` workers own the tenant's partitions, each its share."""
    control = await asyncpg.connect(settings.database_url)
    owners = (
        "SELECT count(DISTINCT p.lease_holder) FROM relay_partitions p JOIN relays r ON r.id = p.relay_id "
        "JOIN tenants t ON t.id = r.tenant_id WHERE t.name = $1"
    )
    try:
        async with asyncio.timeout(60):
            while await control.fetchval(owners, tenant) < workers:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the lanes of the last claim started
    finally:
        await control.close()


@pytest.fixture
async def broker_user() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    admin = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    user = f"orly-rotation-{RUN_ID}"
    await admin.acl_setuser(
        user, enabled=True, passwords=["+broker-old-secret"], keys=[f"{user}:*"], commands=["+@all"]
    )
    try:
        yield admin, user
    finally:
        await admin.acl_deluser(user)
        keys = [k async for k in admin.scan_iter(match=f"{user}:*", count=1000)]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


async def test_rotating_passwords_mid_stream_loses_nothing_and_leaves_no_gap(
    client: AsyncTestClient[Any],
    settings: Settings,
    password_cluster: PgCluster,
    broker_user: tuple[aioredis.Redis, str],
    worker_pool: WorkerPool,
) -> None:
    redis, user = broker_user
    stream = f"{user}:orders"
    app_dsn = f"postgresql://orly_app@127.0.0.1:{password_cluster.port}/app"
    t = await make_tenant(client, "rotation")
    assert (await t.put("/v1/databases/app", {"dsn": app_dsn, "password": "db-old-secret"})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": f"redis://{user}@127.0.0.1:6379/0"}
    assert (await t.put("/v1/targets/stream", {**target, "password": "broker-old-secret"})).status_code == 201
    relay = {
        "database": "app",
        "target": "stream",
        "partitions": 4,
        "topic_mapping": {"*": stream},
        "policy": {"batch_size": 100, "poll_interval_ms": 100},
    }
    assert (await t.put("/v1/relays/events", relay)).status_code == 201
    workers = [worker_pool.start(), worker_pool.start()]

    with TimedReader(redis, stream) as reader:
        writer = asyncio.create_task(write_steadily(password_cluster.dsn("app"), 14.0))
        await reader.until(1000, timeout_s=60)
        await balanced(settings, t.name, workers=2)  # both workers relaying: no rebalance in the window
        started = time.monotonic()

        # the database: PostgreSQL has one password per role, so the new credential is a second login
        # role with the first one's rights; PUT its user and password; once the rotation is done no
        # session of the old role is left, and the tenant can drop it
        admin = await asyncpg.connect(password_cluster.dsn())
        await admin.execute("CREATE ROLE orly_app_b LOGIN PASSWORD 'db-new-secret' IN ROLE orly_app")
        new_dsn = app_dsn.replace("orly_app@", "orly_app_b@")
        r = await t.put("/v1/databases/app", {"dsn": new_dsn, "password": "db-new-secret"})
        assert r.status_code == 200, r.text
        assert r.json()["dsn"] == app_dsn, "the new user shows once the rotation is done"
        database_s = await rotated(t, "/v1/databases/app")
        assert (await t.get("/v1/databases/app")).json()["dsn"] == new_dsn
        old_sessions = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'orly_app'"
        async with asyncio.timeout(30):
            while await admin.fetchval(old_sessions):  # noqa: ASYNC110 (the old pools close after their reads)
                await asyncio.sleep(0.1)
        await admin.execute("ALTER ROLE orly_app NOLOGIN")
        await admin.close()

        # the broker: the ACL user takes the new password next to the old one, PUT, then the old one goes
        await redis.acl_setuser(user, enabled=True, passwords=["+broker-new-secret"])
        r = await t.put("/v1/targets/stream", {**target, "password": "broker-new-secret"})
        assert r.status_code == 200, r.text
        target_s = await rotated(t, "/v1/targets/stream")
        await redis.acl_setuser(user, enabled=True, passwords=["-broker-old-secret"])

        written = await writer
        ended = time.monotonic()
        await reader.until(written, timeout_s=60)
        gap_s = reader.longest_gap(started, ended)
        reader.check(written)

    control = await asyncpg.connect(settings.database_url)
    try:
        errors = await partition_errors(control, t.name)
        print(
            f"\n{written} messages at {RATE}/s, 2 workers: database rotated in {database_s:.2f} s, "
            f"target in {target_s:.2f} s, longest delivery gap {gap_s * 1000:.0f} ms, "
            f"{len(errors)} partition errors, "
            f"{sum(w.log().count('password') for w in workers)} worker log lines naming a password"
        )
        secrets = await control.fetch(
            "SELECT 'databases' AS kind, secret, pending_secret FROM databases d JOIN tenants t ON t.id = d.tenant_id "
            "WHERE t.name = $1 UNION ALL SELECT 'targets', secret, pending_secret FROM targets g "
            "JOIN tenants t ON t.id = g.tenant_id WHERE t.name = $1",
            t.name,
        )
        audit = await control.fetch(
            "SELECT action, resource, actor, detail::text AS detail "
            "FROM audit_log a JOIN tenants t ON t.id = a.tenant_id "
            "WHERE t.name = $1 AND action LIKE 'rotation-%' ORDER BY a.id",
            t.name,
        )
    finally:
        await control.close()
    for w in workers:
        assert "Traceback" not in w.log(), w.log()[-3000:]
    assert not errors, [dict(e) for e in errors]
    box = SecretBox(settings.secret_keys)
    assert {r["kind"]: box.decrypt(r["secret"]) for r in secrets} == {
        "databases": "db-new-secret",
        "targets": "broker-new-secret",
    }
    assert all(r["pending_secret"] is None for r in secrets)
    assert [(a["action"], a["resource"]) for a in audit] == [
        ("rotation-start", "databases/app"),
        ("rotation-complete", "databases/app"),
        ("rotation-start", "targets/stream"),
        ("rotation-complete", "targets/stream"),
    ]
    assert not any("secret" in a["detail"] for a in audit), "a secret in the audit log"
    completed_by = [a["actor"] for a in audit if a["action"] == "rotation-complete"]
    assert all(actor.startswith("worker:") for actor in completed_by), completed_by  # in use: workers finish it
    assert (await t.delete("/v1/relays/events")).status_code == 204


async def test_a_new_password_the_broker_refuses_keeps_the_old_one_in_use(
    client: AsyncTestClient[Any],
    settings: Settings,
    password_cluster: PgCluster,
    broker_user: tuple[aioredis.Redis, str],
    worker_pool: WorkerPool,
) -> None:
    """The tenant PUTs the new password before the broker takes it: the workers go on with the old
    one, the target's GET says the new one is refused, and once the broker takes it the rotation
    completes by itself."""
    redis, user = broker_user
    stream = f"{user}:orders"
    app_dsn = f"postgresql://orly_app@127.0.0.1:{password_cluster.port}/app"
    t = await make_tenant(client, "rotation-refused")
    assert (await t.put("/v1/databases/app", {"dsn": app_dsn, "password": "db-old-secret"})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": f"redis://{user}@127.0.0.1:6379/0"}
    assert (await t.put("/v1/targets/stream", {**target, "password": "broker-old-secret"})).status_code == 201
    relay = {"database": "app", "target": "stream", "partitions": 4, "topic_mapping": {"*": stream}}
    assert (await t.put("/v1/relays/events", relay)).status_code == 201
    worker = worker_pool.start()

    with TimedReader(redis, stream) as reader:
        writer = asyncio.create_task(write_steadily(password_cluster.dsn("app"), 10.0))
        await reader.until(500, timeout_s=60)
        started = min(at for _, _, at in reader.received)
        r = await t.put("/v1/targets/stream", {**target, "password": "broker-new-secret"})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while not ((rotation := await rotation_of(t, "/v1/targets/stream")) or {}).get("error"):
            assert time.monotonic() < deadline, f"no refusal reported: {rotation}"
            await asyncio.sleep(0.1)
        assert rotation["state"] == "refused", rotation
        assert "broker-new-secret" not in json.dumps(rotation)
        refused = rotation["error"]
        await redis.acl_setuser(user, enabled=True, passwords=["+broker-new-secret"])
        target_s = await rotated(t, "/v1/targets/stream")
        written = await writer
        ended = time.monotonic()
        await reader.until(written, timeout_s=60)
        gap_s = reader.longest_gap(started, ended)
        reader.check(written)

    control = await asyncpg.connect(settings.database_url)
    try:
        errors = await partition_errors(control, t.name)
    finally:
        await control.close()
    print(
        f"\n{written} messages at {RATE}/s, new password refused ({refused!r}), then taken: rotated "
        f"{target_s:.2f} s later, longest delivery gap {gap_s * 1000:.0f} ms, {len(errors)} partition errors"
    )
    assert "Traceback" not in worker.log(), worker.log()[-3000:]
    assert not errors, [dict(e) for e in errors]
    assert (await t.delete("/v1/relays/events")).status_code == 204


async def test_a_put_that_fixes_a_wrong_password_gets_the_relay_going(
    client: AsyncTestClient[Any],
    settings: Settings,
    password_cluster: PgCluster,
    broker_user: tuple[aioredis.Redis, str],
    worker_pool: WorkerPool,
) -> None:
    """A target created with a wrong password never connected: the PUT of the right one is a rotation
    (it restarts nothing), and the worker, with no publisher open to switch, takes it from the store."""
    redis, user = broker_user
    stream = f"{user}:orders"
    app_dsn = f"postgresql://orly_app@127.0.0.1:{password_cluster.port}/app"
    t = await make_tenant(client, "rotation-fix")
    assert (await t.put("/v1/databases/app", {"dsn": app_dsn, "password": "db-old-secret"})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": f"redis://{user}@127.0.0.1:6379/0"}
    assert (await t.put("/v1/targets/stream", {**target, "password": "mistyped"})).status_code == 201
    relay = {"database": "app", "target": "stream", "partitions": 2, "topic_mapping": {"*": stream}}
    assert (await t.put("/v1/relays/events", relay)).status_code == 201
    worker_pool.start()
    with TimedReader(redis, stream) as reader:
        written = await write_steadily(password_cluster.dsn("app"), 1.0)
        async with asyncio.timeout(60):
            while "invalid username-password" not in json.dumps((await t.get("/v1/relays/events/status")).json()):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        assert not reader.received
        assert (await t.put("/v1/targets/stream", {**target, "password": "broker-old-secret"})).status_code == 200
        await reader.until(written, timeout_s=60)
        await rotated(t, "/v1/targets/stream")
        reader.check(written)
    assert (await t.delete("/v1/relays/events")).status_code == 204


async def test_an_idle_relay_does_not_hold_a_rotation_up(
    client: AsyncTestClient[Any],
    settings: Settings,
    password_cluster: PgCluster,
    broker_user: tuple[aioredis.Redis, str],
    worker_pool: WorkerPool,
) -> None:
    """A relay that has published nothing yet has no publisher open to switch: its worker promises the
    new password (and connects with it when the first rows come), so the rotation completes."""
    redis, user = broker_user
    stream = f"{user}:orders"
    app_dsn = f"postgresql://orly_app@127.0.0.1:{password_cluster.port}/app"
    t = await make_tenant(client, "rotation-idle")
    assert (await t.put("/v1/databases/app", {"dsn": app_dsn, "password": "db-old-secret"})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": f"redis://{user}@127.0.0.1:6379/0"}
    assert (await t.put("/v1/targets/stream", {**target, "password": "broker-old-secret"})).status_code == 201
    relay = {"database": "app", "target": "stream", "partitions": 2, "topic_mapping": {"*": stream}}
    assert (await t.put("/v1/relays/events", relay)).status_code == 201
    worker_pool.start()
    await balanced(settings, t.name, workers=1)
    await redis.acl_setuser(user, enabled=True, passwords=["+broker-new-secret"])
    r = await t.put("/v1/targets/stream", {**target, "password": "broker-new-secret"})
    assert r.status_code == 200 and r.json()["rotation"]["workers"] == 1, r.text
    await rotated(t, "/v1/targets/stream")
    await redis.acl_setuser(user, enabled=True, passwords=["-broker-old-secret"])
    with TimedReader(redis, stream) as reader:
        written = await write_steadily(password_cluster.dsn("app"), 0.5)
        await reader.until(written, timeout_s=60)
        reader.check(written)
    assert (await t.delete("/v1/relays/events")).status_code == 204
