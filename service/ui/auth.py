"""Who is signed in to the dashboard: a live session (``service.ui.session``) whose API key is still valid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from outbox_relay.errors import OutboxRelayError
from service.dead_letters import service as ops_mod
from service.dead_letters.service import Caller
from service.deps import Services, ServicesDep
from service.ui.session import Session, read_session


class SignInRequired(OutboxRelayError):
    """No valid session: the page sends the browser to the sign-in form (``responses.signin_redirect``).

    The dashboard's own branch of the tree in :mod:`outbox_relay.errors`: only the dashboard raises it."""


@dataclass(frozen=True, slots=True)
class User:
    caller: Caller
    session: Session

    @property
    def label(self) -> str:
        return self.caller.tenant.name if self.caller.tenant else "admin (all tenants)"


UserDep = NamedDependency[User]


async def provide_user(request: Request[Any, Any, Any], services: ServicesDep) -> User:
    """The signed-in user of a live session whose key is still valid (checked on every request)."""
    session = await read_session(request, services.store)
    if session is None:
        raise SignInRequired()
    caller = await ops_mod.caller_for_key_hash(services, session.key_hash)
    if caller is None:
        raise SignInRequired()
    return User(caller=caller, session=session)


def services_of(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services
