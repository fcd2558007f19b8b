"""A database's adopted ``table`` over the API: it reads back as written, a mapping that cannot work is
a 4xx naming the field (a missing table or column is found at provision: tests/integration), and
``schema.sql`` hands out the adoption's DDL instead of the relay's own outbox."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import pg_dsn
from tests.helpers import TenantClient


async def test_a_table_reads_back_and_null_goes_back_to_the_relays_own_outbox(tenant: TenantClient) -> None:
    table = {
        "name": "events",
        "schema": "app",
        "columns": {"id": "event_id", "topic": "kind", "key": None, "payload": "body", "headers": {"at": "created"}},
    }
    r = await tenant.put("/v1/databases/d", {"dsn": pg_dsn("x"), "table": table})
    assert r.status_code == 201, r.text
    got = (await tenant.get("/v1/databases/d")).json()
    assert got["table"] == table
    sql = (await tenant.get("/v1/databases/d/schema.sql")).text
    assert 'ALTER TABLE "app"."events" ADD COLUMN IF NOT EXISTS outbox_relay_txid xid8' in sql
    assert "CREATE INDEX CONCURRENTLY" in sql and 'CREATE OR REPLACE VIEW "outbox_relay".outbox' in sql
    assert "'at', t.\"created\"::text" in sql
    r = await tenant.put("/v1/databases/d", {**got, "table": None})  # GET -> edit -> PUT
    assert r.status_code == 200, r.text
    assert (await tenant.get("/v1/databases/d")).json()["table"] is None
    assert "PARTITION BY RANGE" in (await tenant.get("/v1/databases/d/schema.sql")).text


@pytest.mark.parametrize(
    ("table", "status", "says"),
    [
        ({"name": 'outbox"; DROP TABLE x; --'}, 400, "table.name"),
        ({"name": "Outbox"}, 400, "table.name"),
        ({"name": "outbox", "columns": {"topic": "a b"}}, 400, "table.columns.topic"),
        ({"name": "outbox", "columns": {"headers": {"outbox-id": "id"}}}, 400, "table.columns.headers"),
        ({"name": "outbox", "columns": {"nope": "x"}}, 400, "nope"),
        ({"name": "outbox", "schema": "outbox_relay"}, 422, "table.schema"),
        ({"name": "outbox", "columns": {"key": "outbox_relay_seq"}}, 422, "table.columns.key"),
        ({"name": "outbox", "columns": {"payload": "id"}}, 422, "table.columns.id"),
    ],
)
async def test_a_mapping_that_cannot_work_is_refused_with_its_field(
    tenant: TenantClient, table: dict[str, Any], status: int, says: str
) -> None:
    r = await tenant.put("/v1/databases/d", {"dsn": pg_dsn("x"), "table": table})
    assert r.status_code == status, r.text
    assert says in r.text, r.text
    assert (await tenant.get("/v1/databases/d")).status_code == 404
