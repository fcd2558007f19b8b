"""One way to run a statement on whatever connection the caller hands over.

Supported: asyncpg (a connection, a pool's connection, or a started ``Transaction``), psycopg 3
(``Connection`` and ``AsyncConnection``) and SQLAlchemy (``Session``, ``scoped_session``,
``Connection`` and their asyncio twins). A driver is recognised by ``isinstance`` against the
classes of modules that are already imported (an object of a library implies the library is
loaded), so nothing here imports a driver and the client needs none installed.

Statements are written once with asyncpg's ``$n`` placeholders and ``CAST(... AS ...)`` (``::``
would confuse SQLAlchemy's ``text()``); psycopg gets ``%(pn)s`` and SQLAlchemy ``:pn``.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any

from outbox_relay.client.message import ClientError

_PLACEHOLDER = re.compile(r"\$(\d+)")

SUPPORTED = (
    "an asyncpg Connection (or pool connection, or started Transaction), a psycopg Connection or "
    "AsyncConnection, or a SQLAlchemy Session, AsyncSession, Connection or AsyncConnection"
)


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "asyncpg" | "psycopg" | "sqlalchemy"
    is_async: bool
    conn: Any


def resolve(conn: Any) -> Target:
    """Recognise ``conn``'s driver; :class:`ClientError` for anything else (e.g. a pool)."""
    modules = sys.modules
    asyncpg = modules.get("asyncpg")
    if asyncpg is not None:
        pool = getattr(asyncpg, "pool", None)
        transaction = getattr(asyncpg, "transaction", None)
        if isinstance(conn, asyncpg.Connection) or (pool is not None and isinstance(conn, pool.PoolConnectionProxy)):
            return Target("asyncpg", True, conn)
        if transaction is not None and isinstance(conn, transaction.Transaction):
            state = getattr(conn, "_state", None)
            if getattr(state, "name", None) != "STARTED":
                raise ClientError(f"the asyncpg transaction is not started (state {getattr(state, 'name', '?')})")
            return Target("asyncpg", True, conn._connection)
        if isinstance(conn, asyncpg.Pool):
            raise ClientError("pass a connection acquired from the pool, inside your transaction, not the pool")
    psycopg = modules.get("psycopg")
    if psycopg is not None:
        if isinstance(conn, psycopg.AsyncConnection):
            return Target("psycopg", True, conn)
        if isinstance(conn, psycopg.Connection):
            return Target("psycopg", False, conn)
    sa_async = modules.get("sqlalchemy.ext.asyncio")
    if sa_async is not None:
        if isinstance(conn, sa_async.async_scoped_session):
            conn = conn()
        if isinstance(conn, sa_async.AsyncSession | sa_async.AsyncConnection):
            return Target("sqlalchemy", True, conn)
    sa_orm = modules.get("sqlalchemy.orm")
    if sa_orm is not None:
        if isinstance(conn, sa_orm.scoped_session):
            conn = conn()
        if isinstance(conn, sa_orm.Session):
            return Target("sqlalchemy", False, conn)
    sa_engine = modules.get("sqlalchemy.engine")
    if sa_engine is not None and isinstance(conn, sa_engine.Connection):
        return Target("sqlalchemy", False, conn)
    raise ClientError(f"unsupported connection {type(conn).__module__}.{type(conn).__qualname__}: pass {SUPPORTED}")


@functools.cache
def psycopg_sql(sql: str) -> str:
    return _PLACEHOLDER.sub(r"%(p\1)s", sql.replace("%", "%%"))


@functools.cache
def sqlalchemy_text(sql: str) -> Any:
    from sqlalchemy import text

    return text(_PLACEHOLDER.sub(r":p\1", sql))


def _named(args: Sequence[Any]) -> dict[str, Any]:
    return {f"p{i}": value for i, value in enumerate(args, 1)}


def fetch_sync(target: Target, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` on a synchronous connection; the rows it returns (``[]`` when none)."""
    if target.kind == "psycopg":
        cursor = target.conn.execute(psycopg_sql(sql), _named(args))
        return [] if cursor.description is None else [tuple(row) for row in cursor.fetchall()]
    result = target.conn.execute(sqlalchemy_text(sql), _named(args))
    return [tuple(row) for row in result.all()] if result.returns_rows else []


async def fetch_async(target: Target, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` on an asynchronous connection; the rows it returns (``[]`` when none)."""
    if target.kind == "asyncpg":
        return [tuple(record) for record in await target.conn.fetch(sql, *args)]
    if target.kind == "psycopg":
        cursor = await target.conn.execute(psycopg_sql(sql), _named(args))
        return [] if cursor.description is None else [tuple(row) for row in await cursor.fetchall()]
    result = await target.conn.execute(sqlalchemy_text(sql), _named(args))
    return [tuple(row) for row in result.all()] if result.returns_rows else []


def in_transaction(target: Target) -> bool | None:
    """Whether a statement run now belongs to an open transaction; ``None`` when unknown.

    psycopg outside autocommit opens one implicitly, and SQLAlchemy sessions begin one on first use.
    """
    if target.kind == "asyncpg":
        return bool(target.conn.is_in_transaction())
    if target.kind == "psycopg":
        return not target.conn.autocommit or target.conn.info.transaction_status.name != "IDLE"
    return None


def transaction_sync(target: Target) -> AbstractContextManager[Any]:
    """A transaction block on a synchronous connection: a savepoint when one is already open."""
    if target.kind == "psycopg":
        return target.conn.transaction()  # type: ignore[no-any-return]
    if target.conn.in_transaction():
        return target.conn.begin_nested()  # type: ignore[no-any-return]
    return target.conn.begin()  # type: ignore[no-any-return]


def transaction_async(target: Target) -> AbstractAsyncContextManager[Any]:
    """A transaction block on an asynchronous connection: a savepoint when one is already open."""
    if target.kind in ("asyncpg", "psycopg"):
        return target.conn.transaction()  # type: ignore[no-any-return]
    if target.conn.in_transaction():
        return target.conn.begin_nested()  # type: ignore[no-any-return]
    return target.conn.begin()  # type: ignore[no-any-return]
