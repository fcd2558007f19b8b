"""The dashboard's relay pages at ``/ui/relays``: each relay of the signed-in tenant with what
``GET /v1/relays/{name}/status`` says of it (state, the cause of a stall with its details, lag,
counts, partitions and who holds them), and pause/resume buttons.

Pausing and resuming write the relay's ``enabled`` flag through the API's own code path
(``service.relays.service``): the same checks, the same audit entry, marked ``via: ui``. The forms
carry the session's CSRF token like every other dashboard form. Relays belong to tenants, so the
admin key (which the API does not let near tenant resources either) sees none here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response import Redirect, Template

from outbox_relay.domain import NAME_RE, CauseKind
from service.deps import ServicesDep
from service.relays import service as relays_mod
from service.ui.auth import SignInRequired, User, UserDep, provide_user
from service.ui.forms import checked_form
from service.ui.responses import (
    UI_REFUSALS,
    http_error,
    internal_error,
    on_refusal,
    page,
    redirect,
    safe_back,
    signin_redirect,
)

ADMIN_NOTE = "Relays belong to tenants: sign in with a tenant's API key to see and pause its relays."
CAUSE_LABELS = {
    CauseKind.TARGET_UNREACHABLE: "Target unreachable",
    CauseKind.DATABASE_UNREACHABLE: "Tenant database unreachable",
    CauseKind.LONG_RUNNING_TRANSACTION: "Long-running transaction",
    CauseKind.POISON_MESSAGE: "Poison message",
    CauseKind.LEASE_LOST: "Lease lost",
}


def _checked_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise HTTPException(status_code=404, detail=f"relay {name!r} not found")
    return name


class UIRelaysController(Controller):
    path = "/ui/relays"
    include_in_schema = False
    dependencies = {"user": Provide(provide_user)}
    exception_handlers = {
        SignInRequired: signin_redirect,
        HTTPException: http_error,
        **UI_REFUSALS,
        Exception: internal_error,
    }

    @get("/")
    async def relays_page(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Template:
        found = await relays_mod.statuses(services, user.caller.tenant) if user.caller.tenant else []
        states: dict[str, int] = {}
        for _, status in found:
            states[status.state] = states.get(status.state, 0) + 1
        context = {
            "relays": found,
            "states": states,
            "now": datetime.now(UTC),
            "admin_note": ADMIN_NOTE if user.caller.tenant is None else None,
            "labels": CAUSE_LABELS,
            "here": "/ui/relays",
            "one": False,
        }
        return page(request, "relays.html", context, user=user)

    @get("/{name:str}")
    async def relay_page(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, name: FromPath[str]
    ) -> Template:
        if user.caller.tenant is None:
            raise HTTPException(status_code=403, detail=ADMIN_NOTE)
        found = await relays_mod.status_of(services, user.caller.tenant, _checked_name(name))
        if found is None:
            raise HTTPException(status_code=404, detail=f"relay {name!r} not found")
        context = {
            "relays": [found],
            "now": datetime.now(UTC),
            "labels": CAUSE_LABELS,
            "here": f"/ui/relays/{name}",
            "one": True,
        }
        return page(request, "relays.html", context, user=user)

    @post("/{name:str}/pause", status_code=303)
    async def pause(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, name: FromPath[str]
    ) -> Redirect:
        return await self._set_enabled(request, user, services, name, enabled=False)

    @post("/{name:str}/resume", status_code=303)
    async def resume(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, name: FromPath[str]
    ) -> Redirect:
        return await self._set_enabled(request, user, services, name, enabled=True)

    async def _set_enabled(
        self, request: Request[Any, Any, Any], user: User, services: ServicesDep, name: str, *, enabled: bool
    ) -> Redirect:
        form = await checked_form(request, user)
        back = safe_back(form.get("back"), "/ui/relays")
        verb = "Resumed" if enabled else "Paused"
        if user.caller.tenant is None:
            return redirect(request, back, ("error", ADMIN_NOTE))
        if not NAME_RE.match(name):
            return redirect(request, back, ("error", f"{name!r} is not a relay name"))
        on_refusal(request, back, f"Not {verb.lower()}: ")  # the table's errors (NotFound, RelayChanged ...)
        try:
            changed = await relays_mod.set_enabled(
                services, user.caller.tenant, name, enabled, actor=user.caller.actor, via="ui"
            )
        except HTTPException as exc:  # a check of the relay's own (Problem), outside the table
            return redirect(request, back, ("error", f"Not {verb.lower()}: {exc.detail}"))
        if not changed:
            already = "was not paused" if enabled else "was already paused"
            return redirect(request, back, ("notice", f"Relay {name!r} {already}."))
        if enabled:
            return redirect(request, back, ("notice", f"Resumed relay {name!r}: workers pick it up again."))
        return redirect(request, back, ("notice", f"Paused relay {name!r}: no worker publishes from it until resumed."))
