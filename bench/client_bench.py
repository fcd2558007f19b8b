"""How many messages/s one connection writes with ``add`` versus ``add_many``.

Usage: ``.venv/bin/python bench/client_bench.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
[--messages 20000]``. Creates a throw-away database next to the one ``--dsn`` names, installs the
outbox, prints a table, and drops the database. Never fails on a timing.

Each case writes ``--messages`` messages (a ~200-byte JSON payload, 50 keys, one header) over one
connection, on asyncpg and on psycopg's AsyncConnection:

* ``add, 1 tx/msg``     one transaction per message, as a service writing one event per change does;
* ``add, 1 tx/batch``   ``add`` called once per message, ``batch`` messages per transaction;
* ``add_many``          one ``add_many`` (one statement) per transaction of ``batch`` messages;
* ``COPY`` (asyncpg)    ``copy_records_to_table`` per batch, for reference (returns no ids).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg

from outbox_relay.client import Message, add, add_many, schema_sql

Case = Callable[[Any, list[Message], int], Awaitable[None]]


def messages(n: int) -> list[Message]:
    return [
        Message(
            "orders",
            f"order-{i % 50}",
            {"id": i, "state": "paid", "amount_cents": 1299 + i, "customer": f"customer-{i % 997}", "note": "x" * 80},
            {"source": "bench"},
        )
        for i in range(n)
    ]


async def add_tx_per_message(conn: Any, batch_msgs: list[Message], _: int) -> None:
    for m in batch_msgs:
        async with conn.transaction():
            await add(conn, *m)


async def add_tx_per_batch(conn: Any, msgs: list[Message], batch: int) -> None:
    for start in range(0, len(msgs), batch):
        async with conn.transaction():
            for m in msgs[start : start + batch]:
                await add(conn, *m)


async def add_many_per_batch(conn: Any, msgs: list[Message], batch: int) -> None:
    for start in range(0, len(msgs), batch):
        async with conn.transaction():
            await add_many(conn, msgs[start : start + batch])


async def copy_per_batch(conn: asyncpg.Connection, msgs: list[Message], batch: int) -> None:
    import msgspec

    for start in range(0, len(msgs), batch):
        records = [
            (m.topic, m.key, msgspec.json.encode(m.payload), msgspec.json.encode(m.headers).decode())
            for m in msgs[start : start + batch]
        ]
        async with conn.transaction():
            await conn.copy_records_to_table(
                "outbox", schema_name="outbox_relay", columns=["topic", "key", "payload", "headers"], records=records
            )


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def run(dsn: str, n: int) -> None:
    name = f"orly_client_bench_{os.getpid()}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    bench_dsn = with_database(dsn, name)
    try:
        setup = await asyncpg.connect(bench_dsn)
        await setup.execute(schema_sql())
        await setup.close()
        msgs = messages(n)
        cases: list[tuple[str, str, Case, int, int]] = [
            # (driver, case, function, batch, messages)
            ("asyncpg", "add, 1 tx/msg", add_tx_per_message, 1, n // 4),
            ("asyncpg", "add, 1 tx/batch of 100", add_tx_per_batch, 100, n // 2),
            ("asyncpg", "add_many, batch of 10", add_many_per_batch, 10, n),
            ("asyncpg", "add_many, batch of 100", add_many_per_batch, 100, n),
            ("asyncpg", "add_many, batch of 1000", add_many_per_batch, 1000, n),
            ("asyncpg", "COPY, batch of 1000", copy_per_batch, 1000, n),
            ("psycopg", "add, 1 tx/msg", add_tx_per_message, 1, n // 4),
            ("psycopg", "add, 1 tx/batch of 100", add_tx_per_batch, 100, n // 2),
            ("psycopg", "add_many, batch of 100", add_many_per_batch, 100, n),
            ("psycopg", "add_many, batch of 1000", add_many_per_batch, 1000, n),
        ]
        print(f"{'driver':8} {'case':26} {'messages':>9} {'seconds':>8} {'msgs/s':>9}")
        for driver, label, case, batch, count in cases:
            if driver == "asyncpg":
                conn: Any = await asyncpg.connect(bench_dsn)
            else:
                conn = await psycopg.AsyncConnection.connect(bench_dsn, autocommit=True)
            try:
                await case(conn, msgs[: min(200, count)], batch)  # warm-up: prepared statements, caches
                started = time.perf_counter()
                await case(conn, msgs[:count], batch)
                elapsed = time.perf_counter() - started
            finally:
                await conn.close()
            print(f"{driver:8} {label:26} {count:9d} {elapsed:8.2f} {count / elapsed:9.0f}", flush=True)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(run(args.dsn, args.messages))


if __name__ == "__main__":
    main()
