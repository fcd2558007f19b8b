"""Specs stored before the connection-string allow-lists existed never reach a driver.

The API refuses them now (tests/api/test_input_validation.py), but rows written earlier are still
in the control DB. A worker that meets one pauses the partition with the reason in the relay's
status (``failing``, naming the parameter), charges no message and dead-letters nothing; it does
not hand the DSN to asyncpg (``?passfile=``: a file on the relay host) or the URL to redis-py
(``?path=``: a ``TypeError`` on every connect while the status said ``running``).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outbox_relay.brokers.base import Publisher
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Target
from outbox_relay.engine import PublisherCache, RelayRunner, TenantConnections
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from tests.integration.conftest import FAST_RETRY, Setup, partition_row, write

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _relay_to_redis(setup: Setup, store: ControlStore, run_id: str) -> uuid.UUID:
    r = await setup.tenant.put("/v1/targets/redis", {"kind": "redis_streams", "url": REDIS_URL, "timeout_ms": 1000})
    assert r.status_code == 201, r.text
    body = {
        "database": "app",
        "target": "redis",
        "partitions": 1,
        "policy": FAST_RETRY,
        "topic_mapping": {"*": f"outbox-relay-test:{run_id}:stored-specs:{{topic}}"},
    }
    assert (await setup.tenant.put("/v1/relays/stored", body)).status_code == 201
    return await setup.relay_id(store, "stored")


async def _store_target(store: ControlStore, setup: Setup, name: str, spec: dict[str, object]) -> None:
    """Overwrite a stored target spec, as a row written before the checks would hold it."""
    tenant = await store.get_tenant(setup.tenant.name)
    assert tenant is not None
    await store.pool.execute(
        "UPDATE targets SET kind = $3, spec = $4::text::jsonb, updated_at = now() WHERE tenant_id = $1 AND name = $2",
        tenant.id,
        name,
        spec["kind"],
        json.dumps(spec),
    )


async def _store_spec(store: ControlStore, setup: Setup, table: str, name: str, field: str, value: object) -> None:
    """Overwrite one field of a stored spec, as a row written before the checks would hold it."""
    tenant = await store.get_tenant(setup.tenant.name)
    assert tenant is not None
    await store.pool.execute(
        f"UPDATE {table} SET spec = jsonb_set(spec, ARRAY[$3::text], $4::text::jsonb), updated_at = now() "
        "WHERE tenant_id = $1 AND name = $2",
        tenant.id,
        name,
        field,
        json.dumps(value),
    )


async def _run(runner: RelayRunner, relay_id: uuid.UUID, slices: int = 3) -> None:
    for _ in range(slices):
        await runner.run_slice(relay_id, 0, "test-holder")


@pytest.fixture
async def worker_runner(settings: Settings, store: ControlStore) -> AsyncIterator[RelayRunner]:
    """A runner whose publisher factory is the worker's (workers/settings.py): open_publisher, whose
    adapters check every address they dial against the policy."""
    policy = AddressPolicy(allow_private=True)
    tenants = TenantConnections(policy=policy, timeout_s=2)

    async def factory(target: Target, password: str | None) -> Publisher:
        return await open_publisher(target, password=password, policy=policy)

    publishers = PublisherCache(factory)
    yield RelayRunner(
        settings=dataclasses.replace(settings, slice_s=1.0),
        store=store,
        secrets=SecretBox(settings.secret_keys),
        tenants=tenants,
        publishers=publishers,
    )
    await publishers.close()
    await tenants.close()


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"url": f"{REDIS_URL}?path=/tmp/redis.sock"}, "'path' is not allowed"),
        ({"url": f"{REDIS_URL}?connection_class=UnixDomainSocketConnection"}, "'connection_class' is not allowed"),
        ({"url": REDIS_URL, "maxlen": 10**30}, "invalid maxlen"),
        ({"url": "redis://127.0.0.1:0/0"}, "invalid port"),
        # refused before the address policy resolves any of them (it would stop at the first: "cannot be resolved")
        (
            {"kind": "kafka", "bootstrap_servers": [f"no-such-host-{i}.invalid:9092" for i in range(33)]},
            "at most 32",
        ),
        # a token in a stored NATS URL would be sent to the server: never handed to nats-py
        ({"kind": "nats", "servers": ["nats://s3cret-token@127.0.0.1:4222"]}, "invalid servers[0]"),
    ],
)
async def test_a_stored_target_the_checks_refuse_pauses_and_names_the_cause(
    setup: Setup, worker_runner: RelayRunner, store: ControlStore, run_id: str, spec: dict[str, object], words: str
) -> None:
    runner = worker_runner
    relay_id = await _relay_to_redis(setup, store, run_id)
    await _store_target(store, setup, "redis", {"kind": "redis_streams", "timeout_ms": 1000, **spec})
    ids = await write(setup.dsn, ("orders", "k", b"one"), ("orders", "k", b"two"))
    await _run(runner, relay_id)
    state = await partition_row(store, relay_id)
    assert state["last_error_class"] == "target_unavailable", state
    assert words in state["last_error"], state["last_error"]
    assert (state["cursor_id"], state["dead_count"], state["retry_outbox_id"]) == (0, 0, None), state
    assert await store.pool.fetchval("SELECT count(*) FROM dead_letters WHERE relay_id = $1", relay_id) == 0
    status = (await setup.tenant.get("/v1/relays/stored/status")).json()
    assert status["state"] == "failing" and status["cause"]["kind"] == "target_unreachable", status
    assert words in status["cause"]["detail"]
    # fixed with a PUT, the same messages go out
    r = await setup.tenant.put("/v1/targets/redis", {"kind": "redis_streams", "url": REDIS_URL, "timeout_ms": 1000})
    assert r.status_code == 200, r.text
    await _run(runner, relay_id, slices=1)
    assert (await partition_row(store, relay_id))["cursor_id"] == ids[-1]


async def test_a_stored_dsn_with_passfile_is_never_handed_to_asyncpg(
    setup: Setup, runner: RelayRunner, store: ControlStore, run_id: str, tmp_path: Path
) -> None:
    relay_id = await _relay_to_redis(setup, store, run_id)
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:a-password-of-the-relay-host\n")
    passfile.chmod(0o600)
    await _store_spec(store, setup, "databases", "app", "dsn", f"{setup.dsn}?passfile={passfile}")
    await write(setup.dsn, ("orders", "k", b"one"))
    await _run(runner, relay_id)
    state = await partition_row(store, relay_id)
    assert state["last_error_class"] == "database_unavailable", state
    assert "'passfile' is not allowed" in state["last_error"], state["last_error"]
    assert (state["cursor_id"], state["published_count"]) == (0, 0), state
    status = (await setup.tenant.get("/v1/relays/stored/status")).json()
    assert status["state"] == "failing" and status["cause"]["kind"] == "database_unreachable", status
    assert "passfile" in status["cause"]["detail"]
