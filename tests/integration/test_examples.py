"""Every program in ``examples/`` runs, against a real database and real brokers, and the docs show
each one exactly as it is in the repository, so neither can rot."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import asyncpg
import msgspec
import pytest

from outbox_relay.client import schema_sql
from tests.brokers import RabbitMQAccount, RedisAccount, TansuBroker
from tests.conftest import RUN_ID, DatabaseFactory, pg_dsn

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
WRITERS = sorted(path.name for path in EXAMPLES.glob("write_*.py"))
MARKER = re.compile(r"<!-- example: (examples/[\w.]+) -->\n```python\n(.*?)```", re.DOTALL)


@pytest.fixture(scope="module")
async def shop_dsn(databases: DatabaseFactory) -> str:
    """The quick start's ``shop`` database: the outbox installed, nothing else."""
    dsn = pg_dsn(await databases.create("shop"))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(schema_sql())
    finally:
        await conn.close()
    return dsn


async def run_example(name: str, **env: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, f"{name} failed:\n{stderr.decode()}"
    return stdout.decode()


@pytest.mark.parametrize("name", WRITERS)
async def test_writer_example(name: str, shop_dsn: str) -> None:
    out = await run_example(name, DATABASE_URL=shop_dsn)
    match = re.fullmatch(r"order (\d+): outbox messages? ([0-9a-f-]{36}(?:, [0-9a-f-]{36})*)\n", out)
    assert match, out
    order_id, message_ids = match[1], [uuid.UUID(i) for i in match[2].split(", ")]
    conn = await asyncpg.connect(shop_dsn)
    try:
        rows = await conn.fetch(
            "SELECT message_id, topic, key, payload FROM outbox_relay.outbox WHERE message_id = ANY($1::uuid[]) "
            "ORDER BY id",
            message_ids,
        )
        assert await conn.fetchval("SELECT state FROM orders WHERE id = $1", int(order_id)) == "paid"
    finally:
        await conn.close()
    assert [row["message_id"] for row in rows] == message_ids
    assert (rows[0]["topic"], rows[0]["key"]) == ("orders", order_id)
    assert msgspec.json.decode(rows[0]["payload"]) == {"id": int(order_id), "state": "paid"}


async def check_consumer_output(out: str, dsn: str) -> None:
    lines = out.splitlines()
    assert [line.split(": ", 1)[-1] for line in lines[:2]] == ["shipped", "duplicate, skipped"], out
    message_id = str(uuid.UUID(lines[0].split(": ", 1)[0].removeprefix("message ")))
    match = re.fullmatch(r"order (\d+) shipped 1 time\(s\)", lines[-1])
    assert match, out
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM shipments WHERE order_id = $1", int(match[1])) == 1
        assert await conn.fetchval("SELECT count(*) FROM outbox_relay.inbox WHERE message_id = $1", message_id) == 1
    finally:
        await conn.close()


async def test_rabbitmq_consumer_example(shop_dsn: str, rabbitmq: RabbitMQAccount) -> None:
    out = await run_example(
        "consume_rabbitmq.py", DATABASE_URL=shop_dsn, AMQP_URL=rabbitmq.admin_url, QUEUE="shop-orders"
    )
    await check_consumer_output(out, shop_dsn)


async def test_redis_streams_consumer_example(shop_dsn: str, redis_account: RedisAccount) -> None:
    url = f"redis://{redis_account.user}:{quote(redis_account.password, safe='')}@127.0.0.1:6379/0"
    out = await run_example(
        "consume_redis_streams.py", DATABASE_URL=shop_dsn, REDIS_URL=url, STREAM=f"{redis_account.prefix}shop:orders"
    )
    await check_consumer_output(out, shop_dsn)


async def test_kafka_consumer_example(shop_dsn: str, tansu: TansuBroker) -> None:
    out = await run_example(
        "consume_kafka.py", DATABASE_URL=shop_dsn, KAFKA_BOOTSTRAP=tansu.bootstrap, KAFKA_TOPIC=f"shop.orders.{RUN_ID}"
    )
    await check_consumer_output(out, shop_dsn)


def test_the_docs_show_every_example_as_it_is() -> None:
    """The README (or a page under docs/) embeds each example verbatim."""
    shown: dict[str, str] = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if doc.exists():
            for path, code in MARKER.findall(doc.read_text()):
                shown[path] = code
                assert code == (ROOT / path).read_text(), f"{doc.name} shows an outdated {path}"
    assert sorted(shown) == sorted(f"examples/{path.name}" for path in EXAMPLES.glob("*.py"))
