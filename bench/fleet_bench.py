"""The fleet benchmark: what idle relays, wide relays, big backlogs, big transactions, noisy
neighbours, scale-out, a steady trickle and connections cost the data plane, each beside its goal.

Usage: ``.venv/bin/python bench/fleet_bench.py [--cases a,b] [--scale S]`` as root (``--help``).

It starts its own PostgreSQL cluster (``pg_createcluster``) for the control DB and every tenant DB,
its own two ``redis-server`` processes (the workers' Redis and the Redis Streams target), the API
(``outbox-relay serve``) and real worker processes (``outbox-relay worker``), configures tenants,
databases, targets and relays through the REST API as a user would, and removes all of it at the
end, also on Ctrl-C, SIGTERM or an exception. It never fails on a timing: it prints one table
(case, issue (before), measured, goal, met?) and writes the details as JSON.

It measures through the engine's public surfaces only (the API, the tenant outbox table, the
broker, process CPU, the servers' own counters), so the same bench measures today's engine and the
fleet data plane that replaces it. One exception, documented where it is used: the scale-out case
asks the control DB who owns which partition (``--ownership-sql``; today's ``relay_partitions``
leases by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import math
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from outbox_relay.client import Message, add, add_many
from outbox_relay.config import Settings
from outbox_relay.crypto import generate_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_infra import (
    PrivatePostgres,
    PrivateRedis,
    Proc,
    Teardown,
    free_port,
    log,
    outbox_relay_command,
    process_cpu_s,
    raise_fd_limit,
    start_process,
    tcp_port_owners,
)
from infra import machine

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ADMIN_KEY = "fleet-bench-admin-key"
SCHEMA = "outbox_relay"
RELAYS_PER_DB = 5
PARTITIONS = int(os.environ.get("FB_PARTITIONS", "16"))
DEFAULT_LEASE_TTL_S = Settings().lease_ttl_s  # what the workers run with, unless --worker-env sets another

CASES = (
    "idle100",
    "idle1000",
    "first_message",
    "wide",
    "backlog",
    "bigtx",
    "noisy",
    "scaleout",
    "trickle",
    "connections",
)

# Who owns which partition, for the scale-out case: rows (worker id, partitions held). Workers get
# OUTBOX_RELAY_WORKER_ID; the fleet data plane names the owner "<worker id>#<membership>" and keeps
# it while the worker's heartbeat (table workers) lives; the per-slice engine named the holder
# "<worker id>/<arq job id>" with an expiry of its own.
OWNERSHIP_SQL = (
    "SELECT split_part(split_part(p.lease_holder, '/', 1), '#', 1) AS worker, count(*)::int AS partitions "
    "FROM relay_partitions p LEFT JOIN workers w ON w.key = p.lease_holder "
    "WHERE p.lease_holder IS NOT NULL AND (p.lease_expires_at > now() "
    "OR w.heartbeat_at > now() - make_interval(secs => 10)) GROUP BY 1"
)
# Today's engine only, a diagnostic: partitions that ever took a lease (lease_epoch counts them).
EVER_LEASED_SQL = (
    "SELECT count(*) FILTER (WHERE lease_epoch > 0)::int AS ever, count(*)::int AS total FROM relay_partitions"
)

PAYLOAD_NOTE = "x" * 100


def preload_sql(rows: int, rows_per_tx: int, *, topic: str = "bulk", keys: int = 10_000) -> str:
    """``rows`` ~200-byte JSON messages over ``keys`` keys, in transactions of ``rows_per_tx`` (one
    INSERT statement when that is all of them), written server-side."""
    select = (
        f"SELECT '{topic}', 'key-' || lpad((g % {keys})::text, 5, '0'), "
        "convert_to(json_build_object('order_id', g, 'state', 'paid', 'amount_cents', (g::bigint * 7919) % 100000, "
        "'customer', 'customer-' || (g % 997), 'note', repeat('x', 100))::text, 'UTF8'), "
        '\'{"source": "fleet-bench"}\'::jsonb'
    )
    insert = f"INSERT INTO {SCHEMA}.outbox (topic, key, payload, headers) "
    if rows_per_tx >= rows:
        return f"{insert}{select} FROM generate_series(1, {rows}) g"
    return f"""
DO $$
BEGIN
    FOR t IN 0..({rows} - 1) / {rows_per_tx} LOOP
        {insert}{select}
        FROM generate_series(t * {rows_per_tx} + 1, least((t + 1) * {rows_per_tx}, {rows})) g;
        COMMIT;
    END LOOP;
END
$$"""


# --- figures --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (values need not be sorted; ``inf`` counts as a missing sample)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def latency_summary(samples_ms: list[float]) -> dict[str, Any]:
    """p50/p90/p99/max of commit-to-broker latencies; a message that never arrived is ``inf`` (so a
    p99 over 1% of missing messages is infinite, not the p99 of the ones that made it)."""
    if not samples_ms:
        return {"n": 0}
    missing = sum(1 for s in samples_ms if math.isinf(s))

    def r(v: float) -> float | None:
        return None if math.isinf(v) or math.isnan(v) else round(v, 1)

    return {
        "n": len(samples_ms),
        "missing": missing,
        "p50_ms": r(percentile(samples_ms, 50)),
        "p90_ms": r(percentile(samples_ms, 90)),
        "p99_ms": r(percentile(samples_ms, 99)),
        "max_ms": r(max(samples_ms)),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# --- the API, as a process ------------------------------------------------------------------------


@dataclass
class Tenant:
    name: str
    key: str


class Api:
    """The REST API over HTTP, as a user calls it; ``concurrency`` requests at a time, transient
    failures (5xx, a dropped connection) retried a few times."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=120)
        self.limit = asyncio.Semaphore(concurrency)

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, *, key: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {key}"}
        for attempt in range(4):
            async with self.limit:
                try:
                    response = await self.http.request(method, path, json=body, headers=headers)
                except httpx.TransportError as exc:
                    if attempt == 3:
                        raise RuntimeError(f"{method} {path}: {exc!r}") from exc
                    await asyncio.sleep(0.5 * 2**attempt)
                    continue
            if response.status_code >= 500 and attempt < 3:
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if response.status_code >= 300:
                raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
            return response.json() if response.content else None
        raise AssertionError("unreachable")

    async def tenant(self, name: str) -> Tenant:
        await self.call("PUT", f"/v1/tenants/{name}", key=ADMIN_KEY, body={"display_name": name})
        created = await self.call("POST", f"/v1/tenants/{name}/api-keys", key=ADMIN_KEY, body={"description": "bench"})
        return Tenant(name=name, key=created["key"])


# --- the bench and one case's environment --------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    teardown: Teardown
    run_id: str
    pg: PrivatePostgres
    queue_redis: PrivateRedis
    target_redis: PrivateRedis
    admin: asyncpg.Pool
    target: aioredis.Redis
    """A client of the target Redis, for counting stream entries."""
    secret_key: str = field(default_factory=generate_key)
    _keys: dict[int, list[str]] = field(default_factory=dict)

    @property
    def lease_ttl_s(self) -> float:
        """The workers' lease TTL: ``--worker-env OUTBOX_RELAY_LEASE_TTL_S=...`` or the default."""
        extra = dict(kv.split("=", 1) for kv in self.args.worker_env)
        return float(extra.get("OUTBOX_RELAY_LEASE_TTL_S", DEFAULT_LEASE_TTL_S))

    def scaled(self, n: float, minimum: int) -> int:
        return max(minimum, round(n * float(self.args.scale)))

    async def partition_keys(self, dsn: str, partitions: int) -> list[str]:
        """One message key per relay partition (``keys[p]`` lands in partition ``p`` of a relay with
        ``partitions`` partitions): asks the outbox itself which bucket each candidate key hashes to
        (an insert that is rolled back), and maps buckets as the schema documents (bucket % N)."""
        if partitions in self._keys:
            return self._keys[partitions]

        class Rollback(Exception):
            pass

        found: dict[int, str] = {}
        conn = await asyncpg.connect(dsn)
        try:
            with contextlib.suppress(Rollback):
                async with conn.transaction():
                    rows = await conn.fetch(
                        f"INSERT INTO {SCHEMA}.outbox (topic, key, payload) "
                        "SELECT 'fleet-bench-keys', 'probe-' || g, '\\x'::bytea FROM generate_series(1, 20000) g "
                        "RETURNING key, bucket"
                    )
                    raise Rollback
        finally:
            await conn.close()
        for row in rows:
            found.setdefault(int(row["bucket"]) % partitions, row["key"])
        if len(found) < partitions:
            raise RuntimeError(f"found keys for only {len(found)} of {partitions} partitions")
        self._keys[partitions] = [found[p] for p in range(partitions)]
        return self._keys[partitions]

    async def create_database(self, name: str) -> str:
        async with self.admin.acquire() as conn:
            await conn.execute(f'CREATE DATABASE "{name}"')
        return self.pg.dsn(name)

    async def drop_database(self, name: str) -> None:
        async with self.admin.acquire() as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class CaseEnv:
    """One case's world: a fresh control DB (migrated by ``outbox-relay migrate``), the API process,
    the workers it starts, the tenant databases it creates; all removed on exit, and both Redis
    servers flushed, so that cases do not see each other."""

    def __init__(self, bench: Bench, case: str) -> None:
        self.bench, self.case = bench, case
        self.control_db = f"fb_{case}_control"
        self.queue = f"fleet-bench-{bench.run_id}-{case}"
        self.databases: list[str] = []
        self.workers: list[Proc] = []
        self.api_proc: Proc | None = None
        self.api: Api | None = None
        self._control: asyncpg.Pool | None = None
        self._started = 0

    @property
    def http(self) -> Api:
        assert self.api is not None
        return self.api

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of an API or worker process: only the settings every engine reads."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_RELAY_")}
        env.update(
            OUTBOX_RELAY_DATABASE_URL=self.bench.pg.dsn(self.control_db),
            OUTBOX_RELAY_REDIS_URL=self.bench.queue_redis.url(),
            OUTBOX_RELAY_SECRET_KEYS=self.bench.secret_key,
            OUTBOX_RELAY_ALLOW_PRIVATE_NETWORKS="1",
            OUTBOX_RELAY_QUEUE_NAME=self.queue,
            # the bench's own operator: the wide relay needs 1,024 partitions, one tenant's backlog
            # relay more than the default partition quota, and nobody here guesses keys
            OUTBOX_RELAY_MAX_RELAY_PARTITIONS="1024",
            OUTBOX_RELAY_QUOTA_PARTITIONS="100000",
            OUTBOX_RELAY_QUOTA_RELAYS="10000",
            OUTBOX_RELAY_AUTH_FAILURE_LIMIT="0",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    async def __aenter__(self) -> CaseEnv:
        try:
            return await self._enter()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise

    async def _enter(self) -> CaseEnv:
        bench = self.bench
        await bench.create_database(self.control_db)
        migrate = await asyncio.create_subprocess_exec(
            *outbox_relay_command("migrate"),
            env=self.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(migrate.communicate(), timeout=120)
        if migrate.returncode != 0:
            raise RuntimeError(f"outbox-relay migrate failed: {out.decode(errors='replace')[-2000:]}")
        port = free_port()
        self.api_proc = start_process(
            bench.teardown,
            f"api {self.case}",
            outbox_relay_command("serve", "--port", str(port)),
            self.env(
                OUTBOX_RELAY_ADMIN_API_KEY=ADMIN_KEY, OUTBOX_RELAY_HOST="127.0.0.1", OUTBOX_RELAY_LOG_LEVEL="WARNING"
            ),
            RESULTS_DIR / f"fleet-{bench.run_id}-{self.case}-api.log",
        )
        self.api = Api(f"http://127.0.0.1:{port}", bench.args.api_concurrency)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await self.api.http.get("/readyz")).status_code == 200:
                    break
            if not self.api_proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start: {self.api_proc.log_tail()}")
            await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers:
            await worker.stop_async()
        if self.api is not None:
            await self.api.close()
        if self.api_proc is not None:
            await self.api_proc.stop_async()
        if self._control is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._control.close(), timeout=10)
        for name in [*self.databases, self.control_db]:
            try:
                await asyncio.wait_for(self.bench.drop_database(name), timeout=120)
            except Exception as e:
                log(f"dropping database {name} failed: {e!r}")
        for r in (self.bench.queue_redis, self.bench.target_redis):
            with contextlib.suppress(Exception):
                await r.flush()

    # --- workers ----------------------------------------------------------------------------------

    def worker_id(self, n: int) -> str:
        return f"fb-{self.case}-w{n}"

    async def start_worker(self) -> Proc:
        """An ``outbox-relay worker`` process; returns once it holds a connection to the control DB
        (whatever the engine, it has started up by then)."""
        self._started += 1
        n = self._started
        extra = dict(kv.split("=", 1) for kv in self.bench.args.worker_env)
        worker = start_process(
            self.bench.teardown,
            f"worker {self.worker_id(n)}",
            outbox_relay_command("worker"),
            self.env(OUTBOX_RELAY_WORKER_ID=self.worker_id(n), **extra),
            RESULTS_DIR / f"fleet-{self.bench.run_id}-{self.case}-w{n}.log",
        )
        self.workers.append(worker)
        deadline = time.monotonic() + 60
        while True:
            by_db = await self.connections({worker.pid: "w"})
            if by_db.get("w", {}).get(self.control_db):
                return worker
            if not worker.alive():
                raise RuntimeError(f"worker {n} exited with {worker.process.returncode}: {worker.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {n} did not connect to the control DB within 60 s: {worker.log_tail()}")
            await asyncio.sleep(0.2)

    def live_workers(self) -> list[Proc]:
        return [w for w in self.workers if w.alive()]

    # --- meters -----------------------------------------------------------------------------------

    async def connections(self, procs: dict[int, str]) -> dict[str, dict[str, int]]:
        """Connections to the cluster per process (``procs``: pid -> label) and database."""
        owners = tcp_port_owners(list(procs), remote_port=self.bench.pg.port)
        out: dict[str, dict[str, int]] = {}
        async with self.bench.admin.acquire() as conn:
            rows = await conn.fetch(
                "SELECT datname, client_port FROM pg_stat_activity "
                "WHERE client_port IS NOT NULL AND datname IS NOT NULL"
            )
        for row in rows:
            pid = owners.get(row["client_port"])
            if pid is not None:
                per_db = out.setdefault(procs[pid], {})
                per_db[row["datname"]] = per_db.get(row["datname"], 0) + 1
        return out

    async def snapshot(self) -> dict[str, Any]:
        async with self.bench.admin.acquire() as conn:
            stats = await conn.fetch(
                "SELECT datname, tup_returned + tup_fetched AS read, "
                "tup_inserted + tup_updated + tup_deleted AS written, xact_commit + xact_rollback AS xacts "
                "FROM pg_stat_database WHERE datname IS NOT NULL"
            )
            backends = await conn.fetch(
                "SELECT pid, client_port FROM pg_stat_activity WHERE client_port IS NOT NULL AND datname IS NOT NULL"
            )
        control = next((r for r in stats if r["datname"] == self.control_db), None)
        tenants = [r for r in stats if r["datname"] in set(self.databases)]
        live = self.live_workers()
        owners = tcp_port_owners([w.pid for w in live], remote_port=self.bench.pg.port)
        return {
            "t": time.perf_counter(),
            "workers": {w.pid: process_cpu_s(w.pid) for w in live},
            "pg": self.bench.pg.cpu_s(),
            # the backends that serve the workers' connections (found by client port): PostgreSQL's
            # CPU spent on the workers, without autovacuum's visits to every database, which come and
            # go with the number of databases in the cluster, not with what the workers do
            "pg_workers": {r["pid"]: process_cpu_s(r["pid"]) for r in backends if r["client_port"] in owners},
            "queue_redis": await self.bench.queue_redis.commandstats(),
            "target_redis": await self.bench.target_redis.commands(),
            "control": dict(control) if control else {},
            "tenant_read": sum(r["read"] for r in tenants),
            "tenant_xacts": sum(r["xacts"] for r in tenants),
        }

    async def window(self, seconds: float, *, label: str) -> dict[str, Any]:
        """CPU as fractions of one core (each worker, the PostgreSQL cluster), Redis commands/s and
        control-DB row and transaction rates over ``seconds`` of whatever is going on."""
        statements = self.bench.args.statements
        if statements:
            await self._reset_statements()
        a = await self.snapshot()
        await asyncio.sleep(seconds)
        b = await self.snapshot()
        out = figures(a, b, {w.pid: w.name for w in self.workers})
        out["label"] = label
        if statements:
            out["top_statements"] = await self._top_statements(b["t"] - a["t"])
        return out

    async def _reset_statements(self) -> None:
        async with self.bench.admin.acquire() as conn:
            await conn.execute("SELECT pg_stat_statements_reset()")

    async def _top_statements(self, seconds: float, limit: int = 8) -> list[dict[str, Any]]:
        async with self.bench.admin.acquire() as conn:
            rows = await conn.fetch(
                "SELECT d.datname, s.calls, s.total_exec_time, s.rows, "
                "left(regexp_replace(s.query, '\\s+', ' ', 'g'), 160) AS query "
                "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                "ORDER BY s.total_exec_time DESC LIMIT $1",
                limit * 4,
            )
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            where = (
                "control" if r["datname"] == self.control_db else "tenant" if r["datname"] != "postgres" else "bench"
            )
            m = merged.setdefault(
                (where, r["query"]), {"db": where, "query": r["query"], "calls": 0, "ms": 0.0, "rows": 0}
            )
            m["calls"] += r["calls"]
            m["ms"] += r["total_exec_time"]
            m["rows"] += r["rows"]
        top = sorted(merged.values(), key=lambda m: -m["ms"])[:limit]
        return [
            {
                "db": m["db"],
                "calls_per_s": round(m["calls"] / seconds, 1),
                "exec_ms_per_s": round(m["ms"] / seconds, 1),
                "rows_per_s": round(m["rows"] / seconds, 1),
                "query": m["query"],
            }
            for m in top
        ]

    async def control(self) -> asyncpg.Pool:
        """The bench's own connections to the control DB (for the ownership samples)."""
        if self._control is None:
            self._control = await asyncpg.create_pool(
                self.bench.pg.dsn(self.control_db), min_size=1, max_size=2, command_timeout=30
            )
        assert self._control is not None
        return self._control

    async def ownership(self) -> dict[str, int]:
        """Partitions held per worker id (``--ownership-sql`` on the control DB)."""
        rows = await (await self.control()).fetch(self.bench.args.ownership_sql)
        return {str(r[0]): int(r[1]) for r in rows}

    async def ever_leased(self) -> dict[str, Any]:
        try:
            row = await (await self.control()).fetchrow(EVER_LEASED_SQL)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        assert row is not None
        return {"ever_leased": row["ever"], "partitions": row["total"]}

    # --- tenants ----------------------------------------------------------------------------------

    async def tenant_database(self, tenant: Tenant, pg_name: str, api_name: str = "app") -> str:
        """A new PostgreSQL database, registered and provisioned through the API; returns its DSN."""
        dsn = await self.bench.create_database(pg_name)
        self.databases.append(pg_name)
        await self.http.call("PUT", f"/v1/databases/{api_name}", key=tenant.key, body={"dsn": dsn})
        await self.http.call("POST", f"/v1/databases/{api_name}/provision", key=tenant.key)
        return dsn

    async def redis_target(self, tenant: Tenant, name: str = "redis") -> None:
        body = {"kind": "redis_streams", "url": self.bench.target_redis.url()}
        await self.http.call("PUT", f"/v1/targets/{name}", key=tenant.key, body=body)

    async def put_relay(self, tenant: Tenant, name: str, body: dict[str, Any]) -> None:
        await self.http.call("PUT", f"/v1/relays/{name}", key=tenant.key, body=body)

    async def delete_relay(self, tenant: Tenant, name: str) -> None:
        await self.http.call("DELETE", f"/v1/relays/{name}", key=tenant.key)


def relay_body(
    destination: str, *, partitions: int = PARTITIONS, enabled: bool = True, database: str = "app"
) -> dict[str, Any]:
    return {
        "database": database,
        "target": "redis",
        "topic_mapping": {"*": destination},
        "partitions": partitions,
        "enabled": enabled,
    }


def figures(a: dict[str, Any], b: dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    """What happened between two snapshots, per second."""
    seconds: float = b["t"] - a["t"]
    # a worker that exited inside the window reads 0 at its end: count it as idle from then on
    workers = {
        names.get(pid, str(pid)): max(0.0, b["workers"].get(pid, 0.0) - cpu) / seconds
        for pid, cpu in a["workers"].items()
    }
    calls = {k: v - a["queue_redis"].get(k, 0) for k, v in b["queue_redis"].items()}
    redis_total = sum(calls.values()) - 1  # the meter's own INFO
    control_a, control_b = a["control"], b["control"]

    def rate(key: str) -> float | None:
        if key not in control_a or key not in control_b:
            return None
        return round(float(control_b[key] - control_a[key]) / seconds, 1)

    return {
        "seconds": round(seconds, 2),
        "worker_cores": round(sum(workers.values()), 4),
        "per_worker_cores": {k: round(v, 4) for k, v in workers.items()},
        "pg_cores": round((b["pg"] - a["pg"]) / seconds, 4),
        # a backend that started in the window counts from 0, one that ended in it is left out
        "pg_for_workers_cores": round(
            sum(max(0.0, cpu - a["pg_workers"].get(pid, 0.0)) for pid, cpu in b["pg_workers"].items()) / seconds, 4
        ),
        "redis_cmds_per_s": round(redis_total / seconds, 1),
        "redis_top_commands_per_s": {
            k: round(v / seconds, 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6] if v > 0
        },
        "target_redis_cmds_per_s": round((b["target_redis"] - a["target_redis"] - 1) / seconds, 1),
        "control_rows_read_per_s": rate("read"),
        "control_rows_written_per_s": rate("written"),
        "control_xacts_per_s": rate("xacts"),
        "tenant_rows_read_per_s": round((b["tenant_read"] - a["tenant_read"]) / seconds, 1),
        "tenant_xacts_per_s": round((b["tenant_xacts"] - a["tenant_xacts"]) / seconds, 1),
    }


# --- traffic and deliveries --------------------------------------------------------------------------


def entry_ms(entry_id: bytes | str) -> int:
    """The ms timestamp part of a Redis stream entry id (``<ms>-<seq>``, given by ``XADD *``)."""
    return int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])


class Deliveries:
    """Commit times of the messages the bench wrote (by probe id) and arrival times on the broker
    (by probe id and relay: one message reaches every relay of its database). One process, one
    clock (``time.perf_counter``) for commit -> seen by the bench's reader; and, beside it, commit
    (``time.time()``) -> the broker's own stamp of the entry (the ms part of the id Redis gave it
    at its ``XADD *``; ms resolution, the same machine's clock): the time the broker had it, not
    when this process, competing for the same two cores, got round to reading it."""

    def __init__(self) -> None:
        self.committed: dict[str, float] = {}
        self.committed_wall: dict[str, float] = {}
        self.received: dict[tuple[str, str], float] = {}
        self.stamped_ms: dict[tuple[str, str], int] = {}
        self.duplicates = 0

    def commit(self, probe: str, at: float | None = None) -> None:
        """Record ``probe`` committed now (or at perf_counter ``at``, taken just before)."""
        now = time.perf_counter()
        self.committed[probe] = now if at is None else at
        self.committed_wall[probe] = time.time() - (0.0 if at is None else now - at)

    def on_entry(self, fields: dict[bytes, bytes], at: float, entry_id: bytes | str) -> None:
        try:
            probe = str(json.loads(fields[b"payload"])["p"])
        except (KeyError, ValueError, TypeError):
            return
        key = (probe, fields.get(b"h:outbox-relay", b"").decode())
        if key in self.received:
            self.duplicates += 1
        else:
            self.received[key] = at
            self.stamped_ms[key] = entry_ms(entry_id)

    def broker_latency_ms(self, probe: str, relay: str) -> float:
        """Commit -> the broker's stamp (see the class); ``inf`` if it never arrived."""
        stamped = self.stamped_ms.get((probe, relay))
        committed = self.committed_wall.get(probe)
        if stamped is None or committed is None:
            return math.inf
        return max(0.0, stamped - committed * 1000)

    def latency_ms(self, probe: str, relay: str) -> float:
        at = self.received.get((probe, relay))
        committed = self.committed.get(probe)
        if at is None or committed is None:
            return math.inf
        return (at - committed) * 1000

    async def wait(self, expected: Iterable[tuple[str, str]], timeout_s: float, watch: StreamWatch) -> bool:
        pending = set(expected)
        deadline = time.perf_counter() + timeout_s
        while True:
            pending = {k for k in pending if k not in self.received}
            if not pending:
                return True
            watch.check()
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.05)


class StreamWatch:
    """Reads streams of the target Redis from their start (``XREAD BLOCK``) and hands every entry,
    with the time it arrived, to ``on_entry``."""

    def __init__(
        self, url: str, streams: list[str], on_entry: Callable[[dict[bytes, bytes], float, bytes | str], None]
    ) -> None:
        self.url, self.streams, self.on_entry = url, streams, on_entry
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        client = aioredis.Redis.from_url(self.url)
        last: dict[Any, Any] = {s: "0-0" for s in self.streams}
        try:
            while True:
                reply = await client.xread(last, count=2000, block=100)
                now = time.perf_counter()
                for stream, entries in reply or []:
                    for entry_id, fields in entries:
                        last[stream.decode() if isinstance(stream, bytes) else stream] = entry_id
                        self.on_entry(fields, now, entry_id)
        finally:
            await client.aclose()

    def check(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()

    async def __aenter__(self) -> StreamWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def stream_length(bench: Bench, stream: str) -> int:
    return int(await bench.target.xlen(stream))


async def write_at_rate(
    conns: list[asyncpg.Connection], rate: float, seconds: float, *, topic: str, tag: str, deliveries: Deliveries
) -> dict[str, Any]:
    """``rate`` messages/s for ``seconds``, one per transaction, spread over ``conns`` on a fixed
    schedule (a writer that falls behind stops at twice ``seconds``). Probe ids ``<tag><seq>``."""
    total = int(rate * seconds)
    started = time.perf_counter()
    behind = 0.0
    written = 0

    async def writer(w: int) -> None:
        nonlocal behind, written
        for seq in range(w, total, len(conns)):
            if time.perf_counter() > started + 2 * seconds:
                return
            delay = started + seq / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                behind = max(behind, -delay)
            probe = f"{tag}{seq}"
            await add(conns[w], topic, f"key-{seq % 1000:04d}", {"p": probe, "note": PAYLOAD_NOTE})
            deliveries.commit(probe)
            written += 1

    await asyncio.gather(*(writer(w) for w in range(len(conns))))
    elapsed = time.perf_counter() - started
    return {"written": written, "write_rate": round(written / elapsed, 1), "writer_max_behind_ms": round(behind * 1000)}


async def drain(
    env: CaseEnv, stream: str, n: int, enable: Callable[[], Awaitable[None]], *, cap_s: float
) -> dict[str, Any]:
    """Enable a relay over a pre-loaded outbox and watch its stream fill (``XLEN`` every 50 ms)
    until it holds ``n`` entries, ``cap_s`` pass, or nothing arrives for 30 s. Rates: from the
    enabling call (``msgs_per_s``), and from the first entry to the last (``steady_msgs_per_s``);
    CPU over the whole time (PostgreSQL's also per message). When the stream was empty before, the
    times come from its first and last entry ids (Redis stamps each ``XADD *`` with its clock in
    ms, the machine's clock): the 50 ms poll alone made a 0.4 s drain's rate +-12%."""
    before = await env.snapshot()
    empty = await stream_length(env.bench, stream) == 0
    t_enable, wall_enable = time.perf_counter(), time.time()
    await enable()
    first: tuple[float, int] | None = None
    last_t, count, capped = t_enable, 0, False
    while True:
        now = time.perf_counter()
        c = await stream_length(env.bench, stream)
        if c != count:
            count, last_t = c, now
            if first is None:
                first = (now, c)
        if count >= n:
            break
        if now - t_enable > cap_s:
            capped, last_t = True, now
            break
        if now - last_t > 30:
            break
        await asyncio.sleep(0.05)
    after = await env.snapshot()
    f = figures(before, after, {w.pid: w.name for w in env.workers})
    elapsed = last_t - t_enable
    first_after = first[0] - t_enable if first else None
    steady = None
    if first is not None and last_t > first[0]:
        steady = round((count - first[1]) / (last_t - first[0]), 1)
    clock = "poll"
    if empty and count > 1 and not capped:
        first_ms, last_ms = await entry_times(env.bench, stream)
        elapsed, first_after = last_ms / 1000 - wall_enable, first_ms / 1000 - wall_enable
        if last_ms > first_ms:
            steady = round((count - 1) / ((last_ms - first_ms) / 1000), 1)
        clock = "stream ids"
    pg_s = f["pg_cores"] * f["seconds"]
    worker_s = f["worker_cores"] * f["seconds"]
    return {
        "messages": n,
        "delivered": count,
        "capped_at_s": cap_s if capped else None,
        "stalled": count < n and not capped,
        "seconds": round(elapsed, 3),
        "first_after_s": round(first_after, 3) if first_after is not None else None,
        "timed_by": clock,
        "msgs_per_s": round(count / elapsed, 1) if elapsed > 0 else None,
        "steady_msgs_per_s": steady,
        "pg_cpu_us_per_msg": round(pg_s / count * 1e6, 1) if count else None,
        "worker_cpu_us_per_msg": round(worker_s / count * 1e6, 1) if count else None,
        "cpu": f,
    }


async def entry_times(bench: Bench, stream: str) -> tuple[int, int]:
    """The ms timestamps of a stream's first and last entry (the time part of their ids)."""
    first = await bench.target.xrange(stream, count=1)
    last = await bench.target.xrevrange(stream, count=1)

    return entry_ms(first[0][0]), entry_ms(last[0][0])


async def preload(dsn: str, rows: int, rows_per_tx: int) -> float:
    """Write ``rows`` bulk messages; returns the seconds it took."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, command_timeout=3600)
    try:
        await conn.execute(preload_sql(rows, rows_per_tx))
        await conn.execute(f"ANALYZE {SCHEMA}.outbox")
    finally:
        await conn.close()
    return round(time.perf_counter() - started, 1)


# --- cases: the fleet of idle relays (rows 1-3) --------------------------------------------------------


@dataclass
class FleetDb:
    index: int
    tenant: Tenant
    pg_name: str
    dsn: str
    relays: list[str]


async def grow_fleet(env: CaseEnv, fleet: list[FleetDb], n_dbs: int, *, prefix: str) -> None:
    """Grow the fleet to ``n_dbs`` tenants, each with one database, one Redis target and
    RELAYS_PER_DB relays of PARTITIONS partitions (all enabled, topic mapping
    ``{"*": "<prefix>:{topic}"}``)."""
    started = time.perf_counter()
    limit = asyncio.Semaphore(env.bench.args.api_concurrency)

    async def one(i: int) -> FleetDb:
        async with limit:
            tenant = await env.http.tenant(f"t{i:04d}")
            pg_name = f"fb_{env.case}_t{i:04d}"
            dsn = await env.tenant_database(tenant, pg_name)
            await env.redis_target(tenant)
            relays = [f"r{i:04d}-{j}" for j in range(RELAYS_PER_DB)]
            for name in relays:
                await env.put_relay(tenant, name, relay_body(f"{prefix}:{{topic}}"))
            return FleetDb(index=i, tenant=tenant, pg_name=pg_name, dsn=dsn, relays=relays)

    fleet.extend(await asyncio.gather(*(one(i) for i in range(len(fleet), n_dbs))))
    log(
        f"{env.case}: fleet of {len(fleet)} databases, {len(fleet) * RELAYS_PER_DB} relays "
        f"({time.perf_counter() - started:.1f} s to configure)"
    )


async def first_messages(env: CaseEnv, fleet: list[FleetDb], *, prefix: str, samples: int) -> dict[str, Any]:
    """One message each into ``samples`` different idle databases (0.5 s apart); every relay of the
    database delivers it. Latency commit -> broker for the first relay and for every relay."""
    bench = env.bench
    k = min(samples, len(fleet))
    chosen = [fleet[i * len(fleet) // k] for i in range(k)]
    keys = await bench.partition_keys(chosen[0].dsn, PARTITIONS)
    deliveries = Deliveries()
    topic = "first"
    conns = [await asyncpg.connect(db.dsn) for db in chosen]
    try:
        async with StreamWatch(bench.target_redis.url(), [f"{prefix}:{topic}"], deliveries.on_entry) as watch:
            for i, conn in enumerate(conns):
                probe = f"first-{i}"
                await add(conn, topic, random.choice(keys), {"p": probe, "note": PAYLOAD_NOTE})
                deliveries.commit(probe)
                await asyncio.sleep(0.5)
            expected = [(f"first-{i}", relay) for i, db in enumerate(chosen) for relay in db.relays]
            await deliveries.wait(expected, bench.args.delivery_timeout_s, watch)
    finally:
        for conn in conns:
            await conn.close()
    first, every = [], []
    for i, db in enumerate(chosen):
        per_relay = [deliveries.latency_ms(f"first-{i}", relay) for relay in db.relays]
        first.append(min(per_relay))
        every.extend(per_relay)
    return {
        "relays_configured": len(fleet) * RELAYS_PER_DB,
        "samples": len(chosen),
        "first_relay": latency_summary(first),
        "every_relay": latency_summary(every),
        "timeout_s": bench.args.delivery_timeout_s,
    }


async def probe_every_partition(env: CaseEnv, fleet: list[FleetDb], *, prefix: str) -> dict[str, Any]:
    """One message per partition key into every database (one transaction per database): each
    relay partition of the fleet then has one message to deliver. Served = delivered within
    ``--served-within-s`` of its commit."""
    bench = env.bench
    keys = await bench.partition_keys(fleet[0].dsn, PARTITIONS)
    deliveries = Deliveries()
    topic = "served"
    limit = asyncio.Semaphore(8)

    async def write(db: FleetDb) -> None:
        async with limit:
            conn = await asyncpg.connect(db.dsn)
            try:
                async with conn.transaction():
                    await add_many(
                        conn,
                        [
                            Message(topic, keys[p], {"p": f"{db.index}:{p}", "note": PAYLOAD_NOTE})
                            for p in range(PARTITIONS)
                        ],
                    )
                now = time.perf_counter()
                for p in range(PARTITIONS):
                    deliveries.commit(f"{db.index}:{p}", now)
            finally:
                await conn.close()

    expected = [(f"{db.index}:{p}", relay) for db in fleet for relay in db.relays for p in range(PARTITIONS)]
    async with StreamWatch(bench.target_redis.url(), [f"{prefix}:{topic}"], deliveries.on_entry) as watch:
        started = time.perf_counter()
        await asyncio.gather(*(write(db) for db in fleet))
        write_s = time.perf_counter() - started
        await deliveries.wait(expected, bench.args.delivery_timeout_s, watch)
    latencies = [deliveries.latency_ms(probe, relay) for probe, relay in expected]
    within = bench.args.served_within_s
    return {
        "partitions": len(expected),
        "served_within_s": within,
        "served": sum(1 for v in latencies if v <= within * 1000),
        "served_by_timeout": sum(1 for v in latencies if not math.isinf(v)),
        "timeout_s": bench.args.delivery_timeout_s,
        "probe_write_s": round(write_s, 2),
        "latency": latency_summary(latencies),
        "duplicates": deliveries.duplicates,
    }


async def case_fleet(bench: Bench, selected: set[str]) -> dict[str, Any]:
    """Rows 1-3: 100 idle relays, then 1,000 idle relays over 200 databases (one worker each time,
    a fresh worker process per fleet size; a window with no worker first, as PostgreSQL's baseline:
    autovacuum visits every database of the cluster)."""
    args = bench.args
    prefix = "fb:fleet"
    results: dict[str, Any] = {}
    async with CaseEnv(bench, "fleet") as env:
        fleet: list[FleetDb] = []
        sizes: list[tuple[str, int]] = []
        if selected & {"idle100", "first_message"}:
            sizes.append(("100", bench.scaled(100 / RELAYS_PER_DB, 1)))
        if selected & {"idle1000", "first_message"}:
            sizes.append(("1000", bench.scaled(1000 / RELAYS_PER_DB, 2)))
        for label, n_dbs in sizes:
            await grow_fleet(env, fleet, n_dbs, prefix=prefix)
            part: dict[str, Any] = {"databases": n_dbs, "relays": n_dbs * RELAYS_PER_DB}
            part["baseline"] = await env.window(max(5.0, args.window_s / 2), label="no worker")
            worker = await env.start_worker()
            await asyncio.sleep(args.warmup_s)
            part["idle"] = await env.window(args.window_s, label=f"{label} idle relays")
            part["connections"] = (await env.connections({worker.pid: "worker"})).get("worker", {})
            part["ever_leased"] = await env.ever_leased()
            log(
                f"fleet {label}: worker {part['idle']['worker_cores']:.1%}, PostgreSQL {part['idle']['pg_cores']:.1%} "
                f"(baseline {part['baseline']['pg_cores']:.1%}), {part['idle']['redis_cmds_per_s']} Redis cmd/s"
            )
            if "first_message" in selected:
                part["first_message"] = await first_messages(env, fleet, prefix=prefix, samples=args.first_samples)
                log(f"fleet {label}: first message {part['first_message']['every_relay']}")
            if label == "1000" and "idle1000" in selected:
                part["probes"] = await probe_every_partition(env, fleet, prefix=prefix)
                log(f"fleet {label}: {part['probes']['served']} of {part['probes']['partitions']} partitions served")
            results[label] = part
            await worker.stop_async()
    return results


# --- cases: throughput ---------------------------------------------------------------------------------


async def single_tenant(env: CaseEnv, name: str = "acme") -> Tenant:
    tenant = await env.http.tenant(name)
    await env.redis_target(tenant)
    return tenant


async def case_wide(bench: Bench) -> dict[str, Any]:
    """Row 4: 20,000 messages through a relay of 1,024 partitions beside one of 16; then the wide
    relay idle."""
    args = bench.args
    n = bench.scaled(20_000, 1000)
    wide = min(1024, bench.scaled(1024, 32))
    async with CaseEnv(bench, "wide") as env:
        tenant = await single_tenant(env)
        out: dict[str, Any] = {"messages": n, "wide_partitions": wide}
        for label, partitions in (("p16", PARTITIONS), ("wide", wide)):
            dsn = await env.tenant_database(tenant, f"fb_wide_{label}", label)
            await env.put_relay(
                tenant, label, relay_body(f"fb:wide:{label}", partitions=partitions, enabled=False, database=label)
            )
            out[f"{label}_preload_s"] = await preload(dsn, n, 10)
        out["baseline"] = await env.window(max(5.0, args.window_s / 2), label="no worker")
        await env.start_worker()
        await asyncio.sleep(args.warmup_s / 2)
        for label, partitions in (("p16", PARTITIONS), ("wide", wide)):
            body = relay_body(f"fb:wide:{label}", partitions=partitions, database=label)
            enable = functools.partial(env.put_relay, tenant, label, body)
            out[label] = await drain(env, f"fb:wide:{label}", n, enable, cap_s=args.drain_cap_s)
            log(
                f"wide: {partitions} partitions: {out[label]['msgs_per_s']} msg/s from enabling, "
                f"{out[label]['seconds']} s"
            )
            if label == "p16":
                await env.delete_relay(tenant, label)
        await asyncio.sleep(args.warmup_s)
        out["idle"] = await env.window(args.window_s, label=f"{wide} partitions idle")
    return out


async def drains(bench: Bench, case: str, loads: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Pre-load one database per ``(label, rows, rows_per_tx)``, each with a disabled relay of
    PARTITIONS partitions; then, with one worker, enable one relay after the other and time its
    drain (capped at ``--drain-cap-s``; the previous relay is deleted first)."""
    args = bench.args
    async with CaseEnv(bench, case) as env:
        tenant = await single_tenant(env)
        out: dict[str, Any] = {}
        dsns: dict[str, str] = {}
        for label, rows, per_tx in loads:
            dsns[label] = await env.tenant_database(tenant, f"fb_{case}_{label}", label)
            await env.put_relay(tenant, label, relay_body(f"fb:{case}:{label}", enabled=False, database=label))
            out[label] = {"rows": rows, "rows_per_tx": per_tx, "preload_s": await preload(dsns[label], rows, per_tx)}
            log(f"{case}: {label}: {rows} rows pre-loaded in {out[label]['preload_s']} s")
        if case == "bigtx":
            out["poll_diagnostic"] = {label: await poll_diagnostic(dsns[label]) for label, _, _ in loads}
        await env.start_worker()
        await asyncio.sleep(args.warmup_s / 2)
        previous: str | None = None
        for label, rows, _ in loads:
            if previous is not None:
                await env.delete_relay(tenant, previous)
            body = relay_body(f"fb:{case}:{label}", database=label)
            out[label].update(
                await drain(
                    env,
                    f"fb:{case}:{label}",
                    rows,
                    functools.partial(env.put_relay, tenant, label, body),
                    cap_s=args.drain_cap_s,
                )
            )
            log(f"{case}: {label}: {out[label]['steady_msgs_per_s']} msg/s steady, {out[label]['delivered']} delivered")
            previous = label
    return out


async def poll_diagnostic(dsn: str) -> dict[str, Any]:
    """Today's engine only: how long its poll (``outbox_relay.tenant.sql.poll_sql``, 100 rows of
    partition 0 of 16) takes with the cursor in the middle of the outbox. Skipped when that
    function is gone or changed."""
    try:
        from outbox_relay.tenant.sql import poll_sql

        conn = await asyncpg.connect(dsn)
        try:
            mid = await conn.fetchrow(
                f"SELECT txid::text::bigint AS txid, id FROM {SCHEMA}.outbox ORDER BY txid, id "
                f"OFFSET (SELECT count(*) / 2 FROM {SCHEMA}.outbox) LIMIT 1"
            )
            assert mid is not None
            times = []
            for _ in range(5):
                started = time.perf_counter()
                await conn.fetch(poll_sql(SCHEMA), mid["txid"], mid["id"], PARTITIONS, 0, 100)
                times.append((time.perf_counter() - started) * 1000)
        finally:
            await conn.close()
        return {"poll_ms_median": round(sorted(times)[2], 2), "cursor": f"{mid['txid']}:{mid['id']}"}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


async def case_backlog(bench: Bench) -> dict[str, Any]:
    """Row 5: one relay draining a 10,000-row backlog, then (fresh database) a 1,000,000-row one."""
    small, big = bench.scaled(10_000, 1000), bench.scaled(1_000_000, 20_000)
    return await drains(bench, "backlog", [("small", small, 100), ("big", big, 100)])


async def case_bigtx(bench: Bench) -> dict[str, Any]:
    """Row 6: N rows written 1,000 per transaction, then N rows in one INSERT (one transaction)."""
    n = bench.scaled(bench.args.bigtx_rows, 20_000)
    return await drains(bench, "bigtx", [("per1000", n, 1000), ("onetx", n, n)])


# --- cases: latency ----------------------------------------------------------------------------------


async def latency_phase(
    env: CaseEnv, dsn: str, relay: str, stream: str, *, rate: float, seconds: float, writers: int, tag: str
) -> dict[str, Any]:
    """``rate`` msg/s for ``seconds`` into ``dsn`` (one message per transaction); latency commit ->
    broker of each on ``stream``; worker CPU while it lasts."""
    deliveries = Deliveries()
    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    try:
        async with StreamWatch(env.bench.target_redis.url(), [stream], deliveries.on_entry) as watch:
            before = await env.snapshot()
            written = await write_at_rate(conns, rate, seconds, topic="lat", tag=tag, deliveries=deliveries)
            after = await env.snapshot()
            await deliveries.wait([(p, relay) for p in deliveries.committed], 30, watch)
    finally:
        for conn in conns:
            await conn.close()
    f = figures(before, after, {w.pid: w.name for w in env.workers})
    return {
        **written,
        "latency": latency_summary([deliveries.latency_ms(p, relay) for p in deliveries.committed]),
        "broker_latency": latency_summary([deliveries.broker_latency_ms(p, relay) for p in deliveries.committed]),
        "duplicates": deliveries.duplicates,
        "cpu": f,
    }


async def warm_up_relay(env: CaseEnv, dsn: str, relay: str, stream: str) -> float:
    """Write one message and wait (up to the delivery timeout) for it: the relay runs by then."""
    deliveries = Deliveries()
    conn = await asyncpg.connect(dsn)
    try:
        async with StreamWatch(env.bench.target_redis.url(), [stream], deliveries.on_entry) as watch:
            await add(conn, "lat", "warm-up", {"p": "warm-up"})
            deliveries.commit("warm-up")
            await deliveries.wait([("warm-up", relay)], env.bench.args.delivery_timeout_s, watch)
    finally:
        await conn.close()
    return deliveries.latency_ms("warm-up", relay)


async def case_trickle(bench: Bench) -> dict[str, Any]:
    """Row 9: 1,000 msg/s written (4 connections, one message per transaction) into one relay."""
    args = bench.args
    rate = float(bench.scaled(1000, 50))
    async with CaseEnv(bench, "trickle") as env:
        tenant = await single_tenant(env)
        dsn = await env.tenant_database(tenant, "fb_trickle_app")
        await env.put_relay(tenant, "trickle", relay_body("fb:trickle:{topic}"))
        await env.start_worker()
        await asyncio.sleep(args.warmup_s / 2)
        warm = await warm_up_relay(env, dsn, "trickle", "fb:trickle:lat")
        out = await latency_phase(
            env, dsn, "trickle", "fb:trickle:lat", rate=rate, seconds=args.window_s, writers=4, tag="t"
        )
        out["rate"] = rate
        out["warm_up_ms"] = None if math.isinf(warm) else round(warm, 1)
        log(f"trickle: {out['latency']}, worker {out['cpu']['worker_cores']:.1%}")
    return out


async def case_noisy(bench: Bench) -> dict[str, Any]:
    """Row 7: tenant Q writes 50 msg/s alone, then while tenant N's relay drains a 500,000-row
    backlog (one worker serves both)."""
    args = bench.args
    n = bench.scaled(500_000, 20_000)
    async with CaseEnv(bench, "noisy") as env:
        noisy, quiet = await single_tenant(env, "noisy"), await single_tenant(env, "quiet")
        dsn_n = await env.tenant_database(noisy, "fb_noisy_n")
        dsn_q = await env.tenant_database(quiet, "fb_noisy_q")
        body_n = relay_body("fb:noisy:n")
        await env.put_relay(noisy, "bulk", {**body_n, "enabled": False})
        await env.put_relay(quiet, "q", relay_body("fb:noisy:q:{topic}"))
        out: dict[str, Any] = {"backlog": n, "preload_s": await preload(dsn_n, n, 100)}
        await env.start_worker()
        await asyncio.sleep(args.warmup_s / 2)
        await warm_up_relay(env, dsn_q, "q", "fb:noisy:q:lat")
        out["alone"] = await latency_phase(
            env, dsn_q, "q", "fb:noisy:q:lat", rate=50, seconds=args.window_s, writers=1, tag="a"
        )
        await env.put_relay(noisy, "bulk", body_n)
        deadline = time.perf_counter() + args.delivery_timeout_s
        while await stream_length(bench, "fb:noisy:n") == 0 and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        n_start = await stream_length(bench, "fb:noisy:n")
        out["during"] = await latency_phase(
            env, dsn_q, "q", "fb:noisy:q:lat", rate=50, seconds=args.window_s, writers=1, tag="d"
        )
        n_end = await stream_length(bench, "fb:noisy:n")
        out["noisy_delivered_during"] = n_end - n_start
        out["noisy_still_draining_at_end"] = n_end < n
        out["noisy_rate_during"] = round((n_end - n_start) / args.window_s, 1)
        log(f"noisy: Q alone {out['alone']['latency']}, while N drains {out['during']['latency']}")
    return out


# --- cases: scale-out ----------------------------------------------------------------------------------


def balanced(counts: dict[str, int], live: list[str], total: int) -> bool:
    """Every partition held by a live worker, and the live workers' shares within one of each other."""
    shares = [counts.get(w, 0) for w in live]
    return sum(shares) == total and sum(counts.values()) == total and max(shares) - min(shares) <= 1


async def wait_ownership(
    env: CaseEnv, live: list[str], total: int, *, gone: str | None, timeout_s: float
) -> dict[str, Any]:
    """Sample ownership every 0.25 s: when the gone worker held nothing any more and every partition
    was held by a live one (handover), and when the shares were even (+-1)."""
    started = time.perf_counter()
    handover_s: float | None = None
    balanced_s: float | None = None
    last: dict[str, int] = {}
    while balanced_s is None and time.perf_counter() - started < timeout_s:
        try:
            last = await env.ownership()
        except Exception as exc:
            return {"error": f"ownership query failed: {type(exc).__name__}: {exc}"}
        now = round(time.perf_counter() - started, 2)
        held_by_live = sum(last.get(w, 0) for w in live)
        if handover_s is None and (gone is None or last.get(gone, 0) == 0) and held_by_live == total:
            handover_s = now
        if balanced(last, live, total):
            balanced_s = now
        else:
            await asyncio.sleep(0.25)
    out: dict[str, Any] = {"balanced_s": balanced_s, "shares": last}
    if balanced_s is None:
        out["timeout_s"] = timeout_s
    if gone is not None:
        out["handover_s"] = handover_s
    return out


async def case_scaleout(bench: Bench) -> dict[str, Any]:
    """Row 8: a 200,000-row backlog over --scaleout-relays relays (one database each) drained by 1,
    then 2, then 3 workers (fresh relays and databases per step); ownership when a worker joins,
    and when one is SIGTERMed."""
    args = bench.args
    n_relays = args.scaleout_relays
    per_relay = bench.scaled(200_000 / n_relays, 2000)
    total_partitions = n_relays * PARTITIONS
    timeout_s = max(30.0, 6 * bench.lease_ttl_s)
    async with CaseEnv(bench, "scaleout") as env:
        tenant = await single_tenant(env)
        out: dict[str, Any] = {"relays": n_relays, "rows_per_relay": per_relay, "lease_ttl_s": bench.lease_ttl_s}
        dsns: dict[str, str] = {}
        for step in (1, 2, 3):
            for r in range(n_relays):
                name = f"s{step}-{r}"
                dsns[name] = await env.tenant_database(tenant, f"fb_scaleout_{step}_{r}", name)
                body = relay_body(f"fb:scaleout:{step}:{{topic}}", enabled=False, database=name)
                await env.put_relay(tenant, name, body)
        started = time.perf_counter()
        await asyncio.gather(*(preload(dsn, per_relay, 100) for dsn in dsns.values()))
        out["preload_s"] = round(time.perf_counter() - started, 1)
        log(f"scaleout: {len(dsns)} databases x {per_relay} rows pre-loaded in {out['preload_s']} s")
        for step in (1, 2, 3):
            await env.start_worker()
            live = [env.worker_id(i) for i in range(1, step + 1)]
            if step == 1:
                await asyncio.sleep(args.warmup_s / 2)
            else:
                # the previous step's relays are enabled and idle: the newcomer should get its share
                out[f"join{step}"] = await wait_ownership(env, live, total_partitions, gone=None, timeout_s=timeout_s)
                log(f"scaleout: worker {step} joined: {out[f'join{step}']}")
                for r in range(n_relays):
                    await env.delete_relay(tenant, f"s{step - 1}-{r}")
            stream = f"fb:scaleout:{step}:bulk"

            async def enable(step: int = step) -> None:
                mapping = f"fb:scaleout:{step}:{{topic}}"
                await asyncio.gather(
                    *(
                        env.put_relay(tenant, f"s{step}-{r}", relay_body(mapping, database=f"s{step}-{r}"))
                        for r in range(n_relays)
                    )
                )

            shares: list[dict[str, int]] = []

            async def sample(shares: list[dict[str, int]] = shares) -> None:
                while True:
                    with contextlib.suppress(Exception):
                        shares.append(await env.ownership())
                    await asyncio.sleep(1)

            sampler = asyncio.create_task(sample())
            try:
                result = await drain(env, stream, per_relay * n_relays, enable, cap_s=args.drain_cap_s)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            cores = result["cpu"]["per_worker_cores"]
            result["cpu_share"] = {
                w: round(c / sum(cores.values()), 3) if sum(cores.values()) else None for w, c in cores.items()
            }
            if shares:
                result["mean_partitions_held"] = {
                    w: round(sum(s.get(w, 0) for s in shares) / len(shares), 1) for w in live
                }
            out[f"workers{step}"] = result
            log(
                f"scaleout: {step} workers: {result['steady_msgs_per_s']} msg/s steady, "
                f"CPU shares {result['cpu_share']}"
            )
        # a worker leaves: SIGTERM the third, probe every partition of the (idle) step-3 relays
        leaving = env.workers[2]
        keys = await bench.partition_keys(next(iter(dsns.values())), PARTITIONS)
        deliveries = Deliveries()
        async with StreamWatch(bench.target_redis.url(), ["fb:scaleout:3:probe"], deliveries.on_entry) as watch:
            sigterm_at = time.perf_counter()
            exited_at: list[float] = []

            async def stop_and_clock() -> None:
                await leaving.stop_async()
                exited_at.append(time.perf_counter())

            stopper = asyncio.create_task(stop_and_clock())
            conns = {r: await asyncpg.connect(dsns[f"s3-{r}"]) for r in range(n_relays)}
            try:
                for r, conn in conns.items():
                    async with conn.transaction():
                        await add_many(
                            conn, [Message("probe", keys[p], {"p": f"leave:{r}:{p}"}) for p in range(PARTITIONS)]
                        )
                    now = time.perf_counter()
                    for p in range(PARTITIONS):
                        deliveries.commit(f"leave:{r}:{p}", now)
            finally:
                for conn in conns.values():
                    await conn.close()
            ownership_task = asyncio.create_task(
                wait_ownership(env, live[:2], total_partitions, gone=live[2], timeout_s=timeout_s)
            )
            expected = [(f"leave:{r}:{p}", f"s3-{r}") for r in range(n_relays) for p in range(PARTITIONS)]
            await deliveries.wait(expected, args.delivery_timeout_s, watch)
            leave = await ownership_task
            await stopper
        leave["exit_s"] = round(exited_at[0] - sigterm_at, 2) if exited_at else None
        leave["probes_after_sigterm"] = latency_summary([deliveries.latency_ms(p, relay) for p, relay in expected])
        # the ownership clock started after the probes were written: add that time
        leave["ownership_clock_started_after_s"] = round(min(deliveries.committed.values()) - sigterm_at, 2)
        out["leave"] = leave
        log(f"scaleout: worker 3 SIGTERMed: {leave}")
    return out


# --- cases: connections --------------------------------------------------------------------------------


async def case_connections(bench: Bench) -> dict[str, Any]:
    """Row 10: connections per worker (two workers) to the control DB and to each tenant database of
    a fleet with traffic on every partition; then how long connections to a deleted database last."""
    args = bench.args
    n_dbs = bench.scaled(20, 2)
    prefix = "fb:conn"
    async with CaseEnv(bench, "connections") as env:
        fleet: list[FleetDb] = []
        await grow_fleet(env, fleet, n_dbs, prefix=prefix)
        workers = [await env.start_worker(), await env.start_worker()]
        procs = {w.pid: w.name for w in workers}
        await asyncio.sleep(args.warmup_s / 2)
        probes = await probe_every_partition(env, fleet, prefix=prefix)
        control_max: dict[str, int] = {}
        tenant_max: dict[str, int] = {}
        total_max: dict[str, int] = {}
        end = time.perf_counter() + args.window_s
        while time.perf_counter() < end:
            for name, per_db in (await env.connections(procs)).items():
                control_max[name] = max(control_max.get(name, 0), per_db.get(env.control_db, 0))
                tenant = [c for db, c in per_db.items() if db != env.control_db]
                tenant_max[name] = max(tenant_max.get(name, 0), max(tenant, default=0))
                total_max[name] = max(total_max.get(name, 0), sum(per_db.values()))
            await asyncio.sleep(1)
        # delete one database as its tenant would: its relays, then the database
        gone = fleet[0]
        for relay in gone.relays:
            await env.delete_relay(gone.tenant, relay)
        await env.http.call("DELETE", "/v1/databases/app", key=gone.tenant.key)
        deleted_at = time.perf_counter()
        closed_s: float | None = None
        while time.perf_counter() - deleted_at < args.delivery_timeout_s:
            left = sum(per_db.get(gone.pg_name, 0) for per_db in (await env.connections(procs)).values())
            if left == 0:
                closed_s = round(time.perf_counter() - deleted_at, 2)
                break
            await asyncio.sleep(0.25)
        return {
            "databases": n_dbs,
            "relays": n_dbs * RELAYS_PER_DB,
            "probes_served": f"{probes['served_by_timeout']}/{probes['partitions']}",
            "control_max_per_worker": control_max,
            "tenant_db_max_per_worker": tenant_max,
            "total_max_per_worker": total_max,
            "deleted_db_closed_s": closed_s,
            "deleted_db_timeout_s": args.delivery_timeout_s,
        }


# --- the table -----------------------------------------------------------------------------------------


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def ms(v: float | None) -> str:
    return "lost" if v is None else (f"{v / 1000:.1f} s" if v >= 1000 else f"{v:.0f} ms")


def lat(summary: dict[str, Any]) -> str:
    if not summary.get("n"):
        return "no sample"
    text = f"p50 {ms(summary['p50_ms'])}, p99 {ms(summary['p99_ms'])}"
    if summary.get("missing"):
        text += f" ({summary['missing']} of {summary['n']} not delivered)"
    return text


def rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} msg/s"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "no")


def idle_text(idle: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    text = f"worker {pct(idle['worker_cores'])} + PostgreSQL {pct(idle['pg_cores'])}"
    if "pg_for_workers_cores" in idle:
        text += f" (of which its backends serving the workers {pct(idle['pg_for_workers_cores'])})"
    if baseline is not None:
        text += f" (cluster with no worker {pct(baseline['pg_cores'])})"
    return text + f", {idle['redis_cmds_per_s']:,.0f} Redis cmd/s"


def net_idle_cores(part: dict[str, Any]) -> float:
    """Workers + the PostgreSQL backends serving them while idle. The cluster's own background work
    (autovacuum visiting every database: 2-16% of a core with 200 databases and no worker at all,
    depending on where its round is) is not the workers' and varies more than the goal; older
    results without the per-backend figure fall back to the cluster less its no-worker baseline."""
    idle = part["idle"]
    if "pg_for_workers_cores" in idle:
        return float(idle["worker_cores"] + idle["pg_for_workers_cores"])
    return float(idle["worker_cores"] + idle["pg_cores"] - part["baseline"]["pg_cores"])


ROWS: list[tuple[str, str, str, str]] = [
    # (case id, row label, issue (before), goal)
    (
        "idle100",
        "100 idle relays (1,600 partitions)",
        "worker 44% of a core + PostgreSQL 22%, 1,708 Redis commands/s",
        "1,000 idle relays over 200 tenant databases: workers + PostgreSQL < 5% of one core together",
    ),
    (
        "idle1000",
        "1,000 idle relays",
        "scheduler collapses: ticks start 55-70 s late; 332 of 16,000 partitions ever run",
        "every partition served; no job whose cost grows with partitions each second",
    ),
    (
        "first_message",
        "one message into an idle relay, 100 (and 1,000) relays configured",
        "first relay 105 ms, all relays of that database 32-37 s",
        "commit to broker p99 <= 100 ms with 1,000 relays configured",
    ),
    (
        "wide",
        "one relay with 1,024 partitions, 20k messages",
        "32.7 s to deliver (612 msg/s); idle afterwards 44% worker + 32% PostgreSQL, 5,739 Redis commands/s",
        "same rate as 16 partitions; idle as above",
    ),
    (
        "backlog",
        "backlog 1M vs 10k, one relay",
        "0.38-0.85x (rate ratio); PostgreSQL CPU per message 2-8x",
        ">= 0.9x; lag from an index lookup",
    ),
    (
        "bigtx",
        "one big transaction: 200,000 (goal 1M) rows in one INSERT",
        "each poll of 100 takes 21-37 ms, O(n^2)",
        "1M-row single transaction drains at >= 0.9x the rate of 1M rows written 1,000 per transaction",
    ),
    (
        "noisy",
        "noisy neighbour: tenant N drains 500k, tenant Q writes 50 msg/s",
        "Q p50 4 -> 285 ms, p99 0.7 -> 4.2 s",
        "Q's p99 while N drains <= 2x Q's p99 alone",
    ),
    (
        "scaleout",
        "scale-out, 200k backlog, 1 -> 2 -> 3 workers",
        "0.98x and 1.03x; one worker did >= 84% of the work",
        "partitions split evenly (+-1) across live workers within 2 lease TTLs of a worker joining/leaving; "
        "SIGTERMed worker hands over at once",
    ),
    (
        "trickle",
        "trickle: 1,000 msg/s written, Redis target",
        "worker 0.75 of a core",
        "<= 0.15 of a core, p50 <= 10 ms, p99 <= 50 ms",
    ),
    (
        "connections",
        "connections",
        "per worker up to 20 control DB + 4 pooled + 1 LISTEN per tenant database resource",
        "control DB <= 5 per worker; <= 2 per tenant database per worker + LISTEN; deleted database's connections "
        "close within seconds",
    ),
]


def render(case: str, results: dict[str, Any], args: argparse.Namespace) -> tuple[str, bool | None]:
    """The measured text of one row and whether it meets its goal (None: cannot tell)."""
    fleet = results.get("fleet", {})
    if case == "idle100":
        small, big = fleet.get("100"), fleet.get("1000")
        if small is None and big is None:
            raise LookupError
        parts = []
        if small:
            parts.append(f"{small['relays']} relays: {idle_text(small['idle'], small['baseline'])}")
        if big:
            parts.append(f"{big['relays']} relays / {big['databases']} DBs: {idle_text(big['idle'], big['baseline'])}")
            net = net_idle_cores(big)
            return "; ".join(parts) + f"; workers + their backends {pct(net)}", net < 0.05
        return "; ".join(parts) + " (goal is judged at 1,000 relays: run idle1000)", None
    if case == "idle1000":
        big = fleet.get("1000")
        if big is None or "probes" not in big:
            raise LookupError
        p = big["probes"]
        text = (
            f"{p['served']:,} of {p['partitions']:,} partitions delivered a probe within {p['served_within_s']:g} s "
            f"({p['served_by_timeout']:,} within {p['timeout_s']:g} s; {lat(p['latency'])})"
        )
        ever = big.get("ever_leased", {})
        if "ever_leased" in ever:
            text += f"; {ever['ever_leased']:,} of {ever['partitions']:,} ever leased before the probes"
        ok: bool | None = p["served"] == p["partitions"]
        small = fleet.get("100")
        if small:
            growth = []
            for key, what in (
                ("control_rows_read_per_s", "control-DB rows read/s"),
                ("redis_cmds_per_s", "Redis cmd/s"),
            ):
                a, b = small["idle"].get(key), big["idle"].get(key)
                if a is not None and b is not None:
                    r = b / a if a > 10 else (1.0 if b <= 10 else math.inf)
                    growth.append((what, a, b, r))
            text += "; " + ", ".join(f"{w} {a:,.0f} -> {b:,.0f} ({r:.1f}x)" for w, a, b, r in growth)
            text += f" for {big['relays'] / small['relays']:.0f}x relays"
            ok = bool(ok) and all(r <= 2 for *_, r in growth)
        else:
            text += " (cost growth needs idle100 too)"
        return text, ok
    if case == "first_message":
        if not fleet or not any("first_message" in p for p in fleet.values()):
            raise LookupError
        parts, ok = [], None
        for label, part in fleet.items():
            if "first_message" in part:
                fm = part["first_message"]
                parts.append(
                    f"{fm['relays_configured']} relays ({fm['samples']} messages): "
                    f"first relay {lat(fm['first_relay'])}; every relay {lat(fm['every_relay'])}"
                )
                if label == "1000":
                    p99 = fm["every_relay"].get("p99_ms")
                    ok = p99 is not None and p99 <= 100
        return "; ".join(parts), ok
    r = results.get(case)
    if r is None:
        raise LookupError
    if case == "wide":
        w, s = r["wide"], r["p16"]
        rel = ratio(w["msgs_per_s"], s["msgs_per_s"])
        idle_net = net_idle_cores(r)
        text = (
            f"{r['wide_partitions']} partitions: {w['seconds']} s to deliver {w['delivered']:,} "
            f"({rate(w['msgs_per_s'])}; "
            f"steady {rate(w['steady_msgs_per_s'])}), 16 partitions: {rate(s['msgs_per_s'])} ({rel}x); "
            f"idle afterwards {idle_text(r['idle'], r['baseline'])}, net {pct(idle_net)}"
        )
        return text, rel is not None and rel >= 0.9 and idle_net < 0.05
    if case in ("backlog", "bigtx"):
        a, b = ("big", "small") if case == "backlog" else ("onetx", "per1000")
        big, small = r[a], r[b]
        rel = ratio(big["steady_msgs_per_s"], small["steady_msgs_per_s"])
        cpu_rel = ratio(big["pg_cpu_us_per_msg"], small["pg_cpu_us_per_msg"])
        names = {
            "big": "backlog",
            "small": "backlog",
            "onetx": "in one transaction",
            "per1000": "1,000 per transaction",
        }
        text = (
            f"{big['rows']:,} {names[a]}: {rate(big['steady_msgs_per_s'])}"
            + (f" (capped at {big['capped_at_s']:g} s, {big['delivered']:,} delivered)" if big["capped_at_s"] else "")
            + f" vs {small['rows']:,} {names[b]}: {rate(small['steady_msgs_per_s'])} = {rel}x; "
            f"PostgreSQL CPU/msg {big['pg_cpu_us_per_msg']} vs {small['pg_cpu_us_per_msg']} µs ({cpu_rel}x)"
        )
        diag = r.get("poll_diagnostic", {})
        if case == "bigtx" and "poll_ms_median" in diag.get("onetx", {}):
            text += (
                f"; today's poll of 100 at the middle cursor: {diag['onetx']['poll_ms_median']} ms "
                f"(1,000 per tx: {diag['per1000'].get('poll_ms_median')} ms)"
            )
        return text, rel is not None and rel >= 0.9
    if case == "noisy":
        alone, during = r["alone"]["latency"], r["during"]["latency"]
        a99, d99 = alone.get("p99_ms"), during.get("p99_ms")
        rel = ratio(d99, a99) if d99 is not None else None
        text = (
            f"Q alone {lat(alone)}; while N drains {lat(during)} ({rel}x p99); "
            f"N delivered {r['noisy_delivered_during']:,} meanwhile ({rate(r['noisy_rate_during'])})"
        )
        stamped = [r[phase].get("broker_latency") for phase in ("alone", "during")]
        if all(stamped):
            text += f"; by the broker's stamps: alone {lat(stamped[0])}, during {lat(stamped[1])}"
        if not r["noisy_still_draining_at_end"]:
            text += " (N finished before the window ended)"
        return text, d99 is not None and a99 is not None and d99 <= 2 * a99
    if case == "scaleout":
        one, two, three = r["workers1"], r["workers2"], r["workers3"]
        text = (
            f"steady {rate(one['steady_msgs_per_s'])} -> "
            f"{ratio(two['steady_msgs_per_s'], one['steady_msgs_per_s'])}x (2 workers) -> "
            f"{ratio(three['steady_msgs_per_s'], one['steady_msgs_per_s'])}x (3); busiest worker's CPU share "
            f"{max((v or 0) for v in two['cpu_share'].values()):.0%} (2 workers), "
            f"{max((v or 0) for v in three['cpu_share'].values()):.0%} (3)"
        )
        limit = 2 * r["lease_ttl_s"]
        oks: list[bool] = []
        for key, what in (("join2", "2nd joins"), ("join3", "3rd joins")):
            j = r.get(key, {})
            if "error" in j:
                text += f"; {what}: {j['error']}"
                continue
            after = f"{j['balanced_s']}" if j.get("balanced_s") is not None else f"> {j.get('timeout_s')}"
            text += f"; {what}: even after {after} s"
            oks.append(j.get("balanced_s") is not None and j["balanced_s"] <= limit)
        leave = r["leave"]
        probes = leave["probes_after_sigterm"]
        text += f"; after SIGTERM every partition delivered a probe: {lat(probes)} (max {ms(probes.get('max_ms'))})"
        if "error" not in leave:
            late = f"> {leave.get('timeout_s')}"
            handed = leave.get("handover_s")
            even = leave.get("balanced_s")
            text += (
                f", ownership handed over after {handed if handed is not None else late} s"
                f", even after {even if even is not None else late} s"
                f" (+{leave['ownership_clock_started_after_s']} s: the clock started after the probes)"
            )
            oks.append(leave.get("balanced_s") is not None and leave["balanced_s"] <= limit)
        max_probe = probes.get("max_ms")
        oks.append(max_probe is not None and max_probe <= args.handover_ms)
        return text, all(oks)
    if case == "trickle":
        l_ = r["latency"]
        cores = r["cpu"]["worker_cores"]
        text = f"{r['write_rate']:,.0f} msg/s written: worker {cores:.2f} of a core, {lat(l_)}"
        if r["write_rate"] < 0.95 * r["rate"]:
            text += f" (writers reached only {r['write_rate']:,.0f} of {r['rate']:,.0f} msg/s)"
        p50, p99 = l_.get("p50_ms"), l_.get("p99_ms")
        return text, cores <= 0.15 and p50 is not None and p50 <= 10 and p99 is not None and p99 <= 50
    if case == "connections":
        c, t = r["control_max_per_worker"], r["tenant_db_max_per_worker"]
        closed = r["deleted_db_closed_s"]
        text = (
            f"{r['databases']} DBs, 2 workers: control DB max {max(c.values(), default=0)} per worker, "
            f"tenant DB max {max(t.values(), default=0)} per worker (incl. LISTEN); deleted database's connections "
            + (
                f"closed after {closed} s"
                if closed is not None
                else f"still open after {r['deleted_db_timeout_s']:g} s"
            )
        )
        ok = max(c.values(), default=0) <= 5 and max(t.values(), default=0) <= 3 and closed is not None and closed <= 10
        return text, ok
    raise LookupError


def table(results: dict[str, Any], errors: dict[str, str], selected: list[str], args: argparse.Namespace) -> str:
    lines = ["| case | issue (before) | measured | goal | met? |", "|---|---|---|---|---|"]
    for case, label, before, goal in ROWS:
        if case not in selected:
            continue
        group = "fleet" if case in ("idle100", "idle1000", "first_message") else case
        if group in errors:
            measured, ok = f"error: {errors[group]}", "error"
        else:
            try:
                text, good = render(case, results, args)
                measured, ok = text, met(good)
            except LookupError:
                measured, ok = "not measured", "n/a"
            except Exception as exc:  # a figure missing from a partial result
                measured, ok = f"incomplete: {type(exc).__name__}: {exc}", "n/a"
        lines.append(f"| {label} | {before} | {measured.replace('|', '/')} | {goal} | {ok} |")
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------------------------------


def forget_old_logs(keep_runs: int = 3) -> None:
    """Keep the process logs (``fleet-<run>-*.log``) of the last few runs only."""
    runs: dict[str, float] = {}
    for path in RESULTS_DIR.glob("fleet-*-*.log"):
        run_id = path.name.split("-")[1]
        runs[run_id] = max(runs.get(run_id, 0.0), path.stat().st_mtime)
    for run_id in sorted(runs, key=runs.__getitem__)[:-keep_runs]:
        for path in RESULTS_DIR.glob(f"fleet-{run_id}-*.log"):
            path.unlink(missing_ok=True)


async def run(args: argparse.Namespace, selected: list[str]) -> dict[str, Any]:
    teardown = Teardown()
    run_id = secrets.token_hex(3)
    host = machine()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    RESULTS_DIR.mkdir(exist_ok=True)
    forget_old_logs()
    try:
        pg = PrivatePostgres(name=f"fleetbench_{run_id}", port=args.pg_port or free_port())
        log(f"starting PostgreSQL cluster {pg.name} on port {pg.port}")
        await asyncio.to_thread(
            pg.start,
            teardown,
            max_connections=args.max_connections,
            shared_buffers=args.shared_buffers,
            statements=args.statements,
            explain_ms=args.explain_ms,
            keep_log=RESULTS_DIR / f"fleet-{run_id}-postgresql.log" if args.explain_ms is not None else None,
        )
        await pg.wait_ready()
        queue_redis, target_redis = PrivateRedis("queue"), PrivateRedis("target")
        await queue_redis.start(teardown, RESULTS_DIR / f"fleet-{run_id}-redis-queue.log")
        await target_redis.start(teardown, RESULTS_DIR / f"fleet-{run_id}-redis-target.log")
        admin = await asyncpg.create_pool(pg.dsn("postgres"), min_size=1, max_size=4, command_timeout=600)
        assert admin is not None
        if args.statements:
            await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        target = aioredis.Redis.from_url(target_redis.url())
        bench = Bench(
            target=target,
            args=args,
            teardown=teardown,
            run_id=run_id,
            pg=pg,
            queue_redis=queue_redis,
            target_redis=target_redis,
            admin=admin,
        )
        groups: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = []
        fleet_cases = {c for c in selected if c in ("idle100", "idle1000", "first_message")}
        if fleet_cases:
            groups.append(("fleet", lambda: case_fleet(bench, fleet_cases)))
        single: dict[str, Callable[[Bench], Awaitable[dict[str, Any]]]] = {
            "wide": case_wide,
            "backlog": case_backlog,
            "bigtx": case_bigtx,
            "noisy": case_noisy,
            "scaleout": case_scaleout,
            "trickle": case_trickle,
            "connections": case_connections,
        }
        for case in selected:
            if case in single:
                groups.append((case, functools.partial(single[case], bench)))
        try:
            for name, runner in groups:
                log(f"case {name}")
                case_started = time.perf_counter()
                try:
                    results[name] = await asyncio.wait_for(runner(), timeout=args.case_timeout_s)
                except (Exception, TimeoutError) as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"[:500]
                    log(f"case {name} failed: {exc!r}")
                log(f"case {name} took {time.perf_counter() - case_started:.0f} s")
        finally:
            await target.aclose()
            await admin.close()
    finally:
        log("cleaning up")
        await asyncio.to_thread(teardown.close)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": host,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lease_ttl_s": DEFAULT_LEASE_TTL_S,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "selected": selected,
        "results": results,
        "errors": errors,
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)} (all)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply relay, database and message counts (1.0)")
    parser.add_argument("--window-s", type=float, default=20.0, help="steady measuring window (20)")
    parser.add_argument("--warmup-s", type=float, default=20.0, help="settling time before a window (20)")
    parser.add_argument(
        "--served-within-s", type=float, default=10.0, help="a probe delivered within this is served (10)"
    )
    parser.add_argument("--delivery-timeout-s", type=float, default=60.0, help="longest wait for any delivery (60)")
    parser.add_argument("--drain-cap-s", type=float, default=120.0, help="longest a backlog drain is timed (120)")
    parser.add_argument(
        "--first-samples", type=int, default=20, help="messages into idle databases, first_message (20)"
    )
    parser.add_argument("--bigtx-rows", type=int, default=1_000_000, help="rows of the big transaction at scale 1 (1M)")
    parser.add_argument(
        "--scaleout-relays", type=int, default=4, help="relays (one database each) per scale-out step (4)"
    )
    parser.add_argument(
        "--handover-ms", type=float, default=2000.0, help="'hands over at once': probes after SIGTERM (2000)"
    )
    parser.add_argument("--api-concurrency", type=int, default=16, help="API requests in flight while configuring (16)")
    parser.add_argument("--pg-port", type=int, default=0, help="port of the bench's PostgreSQL cluster (a free one)")
    parser.add_argument("--max-connections", type=int, default=2000, help="the cluster's max_connections (2000)")
    parser.add_argument("--shared-buffers", default="256MB", help="the cluster's shared_buffers (256MB)")
    parser.add_argument(
        "--statements", action="store_true", help="load pg_stat_statements; windows list the costliest statements"
    )
    parser.add_argument(
        "--explain-ms",
        type=int,
        default=None,
        help="log the analysed plan of every statement slower than this (auto_explain; slows every statement): "
        "bench/results/fleet-RUN-postgresql.log",
    )
    parser.add_argument("--ownership-sql", default=OWNERSHIP_SQL, help="control-DB query: rows (worker id, partitions)")
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the workers"
    )
    parser.add_argument("--case-timeout-s", type=float, default=1800.0, help="give up on a case after this (1800)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "fleet-latest.json", help="JSON report")
    args = parser.parse_args(argv)
    selected = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(selected) - set(CASES)
    if unknown or not selected:
        parser.error(f"--cases: unknown {sorted(unknown)}; choose from {', '.join(CASES)}")
    if args.scale <= 0:
        parser.error("--scale must be positive")
    for kv in args.worker_env:
        if "=" not in kv:
            parser.error(f"--worker-env {kv!r}: expected KEY=VALUE")
    return args, [c for c in CASES if c in selected]


async def main_async(args: argparse.Namespace, selected: list[str]) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # clean up on SIGTERM too
    return await run(args, selected)


def main(argv: list[str] | None = None) -> int:
    args, selected = parse_args(argv)
    if os.geteuid() != 0:
        print("fleet_bench needs root (pg_createcluster)", file=sys.stderr)
        return 2
    raise_fd_limit()
    try:
        report = asyncio.run(main_async(args, selected))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report["results"], report["errors"], selected, args))
    m = report["machine"]
    print(
        f"\nscale {args.scale:g}; {m['cpus']} cpus, load {m['load_average_at_start']} at start, "
        f"{report['load_average_at_end']} at end; {report['wall_seconds']} s; JSON in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
