"""``/metrics`` (Prometheus exposition, admin key) and ``/v1/status`` (every relay's state in one call)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import Provide

from outbox_relay.domain import Relay
from outbox_relay.telemetry import prometheus_text
from service.deps import ServicesDep, TenantDep, authenticate_tenant, provide_tenant, require_admin
from service.relays.status import RelayOverview, TenantOverview, relay_status


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request[Any, Any, Any], services: ServicesDep) -> Response[bytes]:
    """Prometheus text format; it names tenants and relays, so it needs the admin key."""
    await require_admin(request, services)
    return Response(prometheus_text(), media_type="text/plain; version=0.0.4; charset=utf-8")


class StatusController(Controller):
    path = "/v1/status"
    tags = ["status"]
    guards = [authenticate_tenant]
    dependencies = {"tenant": Provide(provide_tenant)}

    @get("/", operation_id="getTenantStatus", summary="Every relay's state, cause, lag and counts, in one call")
    async def tenant_status(self, tenant: TenantDep, services: ServicesDep) -> TenantOverview:
        overviews = []
        states: dict[str, int] = {}
        relays = await services.store.relays_of_tenant(tenant.id)
        partitions = await services.store.partition_states_of([row.id for row in relays])
        for row in relays:
            relay = msgspec.json.decode(row.spec, type=Relay)
            status = relay_status(row.name, relay.enabled, partitions.get(row.id, []))
            states[status.state] = states.get(status.state, 0) + 1
            overviews.append(
                RelayOverview(
                    relay=status.relay,
                    state=status.state,
                    cause=status.cause,
                    pending=status.pending,
                    oldest_pending_age_s=status.oldest_pending_age_s,
                    published=status.published,
                    filtered=status.filtered,
                    dead_lettered=status.dead_lettered,
                    last_published_at=status.last_published_at,
                )
            )
        return TenantOverview(relays=overviews, states=states)
