"""Shared dependencies: the control store, the secret box, the address policy, and who is calling.

Authentication answers the same on every route: no key is 401; a key that is neither the admin key
nor a live tenant key (wrong, unknown, revoked) is 401 and counts as a failure of the client; a valid
key of the wrong kind (the admin key on tenant routes, a tenant key on admin routes) is 403. A client
with too many failures gets 429 with ``Retry-After`` on every authenticated route until the window
passes (``service.throttle``). Keys go in ``Authorization: Bearer <key>``, the one scheme the API
documents and every client of this repository sends.
"""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler

from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore, KeyOwner, TenantRow
from service.problems import Problem
from service.throttle import AuthThrottle, client_key


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    store: ControlStore
    secrets: SecretBox
    policy: AddressPolicy
    throttle: AuthThrottle


ServicesDep = NamedDependency[Services]
TenantDep = NamedDependency[TenantRow]
ActorDep = NamedDependency[str]


def provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def api_key_of(request: Request[Any, Any, Any]) -> str | None:
    """The key of ``Authorization: Bearer <key>``, or None."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def client_of(request: Request[Any, Any, Any]) -> str:
    """The unit the failure limit counts in (see ``service.throttle.client_key``)."""
    return client_key(request.client.host if request.client else None)


def throttled(request: Request[Any, Any, Any], services: Services) -> int | None:
    """Seconds the client must wait (it failed too often), or None: a dict lookup, no I/O."""
    return services.throttle.retry_after_s(client_of(request))


def refuse_if_throttled(request: Request[Any, Any, Any], services: Services) -> None:
    """Raise 429 with ``Retry-After`` for a client past the failure limit, before any key lookup."""
    wait_s = throttled(request, services)
    if wait_s is not None:
        exc = Problem(
            429,
            f"too many failed authentications from this address; try again in {wait_s} s",
            slug="too-many-failed-authentications",
            retry_after_s=wait_s,
        )
        exc.headers = {"Retry-After": str(wait_s)}
        raise exc


def missing_key() -> Problem:
    exc = Problem(401, "missing API key: send 'Authorization: Bearer <key>'", slug="unauthorized")
    exc.headers = {"WWW-Authenticate": 'Bearer realm="outbox-relay"'}
    return exc


def bad_key(request: Request[Any, Any, Any], services: Services) -> Problem:
    """The 401 of a key that is not valid (wrong, unknown, revoked); counts a failure of the client."""
    services.throttle.failed(client_of(request))
    exc = Problem(401, "invalid or revoked API key", slug="unauthorized")
    exc.headers = {"WWW-Authenticate": 'Bearer realm="outbox-relay", error="invalid_token"'}
    return exc


def is_admin_key(key: str, services: Services) -> bool:
    admin = services.settings.admin_api_key
    return bool(admin) and hmac.compare_digest(key.encode(), str(admin).encode())


async def authenticate_tenant(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: the tenant of the request's key, checked before the body is read (guards run before
    litestar resolves the handler's arguments), so a wrong key is 401 whatever the body holds."""
    services = provide_services(connection.app.state)
    owner = await _key_owner_of(connection, services)  # type: ignore[arg-type]
    connection.state.tenant, connection.state.actor = owner.tenant, owner.actor


async def authenticate_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: the admin key, checked before the body is read (see :func:`authenticate_tenant`)."""
    services = provide_services(connection.app.state)
    connection.state.actor = await _admin_of(connection, services)  # type: ignore[arg-type]


async def provide_tenant(request: Request[Any, Any, Any], services: ServicesDep) -> TenantRow:
    tenant: TenantRow | None = getattr(request.state, "tenant", None)
    return tenant if tenant is not None else (await _key_owner_of(request, services)).tenant


async def provide_key_actor(request: Request[Any, Any, Any], services: ServicesDep) -> str:
    """The audit log's "who" of a tenant route: ``key:<api key id>`` of the request's key."""
    actor: str | None = getattr(request.state, "actor", None)
    return actor if actor is not None else (await _key_owner_of(request, services)).actor


async def _key_owner_of(request: Request[Any, Any, Any], services: Services) -> KeyOwner:
    refuse_if_throttled(request, services)
    key = api_key_of(request)
    if key is None:
        raise missing_key()
    if is_admin_key(key, services):
        raise Problem(403, "the admin key manages tenants; use a tenant API key for tenant resources", slug="forbidden")
    owner = await services.store.key_owner(key)
    if owner is None:
        raise bad_key(request, services)
    return owner


async def require_admin(request: Request[Any, Any, Any], services: ServicesDep) -> str:
    actor: str | None = getattr(request.state, "actor", None)
    return actor if actor is not None else await _admin_of(request, services)


async def _admin_of(request: Request[Any, Any, Any], services: Services) -> str:
    refuse_if_throttled(request, services)
    key = api_key_of(request)
    if key is None:
        raise missing_key()
    if is_admin_key(key, services):
        return "admin"
    if await services.store.key_owner(key) is None:
        raise bad_key(request, services)
    if not services.settings.admin_api_key:
        raise Problem(403, "the admin API is disabled (no OUTBOX_RELAY_ADMIN_API_KEY)", slug="forbidden")
    raise Problem(403, "this operation needs the admin API key, not a tenant key", slug="forbidden")


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
