"""Metrics, traces and the self-explaining relay status, with real traffic and real failures."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import outbox_relay.engine as engine
import outbox_relay.status as status_module
from outbox_relay.client import add
from outbox_relay.engine import RelayRunner
from outbox_relay.store.control import ControlStore
from outbox_relay.telemetry import LATENCY_BUCKETS_S
from tests.conftest import pg_dsn
from tests.harness.brokers import RabbitMQAccount, free_port
from tests.helpers import ADMIN_KEY
from tests.integration.conftest import FAST_RETRY, Setup, run_until, write
from tests.telemetry import SPANS, counter_value, metric_points


async def make_relay(setup: Setup, store: ControlStore, name: str, target: str, mapping: dict[str, str], **policy: Any):
    body = {
        "database": "app",
        "target": target,
        "partitions": 1,
        "topic_mapping": mapping,
        "policy": {**FAST_RETRY, **policy},
    }
    r = await setup.tenant.put(f"/v1/relays/{name}", body)
    assert r.status_code == 201, r.text
    return await setup.relay_id(store, name)


async def status(setup: Setup, name: str) -> dict[str, Any]:
    r = await setup.tenant.get(f"/v1/relays/{name}/status")
    assert r.status_code == 200, r.text
    return r.json()


async def test_metrics_move_with_traffic_and_failures(
    setup: Setup, runner: RelayRunner, store: ControlStore, client: AsyncTestClient[Any]
) -> None:
    await setup.channel.declare_queue("m-q", durable=True)
    relay_id = await make_relay(setup, store, "metered", "rabbit", {"ok": "m-q", "poison": "nowhere"})
    tenant = setup.tenant.name
    labels = {"tenant": tenant, "relay": "metered", "target": "rabbit"}
    await write(setup.dsn, *[("ok", f"k{i}", b"x") for i in range(10)], ("poison", "p", b"bad"))
    received: list[Any] = []

    async def done() -> bool:
        received.extend(await setup.drain("m-q"))
        row = await store.pool.fetchrow("SELECT dead_count FROM relay_partitions WHERE relay_id = $1", relay_id)
        return len(received) >= 10 and row is not None and row["dead_count"] == 1

    await run_until(runner, relay_id, 1, done)
    assert counter_value("outbox_messages_sent", **labels) == 10
    assert counter_value("outbox_messages_failed", **labels) == 3  # max_attempts refusals
    assert counter_value("outbox_messages_retried", **labels) == 2
    assert counter_value("outbox_messages_dead", **labels) == 1
    latency = [p for p in metric_points("outbox_commit_to_ack_seconds") if p.attributes.get("relay") == "metered"]
    # one observation per published round (its oldest message), in seconds with buckets that resolve
    # milliseconds: a relay that keeps up lands in the low buckets, not all in one
    assert latency and 1 <= latency[0].count <= 10 and latency[0].sum > 0
    assert list(latency[0].explicit_bounds) == LATENCY_BUCKETS_S
    assert sum(latency[0].bucket_counts[: LATENCY_BUCKETS_S.index(60.0) + 1]) == latency[0].count
    assert counter_value("outbox_lease_acquired", **labels) >= 1
    pending = [p for p in metric_points("outbox_pending_messages") if p.attributes.get("relay") == "metered"]
    assert pending, "no pending gauge for the relay"

    r = await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200
    text = r.text
    sent = [
        line
        for line in text.splitlines()
        if line.startswith("outbox_messages_sent_total{") and 'relay="metered"' in line and f'tenant="{tenant}"' in line
    ]
    assert len(sent) == 1 and sent[0].endswith(" 10.0"), sent
    assert "outbox_commit_to_ack_seconds_bucket{" in text and 'le="0.01"' in text
    # API request metrics, labelled by route template (never the concrete path: resource names
    # would make the cardinality unbounded), never by the client's Host header
    await setup.tenant.get("/v1/relays/metered/status")
    assert (await setup.tenant.get("/v1/no-such-route-4711")).status_code == 404
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    text = r.text
    http = [line for line in text.splitlines() if line.startswith("http_server_request_duration_seconds_count")]
    routes = {line.split('http_route="', 1)[1].split('"', 1)[0] for line in http if 'http_route="' in line}
    assert "/v1/relays/{name}/status" in routes, routes
    assert not any("metered" in route or tenant in route or "4711" in route for route in routes), routes
    assert not any("http_host" in line for line in text.splitlines())
    assert (await client.get("/metrics")).status_code == 401
    assert (await setup.tenant.get("/metrics")).status_code == 403  # tenant names inside: operators only


async def test_batch_span_links_the_writers_trace_and_the_message_carries_it(
    setup: Setup, runner: RelayRunner, store: ControlStore
) -> None:
    queue = await setup.channel.declare_queue("trace-q", durable=True)
    relay_id = await make_relay(setup, store, "traced", "rabbit", {"*": "trace-q"})
    producer = trace.get_tracer("test-producer")
    with producer.start_as_current_span("checkout") as span:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        trace_id = span.get_span_context().trace_id
    conn = await asyncpg.connect(setup.dsn)
    try:
        await add(conn, "orders", "k", b"traced", headers=carrier)
    finally:
        await conn.close()
    SPANS.clear()
    got: list[Any] = []

    async def done() -> bool:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            got.append(message)
        return bool(got)

    await run_until(runner, relay_id, 1, done)
    assert got[0].headers["traceparent"] == carrier["traceparent"]  # the consumer continues the trace
    spans = {s.name: s for s in SPANS.get_finished_spans() if s.name != "checkout"}
    batch, publish = spans["relay.batch"], spans["broker.publish"]
    assert publish.parent is not None and publish.parent.span_id == batch.context.span_id
    assert spans["cursor.commit"].parent.span_id == batch.context.span_id
    assert spans["outbox.poll"].parent.span_id == batch.context.span_id
    assert [link.context.trace_id for link in publish.links] == [trace_id]
    assert batch.attributes["outbox.relay"] == "traced" and batch.attributes["outbox.batch_size"] == 1


async def test_status_explains_each_stall_cause(
    setup: Setup,
    runner: RelayRunner,
    store: ControlStore,
    rabbitmq: RabbitMQAccount,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "STALL_AFTER_S", 0.5)
    monkeypatch.setattr(engine, "PENDING_CHECK_S", 0.0)
    monkeypatch.setattr(status_module, "LEASE_GRACE", status_module.timedelta(0))
    await setup.channel.declare_queue("s-q", durable=True)

    # broker unreachable
    closed = f"amqp://{rabbitmq.user}@127.0.0.1:{free_port()}/{rabbitmq.vhost}"
    r = await setup.tenant.put(
        "/v1/targets/gone", {"kind": "rabbitmq", "url": closed, "password": "x", "timeout_ms": 300}
    )
    assert r.status_code == 201
    gone = await make_relay(setup, store, "to-gone", "gone", {"*": "s-q"})
    await write(setup.dsn, ("t", "k", b"1"))
    await runner.run_slice(gone, 0, "test")
    s = await status(setup, "to-gone")
    assert s["state"] == "failing" and s["cause"]["kind"] == "target_unreachable", s
    assert (await setup.tenant.delete("/v1/relays/to-gone")).status_code == 204

    # a poison message retrying
    poison = await make_relay(setup, store, "poisoned", "rabbit", {"*": "nowhere"}, max_attempts=100)
    await runner.run_slice(poison, 0, "test")
    s = await status(setup, "poisoned")
    assert s["state"] == "stalled" and s["cause"]["kind"] == "poison_message", s
    assert s["cause"]["outbox_id"] > 0 and s["cause"]["attempts"] >= 1
    assert (await setup.tenant.delete("/v1/relays/poisoned")).status_code == 204

    # a long-running transaction holding the horizon
    ok = await make_relay(setup, store, "held", "rabbit", {"*": "s-q"})
    await run_until(runner, ok, 1, lambda: _drained(setup))
    holder = await asyncpg.connect(setup.dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.fetchval("SELECT pg_current_xact_id()")  # takes a transaction id, as any write would
        holder_pid = holder.get_server_pid()
        await write(setup.dsn, ("t", "k", b"behind the horizon"))
        await asyncio.sleep(0.7)
        await runner.run_slice(ok, 0, "test")
        s = await status(setup, "held")
        assert s["state"] == "stalled" and s["cause"]["kind"] == "long_running_transaction", s
        assert s["cause"]["pid"] == holder_pid and s["cause"]["age_s"] >= 0.5
        assert s["cause"]["database"] == setup.db_name and setup.db_name in s["cause"]["detail"], s
        assert s["pending"] >= 1
        await tx.rollback()
    finally:
        await holder.close()
    await run_until(runner, ok, 1, lambda: _drained(setup))
    s = await status(setup, "held")
    assert s["state"] == "running" and s["cause"] is None, s

    # tenant database refusing connections
    admin = await asyncpg.connect(pg_dsn("postgres"))
    try:
        await admin.execute(f'ALTER DATABASE "{setup.db_name}" WITH ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", setup.db_name)
        await runner.tenants.close()  # a fresh worker: no pooled connection survives
        await runner.run_slice(ok, 0, "test")
        s = await status(setup, "held")
        assert s["state"] == "failing" and s["cause"]["kind"] == "database_unreachable", s
    finally:
        await admin.execute(f'ALTER DATABASE "{setup.db_name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()

    await write(setup.dsn, ("t", "k", b"after the outage"))
    await run_until(runner, ok, 1, lambda: _drained(setup))
    assert (await status(setup, "held"))["cause"] is None

    # lease lost: a worker took the partition, saw work waiting, and stopped renewing
    await write(setup.dsn, ("t", "k", b"orphaned"))
    lease = await store.acquire_lease(ok, 0, "frozen-worker", 1.0)
    assert lease is not None
    await store.record_pending(lease, 1, None, None)
    await asyncio.sleep(1.2)
    s = await status(setup, "held")
    assert s["state"] == "stalled" and s["cause"]["kind"] == "lease_lost" and "frozen-worker" in s["cause"]["detail"]

    overview = (await setup.tenant.get("/v1/status")).json()
    assert {r["relay"]: r["state"] for r in overview["relays"]} == {"held": "stalled"}
    assert overview["states"] == {"stalled": 1}


async def _drained(setup: Setup) -> bool:
    await setup.drain("s-q")
    return True


async def test_filtered_rows_are_counted_in_the_metric_and_the_status(
    setup: Setup, runner: RelayRunner, store: ControlStore
) -> None:
    """The slice engine's path (RelayRunner, one cursor write per batch): rows the filter leaves out
    move the cursor, are counted in ``relay_partitions`` and in ``outbox_messages_filtered``; unrouted
    rows are not counted as filtered."""
    await setup.channel.declare_queue("f-q", durable=True)
    body = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "topic_mapping": {"a": "f-q", "b": "f-q"},
        "filter": {"any": [{"topic": {"eq": "a"}}, {"payload": "keep", "eq": True}]},
        "policy": {**FAST_RETRY, "batch_size": 4},
    }
    r = await setup.tenant.put("/v1/relays/sieve", body)
    assert r.status_code == 201, r.text
    relay_id = await setup.relay_id(store, "sieve")
    labels = {"tenant": setup.tenant.name, "relay": "sieve", "target": "rabbit"}
    before = counter_value("outbox_messages_filtered", **labels)
    rows = [
        ("a", "k", b"1"),  # published: topic a
        ("b", "k", b'{"keep": true}'),  # published: payload keep
        ("b", "k", b'{"keep": 1}'),  # filtered: 1 is not true
        ("b", "k", b"not json"),  # filtered: not a JSON object
        ("c", "k", b'{"keep": true}'),  # unrouted: not filtered
        ("b", "k", b"{}"),  # filtered, the last row: the cursor must pass it too
    ]
    ids = await write(setup.dsn, *rows)
    received: list[Any] = []

    async def done() -> bool:
        received.extend(await setup.drain("f-q"))
        row = await store.pool.fetchrow("SELECT cursor_id FROM relay_partitions WHERE relay_id = $1", relay_id)
        return row is not None and row["cursor_id"] == ids[-1]

    await run_until(runner, relay_id, 1, done)
    received.extend(await setup.drain("f-q"))
    assert [body for _, _, body in received] == [b"1", b'{"keep": true}']
    assert counter_value("outbox_messages_filtered", **labels) - before == 3
    got = await status(setup, "sieve")
    assert (got["published"], got["filtered"], got["partitions"][0]["filtered"]) == (2, 3, 3)
    overview = (await setup.tenant.get("/v1/status")).json()
    assert [(r["published"], r["filtered"]) for r in overview["relays"] if r["relay"] == "sieve"] == [(2, 3)]
