"""A client generated from the committed spec (``openapi/openapi.json``) drives the README's quick start
against the live API, as a tenant who generates one would: tenant and key (admin), database and its
outbox, a Redis Streams target, a relay, a relayed message, the relay's status, a dead letter.

The generator is openapi-python-client (pinned by the lock), run with ``--fail-on-warning``: a spec
construct it cannot use fails here, and is fixed where the spec comes from (the litestar app in
``service/``, then ``make openapi``; tests/api/test_openapi.py keeps the file equal to the app).
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from outbox_relay.client import add, schema_sql
from tests.conftest import RUN_ID, DatabaseFactory, LiveServer, pg_dsn
from tests.harness.brokers import RedisAccount
from tests.helpers import ADMIN_KEY
from tests.workers import WorkerPool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "openapi" / "openapi.json"
PACKAGE = "outbox_relay_api"
GENERATOR = Path(sys.executable).parent / "openapi-python-client"
CONFIG = f"package_name_override: {PACKAGE}\npost_hooks: []\n"
"""No post hooks: the generator would run ruff over its output, which changes its looks, not what it does."""


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated package, importable for this module only."""
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    config.write_text(CONFIG)
    proc = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--path",
            str(SPEC),
            "--meta",
            "none",
            "--output-path",
            str(out / PACKAGE),
            "--config",
            str(config),
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"the generator refused the spec:\n{proc.stdout}\n{proc.stderr}"
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def api(name: str) -> Any:
    """One generated module, e.g. ``api("relays.get_relay_status")``."""
    return importlib.import_module(f"{PACKAGE}.api.{name}")


def models() -> Any:
    return importlib.import_module(f"{PACKAGE}.models")


async def call(operation: str, *args: Any, expect: int, **kwargs: Any) -> Any:
    """Call a generated operation; the status must be ``expect``; the parsed body is returned."""
    response = await api(operation).asyncio_detailed(*args, **kwargs)
    assert response.status_code == HTTPStatus(expect), (operation, response.status_code, response.content)
    return response.parsed


async def test_the_quick_start_through_a_generated_client(
    generated: ModuleType,
    live_api: LiveServer,
    databases: DatabaseFactory,
    redis_account: RedisAccount,
    worker_pool: WorkerPool,
) -> None:
    m = models()
    tenant_name = f"gen-{RUN_ID}"
    async with generated.AuthenticatedClient(base_url=live_api.url, token=ADMIN_KEY) as admin:
        # 1. the operator: a tenant and its API key
        body = m.TenantWrite(display_name="Acme")
        tenant = await call("tenants_admin.put_tenant", tenant_name, client=admin, body=body, expect=201)
        assert (tenant.name, tenant.display_name) == (tenant_name, "Acme")
        body = m.ApiKeyWrite(description="generated client")
        new_key = await call("tenants_admin.create_api_key", tenant_name, client=admin, body=body, expect=201)
        try:
            async with generated.AuthenticatedClient(base_url=live_api.url, token=new_key.key) as client:
                await quick_start(m, client, databases, redis_account, worker_pool)
        finally:
            await call("tenants_admin.delete_tenant", tenant_name, client=admin, expect=204)


async def quick_start(
    m: Any, client: Any, databases: DatabaseFactory, redis_account: RedisAccount, worker_pool: WorkerPool
) -> None:
    """Steps 2 to 4 of the README's quick start and a dead letter, as the tenant."""
    # 2. the application database, and the outbox installed into it (or the DDL handed out)
    shop = pg_dsn(await databases.create("generated_shop"))
    database = await call("databases.put_database", "shop", client=client, body=m.Database(dsn=shop), expect=201)
    assert (database.name, database.dsn, database.password_set) == ("shop", shop, False)
    provisioned = await call("databases.provision_database", "shop", client=client, expect=200)
    assert (provisioned.database, provisioned.schema) == ("shop", "outbox_relay")
    ddl = await call("databases.get_database_schema_sql", "shop", client=client, expect=200)
    assert ddl == schema_sql("outbox_relay")

    # 3. a Redis Streams target, and a relay to it that dead-letters a payload over 64 bytes at once
    target = m.RedisStreamsTarget(
        kind=m.RedisStreamsTargetKind.REDIS_STREAMS, url=redis_account.url, password=redis_account.password
    )
    stored = await call("targets.put_target", "local-redis", client=client, body=target, expect=201)
    assert isinstance(stored, m.RedisStreamsTarget) and stored.password_set is True
    relay = m.Relay(
        database="shop",
        target="local-redis",
        topic_mapping=m.RelayTopicMapping.from_dict({"*": f"{redis_account.prefix}shop:{{topic}}"}),
        partitions=1,
        policy=m.RelayPolicy(poll_interval_ms=100, max_payload_bytes=64),
    )
    stored = await call("relays.put_relay", "shop-events", client=client, body=relay, expect=201)
    assert (stored.partitions, stored.policy.max_payload_bytes) == (1, 64)

    # 4. the service writes two messages in one transaction; a worker relays the one that fits
    conn = await asyncpg.connect(shop)
    try:
        async with conn.transaction():
            delivered = await add(conn, "orders", key="order-1", payload={"id": 1, "state": "paid"})
            too_big = await add(conn, "orders", key="order-2", payload={"id": 2, "note": "x" * 100})
    finally:
        await conn.close()
    worker_pool.start()
    try:
        deadline = time.monotonic() + 30
        status = await call("relays.get_relay_status", "shop-events", client=client, expect=200)
        while (status.published, status.dead_lettered) != (1, 1) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            status = await call("relays.get_relay_status", "shop-events", client=client, expect=200)
        assert (status.published, status.dead_lettered) == (1, 1), worker_pool.logs()
        redis = aioredis.Redis.from_url(redis_account.admin_url)
        try:
            entries = await redis.xrange(f"{redis_account.prefix}shop:orders")
        finally:
            await redis.aclose()
        assert [fields[b"outbox-id"].decode() for _, fields in entries] == [str(delivered)]
        overview = await call("status.get_tenant_status", client=client, expect=200)
        assert [(r.relay, r.published, r.dead_lettered) for r in overview.relays] == [("shop-events", 1, 1)]

        # the dead letter: listed, read whole, discarded
        page = await call("dead_letters.list_dead_letters", client=client, expect=200)
        assert [(letter.key, letter.status) for letter in page.items] == [("order-2", m.DeadLetterSummaryStatus.DEAD)]
        letter = await call("dead_letters.get_dead_letter", page.items[0].id, client=client, expect=200)
        assert letter.message_id == str(too_big) and "max_payload_bytes" in letter.last_error
        discarded = await call("dead_letters.discard_dead_letter", letter.id, client=client, expect=200)
        assert discarded.status == m.DeadLetterStatus.DISCARDED
        page = await call("dead_letters.list_dead_letters", client=client, expect=200)
        assert page.items == []
    finally:
        # later tests' workers need not run this relay
        await call("relays.delete_relay", "shop-events", client=client, expect=204)
