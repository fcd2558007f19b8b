"""Relays: one database's outbox published to one target, with a topic mapping and a policy."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Response, delete, get, put
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from outbox_relay.domain import Relay
from outbox_relay.errors import OutOfBounds
from service.deps import ServicesDep, TenantDep, authenticate_tenant, decode_cursor, encode_cursor, provide_tenant
from service.problems import Problem
from service.relays.status import RelayStatus, relay_status
from service.resources import (
    CURSOR_PARAM,
    LIMIT_PARAM,
    NAME_PARAM,
    Page,
    read_back,
    spec_json,
)


class RelayPage(Page, kw_only=True):
    items: list[Relay]


class RelayController(Controller):
    path = "/v1/relays"
    tags = ["relays"]
    guards = [authenticate_tenant]
    dependencies = {"tenant": Provide(provide_tenant)}

    @get("/", operation_id="listRelays", summary="List relays")
    async def list_relays(
        self,
        tenant: TenantDep,
        services: ServicesDep,
        limit: Annotated[int, LIMIT_PARAM] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> RelayPage:
        rows = await services.store.list_resources("relays", tenant.id, decode_cursor(cursor), limit + 1)
        items = [read_back(Relay, r) for r in rows[:limit]]
        return RelayPage(items=items, next_cursor=encode_cursor(rows[limit - 1].name) if len(rows) > limit else None)

    @get("/{name:str}", operation_id="getRelay", summary="Read a relay")
    async def get_relay(self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> Relay:
        row = await services.store.get_resource("relays", tenant.id, name)
        if row is None:
            raise Problem(404, f"relay {name!r} not found", slug="not-found")
        return read_back(Relay, row)  # type: ignore[no-any-return]

    @put(
        "/{name:str}",
        operation_id="putRelay",
        summary="Create or replace a relay",
        description="Idempotent. `partitions` and `database` are fixed once the relay exists. Creating one "
        "counts against the tenant's `relays` and `partitions` quotas (409 `quota-exceeded`); the service bounds "
        "`partitions` per relay and `policy.poll_interval_ms` from below (422 `out-of-bounds`, naming the limit).",
        responses={201: ResponseSpec(data_container=Relay, description="Created", generate_examples=False)},
    )
    async def put_relay(
        self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[Relay]
    ) -> Response[Relay]:
        if data.policy.backoff_base_ms > data.policy.backoff_max_ms:
            raise Problem(422, "policy.backoff_base_ms must not exceed policy.backoff_max_ms", slug="invalid-relay")
        settings = services.settings
        if data.policy.poll_interval_ms < settings.min_poll_interval_ms:
            raise OutOfBounds(
                f"policy.poll_interval_ms: at least {settings.min_poll_interval_ms} ms on this service",
                field="policy.poll_interval_ms",
                limit=settings.min_poll_interval_ms,
            )
        row, created = await services.store.put_relay(
            tenant.id,
            name,
            spec_json(data),
            database=data.database,
            target=data.target,
            partitions=data.partitions,
            enabled=data.enabled,
            quotas=settings.quota_defaults(),
            max_partitions=settings.max_relay_partitions,
        )
        await services.store.audit(tenant.id, "tenant", "create" if created else "put", f"relays/{name}")
        return Response(read_back(Relay, row), status_code=201 if created else 200)

    @delete("/{name:str}", operation_id="deleteRelay", summary="Delete a relay (idempotent)")
    async def delete_relay(self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> None:
        if await services.store.delete_resource("relays", tenant.id, name):
            await services.store.audit(tenant.id, "tenant", "delete", f"relays/{name}")

    @get("/{name:str}/status", operation_id="getRelayStatus", summary="State, cause of a stall, lag, leases")
    async def relay_status(
        self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]
    ) -> RelayStatus:
        row = await services.store.get_resource("relays", tenant.id, name)
        if row is None:
            raise Problem(404, f"relay {name!r} not found", slug="not-found")
        relay = msgspec.json.decode(row.spec, type=Relay)
        return relay_status(name, relay.enabled, await services.store.partition_states(row.id))
