"""The README's quick start, run as written, twice (it must be repeatable), against a live API and a
worker process; then the consumer examples against its relay, with docs/client.md's commands for the
RabbitMQ and Kafka relays.

The scripts are the docs' own blocks with a few things moved out of the way of a developer's own
``make run``: the API's address, its admin key, and the name ``shop`` (database, stream, queue, topic,
relays), which becomes one of this run; the RabbitMQ URL gets the run's vhost, the Kafka target the
run's Tansu (which needs the idempotent producer off). They run under ``bash -eu``, so any step that
fails fails the test.
"""

from __future__ import annotations

import asyncio
import re
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from tests.conftest import REDIS_URL, RUN_ID, pg_dsn
from tests.harness.brokers import RabbitMQAccount, TansuBroker
from tests.helpers import ADMIN_KEY, LiveServer, admin, example, run_example
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
QUICK_START = re.compile(r"^## Quick start\b.*?^```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)
MESSAGE = re.compile(r"^message ([0-9a-f-]{36})$", re.MULTILINE)
ENTRY_ID = re.compile(r"\d+-\d+")
CONSUMERS = re.compile(r"^## The consumer examples\n(.*?)^## ", re.DOTALL | re.MULTILINE)
SH_BLOCK = re.compile(r"^( *)```sh\n(.*?)^\1```", re.DOTALL | re.MULTILINE)
KINDS = re.compile(r'"kind": "([a-z_]+)"')
NAME = f"orly_shop_{RUN_ID}"


def replaced(script: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert old in script, f"the docs no longer say {old}"
        script = script.replace(old, new)
    assert re.search(r"\bshop\b", script)
    return re.sub(r"\bshop\b", NAME, script)


def quick_start_script(api_url: str) -> str:
    match = QUICK_START.search((ROOT / "README.md").read_text())
    assert match, "README.md has no quick start block"
    return replaced(match[1], ("http://127.0.0.1:8080", api_url), ("dev-admin-key", ADMIN_KEY))


def consumer_relay_scripts(rabbitmq: RabbitMQAccount, tansu: TansuBroker) -> tuple[str, str]:
    """docs/client.md's commands for the RabbitMQ relay and for the Kafka relay."""
    section = CONSUMERS.search((ROOT / "docs" / "client.md").read_text())
    assert section, "docs/client.md has no consumer examples section"
    blocks = {
        kind: textwrap.dedent(block) for _, block in SH_BLOCK.findall(section[1]) for kind in KINDS.findall(block)
    }
    rabbit, kafka = blocks["rabbitmq"], blocks["kafka"]
    return (
        replaced(rabbit, ("amqp://guest@127.0.0.1:5672/", f"amqp://guest@127.0.0.1:5672/{rabbitmq.vhost}")),
        replaced(
            kafka,
            (
                '"bootstrap_servers": ["127.0.0.1:9092"]',
                f'"bootstrap_servers": ["{tansu.bootstrap}"], "enable_idempotence": false',
            ),
        ),
    )


async def run_bash(script: str, *, succeeds: bool = True) -> str:
    process = await asyncio.create_subprocess_exec(
        "bash", "-eu", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    if succeeds:
        assert process.returncode == 0, f"the quick start failed ({process.returncode}):\n{text}"
    else:
        assert process.returncode != 0, f"the quick start did not fail:\n{text}"
    return text


@pytest.fixture
async def quick_start(live_api: LiveServer, worker_pool: WorkerPool) -> AsyncIterator[str]:
    """The quick start's script, a worker relaying; afterwards the tenant, database and stream are gone."""
    worker_pool.start()
    try:
        yield quick_start_script(live_api.url)
    finally:
        async with httpx.AsyncClient(base_url=live_api.url) as http:
            assert (await http.delete("/v1/tenants/acme", headers=admin())).status_code == 204
        conn = await asyncpg.connect(pg_dsn("postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')
        finally:
            await conn.close()
        redis = Redis.from_url(REDIS_URL)
        try:
            await redis.delete(f"{NAME}:orders")
        finally:
            await redis.aclose()


async def test_the_quick_start_shows_an_error_answer(live_api: LiveServer) -> None:
    """A wrong admin key: the first request's problem detail is printed, and the script stops there."""
    script = quick_start_script(live_api.url).replace(ADMIN_KEY, "not-the-admin-key")
    out = await run_bash(script, succeeds=False)
    assert '"status":401' in out and "curl: (22)" in out, out
    assert "DROP DATABASE" not in out, out


def relayed_id(out: str) -> str:
    ids = MESSAGE.findall(out)
    assert len(ids) == 1, out
    message_id: str = ids[0]
    return message_id


async def test_the_quick_start_works_as_written_and_again(quick_start: str) -> None:
    seen: list[str] = []
    for run in (1, 2):
        out = await run_bash(quick_start)
        message_id = relayed_id(out)
        # the XRANGE at the end shows one entry, this run's: payload, outbox-id and the relay's headers
        xrange = out[out.index(f"message {message_id}\n") :].splitlines()[1:]
        assert len([line for line in xrange if ENTRY_ID.fullmatch(line)]) == 1, out
        fields = dict(zip(xrange[1::2], xrange[2::2], strict=False))
        assert fields["payload"] == '{"id": 1, "state": "paid"}' and fields["outbox-id"] == message_id, out
        assert fields["h:outbox-relay"] == f"{NAME}-events" and fields["h:outbox-topic"] == "orders", out
        assert '"oldest_pending_age_s"' not in out, f"run {run} waited in vain and printed the status:\n{out}"
        assert not any(old in out for old in seen), f"run {run} found an earlier run's message:\n{out}"
        seen.append(message_id)


async def test_the_consumer_examples_read_the_quick_starts_message(
    quick_start: str, live_api: LiveServer, rabbitmq: RabbitMQAccount, tansu: TansuBroker
) -> None:
    """Each consumer, run as docs/client.md says, prints the quick start's message as shipped, and
    leaves no group or queue behind."""
    rabbit_relay, kafka_relay = consumer_relay_scripts(rabbitmq, tansu)
    dsn = pg_dsn(NAME)
    kafka = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
    await kafka.start()
    try:
        groups = await kafka.list_consumer_groups()
        quick_start_out = await run_bash(quick_start)
        message_id = relayed_id(quick_start_out)
        key = re.search(r'"key":"([^"]+)"', quick_start_out)
        assert key, quick_start_out
        # "with the quick start done (ORLY, AUTH and JSON set in its shell)"
        shell = f'ORLY={live_api.url}\nAUTH="Authorization: Bearer {key[1]}"\nJSON="Content-Type: application/json"\n'
        rabbit_env = {"DATABASE_URL": dsn, "AMQP_URL": rabbitmq.admin_url, "QUEUE": f"{NAME}-orders", "COUNT": "1"}
        async with example("consume_rabbitmq.py", **rabbit_env) as rabbit_consumer:  # first: it makes the queue
            assert rabbit_consumer.process.stdout is not None
            ready = await asyncio.wait_for(rabbit_consumer.process.stdout.readline(), timeout=30)
            assert ready.decode().startswith("reading queue"), ready
            await run_bash(shell + rabbit_relay)
        assert f"message {message_id}: shipped" in rabbit_consumer.output.splitlines(), rabbit_consumer.output
        await run_bash(shell + kafka_relay)
        out = await run_example("consume_redis_streams.py", DATABASE_URL=dsn, STREAM=f"{NAME}:orders", COUNT="1")
        assert f"message {message_id}: shipped" in out.splitlines(), out
        env = {"DATABASE_URL": dsn, "KAFKA_BOOTSTRAP": tansu.bootstrap, "KAFKA_TOPIC": f"{NAME}.orders", "COUNT": "1"}
        out = await run_example("consume_kafka.py", **env)
        assert f"message {message_id}: shipped" in out.splitlines(), out
        assert await kafka.list_consumer_groups() == groups
    finally:
        await kafka.close()
    redis = Redis.from_url(REDIS_URL)
    try:
        assert await redis.xinfo_groups(f"{NAME}:orders") == []
    finally:
        await redis.aclose()
    connection = await aio_pika.connect(rabbitmq.admin_url)
    try:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(f"{NAME}-orders", passive=True)
    finally:
        await connection.close()
