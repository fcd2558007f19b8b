"""How long listing dead letters takes through the API, with 10,000 of them for one tenant.

Usage: ``.venv/bin/python bench/dead_letters_bench.py [--letters N] [--noise N] [--repeat N]``.
Needs the local PostgreSQL and Redis. A throw-away control database gets ``--letters`` dead letters
for one tenant (five relays, two error classes, ~200-byte JSON payloads, three attempts each) and
``--noise`` for other tenants; the API runs under uvicorn on a free port and is called over HTTP
with the tenant's key, as a script would. Everything is removed at the end. Prints a table, writes
it as JSON to ``bench/results/dead_letters.json``; never fails on a timing.

Measured (wall time per request at the client, median and p95 over ``--repeat`` runs):

first page     ``GET /v1/dead-letters`` (50 rows, with the counts per relay and error class)
filtered       the same with ``relay=`` and ``error_class=`` (about a tenth of the letters)
walk N         every letter once, following ``next_cursor`` with ``limit=N``: the whole walk's time
deep page      a page 9,900 letters in (keyset pagination: as fast as the first)
one letter     ``GET /v1/dead-letters/{id}`` (payload rendered)
dashboard      ``GET /ui/dead-letters`` (50 rows, counts, signed in)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from outbox_relay.config import Settings
from outbox_relay.crypto import generate_key
from outbox_relay.store.migrate import migrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infra import REDIS_URL, Scratch, log, pg_dsn  # (puts the repository root on the path, too)

from tests.harness.servers import LiveServer

ADMIN_KEY = "bench-admin-key"
RESULTS = Path(__file__).resolve().parent / "results" / "dead_letters.json"

# ~200-byte JSON payloads; relay-0 .. relay-4; every tenth letter too_large, the rest refused
INSERT_LETTERS = """
INSERT INTO dead_letters (tenant_id, relay_name, target_name, partition, outbox_id, outbox_txid,
    outbox_created_at, topic, key, destination, payload, headers, error_class, last_error, attempts, created_at)
SELECT $1, 'relay-' || (i % 5), 'rabbit', i % 16, i, 1000 + i, $3::timestamptz - make_interval(secs => i + 60),
    'orders', 'order-' || (i % 1000), 'orders-q',
    convert_to(json_build_object('order_id', i, 'customer', 'customer-' || (i % 977), 'state', 'paid',
        'lines', json_build_array(json_build_object('sku', 'sku-' || (i % 101), 'qty', 1 + i % 3, 'cents', 1299)),
        'note', repeat('x', 60))::text, 'UTF8'),
    '{"source": "checkout", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}',
    CASE WHEN i % 10 = 0 THEN 'too_large' ELSE 'refused' END,
    'unroutable: no queue is bound for this routing key on exchange '''' (mandatory publish returned: 312 NO_ROUTE)',
    jsonb_build_array(
        jsonb_build_object('at', $3::timestamptz - make_interval(secs => i + 3), 'error', 'unroutable'),
        jsonb_build_object('at', $3::timestamptz - make_interval(secs => i + 2), 'error', 'unroutable'),
        jsonb_build_object('at', $3::timestamptz - make_interval(secs => i + 1), 'error', 'unroutable')),
    $3::timestamptz - make_interval(secs => i)
FROM generate_series(1, $2) i
"""


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"median_ms": round(statistics.median(ms), 1), "p95_ms": round(p95, 1), "runs": len(ms)}


async def timed(repeat: int, call: Callable[[], Awaitable[httpx.Response]]) -> dict[str, float]:
    await call()  # warm: prepared statements, caches
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        r = await call()
        samples.append(time.perf_counter() - started)
        r.raise_for_status()
    return summary(samples)


async def walk(http: httpx.AsyncClient, headers: dict[str, str], limit: int) -> tuple[float, int, int, list[float]]:
    """Every letter once through the cursor: (seconds, letters, requests, per-request seconds)."""
    cursor = None
    seen = 0
    requests = 0
    per_page = []
    started = time.perf_counter()
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        t0 = time.perf_counter()
        r = await http.get("/v1/dead-letters", params=params, headers=headers)
        per_page.append(time.perf_counter() - t0)
        r.raise_for_status()
        body = r.json()
        seen += len(body["items"])
        requests += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return time.perf_counter() - started, seen, requests, per_page


async def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Scratch()
    wall = time.monotonic()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {"letters": args.letters, "noise_letters": args.noise, "repeat": args.repeat},
    }
    server: LiveServer | None = None
    try:
        dsn = pg_dsn(await scratch.database("dead_letters"))
        await migrate(dsn)
        settings = Settings(
            database_url=dsn,
            redis_url=REDIS_URL,
            admin_api_key=ADMIN_KEY,
            secret_keys=(generate_key(),),
            allow_private_networks=True,
            queue_name=f"orly-bench-{scratch.run_id}",
        )
        server = LiveServer(settings)
        server.start()
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            keys = {}
            for name in ("bench", *(f"other-{i}" for i in range(4))):
                (await http.put(f"/v1/tenants/{name}", json={}, headers=admin)).raise_for_status()
                r = await http.post(f"/v1/tenants/{name}/api-keys", json={}, headers=admin)
                r.raise_for_status()
                keys[name] = r.json()["key"]
            log(f"writing {args.letters:,} dead letters (+{args.noise:,} for other tenants)")
            conn = await asyncpg.connect(dsn)
            try:
                now = dt.datetime.now(dt.UTC)
                rows = await conn.fetch("SELECT id, name FROM tenants ORDER BY name")
                for row in rows:
                    n = args.letters if row["name"] == "bench" else args.noise // 4
                    await conn.execute(INSERT_LETTERS, row["id"], n, now)
                await conn.execute("VACUUM ANALYZE dead_letters")  # the steady state autovacuum keeps
                size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('dead_letters'))")
            finally:
                await conn.close()
            report["settings"]["table_size"] = size
            headers = {"Authorization": f"Bearer {keys['bench']}"}

            def get(path: str, **params: Any) -> Callable[[], Awaitable[httpx.Response]]:
                return lambda: http.get(path, params=params, headers=headers)

            first = await http.get("/v1/dead-letters", headers=headers)
            counts = first.json()["counts"]
            assert counts["total"] == args.letters, counts
            results: dict[str, Any] = {}
            log("first page, filtered page")
            results["first page (50, with counts)"] = await timed(args.repeat, get("/v1/dead-letters"))
            results["first page (500, with counts)"] = await timed(args.repeat, get("/v1/dead-letters", limit=500))
            results["filtered (relay + error_class)"] = await timed(
                args.repeat, get("/v1/dead-letters", relay="relay-0", error_class="too_large")
            )
            results["filtered by key (10 rows)"] = await timed(args.repeat, get("/v1/dead-letters", key="order-7"))
            for limit in (100, 500):
                log(f"walking all {args.letters:,} with limit={limit}")
                samples = []
                pages: list[float] = []
                for _ in range(max(1, args.repeat // 5)):
                    seconds, seen, requests, per_page = await walk(http, headers, limit)
                    assert seen == args.letters, seen
                    samples.append(seconds)
                    pages.extend(per_page)
                results[f"walk all {args.letters:,} (limit {limit}, {requests} requests)"] = {
                    **summary(samples),
                    "per_request": summary(pages),
                }
            cursor = None
            for _ in range((args.letters - 100) // 495):  # to the cursor 9,900 letters in
                params: dict[str, Any] = {"limit": 495, **({"cursor": cursor} if cursor else {})}
                cursor = (await http.get("/v1/dead-letters", params=params, headers=headers)).json()["next_cursor"]
            results[f"deep page (after {args.letters - 100:,})"] = await timed(
                args.repeat, get("/v1/dead-letters", limit=50, cursor=cursor)
            )
            letter_id = first.json()["items"][0]["id"]
            results["one letter (GET by id)"] = await timed(args.repeat, get(f"/v1/dead-letters/{letter_id}"))
            results["admin, every tenant (50)"] = await timed(
                args.repeat, lambda: http.get("/v1/dead-letters", headers=admin)
            )
            log("dashboard page")
            r = await http.post("/ui/login", data={"key": keys["bench"]}, follow_redirects=False)
            cookies = dict(r.cookies)
            results["dashboard list page (50 rows)"] = await timed(
                args.repeat, lambda: http.get("/ui/dead-letters", cookies=cookies)
            )
            report["results"] = results
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        await scratch.close()
    report["wall_seconds"] = round(time.monotonic() - wall, 1)
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'listing dead letters through the API':<48} {'median':>10} {'p95':>10}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<48} {r['median_ms']:>8.1f}ms {r['p95_ms']:>8.1f}ms")
        if "per_request" in r:
            p = r["per_request"]
            lines.append(f"{'  per request':<48} {p['median_ms']:>8.1f}ms {p['p95_ms']:>8.1f}ms")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--letters", type=int, default=10_000, help="dead letters of the measured tenant")
    parser.add_argument("--noise", type=int, default=40_000, help="dead letters of four other tenants")
    parser.add_argument("--repeat", type=int, default=20, help="runs per measurement")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        report = asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(
        f"\n{report['machine']['cpus']} cpus, load {report['machine']['load_average_at_start']} at start; "
        f"{report['settings']['table_size']} of dead letters; {report['wall_seconds']} s; JSON in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
