"""Tenants and their API keys: operator-only (admin API key)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, Response, delete, get, post, put
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from msgspec import UNSET, Meta, UnsetType

from outbox_relay.config import QUOTAS, Settings
from outbox_relay.errors import NotFound
from outbox_relay.store.control import KEEP, ApiKeyRow, TenantQuotas, TenantRow
from service.deps import (
    ActorDep,
    Services,
    ServicesDep,
    authenticate_admin,
    decode_cursor,
    encode_cursor,
    require_admin,
)
from service.resources import CURSOR_PARAM, LIMIT_PARAM, NAME_PARAM

QuotaLimit = Annotated[int, Meta(ge=0, le=10_000_000)] | None


class QuotaLimits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The operator's limits for one tenant; a quota left out (or null) follows the service default
    (``OUTBOX_RELAY_QUOTA_<NAME>``). Lowering a limit below what the tenant uses removes nothing: it
    only refuses further creations."""

    relays: QuotaLimit = None
    databases: QuotaLimit = None
    targets: QuotaLimit = None
    partitions: Annotated[QuotaLimit, Meta(description="Relay partitions, summed over the tenant's relays.")] = None
    api_keys: Annotated[QuotaLimit, Meta(description="Live (unrevoked) API keys.")] = None


class TenantWrite(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    display_name: Annotated[str, Meta(max_length=200)] = ""
    quotas: Annotated[
        QuotaLimits | UnsetType,
        Meta(description="Replaces every override of this tenant's quotas; omit it to keep them as they are."),
    ] = UNSET


class QuotaUse(msgspec.Struct, kw_only=True):
    limit: int
    used: int
    default: bool
    """True: the limit is the service default; false: the operator set it for this tenant."""


class TenantQuotaUse(msgspec.Struct, kw_only=True):
    """Each quota's limit for this tenant and what it uses now. Creating past a limit answers 409
    ``quota-exceeded`` naming the quota, its limit and the use."""

    relays: QuotaUse
    databases: QuotaUse
    targets: QuotaUse
    partitions: QuotaUse
    api_keys: QuotaUse


class Tenant(msgspec.Struct, kw_only=True):
    name: str
    display_name: str
    created_at: datetime
    updated_at: datetime
    quotas: TenantQuotaUse


class TenantPage(msgspec.Struct, kw_only=True):
    items: list[Tenant]
    next_cursor: str | None = None


class ApiKeyWrite(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    description: Annotated[str, Meta(max_length=200)] = ""


class ApiKey(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    prefix: str
    """The first characters of the key, to tell keys apart."""
    description: str
    created_at: datetime
    last_used_at: datetime | None = None


class NewApiKey(ApiKey, kw_only=True):
    key: str
    """The key itself. Shown once: only its hash is stored."""


def _quota_use(settings: Settings, quotas: TenantQuotas | None) -> TenantQuotaUse:
    defaults = settings.quota_defaults()
    values = {}
    for q in QUOTAS:
        override = quotas.overrides.get(q) if quotas else None
        values[q] = QuotaUse(
            limit=defaults[q] if override is None else override,
            used=quotas.usage.get(q, 0) if quotas else 0,
            default=override is None,
        )
    return TenantQuotaUse(**values)


async def _tenants(services: Services, rows: list[TenantRow]) -> list[Tenant]:
    quotas = await services.store.tenant_quotas([r.id for r in rows])
    return [
        Tenant(
            name=r.name,
            display_name=r.display_name,
            created_at=r.created_at,
            updated_at=r.updated_at,
            quotas=_quota_use(services.settings, quotas.get(r.id)),
        )
        for r in rows
    ]


async def _tenant_row(services: Services, name: str) -> TenantRow:
    """The tenant of that name; NotFound (404) when there is none."""
    row = await services.store.get_tenant(name)
    if row is None:
        raise NotFound(f"tenant {name!r} not found")
    return row


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        prefix=row.prefix,
        description=row.description,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
    )


class TenantController(Controller):
    path = "/v1/tenants"
    tags = ["tenants (admin)"]
    guards = [authenticate_admin]
    dependencies = {"actor": Provide(require_admin)}

    @get("/", operation_id="listTenants", summary="List tenants")
    async def list_tenants(
        self,
        actor: ActorDep,
        services: ServicesDep,
        limit: Annotated[int, LIMIT_PARAM] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> TenantPage:
        rows = await services.store.list_tenants(decode_cursor(cursor), limit + 1)
        return TenantPage(
            items=await _tenants(services, rows[:limit]),
            next_cursor=encode_cursor(rows[limit - 1].name) if len(rows) > limit else None,
        )

    @get("/{name:str}", operation_id="getTenant", summary="Read a tenant")
    async def get_tenant(self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> Tenant:
        return (await _tenants(services, [await _tenant_row(services, name)]))[0]

    @put(
        "/{name:str}",
        operation_id="putTenant",
        summary="Create or update a tenant",
        description="Idempotent. `quotas` sets this tenant's limits (omit it to keep them; a quota left out "
        "follows the service default).",
        responses={201: ResponseSpec(data_container=Tenant, description="Created", generate_examples=False)},
    )
    async def put_tenant(
        self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[TenantWrite]
    ) -> Response[Tenant]:
        quotas = KEEP if data.quotas is UNSET else msgspec.structs.asdict(data.quotas)
        row, created = await services.store.put_tenant(name, data.display_name, quotas)
        await services.store.audit(row.id, actor, "create" if created else "put", f"tenants/{name}")
        return Response((await _tenants(services, [row]))[0], status_code=201 if created else 200)

    @delete("/{name:str}", operation_id="deleteTenant", summary="Delete a tenant and everything it owns")
    async def delete_tenant(self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> None:
        if await services.store.delete_tenant(name):
            await services.store.audit(None, actor, "delete", f"tenants/{name}")

    @post(
        "/{name:str}/api-keys",
        operation_id="createApiKey",
        summary="Issue an API key (shown once)",
        description="Counts against the tenant's `api_keys` quota (409 `quota-exceeded`).",
    )
    async def create_api_key(
        self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[ApiKeyWrite]
    ) -> NewApiKey:
        tenant = await _tenant_row(services, name)
        row, plaintext = await services.store.create_api_key(
            tenant.id, data.description, quotas=services.settings.quota_defaults()
        )
        await services.store.audit(tenant.id, actor, "create", f"tenants/{name}/api-keys/{row.id}")
        return NewApiKey(**msgspec.structs.asdict(_key(row)), key=plaintext)

    @get("/{name:str}/api-keys", operation_id="listApiKeys", summary="List a tenant's API keys (no secrets)")
    async def list_api_keys(
        self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]
    ) -> list[ApiKey]:
        tenant = await _tenant_row(services, name)
        return [_key(r) for r in await services.store.list_api_keys(tenant.id)]

    @delete("/{name:str}/api-keys/{key_id:uuid}", operation_id="revokeApiKey", summary="Revoke an API key")
    async def revoke_api_key(
        self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], key_id: FromPath[uuid.UUID]
    ) -> None:
        tenant = await services.store.get_tenant(name)
        if tenant is None:
            return
        if await services.store.revoke_api_key(tenant.id, key_id):
            await services.store.audit(tenant.id, actor, "revoke", f"tenants/{name}/api-keys/{key_id}")
