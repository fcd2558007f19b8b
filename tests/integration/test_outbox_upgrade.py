"""An outbox installed with schema version 1 (no message ids) is upgraded in place by provision.

A relay keeps relaying it throughout: before the upgrade with the row ids it always published, after
it with each new row's ``message_id`` and, for the rows written before, a UUID derived from the
outbox's own namespace that stays the same at every read, in a copy made by ``pg_dump`` too. The
upgrade rewrites nothing (the partitions keep their files) and gives way to a writer instead of
queueing the outbox's writers behind its lock.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.client import add
from outbox_relay.engine import RelayRunner
from outbox_relay.store.control import ControlStore
from outbox_relay.tenant import db as tenant_db
from outbox_relay.tenant.sql import notify_channel, quote_ident, quote_literal
from tests.conftest import DatabaseFactory, pg_dsn
from tests.harness.brokers import RabbitMQAccount
from tests.helpers import make_tenant
from tests.integration.conftest import Setup, run_until

V1_SCHEMA = Path(__file__).with_name("outbox_schema_v1.sql")


def v1_schema_sql(schema: str = "outbox_relay") -> str:
    """The DDL that provision ran before message ids (version 1), as it was shipped."""
    return V1_SCHEMA.read_text().format(
        schema=quote_ident(schema),
        schema_literal=quote_literal(schema),
        channel=quote_literal(notify_channel(schema)),
    )


@pytest.fixture
async def v1_setup(
    client: AsyncTestClient[Any], databases: DatabaseFactory, rabbitmq: RabbitMQAccount
) -> AsyncIterator[Setup]:
    t = await make_tenant(client, "upgrade")
    db_name = await databases.create("upgrade")
    conn = await asyncpg.connect(pg_dsn(db_name))
    try:
        await conn.execute(v1_schema_sql())
    finally:
        await conn.close()
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(db_name)})).status_code == 201
    r = await t.put("/v1/targets/rabbit", {"kind": "rabbitmq", "url": rabbitmq.url, "password": rabbitmq.password})
    assert r.status_code == 201, r.text
    connection = await aio_pika.connect(rabbitmq.admin_url)
    channel = await connection.channel()
    yield Setup(t, pg_dsn(db_name), db_name, channel)
    await connection.close()


async def insert_v1(dsn: str, *bodies: bytes) -> list[int]:
    """Rows as a writer of the version 1 era wrote them (no message_id column to fill)."""
    conn = await asyncpg.connect(dsn)
    try:
        return [
            await conn.fetchval(
                "INSERT INTO outbox_relay.outbox (topic, key, payload) VALUES ('t', 'k', $1) RETURNING id", body
            )
            for body in bodies
        ]
    finally:
        await conn.close()


async def partition_files(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT c.relname, c.relfilenode FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'outbox_relay.outbox'::regclass"
    )
    return {r["relname"]: r["relfilenode"] for r in rows}


class Received:
    def __init__(self, setup: Setup, queue: str) -> None:
        self.setup, self.queue = setup, queue
        self.messages: list[tuple[str, bytes]] = []

    async def has(self, n: int) -> bool:
        self.messages += [(message_id, body) for _, message_id, body in await self.setup.drain(self.queue)]
        return len(self.messages) >= n


async def test_a_version_1_outbox_is_upgraded_in_place_and_keeps_relaying_with_stable_ids(
    v1_setup: Setup, runner: RelayRunner, store: ControlStore, databases: DatabaseFactory, tmp_path: Path
) -> None:
    setup = v1_setup
    await setup.channel.declare_queue("upgrade-q", durable=True)
    body = {"database": "app", "target": "rabbit", "partitions": 1, "topic_mapping": {"*": "upgrade-q"}}
    assert (await setup.tenant.put("/v1/relays/up", body)).status_code == 201
    relay_id = await setup.relay_id(store, "up")
    received = Received(setup, "upgrade-q")

    # before the upgrade: relayed as ever, with the row ids
    old_ids = await insert_v1(setup.dsn, b"old-1", b"old-2")
    await run_until(runner, relay_id, 1, lambda: received.has(2))
    assert received.messages == [(str(old_ids[0]), b"old-1"), (str(old_ids[1]), b"old-2")]

    conn = await asyncpg.connect(setup.dsn)
    try:
        files = await partition_files(conn)
        # a writer in the middle of a transaction: the upgrade gives way rather than queue writers
        writer = await asyncpg.connect(setup.dsn)
        try:
            open_tx = writer.transaction()
            await open_tx.start()
            await writer.execute("INSERT INTO outbox_relay.outbox (topic, key, payload) VALUES ('t', 'k', 'held')")
            started = time.monotonic()
            with pytest.raises(asyncpg.LockNotAvailableError):
                await tenant_db.provision(conn, "outbox_relay", lock_timeout_ms=300, attempts=2)
            assert time.monotonic() - started < 5
            # while provision waits for the lock, another writer is held up at most for the lock timeout
            waiting = asyncio.create_task(tenant_db.provision(conn, "outbox_relay", lock_timeout_ms=500, attempts=1))
            await asyncio.sleep(0.1)
            other = await asyncpg.connect(setup.dsn)
            try:
                t0 = time.monotonic()
                await other.execute("INSERT INTO outbox_relay.outbox (topic, key, payload) VALUES ('t', 'k', 'queued')")
                assert time.monotonic() - t0 < 2
            finally:
                await other.close()
            with pytest.raises(asyncpg.LockNotAvailableError):
                await waiting
            await open_tx.commit()
        finally:
            await writer.close()
        assert await conn.fetchval("SELECT version FROM outbox_relay.outbox_meta") == 1  # nothing half-done

        # the upgrade, through the API as a tenant runs it
        r = await setup.tenant.post("/v1/databases/app/provision")
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        assert await partition_files(conn) == files  # catalog only: no partition was rewritten
        meta = await conn.fetchrow("SELECT version, id_namespace FROM outbox_relay.outbox_meta")
        assert meta["version"] == 2 and meta["id_namespace"] is not None
        namespace = uuid.UUID(str(meta["id_namespace"]))
        # old rows keep message_id NULL (nothing was written to them); the relay derives their ids
        assert await conn.fetchval("SELECT count(*) FROM outbox_relay.outbox WHERE message_id IS NOT NULL") == 0
        async with conn.transaction():
            new_id = await add(conn, "t", "k", b"new")
        legacy = await conn.fetch("SELECT txid::text::bigint AS txid, id, payload FROM outbox_relay.outbox ORDER BY id")
    finally:
        await conn.close()
    derived = {bytes(r["payload"]): str(uuid.uuid5(namespace, f"{r['txid']}:{r['id']}")) for r in legacy}

    # after it: the rows written meanwhile (derived ids) and the new one (its message_id)
    await run_until(runner, relay_id, 1, lambda: received.has(5))
    after = received.messages[2:]
    assert after == [(derived[b"held"], b"held"), (derived[b"queued"], b"queued"), (str(new_id), b"new")]

    # read again from the start (a failover, say): every old row gets the same id again
    for _ in range(2):
        await store.pool.execute("UPDATE relay_partitions SET system_identifier = '1/1' WHERE relay_id = $1", relay_id)
        before = len(received.messages)
        await run_until(runner, relay_id, 1, lambda n=before: received.has(n + 5))
        again = received.messages[before : before + 5]
        assert again == [
            (derived[b"old-1"], b"old-1"),
            (derived[b"old-2"], b"old-2"),
            (derived[b"held"], b"held"),
            (derived[b"queued"], b"queued"),
            (str(new_id), b"new"),
        ]

    # a copy made by pg_dump/pg_restore derives the same ids (the namespace is data of the database)
    copy = pg_dsn(await databases.create("upgrade_copy"))
    dump = tmp_path / "upgraded.dump"
    await asyncio.to_thread(subprocess.run, ["pg_dump", "-Fc", "-f", str(dump), setup.dsn], check=True, timeout=120)
    await asyncio.to_thread(subprocess.run, ["pg_restore", "--no-owner", "-d", copy, str(dump)], check=True)
    copy_conn = await asyncpg.connect(copy)
    try:
        layout = await tenant_db.read_layout(copy_conn, "outbox_relay")
        rows = await tenant_db.poll(
            copy_conn, "outbox_relay", cursor=(0, 0), partitions=1, partition=0, limit=100, layout=layout
        )
    finally:
        await copy_conn.close()
    assert {r.payload: r.message_id for r in rows} == {**derived, b"new": str(new_id)}
