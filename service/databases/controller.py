"""Tenant databases: where the outbox lives. ``PUT`` registers, ``provision`` installs the outbox."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar import Controller, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from outbox_relay.domain import Database
from outbox_relay.specs import check_database
from outbox_relay.tenant import adopt
from outbox_relay.tenant import db as tenant_db
from outbox_relay.tenant.sql import schema_sql
from service.deps import authenticate_tenant
from service.problems import MEDIA_TYPE
from service.resources import (
    CURSOR_PARAM,
    DATABASES,
    LIMIT_PARAM,
    NAME_PARAM,
    Page,
    Resources,
    provide_resources,
    spec_json,
)

DatabasesDep = NamedDependency[Resources[Database]]


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
    dependencies = provide_resources(DATABASES)

    @get("/", operation_id="listDatabases", summary="List databases")
    async def list_databases(
        self,
        resources: DatabasesDep,
        limit: Annotated[int, LIMIT_PARAM] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> DatabasePage:
        items, next_cursor = await resources.page(cursor, limit)
        return DatabasePage(items=items, next_cursor=next_cursor)

    @get("/{name:str}", operation_id="getDatabase", summary="Read a database")
    async def get_database(self, resources: DatabasesDep, name: Annotated[str, NAME_PARAM]) -> Database:
        return await resources.get(name)

    @put(
        "/{name:str}",
        operation_id="putDatabase",
        summary="Create or replace a database",
        description="Idempotent. `password` is write-only: omit it to keep the stored one, send null to clear it. "
        "Creating one counts against the tenant's `databases` quota (409 `quota-exceeded`).",
        responses={201: ResponseSpec(data_container=Database, description="Created", generate_examples=False)},
    )
    async def put_database(
        self, resources: DatabasesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[Database]
    ) -> Response[Database]:
        services = resources.services
        check_database(data)  # InvalidDatabaseSpec: 422 invalid-dsn
        await tenant_db.check_address(data.dsn, services.policy)
        return await resources.put_with_secret(
            name,
            data,
            lambda secret: services.store.put_database(
                resources.tenant.id,
                name,
                spec_json(data),
                secret,
                quotas=services.settings.quota_defaults(),
            ),
        )

    @delete(
        "/{name:str}",
        operation_id="deleteDatabase",
        summary="Delete a database (idempotent)",
        responses={409: ResponseSpec(data_container=None, description="A relay still uses it")},
    )
    async def delete_database(self, resources: DatabasesDep, name: Annotated[str, NAME_PARAM]) -> None:
        await resources.delete(name)  # InUse: 409 in-use

    @post(
        "/{name:str}/provision",
        operation_id="provisionDatabase",
        summary="Install the outbox schema into the database",
        description="With `table` set, adopts that existing table instead (checked first: a missing table or "
        "column is 422 `provision-failed`), adding three columns, an index and a trigger to it online. "
        "Checks the database role's privileges first: a role that lacks some gets 422 "
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
    async def provision(self, resources: DatabasesDep, name: Annotated[str, NAME_PARAM]) -> ProvisionResult:
        services = resources.services
        db = msgspec.json.decode((await resources.row(name)).spec, type=Database)
        check_database(db)  # stored before a check existed: never handed to asyncpg
        secret = await services.store.get_secret("databases", resources.tenant.id, name)
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
            done = await tenant_db.provision_for_tenant(conn, db.schema, db.table)
        finally:
            await conn.close()
        await resources.audit("provision", name)
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
    async def schema_sql(self, resources: DatabasesDep, name: Annotated[str, NAME_PARAM]) -> str:
        db = msgspec.json.decode((await resources.row(name)).spec, type=Database)
        if db.table is not None:  # the payload column's type is read at provision; jsonb is Debezium's
            return adopt.script(db.schema, db.table)
        return schema_sql(db.schema)
