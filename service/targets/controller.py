"""Broker targets: RabbitMQ, Redis Streams, Kafka, webhooks. Passwords (a webhook's signing secrets) are write-only."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, delete, get, put
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from msgspec import UNSET

from outbox_relay.domain import Target, WebhookTarget
from outbox_relay.errors import InvalidTargetSpec
from outbox_relay.netguard import check_target
from outbox_relay.specs import check_target as check_target_spec
from service.deps import authenticate_tenant
from service.problems import Problem
from service.resources import (
    CURSOR_PARAM,
    LIMIT_PARAM,
    NAME_PARAM,
    TARGETS,
    Page,
    Resources,
    provide_resources,
    spec_json,
)

TargetsDep = NamedDependency[Resources[Target]]


class TargetPage(Page, kw_only=True):
    items: list[Target]


class TargetController(Controller):
    path = "/v1/targets"
    tags = ["targets"]
    guards = [authenticate_tenant]
    dependencies = provide_resources(TARGETS)

    @get("/", operation_id="listTargets", summary="List targets")
    async def list_targets(
        self,
        resources: TargetsDep,
        limit: Annotated[int, LIMIT_PARAM] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> TargetPage:
        items, next_cursor = await resources.page(cursor, limit)
        return TargetPage(items=items, next_cursor=next_cursor)

    @get("/{name:str}", operation_id="getTarget", summary="Read a target")
    async def get_target(self, resources: TargetsDep, name: Annotated[str, NAME_PARAM]) -> Target:
        return await resources.get(name)

    @put(
        "/{name:str}",
        operation_id="putTarget",
        summary="Create or replace a target",
        description="Idempotent. `password` is write-only: omit it to keep the stored one, send null to clear it "
        "(a webhook's is its signing secret, `whsec_...`, or two separated by a space during a rotation; it cannot "
        "be cleared). "
        "Creating one counts against the tenant's `targets` quota (409 `quota-exceeded`).",
        # Target is a union, which litestar documents as a oneOf; ResponseSpec's annotation names single types
        # (mypy sees it once pydantic is installed: openapi-python-client, a dev dependency, brings it)
        responses={201: ResponseSpec(data_container=Target, description="Created", generate_examples=False)},  # type: ignore[arg-type]
    )
    async def put_target(
        self, resources: TargetsDep, name: Annotated[str, NAME_PARAM], data: JSONBody[Target]
    ) -> Response[Target]:
        services = resources.services
        check_target_spec(data)  # InvalidTargetSpec: 422 invalid-target
        if isinstance(data, WebhookTarget) and data.password is UNSET:  # keep the stored secret: is there one?
            stored = await services.store.get_resource(TARGETS.table, resources.tenant.id, name)
            if stored is None or not stored.has_secret:
                raise InvalidTargetSpec("password", "a webhook target signs every request: it needs a signing secret")
        try:
            await check_target(services.policy, data)
        except ValueError as exc:
            raise Problem(422, str(exc), slug="invalid-target") from None
        kind = type(data).__struct_config__.tag
        return await resources.put_with_secret(
            name,
            data,
            lambda secret: services.store.put_target(
                resources.tenant.id,
                name,
                str(kind),
                spec_json(data),
                secret,
                quotas=services.settings.quota_defaults(),
            ),
        )

    @delete(
        "/{name:str}",
        operation_id="deleteTarget",
        summary="Delete a target (idempotent)",
        responses={409: ResponseSpec(data_container=None, description="A relay still uses it")},
    )
    async def delete_target(self, resources: TargetsDep, name: Annotated[str, NAME_PARAM]) -> None:
        await resources.delete(name)  # InUse: 409 in-use
