"""A worker's switch to a rotated credential, make-before-break, on servers that check passwords: a
private PostgreSQL cluster (SCRAM) and a Redis ACL user of the test's own. A new password the server
refuses leaves the old pool or publisher in use; a switch keeps what is in flight on the old one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.domain import Database, RedisStreamsTarget, Target
from outbox_relay.engine import PublisherCache, TenantConnections
from outbox_relay.errors import TargetUnavailable, TenantDatabaseError
from tests.conftest import RUN_ID
from tests.faults import PgCluster, password_cluster
from tests.helpers import LOCAL

__all__ = ["password_cluster"]  # the fixture
VERSION = datetime(2026, 1, 1, tzinfo=UTC)


async def wait_closed(pool: asyncpg.Pool) -> None:
    async with asyncio.timeout(30):
        while not pool.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_database_switches_to_a_new_password_only_once_the_server_takes_it(
    password_cluster: PgCluster,
) -> None:
    db = Database(dsn=f"postgresql://orly_app@127.0.0.1:{password_cluster.port}/app")
    database_id = uuid.uuid4()
    tenants = TenantConnections(policy=LOCAL, timeout_s=3)
    admin = await asyncpg.connect(password_cluster.dsn())
    try:
        old = await tenants.pool(database_id, VERSION, db, "db-old-secret", secret_version=0)
        in_flight = await old.acquire()  # a read holding a connection of the old pool

        with pytest.raises(TenantDatabaseError, match="password authentication failed"):
            await tenants.rotate(database_id, 1, "db-new-secret")
        assert tenants.in_use() == {database_id: 0}
        assert await tenants.pool(database_id, VERSION, db, "db-old-secret") is old

        await admin.execute("ALTER ROLE orly_app PASSWORD 'db-new-secret'")
        assert await tenants.rotate(database_id, 1, "db-new-secret")
        new = await tenants.pool(database_id, VERSION, db, "db-old-secret")
        assert new is not old and tenants.in_use() == {database_id: 1}
        assert await new.fetchval("SELECT current_user") == "orly_app"
        assert await in_flight.fetchval("SELECT 1") == 1, "the switch broke a read in flight"
        assert not old.is_closing()
        await old.release(in_flight)
        await wait_closed(old)  # closed once its last connection came back
    finally:
        await tenants.close()
        await admin.close()


@pytest.fixture
async def broker_user() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    admin = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    user = f"orly-switch-{RUN_ID}"
    await admin.acl_setuser(user, enabled=True, passwords=["+old-secret"], keys=[f"{user}:*"], commands=["+@all"])
    try:
        yield admin, user
    finally:
        await admin.acl_deluser(user)
        keys = [k async for k in admin.scan_iter(match=f"{user}:*", count=1000)]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


async def test_a_target_switches_make_before_break(broker_user: tuple[aioredis.Redis, str]) -> None:
    redis, user = broker_user
    target_id = uuid.uuid4()
    target: Target = RedisStreamsTarget(url=f"redis://{user}@127.0.0.1:6379/0")

    async def factory(spec: Target, password: str | None) -> object:
        return await open_publisher(spec, password=password, policy=LOCAL)

    publishers = PublisherCache(factory)  # type: ignore[arg-type]
    message = OutgoingMessage(id=1, destination=f"{user}:s", key="k", payload=b"x", headers={})
    try:
        old = await publishers.get(target_id, VERSION, target, "old-secret", secret_version=3)
        with pytest.raises(TargetUnavailable, match="invalid username-password pair"):
            await publishers.rotate(target_id, 4, "new-secret")
        assert publishers.in_use() == {target_id: 3}
        assert await publishers.get(target_id, VERSION, target, "old-secret") is old

        await redis.acl_setuser(user, enabled=True, passwords=["+new-secret"])
        sent = asyncio.create_task(old.publish_batch([message]))  # handed to the old one before the switch
        assert await publishers.rotate(target_id, 4, "new-secret")
        await redis.acl_setuser(user, enabled=True, passwords=["-old-secret"])
        assert (await sent).acked == 1, "the batch in flight was dropped"
        new = await publishers.get(target_id, VERSION, target, "old-secret")
        assert new is not old and publishers.in_use() == {target_id: 4}
        assert (await new.publish_batch([message])).acked == 1
        assert await redis.xlen(f"{user}:s") == 2
    finally:
        await publishers.close()
