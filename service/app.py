"""``create_app()``: the control-plane litestar app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from litestar import Litestar, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from outbox_relay import __version__
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from service.databases.controller import DatabaseController
from service.deps import Services, ServicesDep, provide_services
from service.problems import EXCEPTION_HANDLERS, Problem
from service.relays.controller import RelayController
from service.targets.controller import TargetController
from service.tenants.controller import TenantController


class Health(msgspec.Struct):
    status: str


@get("/healthz", operation_id="liveness", tags=["health"], summary="Liveness probe", include_in_schema=True)
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", operation_id="readiness", tags=["health"], summary="Readiness: the control DB answers")
async def readyz(services: ServicesDep) -> Health:
    try:
        await services.store.ping()
    except Exception:
        raise Problem(503, "control database unavailable", slug="not-ready") from None
    return Health(status="ready")


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Outbox Relay",
        version=__version__,
        description="Transactional-outbox relay: PostgreSQL outbox to Kafka, RabbitMQ and Redis Streams.",
        components=Components(
            security_schemes={
                "apiKey": SecurityScheme(
                    type="http", scheme="bearer", description="A tenant API key, or the admin key for /v1/tenants"
                )
            }
        ),
        security=[{"apiKey": []}],
        path="/docs",
        render_plugins=[ScalarRenderPlugin()],
        use_handler_docstrings=False,
    )


def create_app(settings: Settings | None = None, *, store: ControlStore | None = None) -> Litestar:
    """Compose the API. Without ``store`` the app opens its own pool on start-up."""
    settings = settings or Settings.from_env()
    box = SecretBox(settings.secret_keys)
    policy = AddressPolicy(allow_private=settings.allow_private_networks, extra_denied=settings.denied_networks)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        own = store is None
        s = store or await ControlStore.connect(settings.database_url)
        app.state.services = Services(settings=settings, store=s, secrets=box, policy=policy)
        try:
            yield
        finally:
            if own:
                await s.close()

    return Litestar(
        route_handlers=[healthz, readyz, TenantController, DatabaseController, TargetController, RelayController],
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        openapi_config=openapi_config(),
        debug=False,
    )
