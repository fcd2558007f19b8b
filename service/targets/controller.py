"""Broker targets: RabbitMQ, Redis Streams, Kafka. Passwords are write-only."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, delete, get, put
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from outbox_relay.domain import Target
from outbox_relay.netguard import check_target
from outbox_relay.specs import check_target as check_target_spec
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


class TargetPage(Page, kw_only=True):
    items: list[Target]


class TargetController(Controller):
    path = "/v1/targets"
    tags = ["targets"]
    guards = [authenticate_tenant]
    dependencies = {"tenant": Provide(provide_tenant)}

    @get("/", operation_id="listTargets", summary="List targets")
    async def list_targets(
        self,
        tenant: TenantDep,
        services: ServicesDep,
        limit: Annotated[int, LIMIT_PARAM] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> TargetPage:
        rows = await services.store.list_resources("targets", tenant.id, decode_cursor(cursor), limit + 1)
        items = [read_back(Target, r) for r in rows[:limit]]
        return TargetPage(items=items, next_cursor=encode_cursor(rows[limit - 1].name) if len(rows) > limit else None)

    @get("/{name:str}", operation_id="getTarget", summary="Read a target")
    async def get_target(self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> Target:
        row = await services.store.get_resource("targets", tenant.id, name)
        if row is None:
            raise Problem(404, f"target {name!r} not found", slug="not-found")
        return read_back(Target, row)  # type: ignore[no-any-return]

    @put(
        "/{name:str}",
        operation_id="putTarget",
        summary="Create or replace a target",
        description="Idempotent. `password` is write-only: omit it to keep the stored one, send null to clear it. "
        "Creating one counts against the tenant's `targets` quota (409 `quota-exceeded`).",
        # Target is a union, which litestar documents as a oneOf; ResponseSpec's annotation names single types
        # (mypy sees it once pydantic is installed: openapi-python-client, a dev dependency, brings it)
        responses={201: ResponseSpec(data_container=Target, description="Created", generate_examples=False)},  # type: ignore[arg-type]
    )
    async def put_target(
        self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[Target]
    ) -> Response[Target]:
        check_target_spec(data)  # InvalidTargetSpec: 422 invalid-target
        try:
            await check_target(services.policy, data)
        except ValueError as exc:
            raise Problem(422, str(exc), slug="invalid-target") from None
        kind = type(data).__struct_config__.tag
        row, created = await services.store.put_target(
            tenant.id,
            name,
            str(kind),
            spec_json(data),
            secret_of(data, services.secrets),
            quotas=services.settings.quota_defaults(),
        )
        await services.store.audit(tenant.id, "tenant", "create" if created else "put", f"targets/{name}")
        return Response(read_back(Target, row), status_code=201 if created else 200)

    @delete(
        "/{name:str}",
        operation_id="deleteTarget",
        summary="Delete a target (idempotent)",
        responses={409: ResponseSpec(data_container=None, description="A relay still uses it")},
    )
    async def delete_target(self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> None:
        users = await services.store.relays_using("targets", tenant.id, name)
        if users:
            raise Problem(409, f"target {name!r} is used by relays {users}; delete them first", slug="in-use")
        if await services.store.delete_resource("targets", tenant.id, name):  # InUse: 409 in-use
            await services.store.audit(tenant.id, "tenant", "delete", f"targets/{name}")
