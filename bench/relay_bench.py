"""Messages/s relayed by one worker process, beside the broker's plain-library ceiling, the
adapter's own rate, a hand-written batched poller and a naive relay; the worker's CPU per message;
commit-to-receive latency at a steady write rate.

Usage: ``.venv/bin/python bench/relay_bench.py [--messages N] [--brokers redis,rabbitmq,kafka,nats,webhook]``
(``--help`` for the rest). Needs the local PostgreSQL, Redis and RabbitMQ (``rabbitmqctl``), and for
``nats`` the local NATS server with JetStream (``BENCH_NATS_URL``); Kafka is a private
Tansu broker started for the run. Everything is throw-away (databases, a vhost, a
Redis key prefix, the Tansu process, the worker) and is removed at the end, also on failure.
Prints a table, writes it as JSON to ``bench/results/latest.json``; never fails on a timing.

Per broker, over the same ``--messages`` messages (``--keys`` keys, ~200-byte JSON payloads):

plain  the broker's client library as a user would call it (redis-py pipelined XADD; aio-pika
       with publisher confirms, a ``gather`` per batch; aiokafka ``acks=all``; nats-py's
       ``publish_async`` with ``Nats-Msg-Id``, every ack of a batch awaited together; httpx POSTs
       signed with ``standardwebhooks``, ``--webhook-concurrency`` in flight, to the receiver in
       this process), 500 messages a round trip, no database: the broker's ceiling from Python.
raw    ``publish_batch`` of the broker adapter in batches of ``--batch-size``, no database: the
       ceiling the relay works under.
poller a hand-written batched outbox poller with the plain library: select 500 unpublished rows
       ``FOR UPDATE SKIP LOCKED``, publish them, mark them, commit; until none is left.
relay  the messages are pre-loaded into a fresh tenant outbox; one ``outbox-relay worker`` process
       (default settings) relays them; timed from the relay being enabled (``PUT`` with
       ``enabled: true``) until the broker holds them all (read back from the broker).
naive  a hand-written outbox loop over a classic table with a ``published_at`` column: select one
       row ``FOR UPDATE SKIP LOCKED``, publish it alone, mark it, commit. Runs at most
       ``--naive-seconds`` (it is slow); the rate is over what it did.
latency  ``--rate`` messages/s written for ``--latency-seconds`` by ``--writers`` connections (one
       message per transaction, with ``outbox_relay.client.add``) while the worker relays; a
       consumer records when each arrives. Commit-to-receive = arrival minus the moment the
       writer's commit returned (one process, one clock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from litestar.testing import AsyncTestClient

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.client import add
from outbox_relay.config import Settings
from outbox_relay.crypto import generate_key
from outbox_relay.domain import Relay
from outbox_relay.engine import build_messages
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.migrate import migrate
from outbox_relay.tenant.db import OutboxRow
from service.app import create_app

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infra import (
    NATS_URL,
    REDIS_URL,
    HorizonWatch,
    Scratch,
    cpu_seconds,
    delete_redis_keys,
    log,
    machine,
    pg_dsn,
    redis_db_url,
)
from kits import KafkaKit, Kit, NatsKit, RabbitMQKit, RedisKit, WebhookKit, target_spec

ADMIN_KEY = "bench-admin-key"
LOCAL = AddressPolicy(allow_private=True)  # the bench's brokers are on loopback
SCHEMA = "outbox_relay"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BROKERS = ("redis", "rabbitmq", "kafka", "nats", "webhook")

ROWS_PER_TX = 10
# Pre-load in transactions of ROWS_PER_TX messages (distinct txids, as real traffic has), server-side.
PRELOAD_SQL = f"""
DO $$
BEGIN
    FOR t IN 0..({{messages}} - 1) / {ROWS_PER_TX} LOOP
        INSERT INTO {SCHEMA}.outbox (topic, key, payload, headers)
        SELECT 'orders', 'key-' || lpad((g % {{keys}})::text, 4, '0'),
               convert_to(json_build_object('order_id', g, 'state', 'paid', 'amount_cents', (g * 7919) % 100000,
                                            'customer', 'customer-' || (g % 997), 'note', repeat('x', {{pad}}))::text,
                          'UTF8'),
               '{{{{"source": "bench"}}}}'::jsonb
        FROM generate_series(t * {ROWS_PER_TX} + 1, least((t + 1) * {ROWS_PER_TX}, {{messages}})) g;
        COMMIT;
    END LOOP;
END
$$
"""

ROWS_SQL = (
    f"SELECT txid::text::bigint AS txid, id, topic, key, payload, headers::text AS headers, created_at "
    f"FROM {SCHEMA}.outbox ORDER BY id"
)

NAIVE_SCHEMA_SQL = f"""
CREATE SCHEMA naive;
CREATE TABLE naive.outbox (
    id            bigserial PRIMARY KEY,
    topic         text NOT NULL,
    key           text,
    payload       bytea NOT NULL,
    headers       jsonb NOT NULL DEFAULT '{{}}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON naive.outbox (id) WHERE published_at IS NULL;
INSERT INTO naive.outbox (topic, key, payload, headers)
    SELECT topic, key, payload, headers FROM {SCHEMA}.outbox ORDER BY id;
ANALYZE naive.outbox;
"""
POLLER_SCHEMA_SQL = NAIVE_SCHEMA_SQL.replace("naive", "poller")
POLLER_BATCH = 500
PLAIN_BATCH = 500
POLLER_NEXT_SQL = (
    "SELECT id, topic, key, payload, headers::text AS headers, created_at FROM poller.outbox "
    "WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
)
POLLER_DONE_SQL = "UPDATE poller.outbox SET published_at = now() WHERE id = ANY($1::bigint[])"
NAIVE_NEXT_SQL = (
    "SELECT id, topic, key, payload, headers::text AS headers, created_at FROM naive.outbox "
    "WHERE published_at IS NULL ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
)
NAIVE_DONE_SQL = "UPDATE naive.outbox SET published_at = now() WHERE id = $1"


# --- the API, in process ------------------------------------------------------------------------


class Api:
    """The tenant's view of the control-plane API (litestar test client over the run's control DB).

    Remembers the id of every relay it creates (``relay_ids``): the worker's arq job ids carry it."""

    def __init__(self, client: AsyncTestClient[Any], key: str, control_dsn: str) -> None:
        self.client, self.headers, self.control_dsn = client, {"Authorization": f"Bearer {key}"}, control_dsn
        self.relay_ids: set[str] = set()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.client.request(method, path, json=body, headers=self.headers)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        if method == "PUT" and path.startswith("/v1/relays/"):
            conn = await asyncpg.connect(self.control_dsn)
            try:
                self.relay_ids.update(str(r["id"]) for r in await conn.fetch("SELECT id FROM relays"))
            finally:
                await conn.close()
        return response.json() if response.content else None

    @classmethod
    async def tenant(cls, client: AsyncTestClient[Any], name: str, control_dsn: str) -> Api:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        r = await client.put(f"/v1/tenants/{name}", json={"display_name": name}, headers=admin)
        assert r.status_code == 201, r.text
        r = await client.post(f"/v1/tenants/{name}/api-keys", json={"description": "bench"}, headers=admin)
        assert r.status_code == 201, r.text
        return cls(client, r.json()["key"], control_dsn)


# --- the measurements -----------------------------------------------------------------------------


def outgoing(rows: list[OutboxRow], destination: str, relay_name: str) -> list[OutgoingMessage]:
    """The messages exactly as the relay builds them from these rows (headers included)."""
    spec = Relay(database="app", target="t", topic_mapping={"orders": destination})
    return [m for m in build_messages(spec, relay_name, rows) if m is not None]


def row_of(record: asyncpg.Record) -> OutboxRow:
    return OutboxRow(
        txid=record.get("txid", 0),
        id=record["id"],
        topic=record["topic"],
        key=record["key"],
        payload=bytes(record["payload"]),
        headers=record["headers"],
        created_at=record["created_at"],
    )


async def measure_raw(kit: Kit, messages: list[OutgoingMessage], batch_size: int) -> dict[str, Any]:
    publisher = await open_publisher(target_spec(kit), password=kit.password, policy=LOCAL)
    async with publisher:
        started = time.perf_counter()
        for i in range(0, len(messages), batch_size):
            result = await publisher.publish_batch(messages[i : i + batch_size])
            if result.acked != len(messages[i : i + batch_size]):
                raise RuntimeError(f"raw publish refused: {result}")
        elapsed = time.perf_counter() - started
    return {"messages": len(messages), "seconds": round(elapsed, 3), "msgs_per_s": round(len(messages) / elapsed)}


async def measure_plain(kit: Kit, messages: list[OutgoingMessage]) -> dict[str, Any]:
    async with kit.plain() as send:
        started = time.perf_counter()
        for i in range(0, len(messages), PLAIN_BATCH):
            await send(messages[i : i + PLAIN_BATCH])
        elapsed = time.perf_counter() - started
    return {
        "messages": len(messages),
        "batch": PLAIN_BATCH,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(len(messages) / elapsed),
    }


async def measure_poller(kit: Kit, dsn: str, destination: str, n: int) -> dict[str, Any]:
    """The loop a user writes by hand: a batch of rows locked, published, marked, committed."""
    conn = await asyncpg.connect(dsn)
    done = 0
    try:
        async with kit.plain() as send:
            started = time.perf_counter()
            while done < n:
                async with conn.transaction():
                    records = await conn.fetch(POLLER_NEXT_SQL, POLLER_BATCH)
                    if not records:
                        break
                    await send(outgoing([row_of(r) for r in records], destination, "poller"))
                    await conn.execute(POLLER_DONE_SQL, [r["id"] for r in records])
                done += len(records)
            elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return {"messages": done, "batch": POLLER_BATCH, "seconds": round(elapsed, 3), "msgs_per_s": round(done / elapsed)}


async def wait_for_count(
    kit: Kit, destination: str, n: int, *, stall_s: float = 20.0
) -> tuple[float | None, float, int]:
    """Poll the broker until ``destination`` holds ``n`` messages, or its count has not moved for
    ``stall_s``: (first seen, last change, count) with perf-counter times."""
    first: float | None = None
    last_count, last_change = 0, time.perf_counter()
    while True:
        count = await kit.count(destination)
        now = time.perf_counter()
        if count != last_count:
            last_count, last_change = count, now
            if first is None:
                first = now
        if count >= n or now - last_change > stall_s:
            return first, last_change, count
        await asyncio.sleep(0.02)


async def measure_relay(
    kit: Kit, api: Api, database: str, destination: str, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    name = f"bench-{kit.name}"
    body = {
        "database": database,
        "target": kit.name,
        "topic_mapping": {"orders": destination},
        "partitions": args.partitions,
        "policy": {"batch_size": args.batch_size, "poll_interval_ms": args.poll_interval_ms},
        "enabled": False,
    }
    await api.call("PUT", f"/v1/relays/{name}", body)
    async with HorizonWatch() as horizon:
        cpu_before = cpu_seconds(args.worker_pid)
        enabled = time.perf_counter()
        await api.call("PUT", f"/v1/relays/{name}", {**body, "enabled": True})
        first, done, count = await wait_for_count(kit, destination, n)
        worker_cpu_s = cpu_seconds(args.worker_pid) - cpu_before
    status = await api.call("GET", f"/v1/relays/{name}/status")
    published = sum(p.get("published", 0) for p in status.get("partitions", []))
    await api.call("DELETE", f"/v1/relays/{name}")
    if first is None or count < n:
        raise RuntimeError(f"{kit.name}: the relay stalled at {count} of {n} messages on the broker")
    elapsed = done - enabled
    return {
        "messages": n,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(n / elapsed),
        "first_message_after_s": round(first - enabled, 3),
        # from the first message on the broker to the last: the rate without the start-up
        "steady_msgs_per_s": round(n / (done - first)) if done > first else None,
        "published_per_status": published,
        "worker_cpu_s": round(worker_cpu_s, 2),
        "worker_cpu_us_per_msg": round(worker_cpu_s / n * 1e6),
        **horizon.report(),
    }


async def measure_naive(kit: Kit, dsn: str, destination: str, n: int, max_seconds: float) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    publisher = await open_publisher(target_spec(kit), password=kit.password, policy=LOCAL)
    done = 0
    try:
        async with publisher:
            started = time.perf_counter()
            deadline = started + max_seconds
            while done < n and time.perf_counter() < deadline:
                async with conn.transaction():
                    record = await conn.fetchrow(NAIVE_NEXT_SQL)
                    if record is None:
                        break
                    message = outgoing([row_of(record)], destination, "naive")[0]
                    result = await publisher.publish_batch([message])
                    if result.acked != 1:
                        raise RuntimeError(f"naive publish refused: {result}")
                    await conn.execute(NAIVE_DONE_SQL, record["id"])
                done += 1
            elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return {"messages": done, "seconds": round(elapsed, 3), "msgs_per_s": round(done / elapsed)}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def measure_latency(
    kit: Kit, api: Api, database: str, dsn: str, destination: str, args: argparse.Namespace
) -> dict[str, Any]:
    name = f"bench-{kit.name}-latency"
    await api.call(
        "PUT",
        f"/v1/relays/{name}",
        {
            "database": database,
            "target": kit.name,
            "topic_mapping": {"latency": destination},
            "partitions": args.partitions,
            "policy": {"batch_size": args.batch_size, "poll_interval_ms": args.poll_interval_ms},
        },
    )
    committed: dict[int, float] = {}
    received: dict[int, float] = {}
    duplicates = 0

    def on_message(payload: bytes, at: float) -> None:
        nonlocal duplicates
        seq = json.loads(payload)["seq"]
        if seq in received:
            duplicates += 1
        else:
            received[seq] = at

    stop = asyncio.Event()
    horizon = HorizonWatch()
    consumer = asyncio.create_task(kit.consume(destination, on_message, stop))
    writers = [await asyncpg.connect(dsn) for _ in range(args.writers)]

    async def write(conn: asyncpg.Connection, seq: int) -> None:
        # One message per transaction: outside a transaction block the INSERT commits on its own,
        # and has committed when it returns (half the writer's cost of BEGIN/INSERT/COMMIT, which
        # leaves the 2-core machine room for the relay).
        await add(conn, "latency", f"key-{seq % args.keys:04d}", {"seq": seq, "note": "x" * args.pad})
        committed[seq] = time.perf_counter()

    try:
        # warm-up: the relay has its leases and its publisher before the clock starts
        await write(writers[0], -1)
        deadline = time.perf_counter() + 30
        while -1 not in received:
            if consumer.done():
                consumer.result()
            if time.perf_counter() > deadline:
                raise TimeoutError("the warm-up message did not arrive within 30 s")
            await asyncio.sleep(0.01)
        total = int(args.rate * args.latency_seconds)
        started = 0.0
        lag = 0.0

        async def writer(w: int) -> None:
            nonlocal lag
            for seq in range(w, total, len(writers)):
                if time.perf_counter() > started + 2 * args.latency_seconds:
                    return  # a saturated machine: keep the run bounded
                due = started + seq / args.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    lag = max(lag, -delay)
                await write(writers[w], seq)

        async with horizon:
            cpu_before, cpu_since = cpu_seconds(args.worker_pid), time.perf_counter()
            started = time.perf_counter()
            await asyncio.gather(*(writer(w) for w in range(len(writers))))
            write_s = time.perf_counter() - started
            total = sum(1 for s in committed if s >= 0)
            deadline = time.perf_counter() + 30
            while sum(1 for s in committed if s >= 0 and s in received) < total and time.perf_counter() < deadline:
                if consumer.done():
                    consumer.result()
                await asyncio.sleep(0.05)
            worker_cpu_s = cpu_seconds(args.worker_pid) - cpu_before
            cpu_wall_s = time.perf_counter() - cpu_since
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer, timeout=10)
        for conn in writers:
            await conn.close()
        with contextlib.suppress(Exception):
            await api.call("DELETE", f"/v1/relays/{name}")
    latencies = sorted((received[s] - committed[s]) * 1000 for s in committed if s >= 0 and s in received)
    if not latencies:
        raise RuntimeError("no latency sample arrived")
    return {
        "written": total,
        "received": len(latencies),
        "duplicates": duplicates,
        "write_rate_msgs_per_s": round(total / write_s),
        "writer_max_behind_ms": round(lag * 1000, 1),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p90_ms": round(percentile(latencies, 90), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(latencies[-1], 1),
        "worker_cpu_s": round(worker_cpu_s, 2),
        # share of one core the worker used while it relayed this traffic
        "worker_cpu_share": round(worker_cpu_s / cpu_wall_s, 2),
        **horizon.report(),
    }


# --- one broker, end to end -----------------------------------------------------------------------


async def bench_broker(kit: Kit, scratch: Scratch, api: Api, args: argparse.Namespace) -> dict[str, Any]:
    db_name = await scratch.database(kit.name)
    dsn = pg_dsn(db_name)
    database = f"app-{kit.name}"
    await api.call("PUT", f"/v1/databases/{database}", {"dsn": dsn})
    await api.call("POST", f"/v1/databases/{database}/provision")
    await api.call("PUT", f"/v1/targets/{kit.name}", kit.target_body)
    destinations = {p: kit.destination(p) for p in ("plain", "raw", "poller", "relay", "naive", "latency")}
    await kit.prepare(list(destinations.values()))

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(PRELOAD_SQL.format(messages=int(args.messages), keys=int(args.keys), pad=int(args.pad)))
        await conn.execute(NAIVE_SCHEMA_SQL)
        await conn.execute(POLLER_SCHEMA_SQL)
        await conn.execute(f"ANALYZE {SCHEMA}.outbox")
        rows = [row_of(r) for r in await conn.fetch(ROWS_SQL)]
    finally:
        await conn.close()
    n = len(rows)
    result: dict[str, Any] = {"broker": kit.name}

    async def phase(name: str, measure: Awaitable[dict[str, Any]], summary: Callable[[dict[str, Any]], str]) -> None:
        """Run one measurement; a failure is recorded in the report and the run goes on."""
        try:
            result[name] = await measure
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{kit.name}: {name} failed: {exc!r}")
        else:
            log(f"{kit.name}: {name}: {summary(result[name])}")

    rate = "{0[msgs_per_s]} msg/s".format
    log(f"{kit.name}: {n} messages pre-loaded")
    await phase("plain", measure_plain(kit, outgoing(rows, destinations["plain"], "plain")), rate)
    await phase("raw", measure_raw(kit, outgoing(rows, destinations["raw"], "raw"), args.batch_size), rate)
    await phase("poller", measure_poller(kit, dsn, destinations["poller"], n), rate)
    await phase("relay", measure_relay(kit, api, database, destinations["relay"], n, args), rate)
    await phase("naive", measure_naive(kit, dsn, destinations["naive"], n, args.naive_seconds), rate)
    if args.latency_seconds > 0:
        await phase(
            "latency",
            measure_latency(kit, api, database, dsn, destinations["latency"], args),
            "p50 {0[p50_ms]} ms, p99 {0[p99_ms]} ms at {0[write_rate_msgs_per_s]} msg/s written".format,
        )
    phases = ("plain", "raw", "poller", "relay", "naive")
    plain, raw, poller, relay, naive = (result[k].get("msgs_per_s") for k in phases)
    steady = result["relay"].get("steady_msgs_per_s")
    result["relay_over_raw"] = round(relay / raw, 3) if relay and raw else None
    result["relay_over_naive"] = round(relay / naive, 1) if relay and naive else None
    result["relay_over_poller"] = round(relay / poller, 2) if relay and poller else None
    result["steady_over_plain"] = round(steady / plain, 2) if steady and plain else None
    return result


# --- the run ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Scratch()
    host = machine()  # the load average before the run
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        control_dsn = pg_dsn(await scratch.database("control"))
        await migrate(control_dsn)
        settings = Settings(
            database_url=control_dsn,
            redis_url=redis_db_url(args.worker_redis_db),
            admin_api_key=ADMIN_KEY,
            secret_keys=(generate_key(),),
            allow_private_networks=True,
            queue_name=f"orly-bench-{scratch.run_id}",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
        env.update(
            OUTBOX_RELAY_DATABASE_URL=settings.database_url,
            OUTBOX_RELAY_REDIS_URL=settings.redis_url,
            OUTBOX_RELAY_SECRET_KEYS=",".join(settings.secret_keys),
            OUTBOX_RELAY_ALLOW_PRIVATE_NETWORKS="1",
            OUTBOX_RELAY_QUEUE_NAME=settings.queue_name,
            OUTBOX_RELAY_WORKER_ID=f"bench-{scratch.run_id}",
            PYTHONUNBUFFERED="1",
        )
        RESULTS_DIR.mkdir(exist_ok=True)
        kits: list[Kit] = []
        if "redis" in args.brokers:
            kits.append(RedisKit(url=REDIS_URL, prefix=scratch.redis_prefix()))
        if "rabbitmq" in args.brokers:
            kits.append(RabbitMQKit(vhost=await scratch.rabbitmq_vhost()))
        if "kafka" in args.brokers:
            kits.append(KafkaKit(bootstrap=await scratch.tansu()))
        if "nats" in args.brokers:
            kits.append(NatsKit(url=NATS_URL, prefix=f"orly-bench.{scratch.run_id}"))
        if "webhook" in args.brokers:
            webhook = WebhookKit(concurrency=args.webhook_concurrency)
            await webhook.start()
            kits.append(webhook)
        for kit in kits:
            scratch.on_close(f"{kit.name} connections", kit.close)
        relay_ids: set[str] = set()  # filled by Api as relays are created

        async def forget_relay_jobs() -> None:
            """arq keys of the relays' partition jobs (the job ids name the relay); registered before
            the worker starts, so it runs after the worker has stopped."""
            await delete_redis_keys(settings.redis_url, *(f"arq:*relay:{i}:*" for i in relay_ids))

        scratch.on_close("arq keys of the relay jobs", forget_relay_jobs)
        profile = RESULTS_DIR / "worker.prof" if args.profile_worker else None
        for old in sorted(RESULTS_DIR.glob("relay-worker-*.log"), key=lambda p: p.stat().st_mtime)[:-4]:
            old.unlink(missing_ok=True)  # keep the logs of the last few runs
        worker_log = RESULTS_DIR / f"relay-worker-{scratch.run_id}.log"
        args.worker_pid = await scratch.worker(env, worker_log, profile_to=profile)
        log(f"worker up after {time.perf_counter() - started:.1f} s (queue {settings.queue_name})")

        async with AsyncTestClient(app=create_app(settings)) as client:
            api = await Api.tenant(client, "bench", control_dsn)
            api.relay_ids = relay_ids
            for kit in kits:
                results.append(await bench_broker(kit, scratch, api, args))
    finally:
        log("cleaning up")
        await scratch.close()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": host,
        "settings": {
            "messages": args.messages,
            "keys": args.keys,
            "batch_size": args.batch_size,
            "partitions": args.partitions,
            "poll_interval_ms": args.poll_interval_ms,
            "naive_max_seconds": args.naive_seconds,
            "latency_rate_msgs_per_s": args.rate,
            "latency_seconds": args.latency_seconds,
            "latency_writers": args.writers,
            "worker": "outbox-relay worker, default Settings (slice_s 15, lease_ttl_s 10, schedule 1 s)",
            "worker_redis_db": args.worker_redis_db,
            "preload_rows_per_transaction": ROWS_PER_TX,
        },
        "worker_log": str(worker_log),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    head = (
        "broker",
        "plain msg/s",
        "raw msg/s",
        "poller msg/s",
        "relay msg/s",
        "relay steady",
        "naive msg/s",
        "steady/plain",
        "relay/poller",
        "worker us/msg",
        "p50 ms",
        "p99 ms",
    )
    lines = [head]
    for r in report["results"]:
        latency = r.get("latency", {})

        def cell(value: Any, fmt: str = "{}") -> str:
            return "-" if value is None else fmt.format(value)

        def rate(phase: str, key: str = "msgs_per_s", r: dict[str, Any] = r) -> str:
            return "error" if "error" in r.get(phase, {}) else cell(r.get(phase, {}).get(key))

        lines.append(
            (
                r["broker"],
                rate("plain"),
                rate("raw"),
                rate("poller"),
                rate("relay"),
                rate("relay", "steady_msgs_per_s"),
                rate("naive"),
                cell(r.get("steady_over_plain"), "{:.2f}"),
                cell(r.get("relay_over_poller"), "{:.2f}"),
                rate("relay", "worker_cpu_us_per_msg"),
                cell(latency.get("p50_ms")) if "error" not in latency else "error",
                cell(latency.get("p99_ms")) if "error" not in latency else "error",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        " | ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out + caveats(report))


def caveats(report: dict[str, Any]) -> list[str]:
    """What makes a figure of this run not what it claims to be."""
    notes = []
    rate = report["settings"]["latency_rate_msgs_per_s"]
    for r in report["results"]:
        for phase in ("relay", "latency"):
            held = r.get(phase, {}).get("oldest_xid_holder_s", 0)
            if held > 1:
                notes.append(
                    f"{r['broker']} {phase}: a transaction in database {r[phase]['oldest_xid_holder_database']!r} held "
                    f"the cluster's xmin horizon for up to {held:.1f} s (the relay waits for it)"
                )
        latency = r.get("latency", {})
        if latency.get("write_rate_msgs_per_s", rate) < 0.95 * rate:
            notes.append(
                f"{r['broker']} latency: the writers reached only {latency['write_rate_msgs_per_s']} of {rate:g} msg/s "
                f"(up to {latency['writer_max_behind_ms'] / 1000:.1f} s behind: the machine was saturated)"
            )
        for phase in ("plain", "raw", "poller", "relay", "naive", "latency"):
            if "error" in r.get(phase, {}):
                notes.append(f"{r['broker']} {phase}: {r[phase]['error']}")
    return [f"  * {note}" for note in notes]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per broker (default 20000)")
    parser.add_argument("--keys", type=int, default=1_000, help="distinct message keys (default 1000)")
    parser.add_argument(
        "--brokers",
        default=",".join(BROKERS),
        help="comma-separated subset of redis,rabbitmq,kafka,nats,webhook (default all)",
    )
    parser.add_argument(
        "--pad",
        type=int,
        default=100,
        help="characters of the payloads' note field (100: ~200-byte payloads; 900: ~1 KiB)",
    )
    parser.add_argument(
        "--webhook-concurrency",
        type=int,
        default=16,
        help="webhook: the target's max_concurrent_requests, and the plain httpx loop's POSTs in flight (16)",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="relay policy batch_size and raw batch (100)")
    parser.add_argument("--partitions", type=int, default=16, help="relay partitions (default 16, the API default)")
    parser.add_argument("--poll-interval-ms", type=int, default=1000, help="relay policy poll_interval_ms (1000)")
    parser.add_argument("--naive-seconds", type=float, default=5.0, help="cap on the naive relay's run (5)")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency phase write rate, msg/s (1000)")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="latency phase length; 0 skips it (10)")
    parser.add_argument("--writers", type=int, default=4, help="latency phase writer connections (4)")
    parser.add_argument(
        "--worker-redis-db",
        type=int,
        default=11,
        help="Redis database of the worker's arq queue (11): arq's cron job ids are global per Redis "
        "database, so workers of other deployments or test runs in the same database steal the "
        "scheduler's ticks; 0 shows that effect",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json", help="JSON report path")
    parser.add_argument(
        "--profile-worker", action="store_true", help="run the worker under cProfile (bench/results/worker.prof)"
    )
    args = parser.parse_args(argv)
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = set(args.brokers) - set(BROKERS)
    if unknown or not args.brokers:
        parser.error(f"--brokers: unknown {sorted(unknown)}; choose from {', '.join(BROKERS)}")
    if args.messages < 1 or args.keys < 1 or args.batch_size < 1 or args.partitions < 1:
        parser.error("--messages, --keys, --batch-size and --partitions must be at least 1")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # clean up on SIGTERM too
    return await run(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("httpx", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        report = asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(
        f"\n{report['machine']['cpus']} cpus, load {report['machine']['load_average_at_start']} at start; "
        f"{report['wall_seconds']} s; JSON in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
