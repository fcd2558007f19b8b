"""Registration guardrails on the real PostgreSQL: the relay's own sessions carry
``statement_timeout`` and ``idle_in_transaction_session_timeout``."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from outbox_relay.config import Settings
from outbox_relay.domain import Database
from outbox_relay.engine import TenantConnections
from outbox_relay.errors import ConfigError
from outbox_relay.netguard import AddressPolicy
from outbox_relay.tenant import db as tenant_db
from tests.conftest import PG_HOST, PG_PORT, RUN_ID, pg_dsn

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


async def test_the_relays_sessions_carry_both_timeouts(scratch: Scratch) -> None:
    """Over the relay's own connections: one opened as the LISTEN connection and provision open them,
    and the worker's pool; the relay's values win over the role's own defaults."""
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
