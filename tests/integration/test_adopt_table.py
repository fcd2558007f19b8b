"""Adopting a Debezium-layout outbox table that already holds rows, while the application writes to it.

Provision adds its columns without rewriting the table (its file stays the same), never keeps the
writer waiting for long (its longest insert during provision is measured and printed; the bound is the
provision's ``lock_timeout``), and gives way to a transaction that holds the table instead of queueing
writers behind it. Afterwards the relay's ordinary read of the view sees exactly the rows committed
after provision, each once, with the mapped topic, key, headers and payload, through the index.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.domain import OutboxTable
from outbox_relay.engine import TenantConnections
from outbox_relay.errors import MissingPrivileges
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from outbox_relay.tenant import adopt
from outbox_relay.tenant import db as tenant_db
from outbox_relay.tenant.sql import scan_sql
from tests.conftest import PG_HOST, PG_PORT, RUN_ID, DatabaseFactory, pg_dsn
from tests.helpers import make_tenant
from workers.jobs import maintain_outboxes

# As Debezium's documentation creates it (the outbox event router's expected layout).
DEBEZIUM_OUTBOX = (
    "CREATE TABLE outbox (id uuid NOT NULL PRIMARY KEY, aggregatetype varchar(255) NOT NULL, "
    "aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)"
)
INSERT = "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ($1, $2, $3, $4, $5::jsonb)"
OLD_ROWS = 20_000
DOCS = Path(__file__).parents[2] / "docs" / "delivery.md"


async def debezium_database(databases: DatabaseFactory, prefix: str) -> str:
    name = await databases.create(prefix)
    conn = await asyncpg.connect(pg_dsn(name))
    try:
        await conn.execute(DEBEZIUM_OUTBOX)
        await conn.execute(
            "INSERT INTO outbox SELECT gen_random_uuid(), 'order', 'order-' || (i % 50), 'OrderCreated', "
            "jsonb_build_object('n', i) FROM generate_series(1, $1) AS i",
            OLD_ROWS,
        )
    finally:
        await conn.close()
    return name


class Writer:
    """The application: one-row transactions as fast as they go, each insert's duration kept."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.ids: list[uuid.UUID] = []
        self.longest_s = 0.0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            n = 0
            while not self.stop.is_set():
                message_id = uuid.uuid4()
                started = time.monotonic()
                await conn.execute(INSERT, message_id, "order", f"order-{n % 7}", "OrderPaid", json.dumps({"n": n}))
                self.longest_s = max(self.longest_s, time.monotonic() - started)
                self.ids.append(message_id)
                n += 1
                await asyncio.sleep(0.002)
        finally:
            await conn.close()


async def test_provision_adopts_a_debezium_table_online(
    client: AsyncTestClient[Any], databases: DatabaseFactory
) -> None:
    t = await make_tenant(client, "adopt")
    db_name = await debezium_database(databases, "adopt")
    dsn = pg_dsn(db_name)
    body = {"dsn": dsn, "table": {"name": "outbox", "columns": {"headers": {"eventType": "type"}}}}
    r = await t.put("/v1/databases/app", body)
    assert r.status_code == 201, r.text
    assert r.json()["table"] == {
        "name": "outbox",
        "schema": "public",
        "columns": {
            "id": "id",
            "topic": "aggregatetype",
            "key": "aggregateid",
            "payload": "payload",
            "headers": {"eventType": "type"},
        },
    }
    conn = await asyncpg.connect(dsn)
    try:
        file_before = await conn.fetchval("SELECT pg_relation_filenode('public.outbox')")
        writer = Writer(dsn)
        writing = asyncio.create_task(writer.run())
        await asyncio.sleep(0.3)
        before_provision = len(writer.ids)
        r = await t.post("/v1/databases/app/provision")
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2
        await asyncio.sleep(0.3)
        writer.stop.set()
        await writing
        print(f"\nlongest application insert during provision: {writer.longest_s * 1000:.1f} ms")
        assert before_provision > 0 and len(writer.ids) > before_provision, "the writer kept writing"

        # catalog only: the table was not rewritten
        assert await conn.fetchval("SELECT pg_relation_filenode('public.outbox')") == file_before
        index = await conn.fetchrow(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) AS def FROM pg_index AS i "
            "WHERE i.indexrelid = to_regclass($1)",
            f"public.{adopt.index_name(OutboxTable(name='outbox'))}",
        )
        assert index is not None and index["indisvalid"], index

        # exactly the writer's rows committed after provision: none of the old ones, none twice
        new_ids = {r["id"] for r in await conn.fetch("SELECT id FROM outbox WHERE outbox_relay_txid IS NOT NULL")}
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE outbox_relay_txid IS NULL") >= OLD_ROWS
        assert new_ids and new_ids <= set(writer.ids)
        assert set(writer.ids[:before_provision]).isdisjoint(new_ids)
        # the horizon is the server's: wait for every transaction open now to end (shared servers)
        newest = await conn.fetchval("SELECT max(outbox_relay_txid) FROM outbox")
        deadline = time.monotonic() + 120
        while await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot()) <= $1::xid8", newest):
            assert time.monotonic() < deadline, "a transaction on the server held the horizon for 2 minutes"
            await asyncio.sleep(0.2)
        layout = await tenant_db.read_layout(conn, "outbox_relay")
        rows = await tenant_db.scan(
            conn, "outbox_relay", after=(0, 0), partitions=4, wanted=None, limit=100_000, layout=layout
        )
        assert {uuid.UUID(row.message_id) for _, row in rows} == new_ids
        assert len(rows) == len(new_ids)
        assert [(row.txid, row.id) for _, row in rows] == sorted((row.txid, row.id) for _, row in rows)
        _, first = rows[0]
        assert first.topic == "order" and first.key is not None and first.key.startswith("order-")
        assert json.loads(first.headers) == {"eventType": "OrderPaid"}
        assert set(json.loads(first.payload)) == {"n"}

        # the read is the relay's index range scan over the table, not a scan of its old rows
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + scan_sql("outbox_relay"), 0, 0, 4, None, 100))
        assert adopt.index_name(OutboxTable(name="outbox")) in plan, plan

        # provisioning again changes nothing and fails nothing
        assert (await t.post("/v1/databases/app/provision")).status_code == 200

        # the removal the docs give takes it all out again, without rewriting the table either
        removal = adopt.removal_sql("outbox_relay", OutboxTable(name="outbox"))
        assert removal in DOCS.read_text()
        uncommented = "\n".join(line.split("--")[0] for line in removal.splitlines())
        for statement in uncommented.split(";"):  # one at a time: DROP INDEX CONCURRENTLY needs its own
            if statement.strip():
                await conn.execute(statement)
        columns = await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'public.outbox'::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum"
        )
        assert [c["attname"] for c in columns] == ["id", "aggregatetype", "aggregateid", "type", "payload"]
        assert await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.outbox'::regclass") == 0
        assert await conn.fetchval("SELECT to_regclass('outbox_relay.adopted_outbox_seq')") is None
        assert await conn.fetchval("SELECT to_regnamespace('outbox_relay')") is not None
        assert await conn.fetchval("SELECT to_regclass('outbox_relay.outbox')") is None
        assert await conn.fetchval("SELECT pg_relation_filenode('public.outbox')") == file_before
    finally:
        await conn.close()


async def test_adoption_gives_way_to_a_transaction_holding_the_table(databases: DatabaseFactory) -> None:
    """A transaction that wrote to the table and stays open: provision's catalog step waits at most its
    lock timeout each try and then gives up, changing nothing; a writer arriving meanwhile is held up
    at most one lock timeout, not until the long transaction ends."""
    db_name = await debezium_database(databases, "adopt_busy")
    dsn = pg_dsn(db_name)
    table = OutboxTable(name="outbox")
    conn, holder, other = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute(INSERT, uuid.uuid4(), "order", "order-1", "OrderPaid", "{}")
        with pytest.raises(asyncpg.LockNotAvailableError):
            await adopt.adopt(conn, "outbox_relay", table, "jsonb", lock_timeout_ms=300, attempts=2)
        waiting = asyncio.create_task(
            adopt.adopt(conn, "outbox_relay", table, "jsonb", lock_timeout_ms=500, attempts=1)
        )
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await other.execute(INSERT, uuid.uuid4(), "order", "order-2", "OrderPaid", "{}")
        print(f"\nwriter queued behind a waiting provision for {(time.monotonic() - started) * 1000:.0f} ms")
        with pytest.raises(asyncpg.LockNotAvailableError):
            await waiting
        await held.rollback()
        columns = await conn.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.outbox'::regclass AND attname = ANY($1)",
            list(adopt.ADDED_COLUMNS),
        )
        assert columns == 0, "nothing half-done"
        assert await conn.fetchval("SELECT to_regclass('outbox_relay.outbox')") is None
        # once the transaction ended, it goes through
        await adopt.adopt(conn, "outbox_relay", table, "jsonb", lock_timeout_ms=500, attempts=2)
        assert await conn.fetchval("SELECT count(*) FROM outbox_relay.outbox") == 0  # old rows are not relayed
    finally:
        for c in (conn, holder, other):
            await c.close()


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"name": "missing"}, "table public.missing does not exist"),
        ({"name": "outbox", "columns": {"topic": "nope"}}, "has no column 'nope'"),
        ({"name": "outbox", "columns": {"headers": {"eventType": "kind"}}}, "has no column 'kind'"),
        ({"name": "outbox", "columns": {"id": "aggregateid", "key": "type"}}, "not uuid"),
    ],
)
async def test_a_table_that_does_not_fit_is_422_and_changes_nothing(
    client: AsyncTestClient[Any], databases: DatabaseFactory, table: dict[str, Any], expected: str
) -> None:
    t = await make_tenant(client, "adopt_bad")
    db_name = await debezium_database(databases, "adopt_bad")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(db_name), "table": table})).status_code == 201
    r = await t.post("/v1/databases/app/provision")
    assert r.status_code == 422, r.text
    assert r.json()["type"].endswith("provision-failed") and expected in r.json()["detail"], r.json()
    conn = await asyncpg.connect(pg_dsn(db_name))
    try:
        assert await conn.fetchval("SELECT to_regnamespace('outbox_relay')") is None
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_attribute "
                "WHERE attrelid = 'public.outbox'::regclass AND attname LIKE 'outbox_relay%'"
            )
            == 0
        )
    finally:
        await conn.close()


async def test_a_member_of_the_tables_owner_adopts_it_and_every_writer_keeps_inserting() -> None:
    """The relay's role need not be the application's: a member of the table's owner role adopts it.
    The sequence then belongs to the owner and every role that may insert gets USAGE on it (a default's
    ``nextval`` runs as the inserting role: without it, the application's inserts would fail). A role
    that neither owns the table nor is a member of its owner is refused before anything changes."""
    app, writer, relay, stranger = (f"orly_adopt_{who}_{RUN_ID}" for who in ("app", "writer", "relay", "stranger"))
    database = f"orly_adopt_roles_{RUN_ID}"
    admin = await asyncpg.connect(pg_dsn("postgres"))
    try:
        for role in (app, writer, stranger):
            await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"CREATE ROLE {relay} LOGIN IN ROLE {app}")
        await admin.execute(f"CREATE DATABASE {database}")
        owner = await asyncpg.connect(pg_dsn(database))
        try:
            await owner.execute(DEBEZIUM_OUTBOX)
            await owner.execute(f"ALTER TABLE outbox OWNER TO {app}")
            await owner.execute(f"GRANT INSERT, SELECT ON outbox TO {writer}")
            await owner.execute(f"GRANT CREATE ON DATABASE {database} TO {relay}, {stranger}")
            await owner.execute(f"GRANT CREATE ON SCHEMA public TO {relay}")  # CREATE INDEX wants it
        finally:
            await owner.close()

        def dsn(role: str) -> str:
            return f"postgresql://{role}@{PG_HOST}:{PG_PORT}/{database}"

        conn = await asyncpg.connect(dsn(stranger))
        try:
            with pytest.raises(MissingPrivileges) as refused:
                await tenant_db.provision_for_tenant(conn, "outbox_relay", OutboxTable(name="outbox"))
        finally:
            await conn.close()
        assert refused.value.missing == [
            {
                "privilege": "OWNER",
                "object": "table public.outbox",
                "grant": f"ALTER TABLE public.outbox OWNER TO {stranger}",
            },
            {"privilege": "CREATE", "object": "schema public", "grant": f"GRANT CREATE ON SCHEMA public TO {stranger}"},
        ]

        conn = await asyncpg.connect(dsn(relay))
        try:
            await tenant_db.provision_for_tenant(conn, "outbox_relay", OutboxTable(name="outbox"))
        finally:
            await conn.close()
        for role in (app, writer):
            conn = await asyncpg.connect(dsn(role))
            try:
                await conn.execute(INSERT, uuid.uuid4(), "order", "order-1", "OrderPaid", "{}")
            finally:
                await conn.close()
        conn = await asyncpg.connect(pg_dsn(database))
        try:
            assert await conn.fetchval("SELECT count(*) FROM outbox_relay.outbox") == 2
            assert await conn.fetchval("SELECT to_regclass('outbox_relay.adopted_outbox_seq')") is not None
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        for role in (relay, app, writer, stranger):
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_outbox_maintenance_leaves_an_adopted_table_alone(
    client: AsyncTestClient[Any], databases: DatabaseFactory, store: ControlStore, settings: Settings
) -> None:
    """The table is the application's: no daily partitions are made in it and nothing is dropped; the
    maintenance run records the database as maintained, without an error (it has no
    ``outbox_ensure_partitions`` to call)."""
    t = await make_tenant(client, "adopt_maint")
    db_name = await debezium_database(databases, "adopt_maint")
    assert (await t.put("/v1/databases/app", {"dsn": pg_dsn(db_name), "table": {"name": "outbox"}})).status_code == 201
    assert (await t.post("/v1/databases/app/provision")).status_code == 200
    target = {"kind": "redis_streams", "url": "redis://127.0.0.1:6379/0"}
    assert (await t.put("/v1/targets/stream", target)).status_code == 201
    assert (await t.put("/v1/relays/r", {"database": "app", "target": "stream"})).status_code == 201
    tenants = TenantConnections(policy=AddressPolicy(allow_private=True), timeout_s=2)
    try:
        await maintain_outboxes({"store": store, "tenants": tenants, "secrets": SecretBox(settings.secret_keys)})
    finally:
        await tenants.close()
    tenant = await store.get_tenant(t.name)
    assert tenant is not None
    row = await store.pool.fetchrow(
        "SELECT maintained_at, maintenance_error FROM databases WHERE tenant_id = $1 AND name = 'app'", tenant.id
    )
    assert row["maintained_at"] is not None and row["maintenance_error"] is None, dict(row)
    conn = await asyncpg.connect(pg_dsn(db_name))
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_inherits") == 0
        assert await conn.fetchval("SELECT count(*) FROM public.outbox") == OLD_ROWS
    finally:
        await conn.close()


async def test_another_layout_maps_a_bytea_payload_no_key_and_a_timestamp_header(databases: DatabaseFactory) -> None:
    """Not Debezium's layout: a bytea payload is published as its bytes, a table without a key column
    spreads its rows by number, and a timestamp column becomes a header (a NULL one sends none)."""
    db_name = await databases.create("adopt_other")
    conn = await asyncpg.connect(pg_dsn(db_name))
    try:
        await conn.execute(
            "CREATE SCHEMA app; CREATE TABLE app.events (event_id uuid PRIMARY KEY, kind text NOT NULL, "
            "body bytea, created timestamptz DEFAULT '2026-01-02 03:04:05+00')"
        )
        mapping = msgspec.json.decode(
            b'{"name": "events", "schema": "app", "columns": {"id": "event_id", "topic": "kind", "key": null, '
            b'"payload": "body", "headers": {"occurredAt": "created"}}}',
            type=OutboxTable,
        )
        await tenant_db.provision_for_tenant(conn, "relay_side", mapping)
        first, second = uuid.uuid4(), uuid.uuid4()
        await conn.execute("INSERT INTO app.events (event_id, kind, body) VALUES ($1, 'audit', $2)", first, b"\x00\xff")
        await conn.execute("INSERT INTO app.events (event_id, kind, created) VALUES ($1, 'audit', NULL)", second)
        newest = await conn.fetchval("SELECT max(outbox_relay_txid) FROM app.events")
        deadline = time.monotonic() + 120
        while await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot()) <= $1::xid8", newest):
            assert time.monotonic() < deadline, "a transaction on the server held the horizon for 2 minutes"
            await asyncio.sleep(0.2)
        layout = await tenant_db.read_layout(conn, "relay_side")
        rows = [
            r
            for _, r in await tenant_db.scan(
                conn, "relay_side", after=(0, 0), partitions=1, wanted=None, limit=10, layout=layout
            )
        ]
    finally:
        await conn.close()
    assert [(r.message_id, r.topic, r.key, r.payload) for r in rows] == [
        (str(first), "audit", None, b"\x00\xff"),
        (str(second), "audit", None, b""),
    ]
    occurred = json.loads(rows[0].headers)["occurredAt"]  # the column's text, in the server's TimeZone
    assert datetime.fromisoformat(occurred) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert json.loads(rows[1].headers) == {}
