"""Shared dependencies: the control store, the secret box, the address policy, and who is calling."""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency

from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore, TenantRow
from service.problems import Problem


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    store: ControlStore
    secrets: SecretBox
    policy: AddressPolicy


ServicesDep = NamedDependency[Services]
TenantDep = NamedDependency[TenantRow]
ActorDep = NamedDependency[str]


def provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def api_key_of(request: Request[Any, Any, Any]) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def _unauthorized(detail: str) -> Problem:
    exc = Problem(401, detail, slug="unauthorized")
    exc.headers = {"WWW-Authenticate": 'Bearer realm="outbox-relay"'}
    return exc


async def provide_tenant(request: Request[Any, Any, Any], services: ServicesDep) -> TenantRow:
    key = api_key_of(request)
    if key is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    admin = services.settings.admin_api_key
    if admin and hmac.compare_digest(key.encode(), admin.encode()):
        raise Problem(403, "the admin key manages tenants; use a tenant API key for tenant resources", slug="forbidden")
    tenant = await services.store.tenant_for_key(key)
    if tenant is None:
        raise _unauthorized("invalid or revoked API key")
    return tenant


async def require_admin(request: Request[Any, Any, Any], services: ServicesDep) -> str:
    key = api_key_of(request)
    admin = services.settings.admin_api_key
    if key is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <admin key>'")
    if not admin:
        raise Problem(403, "the admin API is disabled (no OUTBOX_RELAY_ADMIN_API_KEY)", slug="forbidden")
    if not hmac.compare_digest(key.encode(), admin.encode()):
        raise Problem(403, "this operation needs the admin API key", slug="forbidden")
    return "admin"


def encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except ValueError:
        raise Problem(400, "invalid pagination cursor", slug="invalid-request") from None
    # any cursor of the documented alphabet is a position in the name order, even one we did not issue
    return raw.decode("utf-8", "replace").replace("\x00", "")
