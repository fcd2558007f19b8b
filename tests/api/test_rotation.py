"""A password rotation through the API and the control DB, without workers: what starts one, what the
GET shows (never a secret), when the old secret is deleted, the audit entries. A live worker owning
a partition is a ``workers`` row and the partitions' ``lease_holder``, as the fleet writes them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.store.control import ControlStore
from tests.helpers import TenantClient

DSN = "postgresql://app@127.0.0.1:5432/nowhere"
TARGET = {"kind": "redis_streams", "url": "redis://app@127.0.0.1:6379/0"}


@pytest.fixture
async def control(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ControlStore]:
    s = await ControlStore.connect(settings.database_url, max_size=2)
    yield s
    await s.close()


async def secrets_of(control: asyncpg.Connection, box: SecretBox, tenant: str, table: str) -> tuple[str, str | None]:
    row = await control.fetchrow(
        f"SELECT x.secret, x.pending_secret FROM {table} x JOIN tenants t ON t.id = x.tenant_id WHERE t.name = $1",
        tenant,
    )
    assert row is not None
    return box.decrypt(row["secret"]), box.decrypt(row["pending_secret"]) if row["pending_secret"] else None


async def actions(control: asyncpg.Connection, tenant: str) -> list[tuple[str, str]]:
    rows = await control.fetch(
        "SELECT action, resource FROM audit_log a JOIN tenants t ON t.id = a.tenant_id WHERE t.name = $1 "
        "AND split_part(resource, '/', 1) IN ('databases', 'targets', 'relays') ORDER BY a.id",
        tenant,
    )
    return [(r["action"], r["resource"]) for r in rows]


@pytest.fixture
async def live_worker(control: asyncpg.Connection) -> AsyncIterator[Any]:
    """A fake live worker that will own the partitions of the relays handed to ``own``."""
    key = f"test-rotation#{uuid.uuid4().hex[:8]}"
    await control.execute("INSERT INTO workers (key) VALUES ($1)", key)

    class Worker:
        name = key

        async def own(self, relay_id: str) -> None:
            await control.execute("UPDATE relay_partitions SET lease_holder = $1 WHERE relay_id = $2", key, relay_id)

    yield Worker()
    await control.execute("UPDATE relay_partitions SET lease_holder = NULL WHERE lease_holder = $1", key)
    await control.execute("DELETE FROM workers WHERE key = $1", key)


async def test_a_password_alone_rotates_at_once_when_no_worker_uses_it(
    tenant: TenantClient, settings: Settings, control: asyncpg.Connection
) -> None:
    box = SecretBox(settings.secret_keys)
    assert (await tenant.put("/v1/databases/app", {"dsn": DSN, "password": "one"})).status_code == 201
    r = await tenant.put("/v1/databases/app", {"dsn": DSN, "password": "two"})
    assert r.status_code == 200, r.text
    assert "rotation" not in r.json() and "password" not in r.json()
    assert await secrets_of(control, box, tenant.name, "databases") == ("two", None)
    assert await actions(control, tenant.name) == [
        ("create", "databases/app"),
        ("rotation-start", "databases/app"),
        ("rotation-complete", "databases/app"),
    ]


async def test_a_rotation_waits_for_every_live_worker_and_then_drops_the_old_secret(
    tenant: TenantClient, settings: Settings, control: asyncpg.Connection, store: ControlStore, live_worker: Any
) -> None:
    box = SecretBox(settings.secret_keys)
    assert (await tenant.put("/v1/databases/app", {"dsn": DSN, "password": "db-one"})).status_code == 201
    assert (await tenant.put("/v1/targets/out", {**TARGET, "password": "one"})).status_code == 201
    relay = await tenant.put("/v1/relays/r", {"database": "app", "target": "out", "topic_mapping": {"*": "x"}})
    assert relay.status_code == 201, relay.text
    relay_id = await control.fetchval("SELECT id FROM relays WHERE name = 'r' AND tenant_id = "
                                      "(SELECT id FROM tenants WHERE name = $1)", tenant.name)  # fmt: skip
    await live_worker.own(relay_id)
    target_id = await control.fetchval("SELECT target_id FROM relays WHERE id = $1", relay_id)
    updated_at = (await tenant.get("/v1/targets/out")).json()["updated_at"]

    r = await tenant.put("/v1/targets/out", {**TARGET, "password": "two"})
    assert r.status_code == 200, r.text
    rotation = r.json()["rotation"]
    assert rotation["state"] == "switching" and rotation["workers"] == 1 and rotation["switched"] == 0, rotation
    assert r.json()["updated_at"] == updated_at, "a rotation restarted the relays"
    assert "two" not in r.text and "one" not in r.text
    assert await secrets_of(control, box, tenant.name, "targets") == ("one", "two")

    # the pending password again changes nothing; the worker reports it refused
    assert (await tenant.put("/v1/targets/out", {**TARGET, "password": "two"})).json()["rotation"] is not None
    version = await control.fetchval("SELECT pending_version FROM targets WHERE id = $1", target_id)
    await store.report_credential(
        live_worker.name, "targets", target_id, version - 1, refused_version=version, error="WRONGPASS"
    )
    rotation = (await tenant.get("/v1/targets/out")).json()["rotation"]
    assert rotation["state"] == "refused" and rotation["error"] == "WRONGPASS", rotation
    assert await store.complete_rotations(settings.lease_ttl_s, "test") == []

    # the server takes it now: the worker switched, and the rotation completes
    await store.report_credential(live_worker.name, "targets", target_id, version)
    assert (await tenant.get("/v1/targets/out")).json()["rotation"]["switched"] == 1
    done = await store.complete_rotations(settings.lease_ttl_s, "worker:test")
    assert [resource for _, resource in done] == ["targets/out"]
    assert "rotation" not in (await tenant.get("/v1/targets/out")).json()
    assert await secrets_of(control, box, tenant.name, "targets") == ("two", None)
    assert await actions(control, tenant.name) == [
        ("create", "databases/app"),
        ("create", "targets/out"),
        ("create", "relays/r"),
        ("rotation-start", "targets/out"),
        ("put", "targets/out"),
        ("rotation-complete", "targets/out"),
    ]


async def test_the_current_password_cancels_and_a_spec_change_replaces(
    tenant: TenantClient, settings: Settings, control: asyncpg.Connection, live_worker: Any
) -> None:
    box = SecretBox(settings.secret_keys)
    assert (await tenant.put("/v1/databases/app", {"dsn": DSN, "password": "one"})).status_code == 201
    assert (await tenant.put("/v1/targets/out", {**TARGET, "password": "t"})).status_code == 201
    relay = {"database": "app", "target": "out", "topic_mapping": {"*": "x"}}
    assert (await tenant.put("/v1/relays/r", relay)).status_code == 201
    relay_id = await control.fetchval("SELECT r.id FROM relays r JOIN tenants t ON t.id = r.tenant_id "
                                      "WHERE t.name = $1", tenant.name)  # fmt: skip
    await live_worker.own(relay_id)

    assert (await tenant.put("/v1/databases/app", {"dsn": DSN, "password": "two"})).json()["rotation"] is not None
    r = await tenant.put("/v1/databases/app", {"dsn": DSN, "password": "one"})
    assert r.status_code == 200 and "rotation" not in r.json(), r.text
    assert await secrets_of(control, box, tenant.name, "databases") == ("one", None)

    # a new password with a new DSN is an ordinary replace (the relays restart on it), no rotation
    assert (await tenant.put("/v1/databases/app", {"dsn": DSN, "password": "two"})).json()["rotation"] is not None
    r = await tenant.put("/v1/databases/app", {"dsn": DSN + "2", "password": "three"})
    assert r.status_code == 200 and "rotation" not in r.json(), r.text
    assert await secrets_of(control, box, tenant.name, "databases") == ("three", None)
    assert [a for a, _ in await actions(control, tenant.name)][3:] == [
        "rotation-start",
        "rotation-cancel",
        "rotation-start",
        "put",
    ]


async def test_a_new_user_with_its_password_is_a_rotation_too(
    tenant: TenantClient, settings: Settings, control: asyncpg.Connection, store: ControlStore, live_worker: Any
) -> None:
    """PostgreSQL has one password per role: a rotation without a gap moves to a second role, so a PUT
    that changes the DSN's user along with the password rotates (the new user shows once done)."""
    box = SecretBox(settings.secret_keys)
    assert (await tenant.put("/v1/databases/app", {"dsn": DSN, "password": "one"})).status_code == 201
    assert (await tenant.put("/v1/targets/out", {**TARGET, "password": "t"})).status_code == 201
    relay = {"database": "app", "target": "out", "topic_mapping": {"*": "x"}}
    assert (await tenant.put("/v1/relays/r", relay)).status_code == 201
    relay_id, database_id = await control.fetchrow(
        "SELECT r.id, r.database_id FROM relays r JOIN tenants t ON t.id = r.tenant_id WHERE t.name = $1", tenant.name
    )
    await live_worker.own(relay_id)
    new_dsn = DSN.replace("app@", "app_b@")
    r = await tenant.put("/v1/databases/app", {"dsn": new_dsn, "password": "two"})
    assert r.status_code == 200 and r.json()["rotation"] is not None, r.text
    assert r.json()["dsn"] == DSN
    version = await control.fetchval("SELECT pending_version FROM databases WHERE id = $1", database_id)
    await store.report_credential(live_worker.name, "databases", database_id, version)
    assert [res for _, res in await store.complete_rotations(settings.lease_ttl_s, "test")] == ["databases/app"]
    assert (await tenant.get("/v1/databases/app")).json()["dsn"] == new_dsn
    assert await secrets_of(control, box, tenant.name, "databases") == ("two", None)
