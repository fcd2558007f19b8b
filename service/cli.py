"""``outbox-relay``: run the API, a worker, migrations, or everything at once for local use.

outbox-relay dev            API + one worker in one process, on local defaults
outbox-relay serve          the API (uvicorn)
outbox-relay worker         one arq worker
outbox-relay migrate        apply control DB migrations
outbox-relay generate-key   print a new secret key for OUTBOX_RELAY_SECRET_KEYS
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import socket
import sys
from pathlib import Path

from outbox_relay import cli_api
from outbox_relay.config import Settings
from outbox_relay.errors import ConfigError

SERVER_EXTRA_HINT = "needs the server's dependencies: pip install 'outbox-relay[server]'"
"""What a command other than ``api`` says in an install without the ``server`` extra (the tenant-side
package, msgspec only), where ``outbox-relay api`` works: it and this module import only the standard
library and msgspec until a command needs more."""
DEV_ADMIN_KEY = "dev-admin-key"
DEV_STATE_DIR = Path(".outbox-relay")
WORKER_GC_THRESHOLD = (50_000, 20, 20)
"""The worker's cyclic garbage collector: a young collection per 50,000 tracked allocations (Python's
default is 700). A worker reads rows in thousands (asyncpg records, rows, messages, all alive until
their batch is published), so at the default each read set off several young collections, and
moved its rows into the older generations whose collections walk everything buffered: in a
profile of a 1,024-partition relay draining 200,000 rows, 33% of the worker's time was in
``gc_collect_main`` (16% for 16 partitions). With this threshold and ``gc.freeze()`` after start-up,
that drain ran at 23,335 msg/s against 19,107 (16 partitions 25,897 against 24,410)."""


def dev_settings() -> Settings:
    """Local defaults: a persisted secret key, a known admin key, loopback targets allowed."""
    from outbox_relay.crypto import generate_key

    overrides: dict[str, object] = {}
    if not os.environ.get("OUTBOX_RELAY_SECRET_KEYS"):
        key_file = DEV_STATE_DIR / "secret.key"
        if not key_file.exists():
            DEV_STATE_DIR.mkdir(exist_ok=True)
            key_file.write_text(generate_key())
            key_file.chmod(0o600)
        overrides["secret_keys"] = (key_file.read_text().strip(),)
    if not os.environ.get("OUTBOX_RELAY_ADMIN_API_KEY"):
        overrides["admin_api_key"] = DEV_ADMIN_KEY
    if not os.environ.get("OUTBOX_RELAY_ALLOW_PRIVATE_NETWORKS"):
        overrides["allow_private_networks"] = True
    return Settings.from_env(None, **overrides)


async def _migrate(settings: Settings, *, create: bool) -> None:
    from outbox_relay.store.migrate import ensure_database, migrate

    if create and await ensure_database(settings.database_url):
        logging.info("created control database")
    applied = await migrate(settings.database_url)
    logging.info("migrations applied: %s", ", ".join(applied) or "none pending")


def _worker(settings: Settings, *, handle_signals: bool) -> object:
    from workers.settings import worker_settings
    from workers.worker import RelayWorker

    kwargs = worker_settings(settings)
    kwargs["handle_signals"] = handle_signals
    worker = RelayWorker(**kwargs)
    gc.freeze()  # what start-up built lives as long as the process: no collection walks it again
    gc.set_threshold(*WORKER_GC_THRESHOLD)
    return worker


def _listen(settings: Settings, command: str) -> socket.socket:
    """The API's socket, bound before anything else starts: a port that is taken ends the command at
    once with what to do, not after the migrations, a banner naming the URL, and uvicorn's bare
    ``[Errno 98] address already in use``. uvicorn then serves on this socket."""
    host, port = settings.host, settings.port
    try:
        return _bind(host, port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} (set OUTBOX_RELAY_HOST and OUTBOX_RELAY_PORT)"
            ) from exc
        free = _free_port_after(host, port)
        again = f"OUTBOX_RELAY_PORT={free} make run (or outbox-relay dev --port {free})"
        if command != "dev":
            again = f"OUTBOX_RELAY_PORT={free} outbox-relay {command} (or --port {free})"
        raise ConfigError(
            f"port {port} on {host} is already in use (another `make run`?). "
            f"Stop what listens there, or use another port: {again}"
        ) from exc


def _bind(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


def _free_port_after(host: str, port: int) -> int:
    """The first port after ``port`` that can be bound now, to suggest (the next one if none of 20 is)."""
    for candidate in range(port + 1, min(port + 21, 65536)):
        try:
            _bind(host, candidate).close()
        except OSError:
            continue
        return candidate
    return port + 1


async def _serve(settings: Settings, sock: socket.socket, *, with_worker: bool) -> None:
    import uvicorn

    from service.app import create_app

    # log_config=None: uvicorn's loggers go through ours (one format, and QUIET_LOGGERS holds)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_config=None)
    server = uvicorn.Server(config)
    if not with_worker:  # dev prints its banner; uvicorn names no URL for a socket it did not bind
        logging.getLogger("outbox_relay.api").info("serving the API on http://%s:%s", settings.host, settings.port)
    tasks = [asyncio.create_task(server.serve(sockets=[sock]))]
    worker = None
    if with_worker:
        worker = _worker(settings, handle_signals=False)
        tasks.append(asyncio.create_task(worker.async_run()))  # type: ignore[attr-defined]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    if worker is not None:
        await worker.close()  # type: ignore[attr-defined]
    for task in tasks:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for task in done:
        if task.exception():
            raise task.exception()  # type: ignore[misc]


async def _run_worker(settings: Settings) -> None:
    """arq's own signal handling: SIGINT/SIGTERM cancel the worker's jobs and its main loop."""
    worker = _worker(settings, handle_signals=True)
    try:
        await worker.async_run()  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        pass
    finally:
        await worker.close()  # type: ignore[attr-defined]


QUIET_LOGGERS = {
    "arq": "a line as each job starts and ends (the outbox maintenance cron's every minute included), its "
    "start-up, and a health line whenever its counters move",
    "uvicorn.error": "its start-up and shutdown steps (errors still show: they are warnings or worse)",
}
"""Loggers held at WARNING unless ``OUTBOX_RELAY_LOG_LEVEL=DEBUG``: what they say at INFO is how the
machinery runs, not something that happened; under ``make run`` it buried the lines that matter. What
happens is logged by this code, a line each: a dead-letter replay's outcome, a dropped outbox
partition, partitions claimed or given back, an outage and its end, and (uvicorn's access log) each
request to the API."""


def _configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("OUTBOX_RELAY_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    """The command line: ``dev``, ``serve``, ``worker``, ``migrate``, ``generate-key`` and ``api ...``."""
    parser = argparse.ArgumentParser(prog="outbox-relay", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    port_help = "the API's port (default: OUTBOX_RELAY_PORT, else 8080)"
    dev = sub.add_parser(
        "dev",
        help="API + worker in one process, local defaults",
        description="The API and one worker in one process, with a development secret key (.outbox-relay/) and "
        f"the admin key {DEV_ADMIN_KEY}; all OUTBOX_RELAY_* settings apply (`make run` runs this).",
    )
    dev.add_argument("--port", type=int, default=None, help=port_help)
    serve = sub.add_parser("serve", help="run the API")
    serve.add_argument("--port", type=int, default=None, help=port_help)
    sub.add_parser("worker", help="run one worker")
    sub.add_parser("migrate", help="apply control DB migrations")
    sub.add_parser("generate-key", help="print a new secret key")
    cli_api.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "api":
        return cli_api.run(args)
    _configure_logging()

    try:
        if args.command == "generate-key":
            from outbox_relay.crypto import generate_key

            print(generate_key())
            return 0
        settings = dev_settings() if args.command == "dev" else Settings.from_env()
        if getattr(args, "port", None):
            settings = dataclasses.replace(settings, port=args.port)
        if args.command in ("worker", "serve", "dev"):
            from outbox_relay import telemetry

            telemetry.configure(f"outbox-relay-{args.command}")
            if args.command == "worker" and settings.metrics_port:
                telemetry.start_metrics_server(settings.metrics_port, settings.metrics_host)
        if args.command == "migrate":
            asyncio.run(_migrate(settings, create=False))
        elif args.command == "worker":
            asyncio.run(_run_worker(settings))
        elif args.command == "serve":
            asyncio.run(_serve(settings, _listen(settings, "serve"), with_worker=False))
        elif args.command == "dev":
            sock = _listen(settings, "dev")
            asyncio.run(_migrate(settings, create=True))
            print(
                f"Outbox Relay on http://{settings.host}:{settings.port}  (docs: /docs)\n"
                f"admin API key: {settings.admin_api_key}",
                file=sys.stderr,
            )
            asyncio.run(_serve(settings, sock, with_worker=True))
    except ConfigError as exc:
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(f"outbox-relay {args.command}: {SERVER_EXTRA_HINT} ({exc})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
