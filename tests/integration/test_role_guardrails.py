"""Registration guardrails on the real PostgreSQL: provision checks the connecting role's privileges
before it changes anything and names every missing one (with the statement that gives it); a role
granted them provisions; a superuser or a role that owns unrelated tables gets a warning; the relay's
own sessions carry ``statement_timeout`` and ``idle_in_transaction_session_timeout``."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from outbox_relay.config import Settings
from outbox_relay.domain import Database
from outbox_relay.engine import TenantConnections
from outbox_relay.errors import ConfigError
from outbox_relay.netguard import AddressPolicy
from outbox_relay.tenant import db as tenant_db
from tests.conftest import PG_HOST, PG_PORT, RUN_ID, pg_dsn
from tests.helpers import TenantClient, make_tenant

_names = itertools.count(1)
POLICY = AddressPolicy(allow_private=True)


@dataclass
class Scratch:
    """A database and a login role of its own (no privileges beyond PostgreSQL's defaults)."""

    database: str
    role: str

    @property
    def role_dsn(self) -> str:
        return f"postgresql://{self.role}@{PG_HOST}:{PG_PORT}/{self.database}"

    async def admin(self, *statements: str) -> None:
        """Run statements in the scratch database as the superuser."""
        conn = await asyncpg.connect(pg_dsn(self.database))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def as_role(self, query: str) -> Any:
        conn = await asyncpg.connect(self.role_dsn)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()


@pytest.fixture
async def scratch() -> AsyncIterator[Scratch]:
    n = next(_names)
    made = Scratch(database=f"orly_guard_{RUN_ID}_{n}", role=f"orly_guard_role_{RUN_ID}_{n}")
    conn = await asyncpg.connect(pg_dsn("postgres"))
    try:
        await conn.execute(f"CREATE ROLE {made.role} LOGIN")
        await conn.execute(f"CREATE DATABASE {made.database}")
        yield made
    finally:
        await conn.execute(f"DROP DATABASE IF EXISTS {made.database} WITH (FORCE)")
        await conn.execute(f"DROP ROLE IF EXISTS {made.role}")
        await conn.close()


@pytest.fixture
async def tenant(client: AsyncTestClient[Any]) -> TenantClient:
    return await make_tenant(client, "guard")


async def register(tenant: TenantClient, name: str, dsn: str) -> None:
    r = await tenant.put(f"/v1/databases/{name}", {"dsn": dsn})
    assert r.status_code == 201, r.text


async def test_a_role_without_the_grants_gets_every_one_missing_then_provisions_once_granted(
    tenant: TenantClient, scratch: Scratch
) -> None:
    # two things missing at once: CREATE on the database (PostgreSQL 15 grants it to nobody by default)
    # and EXECUTE on a function maintenance calls, revoked from PUBLIC in this database only
    await scratch.admin("REVOKE EXECUTE ON FUNCTION pg_catalog.pg_try_advisory_lock(bigint) FROM PUBLIC")
    await register(tenant, "shop", scratch.role_dsn)

    r = await tenant.post("/v1/databases/shop/provision")

    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["type"] == "urn:outbox-relay:problem:missing-privileges"
    assert problem["missing"] == [
        {
            "privilege": "CREATE",
            "object": f"database {scratch.database}",
            "grant": f"GRANT CREATE ON DATABASE {scratch.database} TO {scratch.role}",
        },
        {
            "privilege": "EXECUTE",
            "object": "function pg_catalog.pg_try_advisory_lock(bigint)",
            "grant": f"GRANT EXECUTE ON FUNCTION pg_catalog.pg_try_advisory_lock(bigint) TO {scratch.role}",
        },
    ]
    assert f"role {scratch.role} lacks" in problem["detail"]
    assert f"GRANT CREATE ON DATABASE {scratch.database} TO {scratch.role};" in problem["detail"]
    # checked before anything changed: no schema was made
    assert await scratch.as_role("SELECT to_regnamespace('outbox_relay') IS NULL") is True

    await scratch.admin(*(m["grant"] for m in problem["missing"]))
    r = await tenant.post("/v1/databases/shop/provision")

    assert r.status_code == 200, r.text
    assert r.json() == {"database": "shop", "schema": "outbox_relay", "version": 2, "warnings": []}
    # the role owns its outbox, and reads it as the relay does
    assert await scratch.as_role("SELECT count(*) FROM outbox_relay.outbox") == 0
    assert await scratch.as_role("SELECT pg_try_advisory_lock(1)") is True


async def test_an_outbox_of_another_owner_lists_every_object_and_the_grants_fix_it(
    tenant: TenantClient, scratch: Scratch
) -> None:
    """Installed by the superuser, then registered with the relay's role: re-applying the schema
    needs the owner, so every relay table, partition and function is named, and the statements
    given are enough."""
    conn = await asyncpg.connect(pg_dsn(scratch.database))
    try:
        await tenant_db.provision(conn, "shop_outbox")
    finally:
        await conn.close()
    await register(tenant, "shop", scratch.role_dsn)
    r = await tenant.put("/v1/databases/shop", {"dsn": scratch.role_dsn, "schema": "shop_outbox"})
    assert r.status_code == 200, r.text

    r = await tenant.post("/v1/databases/shop/provision")

    assert r.status_code == 422, r.text
    missing = r.json()["missing"]
    by_kind = {(m["privilege"], m["object"]) for m in missing}
    assert ("USAGE", "schema shop_outbox") in by_kind
    assert ("CREATE", "schema shop_outbox") in by_kind
    for table in ("outbox", "outbox_default", "outbox_meta"):
        assert ("OWNER", f"table shop_outbox.{table}") in by_kind
    assert ("OWNER", "function shop_outbox.outbox_notify()") in by_kind
    assert ("OWNER", "function shop_outbox.outbox_ensure_partitions(days_ahead integer)") in by_kind
    partitions = [m for m in missing if m["object"].startswith("table shop_outbox.outbox_2")]
    assert len(partitions) == 8  # today and 7 days ahead
    assert len(missing) == len(by_kind) == 2 + 3 + 2 + 8  # the schema exists: no CREATE on the database

    await scratch.admin(*(m["grant"] for m in missing))
    r = await tenant.post("/v1/databases/shop/provision")

    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == []


async def test_a_schema_made_ahead_for_the_role_is_all_it_needs(tenant: TenantClient, scratch: Scratch) -> None:
    """No CREATE on the database: the schema exists (CREATE SCHEMA IF NOT EXISTS would still ask for it)."""
    await scratch.admin(f"CREATE SCHEMA outbox_relay AUTHORIZATION {scratch.role}")
    await register(tenant, "shop", scratch.role_dsn)

    r = await tenant.post("/v1/databases/shop/provision")

    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == []
    assert await scratch.as_role("SELECT has_database_privilege(current_database(), 'CREATE')") is False
    assert await scratch.as_role("SELECT version FROM outbox_relay.outbox_meta") == 2


async def test_a_superuser_is_warned(tenant: TenantClient, scratch: Scratch) -> None:
    await register(tenant, "shop", pg_dsn(scratch.database))

    r = await tenant.post("/v1/databases/shop/provision")

    assert r.status_code == 200, r.text
    warnings = r.json()["warnings"]
    assert [w["code"] for w in warnings] == ["superuser"]
    assert "is a superuser" in warnings[0]["message"]


async def test_a_role_that_owns_unrelated_tables_is_warned(tenant: TenantClient, scratch: Scratch) -> None:
    await scratch.admin(
        f"GRANT CREATE ON DATABASE {scratch.database} TO {scratch.role}",
        f"CREATE SCHEMA app AUTHORIZATION {scratch.role}",
        "CREATE TABLE app.orders (id int)",
        f"ALTER TABLE app.orders OWNER TO {scratch.role}",
        "CREATE TABLE public.customers (id int)",  # the superuser's: not the role's reach
    )
    await register(tenant, "shop", scratch.role_dsn)

    r = await tenant.post("/v1/databases/shop/provision")

    assert r.status_code == 200, r.text
    warnings = r.json()["warnings"]
    assert [w["code"] for w in warnings] == ["owns-unrelated-objects"]
    assert "owns 1 table(s) or view(s) outside schema outbox_relay (app.orders)" in warnings[0]["message"]


async def test_the_relays_sessions_carry_both_timeouts(scratch: Scratch) -> None:
    """Over the relay's own connections: one from ``tenant_db.connect`` (what the LISTEN connection and
    provision open) and the worker's pool (``TenantConnections``); the relay's values win over the
    role's own defaults."""
    await scratch.admin(
        f"ALTER ROLE {scratch.role} IN DATABASE {scratch.database} SET statement_timeout = '1s'",
        f"ALTER ROLE {scratch.role} IN DATABASE {scratch.database} SET idle_in_transaction_session_timeout = 0",
    )
    assert await scratch.as_role("SHOW statement_timeout") == "1s"  # the role's default, for everyone else
    settings = Settings(tenant_statement_timeout_s=45, tenant_idle_in_transaction_timeout_s=7)
    session = tenant_db.SessionLimits.of(settings)
    db = Database(dsn=scratch.role_dsn)
    show = (
        "SELECT current_setting('statement_timeout') || ' ' || current_setting('idle_in_transaction_session_timeout')"
    )

    conn = await tenant_db.connect(db, None, policy=POLICY, timeout_s=3, session=session)
    try:
        assert await conn.fetchval(show) == "45s 7s"
    finally:
        await conn.close()

    tenants = TenantConnections(policy=POLICY, timeout_s=3, session=session)
    try:
        pool = await tenants.pool(uuid.uuid4(), datetime.now(UTC), db, None)
        assert await pool.fetchval(show) == "45s 7s"
    finally:
        await tenants.close()

    conn = await tenant_db.connect(db, None, policy=POLICY, timeout_s=3)  # the defaults
    try:
        assert await conn.fetchval(show) == "1min 15s"
    finally:
        await conn.close()


def test_the_timeouts_cannot_cut_the_relays_own_statements() -> None:
    """The relay cancels a statement itself after max(30 s, connect_timeout_s): a shorter server-side
    statement_timeout would cut statements the relay still waits for (provision, a backlog count)."""
    assert tenant_db.SessionLimits.of(Settings()) == tenant_db.DEFAULT_SESSION
    with pytest.raises(ConfigError, match="tenant_statement_timeout_s must be at least 30"):
        Settings(tenant_statement_timeout_s=29)
    with pytest.raises(ConfigError, match="at least 40"):
        Settings(connect_timeout_s=40, tenant_statement_timeout_s=35)
    with pytest.raises(ConfigError, match="tenant_idle_in_transaction_timeout_s"):
        Settings(tenant_idle_in_transaction_timeout_s=0.5)
