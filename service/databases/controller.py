"""Tenant databases: where the outbox lives. ``PUT`` registers, ``provision`` installs the outbox."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Response, delete, get, post, put
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from outbox_relay.domain import Database
from outbox_relay.specs import check_database
from outbox_relay.tenant import db as tenant_db
from outbox_relay.tenant.sql import schema_sql
from service.deps import ServicesDep, TenantDep, authenticate_tenant, decode_cursor, encode_cursor, provide_tenant
from service.problems import Problem
from service.resources import (
    CURSOR_PARAM,
    LIMIT_PARAM,
    NAME_PARAM,
    Page,
    read_back,
    secret_of,
    spec_json,
)


class DatabasePage(Page, kw_only=True):
    items: list[Database]


class ProvisionResult(msgspec.Struct, kw_only=True):
    database: str
    schema: str
    version: int


class DatabaseController(Controller):
    path = "/v1/databases"
    tags = ["databases"]
    guards = [authenticate_tenant]
    dependencies = {"tenant": Provide(provide_tenant)}

    @get("/", operation_id="listDatabases", summary="List databases")
    async def list_databases(
        self,
        tenant: TenantDep,
        services: ServicesDep,
        limit: Annotated[int, LIMIT_PARAM] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> DatabasePage:
        rows = await services.store.list_resources("databases", tenant.id, decode_cursor(cursor), limit + 1)
        items = [read_back(Database, r) for r in rows[:limit]]
        return DatabasePage(items=items, next_cursor=encode_cursor(rows[limit - 1].name) if len(rows) > limit else None)

    @get("/{name:str}", operation_id="getDatabase", summary="Read a database")
    async def get_database(
        self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]
    ) -> Database:
        row = await services.store.get_resource("databases", tenant.id, name)
        if row is None:
            raise Problem(404, f"database {name!r} not found", slug="not-found")
        return read_back(Database, row)  # type: ignore[no-any-return]

    @put(
        "/{name:str}",
        operation_id="putDatabase",
        summary="Create or replace a database",
        description="Idempotent. `password` is write-only: omit it to keep the stored one, send null to clear it. "
        "Creating one counts against the tenant's `databases` quota (409 `quota-exceeded`).",
        responses={201: ResponseSpec(data_container=Database, description="Created", generate_examples=False)},
    )
    async def put_database(
        self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[Database]
    ) -> Response[Database]:
        check_database(data)  # InvalidDatabaseSpec: 422 invalid-dsn
        await tenant_db.check_address(data.dsn, services.policy)
        row, created = await services.store.put_database(
            tenant.id,
            name,
            spec_json(data),
            secret_of(data, services.secrets),
            quotas=services.settings.quota_defaults(),
        )
        await services.store.audit(tenant.id, "tenant", "put" if not created else "create", f"databases/{name}")
        return Response(read_back(Database, row), status_code=201 if created else 200)

    @delete(
        "/{name:str}",
        operation_id="deleteDatabase",
        summary="Delete a database (idempotent)",
        responses={409: ResponseSpec(data_container=None, description="A relay still uses it")},
    )
    async def delete_database(self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> None:
        users = await services.store.relays_using("databases", tenant.id, name)
        if users:
            raise Problem(409, f"database {name!r} is used by relays {users}; delete them first", slug="in-use")
        if await services.store.delete_resource("databases", tenant.id, name):  # InUse: 409 in-use
            await services.store.audit(tenant.id, "tenant", "delete", f"databases/{name}")

    @post(
        "/{name:str}/provision",
        operation_id="provisionDatabase",
        summary="Install the outbox schema into the database",
        status_code=200,
    )
    async def provision(
        self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]
    ) -> ProvisionResult:
        row = await services.store.get_resource("databases", tenant.id, name)
        if row is None:
            raise Problem(404, f"database {name!r} not found", slug="not-found")
        db = msgspec.json.decode(row.spec, type=Database)
        check_database(db)  # stored before a check existed: never handed to asyncpg
        secret = await services.store.get_secret("databases", tenant.id, name)
        password = services.secrets.decrypt(secret) if secret else None
        conn = await tenant_db.connect(
            db, password, policy=services.policy, timeout_s=services.settings.connect_timeout_s
        )
        try:
            version = await tenant_db.provision_for_tenant(conn, db.schema)  # ProvisionFailed: 422
        finally:
            await conn.close()
        await services.store.audit(tenant.id, "tenant", "provision", f"databases/{name}")
        return ProvisionResult(database=name, schema=db.schema, version=version)

    @get(
        "/{name:str}/schema.sql",
        operation_id="getDatabaseSchemaSql",
        summary="The SQL that installs the outbox (apply it yourself instead of provisioning)",
        # text/plain rather than application/sql (RFC 6922): clients generated from the spec read text/*
        # as a string, and openapi-python-client drops a response of a media type it does not know
        media_type="text/plain",
    )
    async def schema_sql(self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> str:
        row = await services.store.get_resource("databases", tenant.id, name)
        if row is None:
            raise Problem(404, f"database {name!r} not found", slug="not-found")
        db = msgspec.json.decode(row.spec, type=Database)
        return schema_sql(db.schema)
