"""Helpers for tests that drive the REST API: a tenant's view with its key on every request."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from litestar.testing import AsyncTestClient

from outbox_relay.netguard import AddressPolicy
from tests.harness.servers import LiveServer as LiveServer

if TYPE_CHECKING:
    pass

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ADMIN_KEY = "test-admin-key"
LOCAL = AddressPolicy(allow_private=True)
"""The address policy of tests whose brokers and databases are on loopback."""
_counter = itertools.count()


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


class TenantClient:
    """A tenant's view of the API: every request carries its key."""

    def __init__(self, client: AsyncTestClient[Any], name: str, key: str) -> None:
        self.client, self.name, self.key = client, name, key
        self.headers = {"Authorization": f"Bearer {key}"}

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.client.get(path, headers=self.headers, **kw)

    async def put(self, path: str, json: Any, **kw: Any) -> Any:
        return await self.client.put(path, json=json, headers=self.headers, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return await self.client.post(path, json=json, headers=self.headers, **kw)

    async def delete(self, path: str, **kw: Any) -> Any:
        return await self.client.delete(path, headers=self.headers, **kw)


async def make_tenant(client: AsyncTestClient[Any], prefix: str = "t") -> TenantClient:
    name = f"{prefix}-{next(_counter)}"
    r = await client.put(f"/v1/tenants/{name}", json={"display_name": name}, headers=admin())
    assert r.status_code == 201, r.text
    r = await client.post(f"/v1/tenants/{name}/api-keys", json={"description": "test"}, headers=admin())
    assert r.status_code == 201, r.text
    return TenantClient(client, name, r.json()["key"])


@dataclass
class Example:
    process: asyncio.subprocess.Process
    output: str = ""
    """Its standard output after the ``example`` block (what the test had not read itself)."""


@contextlib.asynccontextmanager
async def example(name: str, **env: str) -> AsyncIterator[Example]:
    """``examples/<name>`` running with ``env``; when the block ends, waits for it to exit (killed after
    60 s), checks it exited 0 and sets ``output``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Example(process)
    try:
        yield running
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"{name} failed:\n{stderr.decode()}"
    running.output = stdout.decode()


async def run_example(name: str, **env: str) -> str:
    async with example(name, **env) as running:
        pass
    return running.output
