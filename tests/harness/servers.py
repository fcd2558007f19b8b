"""The API as a live server: shared by the tests and the benches (``bench/`` imports this module and
the rest of ``tests.harness``, never the tests' own helpers)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from outbox_relay.config import Settings


class LiveServer:
    """The API under uvicorn on a free port, in a thread with its own event loop (tests and bench)."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from service.app import create_app
        from tests.harness.brokers import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-api", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
