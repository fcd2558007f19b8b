"""The README's quick start, run as written, twice (it must be repeatable), against a live API and a
worker process.

The script is the README's own block with three things moved out of the way of a developer's own
``make run``: the API's address, its admin key, and the name ``shop`` (database, stream, relay), which
becomes one of this run. It runs under ``bash -eu``, so any step that fails fails the test.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import REDIS_URL, RUN_ID, pg_dsn
from tests.helpers import ADMIN_KEY, LiveServer, admin
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
QUICK_START = re.compile(r"^## Quick start\b.*?^```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)
MESSAGE = re.compile(r"^message ([0-9a-f-]{36})$", re.MULTILINE)
ENTRY_ID = re.compile(r"\d+-\d+")


def quick_start_script(api_url: str, name: str) -> str:
    match = QUICK_START.search((ROOT / "README.md").read_text())
    assert match, "README.md has no quick start block"
    script = match[1]
    for old, new in (("http://127.0.0.1:8080", api_url), ("dev-admin-key", ADMIN_KEY)):
        assert old in script, f"the quick start no longer uses {old}"
        script = script.replace(old, new)
    assert re.search(r"\bshop\b", script)
    return re.sub(r"\bshop\b", name, script)


async def run_bash(script: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "bash", "-eu", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"the quick start failed ({process.returncode}):\n{text}"
    return text


async def test_the_quick_start_works_as_written_and_again(live_api: LiveServer, worker_pool: WorkerPool) -> None:
    name = f"orly_shop_{RUN_ID}"
    worker_pool.start()
    script = quick_start_script(live_api.url, name)
    seen: list[str] = []
    try:
        for run in (1, 2):
            out = await run_bash(script)
            ids = MESSAGE.findall(out)
            assert len(ids) == 1, out
            message_id = ids[0]
            # the XRANGE at the end shows one entry, this run's: payload, outbox-id and the relay's headers
            xrange = out[out.index(f"message {message_id}\n") :].splitlines()[1:]
            assert len([line for line in xrange if ENTRY_ID.fullmatch(line)]) == 1, out
            fields = dict(zip(xrange[1::2], xrange[2::2], strict=False))
            assert fields["payload"] == '{"id": 1, "state": "paid"}' and fields["outbox-id"] == message_id, out
            assert fields["h:outbox-relay"] == f"{name}-events" and fields["h:outbox-topic"] == "orders", out
            assert '"oldest_pending_age_s"' not in out, f"run {run} waited in vain and printed the status:\n{out}"
            assert not any(old in out for old in seen), f"run {run} found an earlier run's message:\n{out}"
            seen.append(message_id)
    finally:
        async with httpx.AsyncClient(base_url=live_api.url) as http:
            assert (await http.delete("/v1/tenants/acme", headers=admin())).status_code == 204
        conn = await asyncpg.connect(pg_dsn("postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        redis = Redis.from_url(REDIS_URL)
        try:
            await redis.delete(f"{name}:orders")
        finally:
            await redis.aclose()
