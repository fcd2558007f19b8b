"""The control DB's connection pool and what every store of it shares."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Self

import asyncpg

from outbox_relay.errors import (
    NotFound,
)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """No server round trip when a pooled control-DB connection is returned. Nothing here changes
    session state (``SET LOCAL`` and transaction-scoped locks only; LISTEN and the migration lock
    use connections of their own), and asyncpg's default reset (``RESET ALL``, ``CLOSE ALL``,
    ``UNLISTEN *``, ``pg_advisory_unlock_all()``) made every cursor write five statements. asyncpg
    still ends an open transaction on release, and discards a connection that broke."""


class StoreBase:
    """The control DB's pool, shared by the stores of each aggregate (:class:`ControlStore` is all of
    them over one pool)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> Self:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, timeout=10, command_timeout=30, reset=_keep_session
        )
        assert pool is not None
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    @staticmethod
    async def _limits(
        conn: asyncpg.Connection, tenant_id: uuid.UUID, defaults: Mapping[str, int], *names: str
    ) -> dict[str, int]:
        """The tenant's limits of these quotas, with its row locked until the transaction ends: every
        creation of one tenant counts after the one before it has committed (or rolled back), so two
        concurrent requests cannot both take the last unit. FOR NO KEY UPDATE, not FOR UPDATE: rows that
        merely reference the tenant (audit entries, dead letters) are not held up by it."""
        row = await conn.fetchrow(
            "SELECT " + ", ".join(f"quota_{n}" for n in names) + " FROM tenants WHERE id = $1 FOR NO KEY UPDATE",
            tenant_id,
        )
        if row is None:
            raise NotFound("the tenant does not exist")
        return {n: row[f"quota_{n}"] if row[f"quota_{n}"] is not None else defaults[n] for n in names}
