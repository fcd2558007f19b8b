"""Container health check for the image's two roles, picked from what PID 1 runs.

* ``outbox-relay serve`` / ``dev``: ``GET /healthz`` on ``OUTBOX_RELAY_PORT`` answers 200.
* ``outbox-relay worker``: Redis answers, and arq's health-check key for the queue is fresh (arq
  rewrites it every few seconds while a worker of the queue is polling). That key is per queue, not
  per worker: it shows the data plane is alive, not that this one process is.

``python healthcheck.py [serve|worker]`` names the role instead. Exit 0 healthy, 1 not.
Standard library only, plus redis (in the image) for workers.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def _role(argv: list[str]) -> str:
    if len(argv) > 1:
        return argv[1]
    try:
        with open("/proc/1/cmdline", "rb") as f:
            init_argv = f.read().split(b"\0")
    except OSError:
        return "serve"
    return "worker" if b"worker" in init_argv else "serve"


def check_api() -> bool:
    port = os.environ.get("OUTBOX_RELAY_PORT", "8080")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as resp:
        return bool(resp.status == 200)


def check_worker() -> bool:
    import redis

    url = os.environ.get("OUTBOX_RELAY_REDIS_URL", "redis://127.0.0.1:6379/0")
    queue = os.environ.get("OUTBOX_RELAY_QUEUE_NAME", "outbox-relay")
    client = redis.Redis.from_url(url, socket_timeout=4, socket_connect_timeout=4)
    return bool(client.ping() and client.exists(f"{queue}:health-check"))


def main(argv: list[str]) -> int:
    try:
        ok = check_worker() if _role(argv) == "worker" else check_api()
    except Exception as exc:  # any failure is "unhealthy"
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
