"""Alert channels: webhooks the service POSTs an alert to when a relay stalls, dead letters appear, a
restore is detected, leases keep being lost or a quota refuses a request (docs/delivery.md, "Alerts").
The signing secret (``password``) is write-only, encrypted at rest like a target's."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, Response, delete, get, put
from litestar.di import NamedDependency
from litestar.params import JSONBody
from msgspec import UNSET

from outbox_relay.domain import Alert, AlertKindName, WebhookTarget
from outbox_relay.errors import InvalidSpec
from outbox_relay.netguard import check_target
from outbox_relay.specs import check_webhook_url, webhook_secrets
from service.deps import authenticate_tenant
from service.problems import Problem
from service.resources import (
    ALERTS,
    CURSOR_PARAM,
    LIMIT_PARAM,
    NAME_PARAM,
    Page,
    Resources,
    provide_resources,
    secret_of,
    spec_json,
)

AlertsDep = NamedDependency[Resources[Alert]]


class AlertPage(Page, kw_only=True):
    items: list[Alert]


class AlertDelivery(msgspec.Struct, kw_only=True):
    """One alert owed to the channel: taken (``sent_at``) or still being sent (``last_error`` says why not)."""

    id: str
    """The alert body's ``id`` (the ``webhook-id``)."""
    event: AlertKindName
    relay: str | None
    summary: str
    raised_at: datetime
    sent_at: datetime | None
    """Null: the endpoint has not taken it yet; it is sent again at every evaluation."""
    attempts: int
    last_error: str | None


class AlertDeliveries(msgspec.Struct, kw_only=True):
    items: list[AlertDelivery]


async def check_alert(resources: Resources[Alert], data: Alert) -> None:
    """The URL (http/https, no user, an address the network policy allows), the secret (a
    ``whsec_`` signing secret, never echoed), the relays named once each and the events once each."""
    check_webhook_url(data.url)  # InvalidSpec: 422 naming url
    if isinstance(data.password, str):
        webhook_secrets(data.password)  # InvalidSpec: 422 naming password, without the secret
    if len(set(data.events)) != len(data.events):
        raise InvalidSpec("events", "names an event more than once")
    if data.relays is not None and len(set(data.relays)) != len(data.relays):
        raise InvalidSpec("relays", "names a relay more than once")
    try:
        await check_target(resources.services.policy, WebhookTarget(url=data.url))
    except ValueError as exc:
        raise Problem(422, str(exc), slug="invalid-spec") from None


class AlertController(Controller):
    path = "/v1/alerts"
    tags = ["alerts"]
    guards = [authenticate_tenant]
    dependencies = provide_resources(ALERTS)

    @get("/", operation_id="listAlerts", summary="List alert channels")
    async def list_alerts(
        self,
        resources: AlertsDep,
        limit: Annotated[int, LIMIT_PARAM] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> AlertPage:
        items, next_cursor = await resources.page(cursor, limit)
        return AlertPage(items=items, next_cursor=next_cursor)

    @get("/{name:str}", operation_id="getAlert", summary="Read an alert channel")
    async def get_alert(self, resources: AlertsDep, name: Annotated[str, NAME_PARAM]) -> Alert:
        return await resources.get(name)

    @put(
        "/{name:str}",
        operation_id="putAlert",
        summary="Create or replace an alert channel",
        description="Idempotent. `password` is the write-only signing secret (`whsec_...`): with one, each "
        "request is signed the Standard Webhooks way; without, plain unsigned POSTs. Omit it to keep the "
        "stored one, send null to clear it. `url` is checked by the network policy, as a target's is. "
        "Creating one counts against the tenant's `alerts` quota (409 `quota-exceeded`).",
    )
    async def put_alert(
        self, resources: AlertsDep, name: Annotated[str, NAME_PARAM], data: JSONBody[Alert]
    ) -> Response[Alert]:
        await check_alert(resources, data)
        services = resources.services
        row, created = await services.store.put_alert(
            resources.tenant.id,
            name,
            spec_json(data),
            secret_of(data, services.secrets),
            limit=services.settings.alert_channels_per_tenant,
        )
        detail = (
            {"secret": "set" if isinstance(data.password, str) else "cleared"} if data.password is not UNSET else None
        )
        return await resources.written(name, row, created, detail)

    @get(
        "/{name:str}/deliveries",
        operation_id="listAlertDeliveries",
        summary="The channel's alerts, newest first",
        description="What was raised for the channel and whether its endpoint took it: an alert not taken "
        "(`sent_at` null) is sent again at every evaluation, `last_error` says why it was not.",
    )
    async def list_deliveries(
        self, resources: AlertsDep, name: Annotated[str, NAME_PARAM], limit: Annotated[int, LIMIT_PARAM] = 50
    ) -> AlertDeliveries:
        row = await resources.row(name)  # NotFound: 404
        rows = await resources.services.store.alert_deliveries(row.id, limit)
        return AlertDeliveries(
            items=[
                AlertDelivery(
                    id=str(r["id"]),
                    event=r["kind"],
                    relay=r["relay"],
                    summary=r["summary"] or "",
                    raised_at=r["raised_at"],
                    sent_at=r["sent_at"],
                    attempts=r["attempts"],
                    last_error=r["last_error"],
                )
                for r in rows
            ]
        )

    @delete("/{name:str}", operation_id="deleteAlert", summary="Delete an alert channel (idempotent)")
    async def delete_alert(self, resources: AlertsDep, name: Annotated[str, NAME_PARAM]) -> None:
        await resources.delete(name)
