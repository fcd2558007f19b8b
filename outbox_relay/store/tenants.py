"""Tenants, their API keys, their audit log and the dashboard's sessions."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from outbox_relay.config import QUOTAS
from outbox_relay.errors import (
    QuotaExceeded,
)
from outbox_relay.store.base import StoreBase
from outbox_relay.store.rows import (
    KEEP,
    KEY_PREFIX,
    ApiKeyRow,
    KeyOwner,
    TenantQuotas,
    TenantRow,
    UISession,
    Unchanged,
    _tenant,
    hash_key,
)


class TenantsStore(StoreBase):
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


async def tenant_id_by_name(pool: asyncpg.Pool, name: str) -> uuid.UUID | None:
    """The id of the tenant called ``name`` (a dead-letter filter names tenants)."""
    value: uuid.UUID | None = await pool.fetchval("SELECT id FROM tenants WHERE name = $1", name)
    return value
