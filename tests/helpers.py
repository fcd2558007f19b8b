"""Helpers for tests that drive the REST API: a tenant's view with its key on every request."""

from __future__ import annotations

import itertools
from typing import Any

from litestar.testing import AsyncTestClient

ADMIN_KEY = "test-admin-key"
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
