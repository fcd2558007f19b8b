"""Private servers for fault tests, so that a test can stop and restart them: a PostgreSQL cluster
(``pg_createcluster`` on a free port, trust auth) and a redis-server. The machine's shared servers
are never touched. Each removes itself at the end, also when the test fails."""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import RUN_ID
from tests.harness.brokers import free_port


def _wait_port(port: int, *, up: bool, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            listening = s.connect_ex(("127.0.0.1", port)) == 0
        if listening == up:
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not {'open' if up else 'close'} in {timeout_s} s")


class PgCluster:
    """A PostgreSQL 15 cluster of the test's own (root runs pg_createcluster, as on CI)."""

    def __init__(self, name: str, *, max_connections: int = 100) -> None:
        self.name = name
        self.port = free_port()
        self.max_connections = max_connections

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "15", self.name, *args], check=True, timeout=60)

    def create(self) -> PgCluster:
        subprocess.run(
            ["pg_createcluster", "15", self.name, "--port", str(self.port), "--",
             "--auth=trust", "--no-sync"],
            check=True, timeout=120, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        conf = Path("/etc/postgresql/15") / self.name / "conf.d" / "tests.conf"
        conf.write_text(
            f"max_connections = {self.max_connections}\nfsync = off\nsynchronous_commit = off\n"
            "full_page_writes = off\nlisten_addresses = '127.0.0.1'\n"
        )
        self.start()
        return self

    def require_passwords(self) -> None:
        """Every role but ``postgres`` logs in over TCP with its password (SCRAM), as a hosted tenant
        database does; ``postgres`` stays trusted, for the test's own setup."""
        conf = Path("/etc/postgresql/15") / self.name
        (conf / "pg_hba.conf").write_text(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        with (conf / "conf.d" / "tests.conf").open("a") as extra:
            extra.write("password_encryption = 'scram-sha-256'\n")
        self._ctl("reload")

    def start(self) -> None:
        self._ctl("start")
        _wait_port(self.port, up=True, timeout_s=30)

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")
        _wait_port(self.port, up=False, timeout_s=30)

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")
        _wait_port(self.port, up=True, timeout_s=30)

    def drop(self) -> None:
        subprocess.run(["pg_dropcluster", "--stop", "15", self.name], check=False, timeout=120)
        # pg_dropcluster keeps a config directory holding a file it did not write (conf.d/tests.conf)
        shutil.rmtree(Path("/etc/postgresql/15") / self.name, ignore_errors=True)


class RedisServer:
    """A redis-server of the test's own, in memory, that the test can stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="orly-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_port(self.port, up=True, timeout_s=15)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        _wait_port(self.port, up=False, timeout_s=15)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_clusters = itertools.count()


@pytest.fixture
async def password_cluster() -> AsyncIterator[PgCluster]:
    """A private cluster where role ``orly_app`` (password ``db-old-secret``) owns database ``app``
    and logs in with its password."""
    cluster = PgCluster(f"orly_pw_{RUN_ID}_{next(_clusters)}").create()
    try:
        cluster.require_passwords()
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE ROLE orly_app LOGIN PASSWORD 'db-old-secret'")
        await admin.execute("CREATE DATABASE app OWNER orly_app")
        await admin.close()
        yield cluster
    finally:
        cluster.drop()
