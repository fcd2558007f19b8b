"""Relays: one database's outbox published to one target, with a topic mapping and a policy."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, Response, delete, get, put
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from outbox_relay.domain import Relay
from service.deps import ServicesDep, TenantDep, decode_cursor, encode_cursor, provide_tenant
from service.problems import Problem
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


class PartitionStatus(msgspec.Struct, kw_only=True):
    partition: int
    cursor: str
    """``txid:id`` of the last published outbox row."""
    published: int
    lease_holder: str | None
    lease_epoch: int
    lease_expires_at: datetime | None
    last_published_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    dead_lettered: int
    retries: int
    """Refusals retried so far."""
    retrying: RetryingMessage | None
    """The refused message this partition is retrying, holding the partition back."""
    resets: int
    """Times the cursor started over because the tenant database was restored or failed over."""
    last_reset_reason: str | None


class RetryingMessage(msgspec.Struct, kw_only=True):
    outbox_id: int
    attempts: int
    next_attempt_at: datetime | None


class RelayStatus(msgspec.Struct, kw_only=True):
    relay: str
    enabled: bool
    published: int
    dead_lettered: int
    last_published_at: datetime | None
    partitions: list[PartitionStatus]


class RelayController(Controller):
    path = "/v1/relays"
    tags = ["relays"]
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
        description="Idempotent. `partitions` and `database` are fixed once the relay exists.",
        responses={201: ResponseSpec(data_container=Relay, description="Created")},
    )
    async def put_relay(
        self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM], data: JSONBody[Relay]
    ) -> Response[Relay]:
        if data.policy.backoff_base_ms > data.policy.backoff_max_ms:
            raise Problem(422, "policy.backoff_base_ms must not exceed policy.backoff_max_ms", slug="invalid-relay")
        try:
            row, created = await services.store.put_relay(
                tenant.id,
                name,
                spec_json(data),
                database=data.database,
                target=data.target,
                partitions=data.partitions,
                enabled=data.enabled,
            )
        except LookupError as exc:
            raise Problem(422, str(exc.args[0]), slug="unknown-reference") from None
        except ValueError as exc:
            raise Problem(409, str(exc), slug="immutable-field") from None
        await services.store.audit(tenant.id, "tenant", "create" if created else "put", f"relays/{name}")
        return Response(read_back(Relay, row), status_code=201 if created else 200)

    @delete("/{name:str}", operation_id="deleteRelay", summary="Delete a relay (idempotent)")
    async def delete_relay(self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]) -> None:
        if await services.store.delete_resource("relays", tenant.id, name):
            await services.store.audit(tenant.id, "tenant", "delete", f"relays/{name}")

    @get("/{name:str}/status", operation_id="getRelayStatus", summary="Cursor, lease and errors per partition")
    async def relay_status(
        self, tenant: TenantDep, services: ServicesDep, name: Annotated[str, NAME_PARAM]
    ) -> RelayStatus:
        row = await services.store.get_resource("relays", tenant.id, name)
        if row is None:
            raise Problem(404, f"relay {name!r} not found", slug="not-found")
        relay = msgspec.json.decode(row.spec, type=Relay)
        parts = await services.store.partition_states(row.id)
        statuses = [
            PartitionStatus(
                partition=p["partition"],
                cursor=f"{p['cursor_txid']}:{p['cursor_id']}",
                published=p["published_count"],
                lease_holder=p["lease_holder"],
                lease_epoch=p["lease_epoch"],
                lease_expires_at=p["lease_expires_at"],
                last_published_at=p["last_published_at"],
                last_error=p["last_error"],
                last_error_at=p["last_error_at"],
                dead_lettered=p["dead_count"],
                retries=p["retried_count"],
                retrying=RetryingMessage(
                    outbox_id=p["retry_outbox_id"], attempts=p["retry_attempts"], next_attempt_at=p["retry_next_at"]
                )
                if p["retry_outbox_id"] is not None
                else None,
                resets=p["resets"],
                last_reset_reason=p["last_reset_reason"],
            )
            for p in parts
        ]
        published_at = [s.last_published_at for s in statuses if s.last_published_at]
        return RelayStatus(
            relay=name,
            enabled=relay.enabled,
            published=sum(s.published for s in statuses),
            dead_lettered=sum(s.dead_lettered for s in statuses),
            last_published_at=max(published_at) if published_at else None,
            partitions=statuses,
        )
