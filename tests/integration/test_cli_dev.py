"""``outbox-relay dev``, which ``make run`` runs, as a developer meets it (issue 17, item 5): a port
that is taken, and its options.

Each test runs the real command in a subprocess on this run's PostgreSQL and Redis, with a queue of
its own; every wait is bounded.
"""

from __future__ import annotations

import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from outbox_relay.config import Settings
from tests.workers import worker_env

REPO = Path(__file__).resolve().parents[2]
DEV = [sys.executable, "-m", "service.cli", "dev"]


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
