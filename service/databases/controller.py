"""Tenant databases: where the outbox lives. ``PUT`` registers, ``provision`` installs the outbox."""

from __future__ import annotations

from typing import Annotated, Literal

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
from service.problems import MEDIA_TYPE, Problem
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


class ProvisionWarning(msgspec.Struct, kw_only=True):
    """Provisioning went ahead, but the role reaches more than the relay needs."""

    code: Literal["superuser", "owns-unrelated-objects"]
    message: str


class MissingPrivilege(msgspec.Struct, kw_only=True):
    privilege: str
    """`CREATE`, `USAGE`, `EXECUTE`, `SELECT` ...; `OWNER`: the object belongs to another role."""
    object: str
    grant: str
    """The statement that gives it (run by the object's owner or a superuser)."""


class MissingPrivilegesProblem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem: the database role lacks privileges the relay needs (every one is listed);
    nothing was changed. `provision-failed` problems carry no `missing`."""

    type: str
    title: str
    status: int
    detail: str
    missing: list[MissingPrivilege] = msgspec.field(default_factory=list)


class ProvisionResult(msgspec.Struct, kw_only=True):
    database: str
    schema: str
    version: int
    warnings: list[ProvisionWarning] = msgspec.field(default_factory=list)
    """Said of the database role the DSN connects as (empty: nothing to say)."""


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
        description="Checks the database role's privileges first: a role that lacks some gets 422 "
        "`missing-privileges` naming each one in `missing` (with the `grant` to run), and nothing is changed. "
        "`warnings` says when the role reaches more than the relay needs (a superuser, or one that owns "
        "tables outside the outbox's schema).",
        status_code=200,
        responses={
            422: ResponseSpec(
                data_container=MissingPrivilegesProblem,
                media_type=MEDIA_TYPE,
                description="The role lacks privileges (`missing-privileges`), or provisioning failed "
                "(`provision-failed`, `invalid-dsn`, `address-not-allowed`)",
                generate_examples=False,
            )
        },
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
            db,
            password,
            policy=services.policy,
            timeout_s=services.settings.connect_timeout_s,
            session=tenant_db.SessionLimits.of(services.settings),
        )
        try:
            # MissingPrivileges, ProvisionFailed: 422 (service.problems.PROBLEMS)
            done = await tenant_db.provision_for_tenant(conn, db.schema)
        finally:
            await conn.close()
        await services.store.audit(tenant.id, "tenant", "provision", f"databases/{name}")
        warnings = [ProvisionWarning(code=w.code, message=w.message) for w in done.warnings]
        return ProvisionResult(database=name, schema=db.schema, version=done.version, warnings=warnings)

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
