"""A tenant's resources: databases, targets and relays (specs, secrets, references between them)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg

from outbox_relay.errors import (
    ImmutableField,
    InUse,
    OutOfBounds,
    QuotaExceeded,
    RelayChanged,
    UnknownReference,
)
from outbox_relay.store.base import StoreBase
from outbox_relay.store.rows import (
    RelayRoute,
    ResourceRow,
    ResourceTable,
    TargetRow,
    Unchanged,
    _resource,
    _select,
    _table,
)


class ResourcesStore(StoreBase):
    # --- tenant resources ------------------------------------------------------------------------

    async def get_resource(self, table: ResourceTable, tenant_id: uuid.UUID, name: str) -> ResourceRow | None:
        row = await self.pool.fetchrow(_select(table) + " WHERE tenant_id = $1 AND name = $2", tenant_id, name)
        return _resource(row) if row else None

    async def list_resources(
        self, table: ResourceTable, tenant_id: uuid.UUID, after: str | None, limit: int
    ) -> list[ResourceRow]:
        rows = await self.pool.fetch(
            _select(table) + " WHERE tenant_id = $1 AND ($2::text IS NULL OR name > $2) ORDER BY name LIMIT $3",
            tenant_id,
            after,
            limit,
        )
        return [_resource(r) for r in rows]

    async def put_database(
        self,
        tenant_id: uuid.UUID,
        name: str,
        spec: bytes,
        secret: bytes | Unchanged | None,
        *,
        quotas: Mapping[str, int],
    ) -> tuple[ResourceRow, bool]:
        """Create or replace; creating raises QuotaExceeded past the tenant's ``databases`` quota."""
        return await self._put("databases", tenant_id, name, spec, secret, {}, quotas)

    async def put_target(
        self,
        tenant_id: uuid.UUID,
        name: str,
        kind: str,
        spec: bytes,
        secret: bytes | Unchanged | None,
        *,
        quotas: Mapping[str, int],
    ) -> tuple[ResourceRow, bool]:
        """Create or replace; creating raises QuotaExceeded past the tenant's ``targets`` quota."""
        return await self._put("targets", tenant_id, name, spec, secret, {"kind": kind}, quotas)

    async def _put(
        self,
        table: ResourceTable,
        tenant_id: uuid.UUID,
        name: str,
        spec: bytes,
        secret: bytes | Unchanged | None,
        extra: dict[str, Any],
        quotas: Mapping[str, int],
    ) -> tuple[ResourceRow, bool]:
        cols = ["tenant_id", "name", "spec", *extra]
        values: list[Any] = [tenant_id, name, spec.decode(), *extra.values()]
        updates = ["spec = EXCLUDED.spec", *(f"{c} = EXCLUDED.{c}" for c in extra)]
        if not isinstance(secret, Unchanged):
            cols.append("secret")
            values.append(secret)
            # an ordinary replace of the secret (with its spec) restarts the relays; a rotation pending
            # then is forgotten, and workers that switched to it are told by the version
            updates += [
                "secret = EXCLUDED.secret",
                f"secret_version = greatest({_table(table)}.secret_version, "
                f"coalesce({_table(table)}.pending_version, 0)) + 1",
                "pending_secret = NULL",
                "pending_spec = NULL",
                "pending_version = NULL",
                "rotation_started_at = NULL",
            ]
        placeholders = ", ".join(f"${i + 1}" + ("::jsonb" if c == "spec" else "") for i, c in enumerate(cols))
        async with self.transaction() as conn:
            limit = (await self._limits(conn, tenant_id, quotas, table))[table]
            exists = await conn.fetchval(
                f"SELECT true FROM {_table(table)} WHERE tenant_id = $1 AND name = $2", tenant_id, name
            )
            if not exists:
                used = await conn.fetchval(f"SELECT count(*) FROM {_table(table)} WHERE tenant_id = $1", tenant_id)
                if used + 1 > limit:
                    raise QuotaExceeded(quota=table, limit=limit, used=used)
            row = await conn.fetchrow(
                f"INSERT INTO {_table(table)} ({', '.join(cols)}) VALUES ({placeholders}) "
                f"ON CONFLICT (tenant_id, name) DO UPDATE SET {', '.join(updates)}, updated_at = now() "
                "RETURNING id, name, spec::text AS spec, secret IS NOT NULL AS has_secret, "
                "created_at, updated_at, rotation_started_at, (xmax = 0) AS inserted",
                *values,
            )
        return _resource(row), bool(row["inserted"])

    async def put_relay(
        self,
        tenant_id: uuid.UUID,
        name: str,
        spec: bytes,
        *,
        database: str,
        target: str,
        partitions: int,
        enabled: bool,
        quotas: Mapping[str, int],
        max_partitions: int = 1024,
        expect_updated_at: datetime | None = None,
    ) -> tuple[ResourceRow, bool]:
        """Create or replace a relay. Raises UnknownReference (missing database/target), ImmutableField
        (a change to a field fixed at creation) or, creating, QuotaExceeded (the tenant's ``relays`` or
        ``partitions`` quota) and OutOfBounds (more than ``max_partitions``; a relay made before the
        bound was lowered keeps its partitions and can still be updated). With ``expect_updated_at``
        (a read-modify-write of a relay read before) only that version is replaced: RelayChanged
        when the relay was written since, or deleted."""
        async with self.transaction() as conn:
            limits = await self._limits(conn, tenant_id, quotas, "relays", "partitions")
            db_id, target_id = await _relay_references(conn, tenant_id, database, target)
            existing = await _relay_for_update(conn, tenant_id, name, expect_updated_at)
            if existing is not None:
                return await _update_relay(conn, existing, db_id, target_id, partitions, enabled, spec), False
            if partitions > max_partitions:
                raise OutOfBounds(
                    f"partitions: at most {max_partitions} per relay on this service",
                    field="partitions",
                    limit=max_partitions,
                )
            await _check_relay_quotas(conn, tenant_id, limits, partitions)
            return await _insert_relay(conn, tenant_id, name, db_id, target_id, partitions, enabled, spec), True

    async def delete_resource(self, table: ResourceTable, tenant_id: uuid.UUID, name: str) -> bool:
        """Delete; raises :class:`InUse` while a relay still uses it."""
        try:
            deleted = await self.pool.fetchval(
                f"DELETE FROM {_table(table)} WHERE tenant_id = $1 AND name = $2 RETURNING true", tenant_id, name
            )
        except asyncpg.ForeignKeyViolationError:
            raise InUse(f"{table[:-1]} {name!r} is used by a relay; delete it first") from None
        return deleted is True

    async def relays_using(self, table: ResourceTable, tenant_id: uuid.UUID, name: str) -> list[str]:
        column = {"databases": "database_id", "targets": "target_id"}[table]
        rows = await self.pool.fetch(
            f"SELECT r.name FROM relays r JOIN {_table(table)} x ON x.id = r.{column} "
            "WHERE x.tenant_id = $1 AND x.name = $2 ORDER BY r.name",
            tenant_id,
            name,
        )
        return [r["name"] for r in rows]

    async def get_secret(self, table: ResourceTable, tenant_id: uuid.UUID, name: str) -> bytes | None:
        value = await self.pool.fetchval(
            f"SELECT secret FROM {_table(table)} WHERE tenant_id = $1 AND name = $2", tenant_id, name
        )
        return bytes(value) if value is not None else None


async def _relay_references(
    conn: asyncpg.Connection, tenant_id: uuid.UUID, database: str, target: str
) -> tuple[uuid.UUID, uuid.UUID]:
    """The ids of the database and target a relay names; UnknownReference when the tenant has none
    of that name."""
    db_id = await conn.fetchval("SELECT id FROM databases WHERE tenant_id = $1 AND name = $2", tenant_id, database)
    if db_id is None:
        raise UnknownReference(f"database {database!r} does not exist")
    target_id = await conn.fetchval("SELECT id FROM targets WHERE tenant_id = $1 AND name = $2", tenant_id, target)
    if target_id is None:
        raise UnknownReference(f"target {target!r} does not exist")
    return db_id, target_id


async def _check_relay_quotas(
    conn: asyncpg.Connection, tenant_id: uuid.UUID, limits: Mapping[str, int], partitions: int
) -> None:
    """QuotaExceeded when one more relay of ``partitions`` partitions takes the tenant past its
    ``relays`` or ``partitions`` quota."""
    used = await conn.fetchrow(
        "SELECT count(*) AS relays, coalesce(sum(partitions), 0) AS partitions FROM relays WHERE tenant_id = $1",
        tenant_id,
    )
    if used["relays"] + 1 > limits["relays"]:
        raise QuotaExceeded(quota="relays", limit=limits["relays"], used=used["relays"])
    if used["partitions"] + partitions > limits["partitions"]:
        raise QuotaExceeded(
            quota="partitions", limit=limits["partitions"], used=used["partitions"], requested=partitions
        )


async def _relay_for_update(
    conn: asyncpg.Connection, tenant_id: uuid.UUID, name: str, expect_updated_at: datetime | None
) -> asyncpg.Record | None:
    """The relay ``name`` (or None), locked for the transaction; RelayChanged when ``expect_updated_at``
    is given and it is not the relay's version (deleted, or written since)."""
    existing = await conn.fetchrow(
        "SELECT id, database_id, partitions, updated_at FROM relays WHERE tenant_id = $1 AND name = $2 FOR UPDATE",
        tenant_id,
        name,
    )
    if expect_updated_at is not None and (existing is None or existing["updated_at"] != expect_updated_at):
        raise RelayChanged(
            f"relay {name!r} was {'deleted' if existing is None else 'changed'} meanwhile; "
            "nothing was written, try again"
        )
    return existing


async def _insert_relay(
    conn: asyncpg.Connection,
    tenant_id: uuid.UUID,
    name: str,
    db_id: uuid.UUID,
    target_id: uuid.UUID,
    partitions: int,
    enabled: bool,
    spec: bytes,
) -> ResourceRow:
    """A new relay and its partitions."""
    row = await conn.fetchrow(
        "INSERT INTO relays (tenant_id, name, database_id, target_id, partitions, enabled, spec) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb) "
        "RETURNING id, name, spec::text AS spec, false AS has_secret, created_at, updated_at",
        tenant_id,
        name,
        db_id,
        target_id,
        partitions,
        enabled,
        spec.decode(),
    )
    await conn.execute(
        "INSERT INTO relay_partitions (relay_id, partition) SELECT $1, generate_series(0, $2 - 1)",
        row["id"],
        partitions,
    )
    return _resource(row)


async def _update_relay(
    conn: asyncpg.Connection,
    existing: asyncpg.Record,
    db_id: uuid.UUID,
    target_id: uuid.UUID,
    partitions: int,
    enabled: bool,
    spec: bytes,
) -> ResourceRow:
    """Replace a relay's target, ``enabled`` and spec; ImmutableField for a change to its partitions
    or database (fixed at creation)."""
    if existing["partitions"] != partitions:
        raise ImmutableField(
            f"partitions is fixed at creation ({existing['partitions']}); create a new relay to change it"
        )
    if existing["database_id"] != db_id:
        raise ImmutableField("database is fixed at creation; create a new relay to read another database")
    row = await conn.fetchrow(
        "UPDATE relays SET target_id = $2, enabled = $3, spec = $4::jsonb, updated_at = now() "
        "WHERE id = $1 RETURNING id, name, spec::text AS spec, false AS has_secret, created_at, updated_at",
        existing["id"],
        target_id,
        enabled,
        spec.decode(),
    )
    return _resource(row)


async def target_with_secret(pool: asyncpg.Pool, tenant_id: uuid.UUID, name: str) -> TargetRow | None:
    """A tenant's target with its (encrypted) secret and version, in one read (a replay's)."""
    row = await pool.fetchrow(
        "SELECT id, name, spec::text AS spec, secret, updated_at FROM targets WHERE tenant_id = $1 AND name = $2",
        tenant_id,
        name,
    )
    return _target_row(row["id"], row["name"], row["spec"], row["secret"], row["updated_at"]) if row else None


async def relay_route(pool: asyncpg.Pool, relay_id: uuid.UUID) -> RelayRoute | None:
    """A relay as it is now, with its current target and that target's secret."""
    row = await pool.fetchrow(
        "SELECT r.id, r.name, r.spec::text AS spec, g.id AS target_id, g.name AS target_name, "
        "g.spec::text AS target_spec, g.secret, g.updated_at AS target_updated_at "
        "FROM relays r JOIN targets g ON g.id = r.target_id WHERE r.id = $1",
        relay_id,
    )
    if row is None:
        return None
    target = _target_row(
        row["target_id"], row["target_name"], row["target_spec"], row["secret"], row["target_updated_at"]
    )
    return RelayRoute(relay_id=row["id"], relay_name=row["name"], relay_spec=row["spec"].encode(), target=target)


def _target_row(target_id: uuid.UUID, name: str, spec: str, secret: Any, updated_at: datetime) -> TargetRow:
    return TargetRow(
        id=target_id,
        name=name,
        spec=spec.encode(),
        secret=bytes(secret) if secret is not None else None,
        updated_at=updated_at,
    )
