"""``outbox-relay dev``, which ``make run`` runs, as a developer meets it (issue 17, item 5): a port
that is taken, its options, and its terminal while nothing happens.

Each test runs the real command in a subprocess on this run's PostgreSQL and Redis, with a queue of
its own; every wait is bounded.
"""

from __future__ import annotations

import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox_relay.config import Settings
from tests.conftest import RUN_ID, DatabaseFactory, pg_dsn
from tests.harness.brokers import end_process, free_port
from tests.workers import OUTPUT_DIR, worker_env

REPO = Path(__file__).resolve().parents[2]
DEV = [sys.executable, "-m", "service.cli", "dev"]
IDLE_S = 10.0
"""How long an idle ``dev`` is watched: start-up, arq's cron at start-up, several fleet ticks and
polls; arq alone polled Redis five times a second."""


def test_dev_on_a_busy_port_exits_saying_what_to_do(settings: Settings, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = subprocess.run(
            DEV,
            env=worker_env(settings, port=port, queue_name=f"orly-dev-{secrets.token_hex(4)}"),
            cwd=tmp_path,  # dev keeps its secret key under ./.outbox-relay
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert "Outbox Relay on" not in proc.stderr  # no banner for a server that never listened
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr, proc.stderr
    assert re.search(r"OUTBOX_RELAY_PORT=\d+ make run \(or outbox-relay dev --port \d+\)", proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


def test_dev_help_explains_port() -> None:
    proc = subprocess.run([*DEV, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"--port PORT\s+the API's port \(default: OUTBOX_RELAY_PORT, else 8080\)", proc.stdout)
    assert "make run" in proc.stdout


def test_make_run_forwards_run_args() -> None:
    """``make -n`` prints the commands without running them."""
    proc = subprocess.run(
        ["make", "-n", "run", "RUN_ARGS=--port 8123"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\S*/bin/outbox-relay dev --port 8123$", proc.stdout, re.M), proc.stdout  # VENV may differ (CI)


class Lines:
    """A process's output, line by line, as it comes."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for raw in stream:  # type: ignore[attr-defined]
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float, start: int = 0) -> int:
        """The index of the first line from ``start`` on that matches; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for i in range(start, len(self.lines)):
                    if re.search(pattern, self.lines[i]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} in {timeout_s} s:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def count(self) -> int:
        with self._cond:
            return len(self.lines)


@pytest.fixture
def idle_dev(settings: Settings, databases: DatabaseFactory, tmp_path: Path) -> Iterator[tuple[Lines, int]]:
    """``outbox-relay dev`` on a control database it creates itself (as ``make run`` does)."""
    name = f"orly_devidle_{RUN_ID}_{secrets.token_hex(2)}"
    databases.created.append(name)  # dropped at the end of the run
    port = free_port()
    env = worker_env(settings, database_url=pg_dsn(name), port=port, queue_name=f"orly-dev-{secrets.token_hex(4)}")
    env.pop("OUTBOX_RELAY_LOG_LEVEL", None)
    proc = subprocess.Popen(DEV, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = Lines(proc.stdout)
    try:
        yield lines, port
    finally:
        end_process(proc, signal.SIGINT, timeout_s=30, kill_wait_s=10)
        log = OUTPUT_DIR / "cli-dev" / "idle-dev.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("\n".join(lines.lines) + "\n")


def test_idle_dev_is_quiet_and_logs_one_line_per_request(idle_dev: tuple[Lines, int]) -> None:
    lines, port = idle_dev
    banner = lines.wait_for(r"^admin API key: dev-admin-key$", timeout_s=60)
    time.sleep(IDLE_S)  # the window watched, not a deadline
    after = lines.lines[banner + 1 : lines.count()]
    rate = len(after) / IDLE_S
    (OUTPUT_DIR / "cli-dev").mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / "cli-dev" / "idle-rate.txt").write_text(f"{len(after)} lines in {IDLE_S} s ({rate:.1f}/s)\n")
    assert after == [], f"{len(after)} lines in {IDLE_S} s of an idle dev:\n" + "\n".join(after)

    # a real event, a request: one line
    start = lines.count()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200
    first = lines.wait_for(r'"GET /healthz HTTP/1\.1" 200', timeout_s=10, start=start)
    assert first == start, lines.lines[start:]
