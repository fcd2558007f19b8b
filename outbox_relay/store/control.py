"""Control DB access: tenants, API keys, tenant resources, relay partitions (cursor + lease).

Every tenant-scoped query carries ``tenant_id`` in its WHERE clause: there is no method that
reads a tenant resource by name alone. Cursor writes are fenced by the lease epoch.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import asyncpg

from outbox_relay.config import QUOTAS
from outbox_relay.domain import PartitionErrorClass
from outbox_relay.errors import (
    ImmutableField,
    InUse,
    NotFound,
    OutOfBounds,
    QuotaExceeded,
    RelayChanged,
    UnknownReference,
)
from outbox_relay.store.dead_letters import NewLetter, insert_letter

ResourceTable = Literal["databases", "targets", "relays"]
RESOURCE_TABLES: frozenset[str] = frozenset(get_args(ResourceTable))


def _table(table: str) -> str:
    """``table`` for interpolation into SQL, once it is known to be one of the resource tables (the
    type says so to mypy; this says so at run time, for a caller that passed a string through)."""
    if table not in RESOURCE_TABLES:
        raise ValueError(f"not a resource table: {table!r}")
    return table


KEY_PREFIX = "orly_"

HELD_BY_LEASE = "relay_id = $1 AND partition = $2 AND lease_epoch = $3 AND lease_holder IS NOT NULL"
"""The fence of every write that moves a partition's state: $1 relay, $2 partition, $3 the writer's
lease epoch. It fails once another worker took the lease (new epoch) or the writer gave it back."""


def control_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the control DB could not be reached (down, restarting, connection
    lost), as opposed to a statement that failed: the first is worth retrying, the second is not."""
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        # a pooled connection the server closed mid-statement can report itself as busy
        # ("cannot switch to state ...; another operation is in progress"): the pool replaces it
        | asyncpg.InternalClientError
        | asyncpg.CannotConnectNowError
        | asyncpg.exceptions.OperatorInterventionError,
    )


def hash_key(key: str) -> bytes:
    """API keys are 256-bit random tokens: a plain SHA-256 is the right hash (no stretching needed)."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class TenantRow:
    id: uuid.UUID
    name: str
    display_name: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyOwner:
    """Who an API key belongs to: the tenant and the key's id (the audit log's "who")."""

    tenant: TenantRow
    key_id: uuid.UUID

    @property
    def actor(self) -> str:
        """The audit log's "who" of this key: ``key:<api key id>``."""
        return f"key:{self.key_id}"


@dataclass(frozen=True, slots=True)
class TenantQuotas:
    """A tenant's quota overrides (None: the service default) and what it uses of each quota now."""

    overrides: dict[str, int | None]
    usage: dict[str, int]


@dataclass(frozen=True, slots=True)
class UISession:
    """A signed-in dashboard browser: the hash of the API key it signed in with, and its CSRF token."""

    key_hash: bytes
    csrf: str
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: uuid.UUID
    prefix: str
    description: str
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class ResourceRow:
    id: uuid.UUID
    name: str
    spec: bytes
    """The resource as written, JSON, without secrets."""
    has_secret: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class RelayPlan:
    """Everything a worker needs to run one relay, secrets decrypted by the caller."""

    relay_id: uuid.UUID
    tenant_id: uuid.UUID
    tenant_name: str
    relay_name: str
    target_name: str
    relay_spec: bytes
    relay_version: datetime
    enabled: bool
    partitions: int
    database_id: uuid.UUID
    database_spec: bytes
    database_secret: bytes | None
    database_version: datetime
    target_id: uuid.UUID
    target_spec: bytes
    target_secret: bytes | None
    target_version: datetime


@dataclass(frozen=True, slots=True)
class RetryState:
    """The message a partition is retrying: its outbox id, failed attempts so far, their errors."""

    outbox_id: int
    attempts: int
    errors: list[dict[str, Any]]
    next_at: datetime | None


@dataclass(frozen=True, slots=True)
class Lease:
    relay_id: uuid.UUID
    partition: int
    holder: str
    epoch: int
    cursor_txid: int
    cursor_id: int
    system_identifier: str | None
    retry: RetryState | None = None


RestorePolicy = Literal["resend", "skip"]
RestorePhase = Literal["resending", "resent", "skipped"]


@dataclass(frozen=True, slots=True)
class RestoreState:
    """The last restore a partition detected (``relay_partitions.restore_*``; see migration 0008).

    While ``state`` is ``resending`` the partition's cursor is its position in the restored backlog;
    afterwards the ordinary read leaves the backlog (``max_id``, ``max_created_at``) out."""

    policy: RestorePolicy
    state: RestorePhase
    next_xid: int
    max_id: int
    max_created_at: datetime
    rows: int
    done: int
    detected_at: datetime
    finished_at: datetime | None


def lease_of(row: Any, *, relay_id: uuid.UUID, partition: int, holder: str) -> Lease:
    """A Lease from a ``relay_partitions`` row (epoch, cursor, identity and retry columns)."""
    return Lease(
        relay_id=relay_id,
        partition=partition,
        holder=holder,
        epoch=row["lease_epoch"],
        cursor_txid=row["cursor_txid"],
        cursor_id=row["cursor_id"],
        system_identifier=row["system_identifier"],
        retry=RetryState(
            outbox_id=row["retry_outbox_id"],
            attempts=row["retry_attempts"],
            errors=json.loads(row["retry_errors"]),
            next_at=row["retry_next_at"],
        )
        if row["retry_outbox_id"] is not None
        else None,
    )


class Unchanged:
    """Marker: keep the stored secret as it is."""


KEEP = Unchanged()


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """No server round trip when a pooled control-DB connection is returned. Nothing here changes
    session state (``SET LOCAL`` and transaction-scoped locks only; LISTEN and the migration lock
    use connections of their own), and asyncpg's default reset (``RESET ALL``, ``CLOSE ALL``,
    ``UNLISTEN *``, ``pg_advisory_unlock_all()``) made every cursor write five statements. asyncpg
    still ends an open transaction on release, and discards a connection that broke."""


class ControlStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> ControlStore:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, timeout=10, command_timeout=30, reset=_keep_session
        )
        assert pool is not None
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # --- tenants and keys ------------------------------------------------------------------------

    async def put_tenant(
        self, name: str, display_name: str, quotas: Mapping[str, int | None] | Unchanged = KEEP
    ) -> tuple[TenantRow, bool]:
        """Create or update a tenant. ``quotas`` replaces every override (a name it lacks, or None,
        follows the service default); ``KEEP`` leaves the stored overrides as they are."""
        cols = ["name", "display_name"]
        values: list[Any] = [name, display_name]
        if not isinstance(quotas, Unchanged):
            unknown = set(quotas) - set(QUOTAS)
            if unknown:
                raise ValueError(f"unknown quotas {sorted(unknown)}")
            cols += [f"quota_{q}" for q in QUOTAS]
            values += [quotas.get(q) for q in QUOTAS]
        placeholders = ", ".join(f"${i + 1}" for i in range(len(cols)))
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[1:])
        row = await self.pool.fetchrow(
            f"INSERT INTO tenants ({', '.join(cols)}) VALUES ({placeholders}) "
            f"ON CONFLICT (name) DO UPDATE SET {updates}, updated_at = now() "
            "RETURNING *, (xmax = 0) AS inserted",
            *values,
        )
        return _tenant(row), bool(row["inserted"])

    async def tenant_quotas(self, tenant_ids: list[uuid.UUID]) -> dict[uuid.UUID, TenantQuotas]:
        """Each tenant's quota overrides and current use, in one query (a page of the tenant list)."""
        rows = await self.pool.fetch(
            "SELECT t.id, t.quota_relays, t.quota_databases, t.quota_targets, t.quota_partitions, t.quota_api_keys, "
            "(SELECT count(*) FROM relays r WHERE r.tenant_id = t.id) AS relays, "
            "(SELECT coalesce(sum(r.partitions), 0) FROM relays r WHERE r.tenant_id = t.id) AS partitions, "
            "(SELECT count(*) FROM databases d WHERE d.tenant_id = t.id) AS databases, "
            "(SELECT count(*) FROM targets g WHERE g.tenant_id = t.id) AS targets, "
            "(SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id AND k.revoked_at IS NULL) AS api_keys "
            "FROM tenants t WHERE t.id = ANY($1::uuid[])",
            tenant_ids,
        )
        return {
            r["id"]: TenantQuotas(overrides={q: r[f"quota_{q}"] for q in QUOTAS}, usage={q: int(r[q]) for q in QUOTAS})
            for r in rows
        }

    @staticmethod
    async def _limits(
        conn: asyncpg.Connection, tenant_id: uuid.UUID, defaults: Mapping[str, int], *names: str
    ) -> dict[str, int]:
        """The tenant's limits of these quotas, with its row locked until the transaction ends: every
        creation of one tenant counts after the one before it has committed (or rolled back), so two
        concurrent requests cannot both take the last unit. FOR NO KEY UPDATE, not FOR UPDATE: rows that
        merely reference the tenant (audit entries, dead letters) are not held up by it."""
        row = await conn.fetchrow(
            "SELECT " + ", ".join(f"quota_{n}" for n in names) + " FROM tenants WHERE id = $1 FOR NO KEY UPDATE",
            tenant_id,
        )
        if row is None:
            raise NotFound("the tenant does not exist")
        return {n: row[f"quota_{n}"] if row[f"quota_{n}"] is not None else defaults[n] for n in names}

    async def get_tenant(self, name: str) -> TenantRow | None:
        row = await self.pool.fetchrow("SELECT * FROM tenants WHERE name = $1", name)
        return _tenant(row) if row else None

    async def list_tenants(self, after: str | None, limit: int) -> list[TenantRow]:
        rows = await self.pool.fetch(
            "SELECT * FROM tenants WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2",
            after,
            limit,
        )
        return [_tenant(r) for r in rows]

    async def delete_tenant(self, name: str) -> bool:
        return await self.pool.fetchval("DELETE FROM tenants WHERE name = $1 RETURNING true", name) is True

    async def create_api_key(
        self, tenant_id: uuid.UUID, description: str, *, quotas: Mapping[str, int]
    ) -> tuple[ApiKeyRow, str]:
        """A new key for the tenant; the plaintext is returned here once and never stored. Raises
        QuotaExceeded when the tenant already has its limit of live keys (``quotas``: the defaults)."""
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        async with self.transaction() as conn:
            limit = (await self._limits(conn, tenant_id, quotas, "api_keys"))["api_keys"]
            used = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE tenant_id = $1 AND revoked_at IS NULL", tenant_id
            )
            if used + 1 > limit:
                raise QuotaExceeded(quota="api_keys", limit=limit, used=used)
            row = await conn.fetchrow(
                "INSERT INTO api_keys (tenant_id, prefix, key_hash, description) VALUES ($1, $2, $3, $4) "
                "RETURNING id, prefix, description, created_at, last_used_at",
                tenant_id,
                plaintext[:12],
                hash_key(plaintext),
                description,
            )
        return ApiKeyRow(**dict(row)), plaintext

    async def list_api_keys(self, tenant_id: uuid.UUID) -> list[ApiKeyRow]:
        rows = await self.pool.fetch(
            "SELECT id, prefix, description, created_at, last_used_at FROM api_keys "
            "WHERE tenant_id = $1 AND revoked_at IS NULL ORDER BY created_at",
            tenant_id,
        )
        return [ApiKeyRow(**dict(r)) for r in rows]

    async def revoke_api_key(self, tenant_id: uuid.UUID, key_id: uuid.UUID) -> bool:
        return (
            await self.pool.fetchval(
                "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND id = $2 "
                "AND revoked_at IS NULL RETURNING true",
                tenant_id,
                key_id,
            )
            is True
        )

    async def key_owner(self, key: str) -> KeyOwner | None:
        """The tenant and key id of a live (unrevoked) tenant API key; notes its use once a minute."""
        return await self.key_owner_by_hash(hash_key(key))

    async def key_owner_by_hash(self, digest: bytes) -> KeyOwner | None:
        """``key_owner`` of the key with this hash (a dashboard session keeps only the hash)."""
        row = await self.pool.fetchrow(
            "UPDATE api_keys k SET last_used_at = now() FROM tenants t "
            "WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND t.id = k.tenant_id "
            "AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute') "
            "RETURNING k.id AS key_id, t.*",
            digest,
        )
        if row is None:
            row = await self.pool.fetchrow(
                "SELECT k.id AS key_id, t.* FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
                "WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
                digest,
            )
        return KeyOwner(tenant=_tenant(row), key_id=row["key_id"]) if row else None

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
            updates.append("secret = EXCLUDED.secret")
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
                "created_at, updated_at, (xmax = 0) AS inserted",
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
            existing = await conn.fetchrow(
                "SELECT id, database_id, partitions, updated_at FROM relays "
                "WHERE tenant_id = $1 AND name = $2 FOR UPDATE",
                tenant_id,
                name,
            )
            if expect_updated_at is not None and (existing is None or existing["updated_at"] != expect_updated_at):
                raise RelayChanged(
                    f"relay {name!r} was {'deleted' if existing is None else 'changed'} meanwhile; "
                    "nothing was written, try again"
                )
            if existing is not None:
                return await _update_relay(conn, existing, db_id, target_id, partitions, enabled, spec), False
            if partitions > max_partitions:
                raise OutOfBounds(
                    f"partitions: at most {max_partitions} per relay on this service",
                    field="partitions",
                    limit=max_partitions,
                )
            await _check_relay_quotas(conn, tenant_id, limits, partitions)
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
            return _resource(row), True

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

    async def audit(
        self, tenant_id: uuid.UUID | None, actor: str, action: str, resource: str, detail: str = "{}"
    ) -> None:
        await self.pool.execute(
            "INSERT INTO audit_log (tenant_id, actor, action, resource, detail) VALUES ($1, $2, $3, $4, $5::jsonb)",
            tenant_id,
            actor,
            action,
            resource,
            detail,
        )

    # --- dashboard sessions ----------------------------------------------------------------------------

    async def create_ui_session(self, token_hash: bytes, key_hash: bytes, csrf: str, ttl_s: float) -> None:
        """Remember a signed-in browser (and forget the sessions that have expired)."""
        async with self.transaction() as conn:
            await conn.execute("DELETE FROM ui_sessions WHERE expires_at < now()")
            await conn.execute(
                "INSERT INTO ui_sessions (token_hash, key_hash, csrf, expires_at) "
                "VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
                token_hash,
                key_hash,
                csrf,
                ttl_s,
            )

    async def ui_session(self, token_hash: bytes) -> UISession | None:
        """The live (signed-in, unexpired) session of this token, if any."""
        row = await self.pool.fetchrow(
            "SELECT key_hash, csrf, created_at, expires_at FROM ui_sessions "
            "WHERE token_hash = $1 AND expires_at > now()",
            token_hash,
        )
        if row is None:
            return None
        return UISession(
            key_hash=bytes(row["key_hash"]),
            csrf=row["csrf"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
        )

    async def delete_ui_session(self, token_hash: bytes) -> bool:
        """Sign the session out, wherever its cookie is."""
        return (
            await self.pool.fetchval("DELETE FROM ui_sessions WHERE token_hash = $1 RETURNING true", token_hash) is True
        )

    # --- data plane: scheduling, leases, cursors -------------------------------------------------

    async def idle_partitions(self) -> list[tuple[uuid.UUID, int, int]]:
        """(relay, partition, lease epoch) of every enabled relay's partition that nobody holds now
        (lease free or expired): the ones a relay job should be queued for."""
        rows = await self.pool.fetch(
            "SELECT p.relay_id, p.partition, p.lease_epoch FROM relay_partitions p JOIN relays r ON r.id = p.relay_id "
            "WHERE r.enabled AND (p.lease_holder IS NULL OR p.lease_expires_at IS NULL OR p.lease_expires_at < now()) "
            "ORDER BY p.relay_id, p.partition"
        )
        return [(r["relay_id"], r["partition"], r["lease_epoch"]) for r in rows]

    async def relay_plan(self, relay_id: uuid.UUID) -> RelayPlan | None:
        return (await self.relay_plans([relay_id])).get(relay_id)

    async def relay_plans(self, relay_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, RelayPlan]:
        """The plans of the relays that exist among ``relay_ids``, in one query (a worker that
        claims the partitions of a thousand relays at start reads their plans at once)."""
        if not relay_ids:
            return {}
        rows = await self.pool.fetch(
            "SELECT r.id AS relay_id, t.id AS tenant_id, t.name AS tenant_name, r.name AS relay_name, "
            "g.name AS target_name, r.spec::text AS relay_spec, "
            "r.updated_at AS relay_version, r.enabled, r.partitions, "
            "d.id AS database_id, d.spec::text AS database_spec, d.secret AS database_secret, "
            "d.updated_at AS database_version, "
            "g.id AS target_id, g.spec::text AS target_spec, g.secret AS target_secret, "
            "g.updated_at AS target_version "
            "FROM relays r JOIN tenants t ON t.id = r.tenant_id JOIN databases d ON d.id = r.database_id "
            "JOIN targets g ON g.id = r.target_id WHERE r.id = ANY($1::uuid[])",
            list(relay_ids),
        )
        plans: dict[uuid.UUID, RelayPlan] = {}
        for row in rows:
            values = dict(row)
            for k in ("relay_spec", "database_spec", "target_spec"):
                values[k] = values[k].encode()
            for k in ("database_secret", "target_secret"):
                values[k] = bytes(values[k]) if values[k] is not None else None
            plans[row["relay_id"]] = RelayPlan(**values)
        return plans

    async def acquire_lease(self, relay_id: uuid.UUID, partition: int, holder: str, ttl_s: float) -> Lease | None:
        """Compare-and-set: take the partition if its lease is free or expired; bumps the epoch."""
        row = await self.pool.fetchrow(
            "UPDATE relay_partitions SET lease_holder = $3, lease_epoch = lease_epoch + 1, "
            "lease_expires_at = now() + make_interval(secs => $4), updated_at = now() "
            "WHERE relay_id = $1 AND partition = $2 "
            # free, or a slice lease that expired (a fleet owner's partition has no expiry of its own:
            # it lapses with the owner's heartbeat, and the fleet frees it)
            "AND (lease_holder IS NULL OR lease_expires_at < now()) "
            "RETURNING lease_epoch, cursor_txid, cursor_id, system_identifier, "
            "retry_outbox_id, retry_attempts, retry_errors::text AS retry_errors, retry_next_at",
            relay_id,
            partition,
            holder,
            ttl_s,
        )
        if row is None:
            return None
        return lease_of(row, relay_id=relay_id, partition=partition, holder=holder)

    async def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        return (
            await self.pool.fetchval(
                "UPDATE relay_partitions SET lease_expires_at = now() + make_interval(secs => $4) "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                ttl_s,
            )
            is True
        )

    async def release_lease(self, lease: Lease) -> None:
        await self.pool.execute(
            "UPDATE relay_partitions SET lease_holder = NULL, lease_expires_at = NULL "
            "WHERE relay_id = $1 AND partition = $2 AND lease_epoch = $3",
            lease.relay_id,
            lease.partition,
            lease.epoch,
        )

    async def advance_cursor(self, lease: Lease, txid: int, row_id: int, published: int, filtered: int = 0) -> bool:
        """Move the cursor, fenced: refused (False) once another holder took the lease. ``filtered``:
        rows the relay's filter left out that the cursor passes."""
        return (
            await self.pool.fetchval(
                "UPDATE relay_partitions SET cursor_txid = $4, cursor_id = $5, "
                "published_count = published_count + $6, filtered_count = filtered_count + $7, "
                "last_published_at = CASE WHEN $6 > 0 THEN now() ELSE last_published_at END, "
                "last_error = NULL, last_error_class = NULL, stall = NULL, "
                "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', "
                "retry_next_at = NULL, updated_at = now() "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                txid,
                row_id,
                published,
                filtered,
            )
            is True
        )

    async def record_error(self, lease: Lease, error: str, error_class: str = PartitionErrorClass.ERROR) -> None:
        await self.pool.execute(
            "UPDATE relay_partitions SET last_error = $4, last_error_at = now(), last_error_class = $5 "
            "WHERE relay_id = $1 AND partition = $2 AND lease_epoch = $3",
            lease.relay_id,
            lease.partition,
            lease.epoch,
            error[:2000],
            error_class,
        )

    async def record_pending(
        self, lease: Lease, pending: int, oldest_at: datetime | None, stall: dict[str, Any] | None
    ) -> None:
        await self.pool.execute(
            "UPDATE relay_partitions SET pending_estimate = $4, oldest_pending_at = $5, pending_checked_at = now(), "
            "stall = $6::jsonb WHERE relay_id = $1 AND partition = $2 AND lease_epoch = $3",
            lease.relay_id,
            lease.partition,
            lease.epoch,
            pending,
            oldest_at,
            json.dumps(stall) if stall is not None else None,
        )

    async def record_retry(self, lease: Lease, retry: RetryState, error: str) -> bool:
        """Remember a refused message's attempts (fenced); False once the lease is lost."""
        return (
            await self.pool.fetchval(
                "UPDATE relay_partitions SET retry_outbox_id = $4, retry_attempts = $5, retry_errors = $6::jsonb, "
                "retry_next_at = $7, retried_count = retried_count + 1, last_error = $8, last_error_at = now(), "
                "last_error_class = 'refused', "
                "updated_at = now() "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                retry.outbox_id,
                retry.attempts,
                json.dumps(retry.errors),
                retry.next_at,
                error[:2000],
            )
            is True
        )

    async def dead_letter(self, lease: Lease, letter: NewLetter) -> bool:
        """Store the letter and move the cursor past it, in one transaction, fenced by the epoch."""
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await conn.fetchval(
                "UPDATE relay_partitions SET cursor_txid = $4, cursor_id = $5, dead_count = dead_count + 1, "
                "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', retry_next_at = NULL, "
                "last_error = $6, last_error_at = now(), updated_at = now() "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                letter.outbox_txid,
                letter.outbox_id,
                f"dead-lettered outbox message {letter.outbox_id}: {letter.last_error}"[:2000],
            )
            if moved is not True:
                return False
            await insert_letter(conn, lease.relay_id, lease.partition, letter)
            return True

    async def set_identity(self, lease: Lease, identity: str) -> bool:
        return (
            await self.pool.fetchval(
                f"UPDATE relay_partitions SET system_identifier = $4 WHERE {HELD_BY_LEASE} RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                identity,
            )
            is True
        )

    async def reset_cursor(self, lease: Lease, identity: str | None, reason: str) -> bool:
        """Start the partition over from the beginning of the outbox (after a restore or failover
        that left no row above the server's transaction counter): everything is published again,
        nothing is left out (an earlier restore's backlog bounds are dropped too)."""
        return (
            await self.pool.fetchval(
                "UPDATE relay_partitions SET cursor_txid = 0, cursor_id = 0, system_identifier = $4, "
                "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', retry_next_at = NULL, "
                "resets = resets + 1, last_reset_at = now(), last_reset_reason = $5, "
                "last_error = $5, last_error_at = now(), updated_at = now(), "
                "restore_policy = NULL, restore_state = NULL, restore_next_xid = NULL, restore_max_id = NULL, "
                "restore_max_created_at = NULL, restore_rows = 0, restore_done = 0, "
                "restore_detected_at = NULL, restore_finished_at = NULL "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                identity,
                reason[:2000],
            )
            is True
        )

    async def start_restore(
        self,
        lease: Lease,
        identity: str | None,
        reason: str,
        *,
        policy: RestorePolicy,
        next_xid: int,
        max_id: int,
        max_created_at: datetime,
        rows: int,
    ) -> RestoreState | None:
        """Start over after a restore whose backlog is known (fenced; None once the lease is lost).

        ``resend``: the cursor starts at the beginning of the backlog, which is read first.
        ``skip``: the backlog is done at once (counted, never published again) and the ordinary
        read starts from the beginning of the outbox, without it."""
        state: RestorePhase = (
            "resending" if policy == "resend" and rows > 0 else ("skipped" if policy == "skip" else "resent")
        )
        row = await self.pool.fetchrow(
            "UPDATE relay_partitions SET cursor_txid = 0, cursor_id = 0, system_identifier = $4, "
            "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', retry_next_at = NULL, "
            "resets = resets + 1, last_reset_at = now(), last_reset_reason = $5, "
            "last_error = $5, last_error_at = now(), updated_at = now(), "
            "restore_policy = $6::text, restore_state = $7::text, restore_next_xid = $8::bigint, "
            "restore_max_id = $9::bigint, restore_max_created_at = $10::timestamptz, restore_rows = $11::bigint, "
            "restore_done = CASE WHEN $7::text = 'resending' THEN 0 ELSE $11::bigint END, restore_detected_at = now(), "
            "restore_finished_at = CASE WHEN $7::text = 'resending' THEN NULL ELSE now() END "
            f"WHERE {HELD_BY_LEASE} "
            "RETURNING restore_detected_at, restore_finished_at, restore_done",
            lease.relay_id,
            lease.partition,
            lease.epoch,
            identity,
            reason[:2000],
            policy,
            state,
            next_xid,
            max_id,
            max_created_at,
            rows,
        )
        if row is None:
            return None
        return RestoreState(
            policy=policy,
            state=state,
            next_xid=next_xid,
            max_id=max_id,
            max_created_at=max_created_at,
            rows=rows,
            done=row["restore_done"],
            detected_at=row["restore_detected_at"],
            finished_at=row["restore_finished_at"],
        )

    async def restore_state(self, relay_id: uuid.UUID, partition: int) -> RestoreState | None:
        """The partition's last detected restore with a backlog, if any."""
        return (await self.restore_states(relay_id, [partition])).get(partition)

    async def restore_states(self, relay_id: uuid.UUID, partitions: list[int]) -> dict[int, RestoreState]:
        """The last detected restore of each of ``partitions`` that has one, in one query."""
        rows = await self.pool.fetch(
            "SELECT partition, restore_policy, restore_state, restore_next_xid, restore_max_id, "
            "restore_max_created_at, restore_rows, restore_done, restore_detected_at, restore_finished_at "
            "FROM relay_partitions WHERE relay_id = $1 AND partition = ANY($2::int[]) AND restore_state IS NOT NULL",
            relay_id,
            partitions,
        )
        return {
            row["partition"]: RestoreState(
                policy=row["restore_policy"],
                state=row["restore_state"],
                next_xid=row["restore_next_xid"],
                max_id=row["restore_max_id"],
                max_created_at=row["restore_max_created_at"],
                rows=row["restore_rows"],
                done=row["restore_done"],
                detected_at=row["restore_detected_at"],
                finished_at=row["restore_finished_at"],
            )
            for row in rows
        }

    async def restore_progress(self, lease: Lease, done: int) -> bool:
        """How many backlog rows a resending partition has passed so far (fenced)."""
        return (
            await self.pool.fetchval(
                f"UPDATE relay_partitions SET restore_done = $4 WHERE {HELD_BY_LEASE} "
                "AND restore_state = 'resending' RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                done,
            )
            is True
        )

    async def finish_restore(self, lease: Lease) -> datetime | None:
        """The backlog is through: the ordinary read starts from the beginning of the outbox,
        without the backlog (fenced; None once the lease is lost)."""
        value: datetime | None = await self.pool.fetchval(
            "UPDATE relay_partitions SET cursor_txid = 0, cursor_id = 0, restore_state = 'resent', "
            "restore_done = restore_rows, restore_finished_at = now(), updated_at = now() "
            f"WHERE {HELD_BY_LEASE} AND restore_state = 'resending' "
            "RETURNING restore_finished_at",
            lease.relay_id,
            lease.partition,
            lease.epoch,
        )
        return value

    async def relays_of_tenant(self, tenant_id: uuid.UUID) -> list[ResourceRow]:
        rows = await self.pool.fetch(_select("relays") + " WHERE tenant_id = $1 ORDER BY name", tenant_id)
        return [_resource(r) for r in rows]

    async def databases_with_relays(self, *, due_after_s: float = 0.0, spread_s: float = 60.0) -> list[dict[str, Any]]:
        """Tenant databases some relay reads (the ones outbox maintenance looks after) and that were
        not maintained in the last ``due_after_s``, least recently maintained first; at most a
        ``spread_s / due_after_s`` share of them (at least one), so that a run every ``spread_s``
        maintains each about every ``due_after_s`` without all of them falling due in one run."""
        rows = await self.pool.fetch(
            "WITH read AS (SELECT d.id, d.spec::text AS spec, d.secret, d.updated_at, d.maintained_at "
            "FROM databases d WHERE EXISTS (SELECT 1 FROM relays r WHERE r.database_id = d.id)) "
            "SELECT id, spec, secret, updated_at FROM read "
            "WHERE maintained_at IS NULL OR maintained_at < now() - make_interval(secs => $1) "
            "ORDER BY maintained_at NULLS FIRST, id "
            "LIMIT CASE WHEN $1 <= $2 THEN NULL ELSE greatest(1, ceil((SELECT count(*) FROM read) * $2 / $1))::int END",
            due_after_s,
            spread_s,
        )
        return [dict(r) for r in rows]

    async def relay_cursors(self, database_id: uuid.UUID) -> list[tuple[int, int, dict[int, tuple[int, int]]]]:
        """(partitions, retention_hours, {partition: cursor}) of every relay reading the database."""
        return (await self.relay_cursors_of([database_id])).get(database_id, [])

    async def relay_cursors_of(
        self, database_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, list[tuple[int, int, dict[int, tuple[int, int]]]]]:
        """:meth:`relay_cursors` of many databases in one query (one maintenance run reads every
        partition's cursor once, not once per database)."""
        rows = await self.pool.fetch(
            "SELECT r.database_id, r.id, r.partitions, "
            "coalesce((r.spec->'policy'->>'retention_hours')::int, 168) AS retention, "
            "array_agg(p.partition ORDER BY p.partition) AS parts, "
            # a partition still reading a restored backlog has read nothing of the rest yet
            "array_agg(CASE WHEN p.restore_state = 'resending' THEN 0 ELSE p.cursor_txid END "
            "ORDER BY p.partition) AS txids, "
            "array_agg(CASE WHEN p.restore_state = 'resending' THEN 0 ELSE p.cursor_id END "
            "ORDER BY p.partition) AS ids "
            "FROM relays r JOIN relay_partitions p ON p.relay_id = r.id WHERE r.database_id = ANY($1::uuid[]) "
            "GROUP BY r.id",
            database_ids,
        )
        out: dict[uuid.UUID, list[tuple[int, int, dict[int, tuple[int, int]]]]] = {}
        for r in rows:
            cursors = {p: (tx, i) for p, tx, i in zip(r["parts"], r["txids"], r["ids"], strict=True)}
            out.setdefault(r["database_id"], []).append((r["partitions"], r["retention"], cursors))
        return out

    async def record_maintenance(self, database_id: uuid.UUID, error: str | None) -> None:
        await self.pool.execute(
            "UPDATE databases SET maintained_at = now(), maintenance_error = $2 WHERE id = $1", database_id, error
        )

    async def partition_states(self, relay_id: uuid.UUID) -> list[dict[str, Any]]:
        return (await self.partition_states_of([relay_id])).get(relay_id, [])

    async def partition_states_of(
        self, relay_ids: list[uuid.UUID], ownership_ttl_s: float = 10.0
    ) -> dict[uuid.UUID, list[dict[str, Any]]]:
        """Every partition's state of each relay, by relay, in one query (the tenant overview)."""
        rows = await self.pool.fetch(
            "SELECT p.relay_id, p.partition, p.cursor_txid, p.cursor_id, p.lease_holder, p.lease_epoch, "
            # a fleet owner's partition lapses with the owner's heartbeat
            "coalesce(p.lease_expires_at, w.heartbeat_at + make_interval(secs => $2)) AS lease_expires_at, "
            "p.last_published_at, p.last_error, p.last_error_at, p.published_count, p.filtered_count, p.dead_count, "
            "p.retried_count, p.retry_outbox_id, p.retry_attempts, p.retry_next_at, p.resets, p.last_reset_at, "
            "p.last_reset_reason, p.last_error_class, p.pending_estimate, p.oldest_pending_at, "
            "p.pending_checked_at, p.stall::text AS stall, p.lag_s, "
            "p.restore_policy, p.restore_state, p.restore_rows, p.restore_done, p.restore_detected_at, "
            "p.restore_finished_at, "
            "coalesce(p.lease_expires_at, w.heartbeat_at + make_interval(secs => $2)) < now() AS lease_expired "
            "FROM relay_partitions p LEFT JOIN workers w ON w.key = p.lease_holder "
            "WHERE p.relay_id = ANY($1::uuid[]) ORDER BY p.relay_id, p.partition",
            relay_ids,
            ownership_ttl_s,
        )
        by_relay: dict[uuid.UUID, list[dict[str, Any]]] = {}
        for r in rows:
            by_relay.setdefault(r["relay_id"], []).append(dict(r))
        return by_relay


def _select(table: ResourceTable) -> str:
    return (
        "SELECT id, name, spec::text AS spec, secret IS NOT NULL AS has_secret, created_at, updated_at "
        f"FROM {_table(table)}"
        if table != "relays"
        else "SELECT id, name, spec::text AS spec, false AS has_secret, created_at, updated_at FROM relays"
    )


def _tenant(row: Any) -> TenantRow:
    return TenantRow(
        id=row["id"],
        name=row["name"],
        display_name=row["display_name"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _resource(row: Any) -> ResourceRow:
    return ResourceRow(
        id=row["id"],
        name=row["name"],
        spec=row["spec"].encode(),
        has_secret=bool(row["has_secret"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


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
