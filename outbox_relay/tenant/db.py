"""Connections to tenants' own databases: connect (address policy + timeouts), provision, read.

The relay only ever reads here: it never updates or deletes outbox rows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import asyncpg

from outbox_relay.domain import Database
from outbox_relay.errors import AddressNotAllowed, TenantDatabaseError
from outbox_relay.netguard import AddressPolicy, hosts_of
from outbox_relay.tenant import sql

APPLICATION_NAME = "outbox-relay"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    txid: int
    id: int
    topic: str
    key: str | None
    payload: bytes
    headers: str
    created_at: datetime


def check_dsn(dsn: str) -> None:
    """Refuse DSNs the service cannot or must not use; raises ValueError with the reason."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("dsn must start with postgresql://")
    if parts.password is not None:
        raise ValueError("dsn must not contain a password: send it in the write-only `password` field")
    if not parts.hostname:
        raise ValueError("dsn must name a host")
    if not parts.path.strip("/"):
        raise ValueError("dsn must name a database (postgresql://user@host:5432/dbname)")
    if not parts.username:
        raise ValueError("dsn must name a user (postgresql://user@host:5432/dbname)")
    try:
        hosts_of(parts.netloc, 5432)
    except ValueError:
        raise ValueError("dsn has an invalid port") from None


async def check_address(dsn: str, policy: AddressPolicy) -> None:
    for host, port in hosts_of(urlsplit(dsn).netloc, 5432):
        await policy.check_host(host, port)


async def connect(db: Database, password: str | None, *, policy: AddressPolicy, timeout_s: float) -> asyncpg.Connection:
    """One connection to the tenant DB; TenantDatabaseError when that fails."""
    try:
        await check_address(db.dsn, policy)
        return await asyncpg.connect(
            db.dsn,
            password=password,
            timeout=timeout_s,
            command_timeout=max(timeout_s, 30),
            server_settings={"application_name": APPLICATION_NAME},
        )
    except AddressNotAllowed:
        raise
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise TenantDatabaseError(f"cannot connect to the database: {describe(exc)}") from None


async def create_pool(
    db: Database, password: str | None, *, policy: AddressPolicy, timeout_s: float, max_size: int = 4
) -> asyncpg.Pool:
    await check_address(db.dsn, policy)
    pool = asyncpg.create_pool(
        db.dsn,
        password=password,
        min_size=0,
        max_size=max_size,
        timeout=timeout_s,
        command_timeout=max(timeout_s, 30),
        server_settings={"application_name": APPLICATION_NAME},
    )
    await pool
    return pool


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a connection or query failure."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def provision(conn: asyncpg.Connection, schema: str) -> int:
    """Install or re-apply the outbox schema; returns the schema version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "outbox_relay.provision." + schema)
        await conn.execute(sql.schema_sql(schema))
    return sql.SCHEMA_VERSION


async def poll(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    cursor: tuple[int, int],
    partitions: int,
    partition: int,
    limit: int,
) -> list[OutboxRow]:
    rows = await conn.fetch(sql.poll_sql(schema), cursor[0], cursor[1], partitions, partition, limit)
    return [
        OutboxRow(
            txid=r["txid"],
            id=r["id"],
            topic=r["topic"],
            key=r["key"],
            payload=bytes(r["payload"]),
            headers=r["headers"],
            created_at=r["created_at"],
        )
        for r in rows
    ]


async def scan(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    after: tuple[int, int],
    partitions: int,
    wanted: list[int] | None,
    limit: int,
) -> list[tuple[int, OutboxRow]]:
    """Rows of the ``wanted`` partitions (None: all) after ``after``, in order, with their partition;
    TenantDatabaseError when the database cannot be read."""
    try:
        rows = await conn.fetch(sql.scan_sql(schema), after[0], after[1], partitions, wanted, limit)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise TenantDatabaseError(f"reading the outbox failed: {describe(exc)}") from None
    return [
        (
            r["part"],
            OutboxRow(
                txid=r["txid"],
                id=r["id"],
                topic=r["topic"],
                key=r["key"],
                payload=bytes(r["payload"]),
                headers=r["headers"],
                created_at=r["created_at"],
            ),
        )
        for r in rows
    ]


async def next_row_at(conn: asyncpg.Connection | asyncpg.Pool, schema: str, after: tuple[int, int]) -> datetime | None:
    try:
        value: datetime | None = await conn.fetchval(sql.next_row_sql(schema), after[0], after[1])
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise TenantDatabaseError(f"reading the outbox failed: {describe(exc)}") from None
    return value
