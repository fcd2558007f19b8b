"""Writing a relay: the one code path of ``PUT /v1/relays/{name}`` and the dashboard's pause and resume.

Both check the same bounds, go through the same store call and write the same audit entry (the
dashboard's marked ``via: ui``); a refusal is a :class:`~service.problems.Problem` (or the core's
``QuotaExceeded``/``OutOfBounds``, which the API's handlers turn into problems).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from outbox_relay.domain import Relay
from outbox_relay.errors import OutOfBounds
from outbox_relay.filters import check
from outbox_relay.store.control import ResourceRow, TenantRow
from service.deps import Services
from service.problems import Problem
from service.relays.status import RelayStatus, relay_status
from service.resources import RELAYS, Resources, read_back, spec_json


async def put_relay(
    relays: Resources[Relay],
    name: str,
    data: Relay,
    *,
    detail: dict[str, Any] | None = None,
    expect_updated_at: datetime | None = None,
) -> tuple[ResourceRow, bool]:
    """Create or replace a relay: (the stored row, whether it was created), audited as ``relays.actor``.
    With ``expect_updated_at``, only the version read then (409 ``conflict`` when it changed since)."""
    services, tenant = relays.services, relays.tenant
    if data.policy.backoff_base_ms > data.policy.backoff_max_ms:
        raise Problem(422, "policy.backoff_base_ms must not exceed policy.backoff_max_ms", slug="invalid-relay")
    if data.filter is not None:
        check(data.filter)  # InvalidFilter: 422 invalid-filter naming the field (service.problems.PROBLEMS)
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
        expect_updated_at=expect_updated_at,
    )  # UnknownReference, ImmutableField, RelayChanged: answered by service.problems.PROBLEMS
    await relays.audit("create" if created else "put", name, detail)
    return row, created


async def set_enabled(services: Services, tenant: TenantRow, name: str, enabled: bool, *, actor: str, via: str) -> bool:
    """Pause (``enabled=False``) or resume a relay of ``tenant``: its stored spec written back through
    :func:`put_relay` with only ``enabled`` changed. False when it already was so (nothing written);
    NotFound when the tenant has no such relay."""
    relays = Resources(RELAYS, services, tenant, actor)
    row = await relays.row(name)
    relay = msgspec.json.decode(row.spec, type=Relay)
    if relay.enabled == enabled:
        return False
    changed = msgspec.structs.replace(relay, enabled=enabled)
    detail = {"via": via, "enabled": enabled}
    # only the version read here: a change written in between (say an API PUT) is never undone
    await put_relay(relays, name, changed, detail=detail, expect_updated_at=row.updated_at)
    return True


async def statuses(services: Services, tenant: TenantRow) -> list[tuple[Relay, RelayStatus]]:
    """Every relay of ``tenant`` (by name) with its status, as ``GET /v1/relays/{name}/status``
    computes it; the partitions of all of them read in one query."""
    rows = await services.store.relays_of_tenant(tenant.id)
    partitions = await services.store.partition_states_of([row.id for row in rows])
    out = []
    for row in rows:
        relay = read_back(Relay, row)
        out.append((relay, relay_status(row.name, relay.enabled, partitions.get(row.id, []))))
    return out


async def status_of(services: Services, tenant: TenantRow, name: str) -> tuple[Relay, RelayStatus] | None:
    """One relay of ``tenant`` with its status; None when the tenant has no relay of that name."""
    row = await services.store.get_resource("relays", tenant.id, name)
    if row is None:
        return None
    relay = read_back(Relay, row)
    return relay, relay_status(row.name, relay.enabled, await services.store.partition_states(row.id))
