"""Connections to tenants' own databases: connect (address policy + timeouts), provision, read.

The relay only ever reads here: it never updates or deletes outbox rows.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
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
    message_id: str = ""
    """The id consumers dedupe on (``outbox-id``): the row's ``message_id``, or for a row written
    before the outbox had one, the UUID the relay derives from it (:func:`derived_message_id`).
    Empty only for an outbox of schema version 1, whose messages carry the row id."""
    fenced: bool = False
    """Part of a restored backlog that was resent or skipped on its own: never published by the
    ordinary read, which only moves its cursor over it (its payload is not even read)."""

    @property
    def outgoing_id(self) -> str:
        """The id the message is published with."""
        return self.message_id or str(self.id)


@dataclass(frozen=True, slots=True)
class OutboxLayout:
    """What the relay needs to know of an outbox's schema: its version and id namespace."""

    version: int
    namespace: uuid.UUID | None

    @property
    def has_message_ids(self) -> bool:
        return self.version >= 2 and self.namespace is not None


@dataclass(frozen=True, slots=True)
class RestoreFence:
    """The restored backlog of a detected restore: rows with ``id <= max_id`` and
    ``created_at <= max_created_at``; ``next_xid`` was the server's next transaction id then."""

    max_id: int
    max_created_at: datetime
    next_xid: int


@dataclass(frozen=True, slots=True)
class RestoreBounds:
    next_xid: int
    max_id: int | None
    """None: no row lay above the server's transaction counter (nothing would be held back)."""
    max_created_at: datetime


def derived_message_id(namespace: uuid.UUID, txid: int, row_id: int) -> str:
    """The message id of a row written before its outbox had message ids (schema version 1):
    UUID v5 of ``"txid:id"`` in the outbox's own namespace. ``(txid, id)`` is unique within one
    database's history and the namespace is stored in the database (``outbox_meta``), so a dump, a
    restore or a replica derive the same id and another outbox never does."""
    return str(uuid.uuid5(namespace, f"{txid}:{row_id}"))


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


PROVISION_LOCK_TIMEOUT_MS = 2000
PROVISION_ATTEMPTS = 5


async def provision(
    conn: asyncpg.Connection,
    schema: str,
    *,
    lock_timeout_ms: int = PROVISION_LOCK_TIMEOUT_MS,
    attempts: int = PROVISION_ATTEMPTS,
) -> int:
    """Install, re-apply or upgrade the outbox schema; returns the schema version.

    The DDL takes the outbox's table lock for an instant (the trigger, and once the version 2
    upgrade's catalog-only ``ALTER TABLE``). While it waits for that lock, writers queue behind it,
    so it waits at most ``lock_timeout_ms`` and then gives way and tries again, up to ``attempts``
    times; a writer is never held up for longer than that. Raises ``asyncpg.LockNotAvailableError``
    when a long transaction kept the table busy throughout.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "outbox_relay.provision." + schema)
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                await conn.execute(sql.schema_sql(schema))
            return sql.SCHEMA_VERSION
        except asyncpg.LockNotAvailableError:
            if attempt == attempts:
                raise
            await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


async def read_layout(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> OutboxLayout:
    """The outbox's schema version and id namespace (version 1 when ``outbox_meta`` is missing)."""
    try:
        row = await conn.fetchrow(sql.meta_sql(schema))
    except asyncpg.UndefinedTableError:
        return OutboxLayout(version=1, namespace=None)
    if row is None:
        return OutboxLayout(version=1, namespace=None)
    namespace = row["id_namespace"]
    return OutboxLayout(version=int(row["version"]), namespace=uuid.UUID(namespace) if namespace else None)


def _rows(records: list[asyncpg.Record], layout: OutboxLayout | None) -> list[OutboxRow]:
    namespace = layout.namespace if layout is not None and layout.has_message_ids else None
    out = []
    for r in records:
        message_id = r["message_id"]
        if message_id is not None:
            text = str(message_id)
        elif namespace is not None:
            text = derived_message_id(namespace, r["txid"], r["id"])
        else:
            text = ""
        out.append(
            OutboxRow(
                txid=r["txid"],
                id=r["id"],
                topic=r["topic"],
                key=r["key"],
                payload=bytes(r["payload"]),
                headers=r["headers"],
                created_at=r["created_at"],
                message_id=text,
                fenced=r["fenced"],
            )
        )
    return out


NO_FENCE_ID = 0
NO_FENCE_AT = datetime.min.replace(tzinfo=UTC)


async def poll(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    cursor: tuple[int, int],
    partitions: int,
    partition: int,
    limit: int,
    layout: OutboxLayout | None = None,
    fence: RestoreFence | None = None,
) -> list[OutboxRow]:
    """The ordinary read (:func:`~outbox_relay.tenant.sql.poll_sql`); rows of ``fence`` come back ``fenced``.

    ``layout`` (the outbox's :func:`read_layout`; None: the current version) decides whether the
    rows carry message ids."""
    version = layout.version if layout is not None else sql.SCHEMA_VERSION
    rows = await conn.fetch(
        sql.poll_sql(schema, version),
        cursor[0],
        cursor[1],
        partitions,
        partition,
        limit,
        fence.max_id if fence else NO_FENCE_ID,
        fence.max_created_at if fence else NO_FENCE_AT,
    )
    return _rows(rows, layout)


async def poll_backlog(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    cursor: tuple[int, int],
    partitions: int,
    partition: int,
    limit: int,
    layout: OutboxLayout | None,
    fence: RestoreFence,
) -> list[OutboxRow]:
    """The next rows of a restored backlog (:func:`~outbox_relay.tenant.sql.backlog_poll_sql`)."""
    version = layout.version if layout is not None else sql.SCHEMA_VERSION
    rows = await conn.fetch(
        sql.backlog_poll_sql(schema, version),
        cursor[0],
        cursor[1],
        partitions,
        partition,
        limit,
        fence.max_id,
        fence.max_created_at,
        fence.next_xid,
    )
    return _rows(rows, layout)


async def backlog_done(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    cursor: tuple[int, int],
    partitions: int,
    partition: int,
    fence: RestoreFence,
) -> bool:
    return bool(
        await conn.fetchval(
            sql.backlog_done_sql(schema),
            cursor[0],
            cursor[1],
            partitions,
            partition,
            fence.max_id,
            fence.max_created_at,
            fence.next_xid,
        )
    )


async def restore_bounds(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> RestoreBounds:
    row = await conn.fetchrow(sql.restore_bounds_sql(schema))
    assert row is not None
    return RestoreBounds(next_xid=row["next_xid"], max_id=row["max_id"], max_created_at=row["max_created_at"])


async def backlog_count(
    conn: asyncpg.Connection | asyncpg.Pool, schema: str, *, fence: RestoreFence, partitions: int, partition: int
) -> int:
    return int(
        await conn.fetchval(sql.backlog_count_sql(schema), fence.max_id, fence.max_created_at, partitions, partition)
    )
