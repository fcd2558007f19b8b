"""Shared set-up for engine-level tests: a tenant with a provisioned database and a RabbitMQ target,
a RelayRunner driven one slice at a time, and helpers to write and read."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.brokers.factory import open_publisher
from outbox_relay.client import add
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.engine import PublisherCache, RelayRunner, TenantConnections
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import RabbitMQAccount
from tests.helpers import TenantClient, make_tenant

FAST_RETRY = {"max_attempts": 3, "backoff_base_ms": 20, "backoff_max_ms": 100, "poll_interval_ms": 50}


@pytest.fixture
async def store(control_dsn: str) -> AsyncIterator[ControlStore]:
    s = await ControlStore.connect(control_dsn)
    yield s
    await s.close()


@pytest.fixture
async def runner(settings: Settings, store: ControlStore) -> AsyncIterator[RelayRunner]:
    policy = AddressPolicy(allow_private=True)
    tenants = TenantConnections(policy=policy, timeout_s=2)
    publishers = PublisherCache(lambda target, password: open_publisher(target, password=password, policy=policy))
    quick = dataclasses.replace(settings, slice_s=1.0)
    yield RelayRunner(
        settings=quick, store=store, secrets=SecretBox(settings.secret_keys), tenants=tenants, publishers=publishers
    )
    await publishers.close()
    await tenants.close()


class Setup:
    """A tenant with a provisioned database and a RabbitMQ target, and the queues it reads."""

    def __init__(self, tenant: TenantClient, dsn: str, db_name: str, channel: aio_pika.abc.AbstractChannel) -> None:
        self.tenant, self.dsn, self.db_name, self.channel = tenant, dsn, db_name, channel

    async def relay_id(self, store: ControlStore, name: str) -> uuid.UUID:
        tenant = await store.get_tenant(self.tenant.name)
        assert tenant is not None
        row = await store.get_resource("relays", tenant.id, name)
        assert row is not None
        return row.id

    async def drain(self, queue: str) -> list[tuple[str, str, bytes]]:
        q = await self.channel.declare_queue(queue, durable=True)
        out = []
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            out.append((str(message.headers.get("outbox-key")), str(message.message_id), message.body))
        return out


@pytest.fixture
async def setup(
    client: AsyncTestClient[Any], databases: DatabaseFactory, rabbitmq: RabbitMQAccount
) -> AsyncIterator[Setup]:
    t = await make_tenant(client, "engine")
    db_name = await databases.create("engine")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(db_name)})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    r = await t.put(
        "/v1/targets/rabbit",
        {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password, "timeout_ms": 2000},
    )
    assert r.status_code == 201, r.text
    connection = await aio_pika.connect(rabbitmq.admin_url)
    channel = await connection.channel()
    yield Setup(t, pg_dsn(db_name), db_name, channel)
    await connection.close()


async def run_until(
    runner: RelayRunner, relay_id: uuid.UUID, partitions: int, done: Callable[[], Any], max_slices: int = 20
) -> None:
    for _ in range(max_slices):
        for p in range(partitions):
            await runner.run_slice(relay_id, p, "test-holder")
        if await done():
            return
    raise AssertionError("condition not reached")


async def write(dsn: str, *messages: tuple[str, str | None, bytes]) -> list[int]:
    """Write the messages in one transaction; returns their outbox row ids (the cursor's ids)."""
    return [row_id for row_id, _ in await write_ids(dsn, *messages)]


async def write_ids(dsn: str, *messages: tuple[str, str | None, bytes]) -> list[tuple[int, uuid.UUID]]:
    """Write the messages in one transaction; returns each one's (outbox row id, message id)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            message_ids = [await add(conn, topic, key, payload) for topic, key, payload in messages]
            rows = await conn.fetch(
                "SELECT id, message_id FROM outbox_relay.outbox WHERE message_id = ANY($1::uuid[])", message_ids
            )
        by_message = {uuid.UUID(str(r["message_id"])): r["id"] for r in rows}
        return [(by_message[m], m) for m in message_ids]
    finally:
        await conn.close()


async def partition_row(store: ControlStore, relay_id: uuid.UUID, partition: int = 0) -> dict[str, Any]:
    row = await store.pool.fetchrow(
        "SELECT * FROM relay_partitions WHERE relay_id = $1 AND partition = $2", relay_id, partition
    )
    assert row is not None
    return dict(row)


async def until(condition: Callable[[], bool], timeout_s: float) -> float:
    """Poll ``condition`` until it holds (the seconds it took), failing after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)
    return time.monotonic() - started
