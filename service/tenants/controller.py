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
from msgspec import Meta

from outbox_relay.store.control import ApiKeyRow, TenantRow
from service.deps import ActorDep, ServicesDep, decode_cursor, encode_cursor, require_admin
from service.problems import Problem
from service.resources import CURSOR_PARAM, LIMIT_PARAM, NAME_PARAM


class TenantWrite(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    display_name: Annotated[str, Meta(max_length=200)] = ""


class Tenant(msgspec.Struct, kw_only=True):
    name: str
    display_name: str
    created_at: datetime
    updated_at: datetime


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


def _tenant(row: TenantRow) -> Tenant:
    return Tenant(name=row.name, display_name=row.display_name, created_at=row.created_at, updated_at=row.updated_at)


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
            items=[_tenant(r) for r in rows[:limit]],
            next_cursor=encode_cursor(rows[limit - 1].name) if len(rows) > limit else None,
        )

    @get("/{name:str}", operation_id="getTenant", summary="Read a tenant")
    async def get_tenant(self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> Tenant:
        row = await services.store.get_tenant(name)
        if row is None:
            raise Problem(404, f"tenant {name!r} not found", slug="not-found")
        return _tenant(row)

    @put(
        "/{name:str}",
        operation_id="putTenant",
        summary="Create or update a tenant",
        responses={201: ResponseSpec(data_container=Tenant, description="Created", generate_examples=False)},
    )
    async def put_tenant(
        self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[TenantWrite]
    ) -> Response[Tenant]:
        row, created = await services.store.put_tenant(name, data.display_name)
        await services.store.audit(row.id, actor, "create" if created else "put", f"tenants/{name}")
        return Response(_tenant(row), status_code=201 if created else 200)

    @delete("/{name:str}", operation_id="deleteTenant", summary="Delete a tenant and everything it owns")
    async def delete_tenant(self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> None:
        if await services.store.delete_tenant(name):
            await services.store.audit(None, actor, "delete", f"tenants/{name}")

    @post("/{name:str}/api-keys", operation_id="createApiKey", summary="Issue an API key (shown once)")
    async def create_api_key(
        self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[ApiKeyWrite]
    ) -> NewApiKey:
        tenant = await services.store.get_tenant(name)
        if tenant is None:
            raise Problem(404, f"tenant {name!r} not found", slug="not-found")
        row, plaintext = await services.store.create_api_key(tenant.id, data.description)
        await services.store.audit(tenant.id, actor, "create", f"tenants/{name}/api-keys/{row.id}")
        return NewApiKey(**msgspec.structs.asdict(_key(row)), key=plaintext)

    @get("/{name:str}/api-keys", operation_id="listApiKeys", summary="List a tenant's API keys (no secrets)")
    async def list_api_keys(
        self, actor: ActorDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]
    ) -> list[ApiKey]:
        tenant = await services.store.get_tenant(name)
        if tenant is None:
            raise Problem(404, f"tenant {name!r} not found", slug="not-found")
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
