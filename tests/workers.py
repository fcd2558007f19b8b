"""Real worker processes (``outbox-relay worker``) for end-to-end and scale-out tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from arq.worker import Worker

from outbox_relay.config import PREFIX, Settings
from tests.harness.brokers import end_process

OUTPUT_DIR = Path(os.environ.get("OUTBOX_RELAY_TEST_OUTPUT", "test-output"))


def worker_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """The environment that gives a worker process the same settings as the test's app."""
    values: dict[str, object] = {
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "secret_keys": ",".join(settings.secret_keys),
        "allow_private_networks": "1" if settings.allow_private_networks else "0",
        "queue_name": settings.queue_name,
        "slice_s": settings.slice_s,
        "lease_ttl_s": settings.lease_ttl_s,
        "schedule_interval_s": settings.schedule_interval_s,
        "connect_timeout_s": settings.connect_timeout_s,
    }
    values.update(overrides)
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env.update({PREFIX + k.upper(): str(v) for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class WorkerProcess:
    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env={**self.env, "OUTBOX_RELAY_WORKER_ID": self.name},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 10) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # in case a test left it stopped
            end_process(process, timeout_s=timeout_s)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]


class WorkerPool:
    """Starts worker processes on demand and stops them all at the end of the test."""

    def __init__(self, settings: Settings, test_name: str) -> None:
        self.settings = settings
        self.test_name = test_name
        self.workers: list[WorkerProcess] = []

    def start(self, **overrides: object) -> WorkerProcess:
        name = f"w{len(self.workers) + 1}-{self.test_name}"[:60]
        worker = WorkerProcess(
            name=name,
            env=worker_env(self.settings, **overrides),
            log_path=OUTPUT_DIR / "workers" / f"{self.test_name}-{int(time.time())}-{len(self.workers) + 1}.log",
        )
        worker.start()
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name} ---\n{w.log()[-4000:]}" for w in self.workers)


@pytest.fixture
def worker_pool(settings: Settings, request: pytest.FixtureRequest) -> Iterator[WorkerPool]:
    pool = WorkerPool(settings, request.node.name.replace("/", "_").replace("[", "_").rstrip("]"))
    try:
        yield pool
    finally:
        pool.stop_all()


async def run_replay_jobs(settings: Settings) -> None:
    """In this process: an arq worker with the real start-up and only the replay job, until its queue is empty."""
    from workers.settings import worker_settings

    ws = worker_settings(settings, data_plane=False)
    worker = Worker(
        functions=[f for f in ws["functions"] if f.name == "replay_dead_letters"],
        on_startup=ws["on_startup"],
        on_shutdown=ws["on_shutdown"],
        redis_settings=ws["redis_settings"],
        queue_name=settings.queue_name,
        burst=True,
        poll_delay=0.05,
        handle_signals=False,
        keep_result=0,
    )
    try:
        await worker.main()
    finally:
        await worker.close()
