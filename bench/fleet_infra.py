"""Private infrastructure and meters for ``fleet_bench.py``.

The fleet bench runs hundreds of tenant databases and thousands of relays, more than the machine's
shared servers should carry, so it brings its own: a PostgreSQL cluster (``pg_createcluster``, as
root) holding the control DB and every tenant DB, and two ``redis-server`` processes (the workers'
queue/coordination Redis, and the Redis Streams target), all on free ports. Workers and the API run
as real processes (``outbox-relay worker`` / ``outbox-relay serve``).

Every resource registers its removal on a :class:`Teardown` the moment it exists; ``close()`` runs
them newest first, each one even when an earlier one failed. An ``atexit`` hook runs whatever is
left, so an exception or Ctrl-C anywhere still drops the cluster and stops the processes (only a
SIGKILL of the bench can leave them: ``pg_lsclusters`` shows ``fleetbench_*`` clusters).

Meters, all from ``/proc`` or the servers' own counters, so that they measure any engine alike:

* :func:`process_cpu_s`: user + system CPU seconds of one process (``/proc/<pid>/stat``).
* :meth:`PrivatePostgres.cpu_s`: the whole cluster: the postmaster, every live child (backends,
  checkpointer, autovacuum ...) and, through the postmaster's ``cutime``/``cstime``, the children
  that exited (a backend that ends inside a window is charged its whole life: slightly high).
* :meth:`PrivateRedis.commands`: ``total_commands_processed`` (``INFO stats``).
* :func:`tcp_port_owners`: which of the given processes owns the client end of each TCP connection
  (socket inodes in ``/proc/<pid>/fd`` against ``/proc/net/tcp``), so that ``pg_stat_activity``
  rows (``client_port``) can be charged to a worker without the engine naming its connections.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_VERSION = "15"
MAIN_PG_HBA = Path(f"/etc/postgresql/{PG_VERSION}/main/pg_hba.conf")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_fd_limit() -> None:
    """Soft open-files limit up to the hard one, for this process and the children it starts: a
    worker holding connections to hundreds of tenant databases needs more than 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- teardown -------------------------------------------------------------------------------------


class Teardown:
    """Clean-ups, run newest first by :meth:`close` (or at interpreter exit), each exactly once."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []
        atexit.register(self.close)

    def add(self, what: str, step: Callable[[], None]) -> Callable[[], None]:
        """Register ``step``; returns a callable that runs it now (and unregisters it)."""
        entry = (what, step)
        self._steps.append(entry)

        def run_now() -> None:
            if entry in self._steps:
                self._steps.remove(entry)
                _run_step(what, step)

        return run_now

    def close(self) -> None:
        while self._steps:
            what, step = self._steps.pop()
            _run_step(what, step)


def _run_step(what: str, step: Callable[[], None]) -> None:
    try:
        step()
    except BaseException as exc:  # keep cleaning up; say what is left
        log(f"clean-up of {what} failed: {exc!r}")


# --- CPU ------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    # the command name (field 2) may contain spaces and parentheses: split after its last ")"
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu_s(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` so far (0 once it is gone); with ``reaped_children``
    also those of its children that exited and were waited for."""
    try:
        fields = _stat_fields(pid)
    except (OSError, IndexError):
        return 0.0
    # after the command: [0] state, [1] ppid, ..., [11] utime, [12] stime, [13] cutime, [14] cstime
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == pid:
                out.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


# --- connections per process -----------------------------------------------------------------------


def tcp_port_owners(pids: list[int], *, remote_port: int) -> dict[int, int]:
    """Local port -> pid, for the TCP connections to ``remote_port`` that the given processes hold
    (Linux may reuse an ephemeral port towards another destination, hence the filter)."""
    inodes: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(fd.path)
                    if link.startswith("socket:["):
                        inodes[int(link[8:-1])] = pid
    owners: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) < 10:
                    continue
                inode = int(parts[9])
                if inode in inodes and int(parts[2].rsplit(":", 1)[1], 16) == remote_port:
                    owners[int(parts[1].rsplit(":", 1)[1], 16)] = inodes[inode]
    return owners


# --- PostgreSQL -----------------------------------------------------------------------------------


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of its own (``pg_createcluster``), trust auth on 127.0.0.1, user postgres."""

    name: str
    port: int
    data_dir: Path = field(init=False)
    keep_log: Path | None = field(init=False, default=None)
    """Where the server's log is copied before the cluster is dropped (``start(keep_log=...)``)."""

    def __post_init__(self) -> None:
        self.data_dir = Path(f"/var/lib/postgresql/{PG_VERSION}/{self.name}")

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(
        self,
        teardown: Teardown,
        *,
        max_connections: int,
        shared_buffers: str,
        statements: bool,
        explain_ms: int | None = None,
        keep_log: Path | None = None,
    ) -> None:
        """``explain_ms``: auto_explain logs the plan (analysed, with buffers) of every statement that
        took longer; the cluster's log is copied to ``keep_log`` before the cluster goes."""
        options = {
            "max_connections": str(max_connections),
            "shared_buffers": f"'{shared_buffers}'",
            "listen_addresses": "'127.0.0.1'",
            "max_wal_size": "'4GB'",
        }
        if statements:
            options["shared_preload_libraries"] = "'pg_stat_statements'"
            options["pg_stat_statements.track"] = "'top'"
        if explain_ms is not None:
            options["session_preload_libraries"] = "'auto_explain'"
            options["auto_explain.log_min_duration"] = f"'{explain_ms}ms'"
            options["auto_explain.log_analyze"] = "on"
            options["auto_explain.log_buffers"] = "on"
        self.keep_log = keep_log
        teardown.add(f"PostgreSQL cluster {self.name}", self.drop)
        _run(["pg_createcluster", PG_VERSION, self.name, "--port", str(self.port), "--start-conf", "manual"])
        conf = Path(f"/etc/postgresql/{PG_VERSION}/{self.name}")
        (conf / "conf.d" / "fleet-bench.conf").write_text("".join(f"{k} = {v}\n" for k, v in options.items()))
        # trust on 127.0.0.1, as the machine's own cluster has it
        shutil.copyfile(MAIN_PG_HBA, conf / "pg_hba.conf")
        _run(["pg_ctlcluster", PG_VERSION, self.name, "start"])

    def drop(self) -> None:
        """Stop and remove the cluster (data directory, configuration, log), if it exists."""
        server_log = Path(f"/var/log/postgresql/postgresql-{PG_VERSION}-{self.name}.log")
        if self.keep_log is not None and server_log.exists():
            shutil.copyfile(server_log, self.keep_log)
        listed = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, timeout=30).stdout
        if any(line.split()[:2] == [PG_VERSION, self.name] for line in listed.splitlines() if line.strip()):
            subprocess.run(["pg_dropcluster", "--stop", PG_VERSION, self.name], capture_output=True, timeout=180)
        # pg_dropcluster leaves the configuration directory when it holds a file it did not write
        # (our conf.d/fleet-bench.conf)
        shutil.rmtree(f"/etc/postgresql/{PG_VERSION}/{self.name}", ignore_errors=True)

    def postmaster_pid(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        postmaster = self.postmaster_pid()
        return [postmaster, *children_of(postmaster)]

    def cpu_s(self) -> float:
        """CPU seconds of the whole cluster so far (see the module docstring)."""
        postmaster = self.postmaster_pid()
        return process_cpu_s(postmaster, reaped_children=True) + sum(
            process_cpu_s(child) for child in children_of(postmaster)
        )

    async def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = await asyncpg.connect(self.dsn("postgres"), timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
            else:
                await conn.close()
                return


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:3])} ... failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}"
        )


# --- Redis ----------------------------------------------------------------------------------------


@dataclass
class PrivateRedis:
    """A ``redis-server`` of its own: no persistence, 127.0.0.1, a free port."""

    name: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def start(self, teardown: Teardown, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server",
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--logfile", str(log_path), "--dir", str(log_path.parent),
            "--dbfilename", f"{log_path.stem}.rdb",
        ]  # fmt: skip
        self.process = subprocess.Popen(  # noqa: ASYNC220 (starting it does not block)
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        process = self.process
        teardown.add(f"redis-server {self.name} (pid {process.pid})", lambda: stop_sync(process, timeout_s=10))
        client = aioredis.Redis.from_url(self.url())
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    await client.ping()
                    return
                except (OSError, aioredis.ConnectionError):
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server {self.name} did not start (exit {process.poll()})") from None
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def commands(self) -> int:
        """Commands the server has processed so far (the meter's own INFO counts: one each)."""
        client = aioredis.Redis.from_url(self.url())
        try:
            info = await client.info("stats")
            return int(info["total_commands_processed"])
        finally:
            await client.aclose()

    async def commandstats(self) -> dict[str, int]:
        client = aioredis.Redis.from_url(self.url())
        try:
            info = await client.info("commandstats")
            return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}
        finally:
            await client.aclose()

    async def flush(self) -> None:
        client = aioredis.Redis.from_url(self.url())
        try:
            await client.flushall()
        finally:
            await client.aclose()


# --- processes ------------------------------------------------------------------------------------


def stop_sync(process: subprocess.Popen[bytes], *, timeout_s: float = 15, sig: int = signal.SIGTERM) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGCONT)
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class Proc:
    """A started process, its log file, and its removal on the teardown."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _stop: Callable[[], None]

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self._stop()

    async def stop_async(self) -> None:
        await asyncio.to_thread(self._stop)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_process(teardown: Teardown, name: str, command: list[str], env: dict[str, str], log_path: Path) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = log_path.open("ab")
    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        try:
            stop_sync(process, timeout_s=30)
        finally:
            out.close()

    run_now = teardown.add(f"{name} (pid {process.pid})", stop)
    return Proc(name=name, process=process, log_path=log_path, _stop=run_now)


def outbox_relay_command(*args: str) -> list[str]:
    """``outbox-relay ...`` from the virtual environment running this bench."""
    script = Path(sys.executable).with_name("outbox-relay")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "service.cli", *args]
