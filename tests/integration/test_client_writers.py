"""The writer API (add, add_many) over every supported driver, on a real tenant database."""

from __future__ import annotations

import inspect
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import msgspec
import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import outbox_relay.client
from outbox_relay.client import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    ClientError,
    Message,
    add,
    add_many,
    schema_sql,
)
from outbox_relay.client import message as client_message
from outbox_relay.client import writer as client_writer
from outbox_relay.tenant import db as tenant_db
from tests.conftest import DatabaseFactory, pg_dsn


@pytest.fixture(scope="module")
async def dsn(databases: DatabaseFactory) -> str:
    dsn = pg_dsn(await databases.create("client"))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(schema_sql())
    finally:
        await conn.close()
    return dsn


async def settle(value: Any) -> Any:
    """The result of a client call: awaited on asynchronous connections, as is on synchronous ones."""
    return await value if inspect.isawaitable(value) else value


async def rows_of(dsn: str, topic: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT id, message_id, key, payload, headers::text AS headers FROM outbox_relay.outbox "
            "WHERE topic = $1 ORDER BY id",
            topic,
        )
        return rows
    finally:
        await conn.close()


# --- one transaction on each kind of connection ---------------------------------------------------

Tx = Callable[[str, bool], AbstractAsyncContextManager[Any]]


@asynccontextmanager
async def asyncpg_connection(dsn: str, commit: bool) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        yield conn
        await (tx.commit() if commit else tx.rollback())
    finally:
        await conn.close()


@asynccontextmanager
async def asyncpg_transaction(dsn: str, commit: bool) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        yield tx
        await (tx.commit() if commit else tx.rollback())
    finally:
        await conn.close()


@asynccontextmanager
async def asyncpg_pool(dsn: str, commit: bool) -> AsyncIterator[Any]:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        yield conn
        await (tx.commit() if commit else tx.rollback())


@asynccontextmanager
async def psycopg_sync(dsn: str, commit: bool) -> AsyncIterator[Any]:
    with psycopg.connect(dsn) as conn:
        yield conn
        conn.commit() if commit else conn.rollback()


@asynccontextmanager
async def psycopg_async(dsn: str, commit: bool) -> AsyncIterator[Any]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        yield conn
        await (conn.commit() if commit else conn.rollback())


def sync_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://")


@asynccontextmanager
async def sqlalchemy_session(dsn: str, commit: bool) -> AsyncIterator[Any]:
    engine = create_engine(sync_url(dsn))
    try:
        with Session(engine) as session:
            yield session
            session.commit() if commit else session.rollback()
    finally:
        engine.dispose()


@asynccontextmanager
async def sqlalchemy_scoped_session(dsn: str, commit: bool) -> AsyncIterator[Any]:
    engine = create_engine(sync_url(dsn))
    scoped = scoped_session(sessionmaker(engine))
    try:
        yield scoped
        scoped.commit() if commit else scoped.rollback()
    finally:
        scoped.remove()
        engine.dispose()


@asynccontextmanager
async def sqlalchemy_connection(dsn: str, commit: bool) -> AsyncIterator[Any]:
    engine = create_engine(sync_url(dsn))
    try:
        with engine.connect() as conn:
            yield conn
            conn.commit() if commit else conn.rollback()
    finally:
        engine.dispose()


def async_session_over(driver: str) -> Tx:
    @asynccontextmanager
    async def tx(dsn: str, commit: bool) -> AsyncIterator[Any]:
        engine = create_async_engine(dsn.replace("postgresql://", f"postgresql+{driver}://"))
        try:
            async with async_sessionmaker(engine)() as session:
                yield session
                await (session.commit() if commit else session.rollback())
        finally:
            await engine.dispose()

    return tx


@asynccontextmanager
async def sqlalchemy_async_connection(dsn: str, commit: bool) -> AsyncIterator[Any]:
    engine = create_async_engine(dsn.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with engine.connect() as conn:
            yield conn
            await (conn.commit() if commit else conn.rollback())
    finally:
        await engine.dispose()


FLAVOURS: dict[str, Tx] = {
    "asyncpg": asyncpg_connection,
    "asyncpg-transaction": asyncpg_transaction,
    "asyncpg-pool": asyncpg_pool,
    "psycopg": psycopg_sync,
    "psycopg-async": psycopg_async,
    "sqlalchemy-session": sqlalchemy_session,
    "sqlalchemy-scoped-session": sqlalchemy_scoped_session,
    "sqlalchemy-connection": sqlalchemy_connection,
    "sqlalchemy-async-session-asyncpg": async_session_over("asyncpg"),
    "sqlalchemy-async-session-psycopg": async_session_over("psycopg"),
    "sqlalchemy-async-connection": sqlalchemy_async_connection,
}


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_messages_commit_with_the_callers_transaction(dsn: str, flavour: str) -> None:
    topic = f"orders-{flavour}"
    async with FLAVOURS[flavour](dsn, True) as conn:
        first = await settle(add(conn, topic, "k1", {"n": 1}, headers={"source": "test"}))
        batch = await settle(
            add_many(
                conn, [Message(topic, "k1", b"\x00\xff"), (topic, None, "text"), (topic, "k2", [1, 2], {"a": "b"})]
            )
        )
        assert await settle(add_many(conn, [])) == []
    assert type(first) is uuid.UUID and all(type(i) is uuid.UUID for i in batch)  # the driver's type converted
    rows = await rows_of(dsn, topic)
    # the message ids (each row's message_id), in the order written
    assert [r["message_id"] for r in rows] == [first, *batch] and len({first, *batch}) == 4
    assert [(r["key"], bytes(r["payload"]), msgspec.json.decode(r["headers"])) for r in rows] == [
        ("k1", b'{"n":1}', {"source": "test"}),
        ("k1", b"\x00\xff", {}),
        (None, b"text", {}),
        ("k2", b"[1,2]", {"a": "b"}),
    ]


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_rolled_back_transaction_writes_nothing(dsn: str, flavour: str) -> None:
    topic = f"never-{flavour}"
    async with FLAVOURS[flavour](dsn, False) as conn:
        await settle(add(conn, topic, "k", b"x"))
        await settle(add_many(conn, [(topic, "k", b"y")]))
    assert await rows_of(dsn, topic) == []


async def test_bad_input_is_refused_before_any_sql(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            bad_calls: list[tuple[Callable[[], Any], str]] = [
                (lambda: add(conn, "", "k", b""), "non-empty"),
                (lambda: add(conn, "t" * 250, "k", b""), "longer than 249"),
                (lambda: add(conn, "t", "k", b"", headers={"n": 1}), "headers must map strings"),  # type: ignore[dict-item]
                (lambda: add(conn, "t", "k", b"", headers={"outbox-id": "7"}), "set by the relay"),
                (lambda: add(conn, "t", "k\x00", b""), "NUL"),
                (lambda: add(conn, "t", 5, b""), "key must be a string"),  # type: ignore[call-overload]
                (lambda: add(conn, "t", "k", object()), "JSON"),
                (lambda: add(conn, "t", "k", b"x" * 11, max_payload_bytes=10), "11 bytes, over the limit of 10"),
                (lambda: add(conn, "t", "k", b"x" * (DEFAULT_MAX_PAYLOAD_BYTES + 1)), "over the limit of 1048576"),
                (lambda: add(conn, "t", "k", b"", max_payload_bytes=-1), "max_payload_bytes"),
                (lambda: add_many(conn, [("t", "k", b"ok"), ("", "k", b"bad")]), "message 1: topic"),
                (lambda: add_many(conn, [("t", "k")]), "message 0: expected a Message"),
                (lambda: add(conn, "t", "k", b"", schema="Robert'); DROP TABLE students;--"), "invalid SQL identifier"),
            ]
            for call, match in bad_calls:
                with pytest.raises(ClientError, match=match):
                    await settle(call())
            # Nothing reached the server, so the transaction is not aborted and still takes writes.
            assert isinstance(await add(conn, "checked", "k", b"x" * 10, max_payload_bytes=10), uuid.UUID)
    finally:
        await conn.close()
    assert len(await rows_of(dsn, "checked")) == 1


async def test_connections_it_cannot_use_are_refused(dsn: str) -> None:
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
        with pytest.raises(ClientError, match="acquired from the pool"):
            await settle(add(pool, "t", "k", b""))
        async with pool.acquire() as conn:
            with pytest.raises(ClientError, match="not started"):
                add(conn.transaction(), "t", "k", b"")
    with pytest.raises(ClientError, match=r"unsupported connection builtins\.object"):
        add(object(), "t", "k", b"")  # type: ignore[unused-coroutine]


async def test_add_many_keeps_the_given_order_and_the_relay_reads_it(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = "ordered"
    messages = [(topic, f"key-{i % 7}", str(i)) for i in range(1500)]
    monkeypatch.setattr(client_writer, "STATEMENT_BYTES", 1000)  # several statements per batch
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            ids = await add_many(conn, messages)
        rows = await tenant_db.poll(conn, "outbox_relay", cursor=(0, 0), partitions=1, partition=0, limit=10_000)
    finally:
        await conn.close()
    assert len(set(ids)) == 1500
    mine = [row for row in rows if row.topic == topic]
    assert [uuid.UUID(row.message_id) for row in mine] == ids
    assert [row.payload for row in mine] == [str(i).encode() for i in range(1500)]


async def test_records_the_active_trace_context(dsn: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    conn = await asyncpg.connect(dsn)
    try:
        untraced = await add(conn, "traced", "k", b"")
        with tracer.start_as_current_span("checkout") as span:
            context = span.get_span_context()
            traced = await add(conn, "traced", "k", b"", headers={"source": "checkout"})
            (batched,) = await add_many(conn, [("traced", "k", b"")])
            explicit = await add(conn, "traced", "k", b"", headers={"traceparent": "mine"})
            off = await add(conn, "traced", "k", b"", trace_context=False)
    finally:
        await conn.close()
    headers = {r["message_id"]: msgspec.json.decode(r["headers"]) for r in await rows_of(dsn, "traced")}
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert headers[untraced] == {}
    assert headers[traced] == {"traceparent": traceparent, "source": "checkout"}
    assert headers[batched] == {"traceparent": traceparent}
    assert headers[explicit] == {"traceparent": "mine"}
    assert headers[off] == {}


def test_trace_context_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    client_message._otel.cache_clear()
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    try:
        assert client_message.current_trace_headers() == {}
    finally:
        client_message._otel.cache_clear()


def test_the_client_imports_without_drivers_or_service_dependencies() -> None:
    blocked = (
        "asyncpg psycopg sqlalchemy opentelemetry litestar arq aio_pika aiokafka redis cryptography uvicorn".split()
    )
    code = (
        f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
        "from outbox_relay.client import add, add_many, Inbox, check_message, encode_payload, current_trace_headers\n"
        "assert current_trace_headers() == {}\n"
        "print(check_message('t', 'k', {'a': 'b'}), encode_payload({'n': 1}).decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=30)
    assert out.stdout.split() == ['{"a":"b"}', '{"n":1}'], out.stderr


def test_public_api() -> None:
    """Changing this list is changing the client's contract with every tenant's code."""
    assert set(outbox_relay.client.__all__) == {
        "DEFAULT_MAX_PAYLOAD_BYTES",
        "MAX_TOPIC_LENGTH",
        "SUPPORTED",
        "ClientError",
        "Inbox",
        "Message",
        "MessageRef",
        "add",
        "add_many",
        "amqp_ref",
        "check_message",
        "current_trace_headers",
        "encode_payload",
        "kafka_ref",
        "nats_ref",
        "schema_sql",
        "stream_ref",
    }
    assert all(hasattr(outbox_relay.client, name) for name in outbox_relay.client.__all__)
    assert str(inspect.signature(add)) == (
        "(conn: 'Any', topic: 'str', key: 'str | None', payload: 'Any', headers: 'Mapping[str, str] | None' = None, "
        "*, schema: 'str' = 'outbox_relay', max_payload_bytes: 'int' = 1048576, trace_context: 'bool' = True) "
        "-> 'uuid.UUID | Coroutine[Any, Any, uuid.UUID]'"
    )
    assert list(inspect.signature(add_many).parameters) == [
        "conn",
        "messages",
        "schema",
        "max_payload_bytes",
        "trace_context",
    ]
    assert issubclass(ClientError, ValueError)
