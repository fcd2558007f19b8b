"""Credential rotation: a database's or target's new password pending next to the current one, the
version each worker uses, and the completion that drops the old one (migration 0011).

A rotation starts when a PUT changes only the password of a resource that has one
(:meth:`RotationsStore.start_rotation`). It does not move ``updated_at``: the relays keep running,
and each worker switches its pool or publisher to the new credential make-before-break
(:mod:`outbox_relay.rotation`), reporting the version it uses (:meth:`report_credential`). Once
every live worker owning a partition of a relay that uses the resource reports the pending version,
:meth:`complete_rotations` makes the pending secret the current one and the old one is deleted,
with an audit entry in the same statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Literal

from outbox_relay.store.base import StoreBase
from outbox_relay.store.rows import (
    CredentialDue,
    ResourceRow,
    RotationStatus,
    RotationWorker,
    StoredSecrets,
    _resource,
    _table,
)

SecretTable = Literal["databases", "targets"]
RELAY_COLUMN: Mapping[str, str] = {"databases": "database_id", "targets": "target_id"}


def _live_users(table: SecretTable, resource: str = "x.id") -> str:
    """The live workers (``w.key``) owning a partition of a relay that uses the resource whose id is
    ``resource`` (a column or a parameter), with $1 the lease TTL in seconds."""
    return (
        "SELECT DISTINCT w.key FROM relays r JOIN relay_partitions p ON p.relay_id = r.id "
        "JOIN workers w ON w.key = p.lease_holder "
        f"WHERE r.{RELAY_COLUMN[table]} = {resource} AND w.heartbeat_at >= now() - make_interval(secs => $1)"
    )


class RotationsStore(StoreBase):
    async def stored_secrets(self, table: SecretTable, tenant_id: uuid.UUID, name: str) -> StoredSecrets | None:
        row = await self.pool.fetchrow(
            f"SELECT id, spec::text AS spec, secret, pending_secret, pending_spec::text AS pending_spec "
            f"FROM {_table(table)} WHERE tenant_id = $1 AND name = $2",
            tenant_id,
            name,
        )
        if row is None:
            return None
        return StoredSecrets(
            id=row["id"],
            spec=row["spec"].encode(),
            secret=bytes(row["secret"]) if row["secret"] is not None else None,
            pending=bytes(row["pending_secret"]) if row["pending_secret"] is not None else None,
            pending_spec=row["pending_spec"].encode() if row["pending_spec"] is not None else None,
        )

    async def start_rotation(
        self,
        table: SecretTable,
        tenant_id: uuid.UUID,
        name: str,
        spec: bytes,
        pending: bytes | None,
        pending_spec: bytes | None = None,
    ) -> tuple[ResourceRow, int] | None:
        """Store ``pending`` next to the current secret (replacing an earlier pending one) under a new
        version, with ``pending_spec`` when the user changes too; returns the row and that version
        (``pending`` None: the rotation pending now, as it is). None when the stored spec is not
        ``spec`` (it changed since the caller read it) or there is no current secret: that PUT is an
        ordinary replace."""
        row = await self.pool.fetchrow(
            f"UPDATE {_table(table)} SET pending_secret = coalesce($4, pending_secret), "
            "pending_spec = CASE WHEN $4::bytea IS NULL THEN pending_spec ELSE $5::jsonb END, "
            "pending_version = CASE WHEN $4::bytea IS NULL THEN pending_version "
            "ELSE greatest(secret_version, coalesce(pending_version, 0)) + 1 END, "
            "rotation_started_at = CASE WHEN $4::bytea IS NULL THEN rotation_started_at ELSE now() END "
            "WHERE tenant_id = $1 AND name = $2 AND spec = $3::jsonb AND secret IS NOT NULL "
            "AND ($4::bytea IS NOT NULL OR pending_secret IS NOT NULL) "
            "RETURNING id, name, spec::text AS spec, true AS has_secret, created_at, updated_at, "
            "rotation_started_at, pending_version",
            tenant_id,
            name,
            spec.decode(),
            pending,
            pending_spec.decode() if pending_spec is not None else None,
        )
        return (_resource(row), row["pending_version"]) if row else None

    async def cancel_rotation(self, table: SecretTable, tenant_id: uuid.UUID, name: str, spec: bytes) -> bool:
        """Forget a pending secret (the PUT sent the current password again); whether one was pending.
        Workers that switched to it go back to the current one (its version moves on)."""
        cancelled = await self.pool.fetchval(
            f"UPDATE {_table(table)} SET pending_secret = NULL, pending_spec = NULL, "
            "secret_version = greatest(secret_version, coalesce(pending_version, 0)) + 1, "
            "pending_version = NULL, rotation_started_at = NULL "
            "WHERE tenant_id = $1 AND name = $2 AND spec = $3::jsonb AND pending_secret IS NOT NULL RETURNING true",
            tenant_id,
            name,
            spec.decode(),
        )
        return cancelled is True

    async def credentials_due(self, table: SecretTable, in_use: Mapping[uuid.UUID, int]) -> list[CredentialDue]:
        """Of the resources a worker has open (id: the credential version it uses), those whose
        credential moved on: one read of only the rows that need a switch."""
        if not in_use:
            return []
        rows = await self.pool.fetch(
            "SELECT x.id, x.spec::text AS spec, x.secret, x.secret_version, x.pending_secret, x.pending_version, "
            "x.pending_spec::text AS pending_spec "
            f"FROM unnest($1::uuid[], $2::int[]) AS u(id, version) JOIN {_table(table)} x ON x.id = u.id "
            "WHERE (x.pending_secret IS NOT NULL AND x.pending_version <> u.version) "
            "OR (x.pending_secret IS NULL AND x.secret_version <> u.version)",
            list(in_use),
            list(in_use.values()),
        )
        return [
            CredentialDue(
                table=table,
                id=r["id"],
                spec=r["spec"].encode(),
                secret=bytes(r["secret"]) if r["secret"] is not None else None,
                secret_version=r["secret_version"],
                pending=bytes(r["pending_secret"]) if r["pending_secret"] is not None else None,
                pending_version=r["pending_version"],
                pending_spec=r["pending_spec"].encode() if r["pending_spec"] is not None else None,
            )
            for r in rows
        ]

    async def credential_of(self, table: SecretTable, resource_id: uuid.UUID) -> CredentialDue | None:
        """A resource's credentials as they are now (current and pending)."""
        due = await self.credentials_due(table, {resource_id: -1})
        return due[0] if due else None

    async def report_credential(
        self,
        worker_key: str,
        table: SecretTable,
        resource_id: uuid.UUID,
        version: int,
        *,
        refused_version: int | None = None,
        error: str | None = None,
    ) -> bool:
        """The version ``worker_key`` uses for the resource, and the one it could not switch to (with
        the secret-free ``error``), if any. False (nothing written) when the worker is no member."""
        written = await self.pool.fetchval(
            "INSERT INTO worker_credentials (worker_key, kind, resource_id, version, refused_version, error) "
            "SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM workers WHERE key = $1) "
            "ON CONFLICT (kind, resource_id, worker_key) DO UPDATE SET version = EXCLUDED.version, "
            "refused_version = EXCLUDED.refused_version, error = EXCLUDED.error, reported_at = now() "
            "RETURNING true",
            worker_key,
            table,
            resource_id,
            version,
            refused_version,
            error,
        )
        if written:  # the other workers look at once whether the rotation can complete
            await self.pool.execute("SELECT pg_notify('outbox_relay_config', 'rotations:reported')")
        return written is True

    async def complete_rotations(self, ttl_s: float, actor: str) -> list[tuple[uuid.UUID, str]]:
        """Finish every rotation whose users (live workers owning a partition of a relay using the
        resource) all report its pending version: the pending secret becomes the current one, the old
        one is deleted, and the audit log says so, in one statement per table. Returns (tenant id,
        ``table/name``) of each."""
        done: list[tuple[uuid.UUID, str]] = []
        for table in ("databases", "targets"):
            rows = await self.pool.fetch(
                f"WITH done AS (UPDATE {_table(table)} x SET secret = x.pending_secret, "
                "spec = coalesce(x.pending_spec, x.spec), pending_spec = NULL, "
                "secret_version = x.pending_version, pending_secret = NULL, pending_version = NULL, "
                "rotation_started_at = NULL "
                f"WHERE x.pending_secret IS NOT NULL AND NOT EXISTS ({_live_users(table)} AND NOT EXISTS ("
                "SELECT 1 FROM worker_credentials c WHERE c.worker_key = w.key AND c.kind = $3 "
                "AND c.resource_id = x.id AND c.version = x.pending_version)) "
                "RETURNING x.tenant_id, x.name, x.secret_version) "
                "INSERT INTO audit_log (tenant_id, actor, action, resource, detail) "
                "SELECT tenant_id, $2, 'rotation-complete', $3 || '/' || name, "
                "jsonb_build_object('version', secret_version) FROM done RETURNING tenant_id, resource",
                ttl_s,
                actor,
                table,
            )
            done.extend((r["tenant_id"], r["resource"]) for r in rows)
        return done

    async def rotation_status(self, table: SecretTable, resource_id: uuid.UUID, ttl_s: float) -> RotationStatus | None:
        """The rotation in progress of a resource (None: none is), with each live user's version and
        refusal."""
        row = await self.pool.fetchrow(
            f"SELECT rotation_started_at, pending_version FROM {_table(table)} WHERE id = $1 "
            "AND pending_secret IS NOT NULL",
            resource_id,
        )
        if row is None:
            return None
        users = await self.pool.fetch(
            f"SELECT u.key, c.version, c.refused_version, c.error FROM ({_live_users(table, '$2')}) u "
            "LEFT JOIN worker_credentials c ON c.worker_key = u.key AND c.kind = $3 AND c.resource_id = $2 "
            "ORDER BY u.key",
            ttl_s,
            resource_id,
            table,
        )
        version = row["pending_version"]
        return RotationStatus(
            started_at=row["rotation_started_at"],
            version=version,
            workers=[
                RotationWorker(
                    worker=u["key"],
                    version=u["version"],
                    error=u["error"] if u["refused_version"] == version else None,
                )
                for u in users
            ],
        )
