"""Throw-away infrastructure for the benchmark: databases, a RabbitMQ vhost, a Redis key prefix,
a private Tansu (Kafka-protocol) broker and one relay worker process.

Every resource registers its own clean-up on :class:`Scratch` the moment it exists; ``close()``
runs them newest first, each one even when an earlier one failed, so an interrupted run leaves
nothing behind (a SIGKILL still can: names carry ``orly_bench``/``orly-bench`` to find them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

# the test suite's broker helpers (free ports, Tansu's location and command line) serve here too
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.harness.brokers import free_port, listening, tansu_command

PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")


def machine() -> dict[str, Any]:
    """What a bench's report says of the machine it ran on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


PG_PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672


def redis_db_url(db: int) -> str:
    """REDIS_URL with another database number."""
    base = REDIS_URL.rsplit("/", 1)[0] if REDIS_URL.rsplit("/", 1)[-1].isdigit() else REDIS_URL.rstrip("/")
    return f"{base}/{db}"


def pg_dsn(database: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class HorizonWatch:
    """Samples, every ``interval_s``, the oldest transaction holding a transaction id anywhere on the
    PostgreSQL cluster. The relay reads rows below ``pg_snapshot_xmin(pg_current_snapshot())``, and
    a snapshot's xmin is cluster-wide: a long transaction in *any* database holds every outbox back.
    Other work sharing the machine's PostgreSQL (test suites that hold a transaction open on
    purpose) therefore shows up in the figures; this says when it did."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.max_age_s = 0.0
        self.database: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        conn = await asyncpg.connect(pg_dsn("postgres"))
        try:
            while True:
                row = await conn.fetchrow(
                    "SELECT datname, extract(epoch FROM now() - xact_start)::float8 AS age_s FROM pg_stat_activity "
                    "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() ORDER BY age(backend_xid) DESC LIMIT 1"
                )
                if row is not None and row["age_s"] is not None and row["age_s"] > self.max_age_s:
                    self.max_age_s, self.database = row["age_s"], row["datname"]
                await asyncio.sleep(self.interval_s)
        finally:
            await conn.close()

    async def __aenter__(self) -> HorizonWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def report(self) -> dict[str, object]:
        return {"oldest_xid_holder_s": round(self.max_age_s, 2), "oldest_xid_holder_database": self.database}


class Scratch:
    """Names unique to this run, and the clean-ups of everything created under them."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(4)
        self._cleanups: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def on_close(self, what: str, cleanup: Callable[[], Awaitable[None]]) -> None:
        self._cleanups.append((what, cleanup))

    async def close(self) -> None:
        while self._cleanups:
            what, cleanup = self._cleanups.pop()
            try:
                await asyncio.wait_for(cleanup(), timeout=60)
            except BaseException as exc:  # keep cleaning up; say what is left
                log(f"clean-up of {what} failed: {exc!r}")

    # --- PostgreSQL ------------------------------------------------------------------------------

    async def database(self, purpose: str) -> str:
        """A new empty database; returns its name. Dropped (WITH FORCE) at close or by :meth:`drop`."""
        name = f"orly_bench_{self.run_id}_{purpose}"
        conn = await asyncpg.connect(pg_dsn("postgres"))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.on_close(f"database {name}", lambda: drop_database(name))
        return name

    # --- RabbitMQ --------------------------------------------------------------------------------

    async def rabbitmq_vhost(self) -> str:
        """A vhost guest may use; deleted (with its queues) at close."""
        vhost = f"orly-bench-{self.run_id}"
        await rabbitmqctl("add_vhost", vhost)
        self.on_close(f"vhost {vhost}", lambda: rabbitmqctl("delete_vhost", vhost))
        await rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return vhost

    # --- Redis -----------------------------------------------------------------------------------

    def redis_prefix(self) -> str:
        """A key prefix for this run's streams; its keys are deleted at close."""
        prefix = f"orly-bench:{self.run_id}:"
        self.on_close(f"redis keys {prefix}*", lambda: delete_redis_keys(REDIS_URL, f"{prefix}*"))
        return prefix

    # --- Kafka (Tansu) ---------------------------------------------------------------------------

    async def tansu(self) -> str:
        """A private in-memory Tansu broker on a free port; returns its bootstrap address."""
        last: Exception | None = None
        for _ in range(3):  # another process may take the free port before Tansu binds it
            port = free_port()
            process = subprocess.Popen(  # noqa: ASYNC220 (starting it does not block)
                tansu_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.on_close(f"tansu pid {process.pid}", functools.partial(stop_process, process))
            deadline = time.monotonic() + 10
            while not listening(("127.0.0.1", port)):
                if process.poll() is not None or time.monotonic() > deadline:
                    last = RuntimeError(f"tansu did not listen on port {port} (exit {process.poll()})")
                    break
                await asyncio.sleep(0.02)
            else:
                return f"127.0.0.1:{port}"
        raise RuntimeError(f"could not start tansu: {last}")

    # --- the relay worker ------------------------------------------------------------------------

    async def worker(self, env: dict[str, str], log_path: Path, *, profile_to: Path | None = None) -> int:
        """Start ``outbox-relay worker``, wait until it serves its queue (arq's health-check key);
        returns its pid."""
        queue = env["OUTBOX_RELAY_QUEUE_NAME"]
        redis_url = env["OUTBOX_RELAY_REDIS_URL"]
        # registered before the worker's stop, so it runs after it (clean-ups run newest first)
        self.on_close(f"arq keys of {queue}", lambda: forget_queue(redis_url, queue))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
        command = [sys.executable, "-m", "service.cli", "worker"]
        if profile_to is not None:
            command = [sys.executable, "-m", "cProfile", "-o", str(profile_to), "-m", "service.cli", "worker"]
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)  # noqa: ASYNC220

        async def stop() -> None:
            await stop_process(process, timeout_s=15)
            out.close()

        self.on_close(f"worker pid {process.pid}", stop)
        redis = aioredis.Redis.from_url(redis_url)
        try:
            deadline = time.monotonic() + 30
            while not await redis.exists(f"{queue}:health-check"):
                if process.poll() is not None:
                    raise RuntimeError(f"the worker exited with {process.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start within 30 s; see {log_path}")
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()
        return process.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 5) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait(timeout=5)


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(pg_dsn("postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "--quiet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode(errors='replace') or out.decode()}")


async def forget_queue(url: str, queue: str) -> None:
    """Delete an arq queue, the jobs still in it (and their retry/in-progress/result keys) and its
    health-check key. Jobs of other queues in the same Redis database are left alone."""
    redis = aioredis.Redis.from_url(url)
    try:
        ids = [i.decode() for i in await redis.zrange(queue, 0, -1)]
        keys = [f"arq:{kind}:{i}" for i in ids for kind in ("job", "retry", "in-progress", "result")]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i : i + 500])
        await redis.delete(queue, f"{queue}:health-check")
    finally:
        await redis.aclose()


async def delete_redis_keys(url: str, *patterns: str) -> None:
    redis = aioredis.Redis.from_url(url)
    try:
        for pattern in patterns:
            keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
            for i in range(0, len(keys), 500):
                await redis.delete(*keys[i : i + 500])
    finally:
        await redis.aclose()
