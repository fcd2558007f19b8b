"""``create_app()``: the control-plane litestar app."""

from __future__ import annotations

import os

# Stable HTTP semantic conventions: request metrics labelled by method, route template and status,
# not by the client-supplied Host header (unbounded cardinality). Read once, at first use.
os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import msgspec
from litestar import Litestar, Router, get
from litestar.datastructures import MutableScopeHeaders
from litestar.di import Provide
from litestar.logging import LoggingConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import (
    Components,
    OpenAPI,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Reference,
    Schema,
    SecurityScheme,
)
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.types import ControllerRouterHandler, Message, Scope
from litestar.utils import normalize_path
from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE

from outbox_relay import __version__
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from service.alerts.controller import AlertController
from service.apidocs import DOCS_HEADERS, LocalSwaggerPlugin
from service.databases.controller import DatabaseController
from service.dead_letters.controller import DeadLetterController
from service.deps import Services, ServicesDep, provide_services
from service.inputs import MAX_BODY_BYTES, ApiRequest, refuse_nul_in_query
from service.observability import StatusController, metrics_endpoint
from service.problems import EXCEPTION_HANDLERS, MEDIA_TYPE, Problem
from service.relays.controller import RelayController
from service.schemas import use_msgspec_schemas
from service.targets.controller import TargetController
from service.tenants.controller import TenantController
from service.throttle import AuthThrottle
from service.ui.controller import UIController
from service.ui.relays import UIRelaysController
from service.ui.responses import ui_static_files, ui_template_config


def route_template_details(scope: Scope) -> tuple[str, dict[str, str]]:
    """Span name and ``http.route`` from the matched route's template (``/v1/relays/{name}``).

    litestar's default puts the concrete path there (``GET /v1/relays/shop``), which makes the
    request metrics' cardinality as large as the set of resource names. The OTel middleware wraps
    the router, so it asks before routing: look the route up the way the router will (its lookup
    is cached). A path no route matches is ``unmatched``, so scanners cannot add label values.
    """
    method = str(scope.get("method", "")).strip()
    path = scope.get("path", "")
    if root_path := scope.get("root_path", ""):
        path = path.split(root_path, maxsplit=1)[-1]
    try:
        *_, template = scope["litestar_app"].asgi_router.handle_routing(path=normalize_path(path), method=method)
    except Exception:  # NotFound, MethodNotAllowed: the router answers those itself
        template = "unmatched"
    template = template or "unmatched"
    return (f"{method} {template}" if method else template), {HTTP_ROUTE: template}


class Health(msgspec.Struct):
    status: str


@get("/healthz", operation_id="liveness", tags=["health"], summary="Liveness probe", security=[])
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", operation_id="readiness", tags=["health"], summary="Readiness: the control DB answers", security=[])
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
                    type="http",
                    scheme="bearer",
                    description="`Authorization: Bearer <key>`: a tenant API key, or the admin key for /v1/tenants "
                    "(and across tenants on /v1/dead-letters). No other header carries a key.",
                )
            }
        ),
        security=[{"apiKey": []}],
        path="/docs",
        render_plugins=[LocalSwaggerPlugin()],
        # the reference's page, assets and document, under the reference's Content-Security-Policy
        openapi_router=Router(
            "/docs",
            route_handlers=[],
            include_in_schema=False,
            response_headers=DOCS_HEADERS,
            dto=None,
            return_dto=None,
        ),
        use_handler_docstrings=False,
    )


PROBLEM_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    required=["type", "title", "status", "detail"],
    properties={
        "type": Schema(type=OpenAPIType.STRING, description="urn:outbox-relay:problem:<slug> or about:blank"),
        "title": Schema(type=OpenAPIType.STRING),
        "status": Schema(type=OpenAPIType.INTEGER),
        "detail": Schema(type=OpenAPIType.STRING, description="What went wrong, for a human."),
        "errors": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(type=OpenAPIType.OBJECT),
            description="Validation errors: message, key and source of each.",
        ),
    },
    description="RFC 9457 problem details.",
)
_PROBLEM_TEXT = {
    400: "Invalid request: unknown field, wrong type or value out of range",
    401: "Missing, unknown or revoked API key (the same on every route)",
    403: "The key may not do this (admin routes need the admin key; tenant routes a tenant key)",
    404: "No such resource for this tenant",
    409: "Conflicts with the current state (resource in use, an immutable field changed, or a quota reached: "
    "`quota-exceeded` names the quota, its limit and the use; `replays-in-flight` the limit of replays)",
    413: "The request body is over 1 MiB",
    422: "Well-formed but refused (e.g. a password inside a DSN, a DSN or URL parameter outside the allow-list, "
    "an address that is not allowed, a NUL character in a text field, a value past the service's bounds: "
    "`out-of-bounds` names the field and the limit)",
    429: "Too many failed authentications from this address; `Retry-After` says when to try again",
    502: "The tenant database could not be reached or refused the operation",
    503: "Not ready",
}


RETRY_AFTER: dict[str, OpenAPIHeader | Reference] = {
    "Retry-After": OpenAPIHeader(
        schema=Schema(type=OpenAPIType.INTEGER, minimum=1), description="Seconds to wait before trying again."
    )
}


def document_problems(openapi: OpenAPI) -> OpenAPI:
    """Describe every error an operation can answer with, as ``application/problem+json``.

    litestar documents only its own 400 (as ``application/json``); clients and schemathesis need
    the real set.
    """
    use_msgspec_schemas(openapi)
    if openapi.components.schemas is None:
        openapi.components.schemas = {}
    openapi.components.schemas["Problem"] = PROBLEM_SCHEMA
    ref = Reference(ref="#/components/schemas/Problem")
    for path, item in (openapi.paths or {}).items():
        for method in ("get", "put", "post", "delete"):
            operation = getattr(item, method, None)
            if operation is None:
                continue
            codes: set[int] = set()
            if path.startswith("/v1/"):
                codes |= {400, 401, 403, 429}
                if "{" in path:
                    codes.add(404)
                if method in ("put", "post", "delete") and "{" in path:
                    codes.add(409)
                if method in ("put", "post"):
                    codes.add(422)
                if operation.request_body is not None:
                    codes.add(413)
                if path.endswith(("/provision", "/replays")):
                    codes.add(502)  # both connect to the tenant database
            if path == "/readyz":
                codes.add(503)
            if path in ("/healthz", "/readyz"):
                operation.security = []  # public probes
            responses = operation.responses or {}
            for code in sorted(codes):
                declared = responses.get(str(code))
                if isinstance(declared, OpenAPIResponse) and MEDIA_TYPE in (declared.content or {}):
                    continue  # the operation's own problem schema (e.g. provision's missing privileges)
                responses[str(code)] = OpenAPIResponse(
                    description=_PROBLEM_TEXT[code],
                    content={MEDIA_TYPE: OpenAPIMediaType(schema=ref)},
                    headers=RETRY_AFTER if code == 429 else None,
                )
            operation.responses = responses
    return openapi


ROUTE_HANDLERS: list[ControllerRouterHandler] = [
    healthz,
    readyz,
    metrics_endpoint,
    TenantController,
    DatabaseController,
    TargetController,
    RelayController,
    AlertController,
    StatusController,
    DeadLetterController,
    UIController,
    UIRelaysController,
    ui_static_files,
]
"""Every part of the API: probes, metrics, the resource controllers, dead letters, the dashboard."""


def create_app(settings: Settings | None = None, *, store: ControlStore | None = None) -> Litestar:
    """Compose the API. Without ``store`` the app opens its own pool on start-up."""
    settings = settings or Settings.from_env()
    allow: dict[str, str] = {}
    app = Litestar(
        route_handlers=ROUTE_HANDLERS,
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        request_class=ApiRequest,
        request_max_body_size=MAX_BODY_BYTES,
        before_request=refuse_nul_in_query,
        before_send=[allow_header_fixer(allow)],
        lifespan=[services_lifespan(settings, store)],
        openapi_config=openapi_config(),
        template_config=ui_template_config(),
        debug=False,
        # litestar's default configures the root logger (its own format, level INFO) when the app is
        # built, overriding the process's: OUTBOX_RELAY_LOG_LEVEL and service/cli.py's quiet loggers
        # stopped holding the moment `serve` or `dev` created the app
        logging_config=LoggingConfig(configure_root_logger=False),
        plugins=[telemetry_plugin()],
    )
    document_problems(app.openapi_schema)  # the plugin caches this object; /docs serves it
    allow.update(
        {route.path_format: ", ".join(sorted(route.methods)) for route in app.routes if hasattr(route, "methods")}
    )
    return app


def services_lifespan(
    settings: Settings, store: ControlStore | None
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """The app's :class:`Services`, built on start-up; a pool opened here (no ``store`` given) is
    closed on shut-down."""
    box = SecretBox(settings.secret_keys)
    policy = AddressPolicy(allow_private=settings.allow_private_networks, extra_denied=settings.denied_networks)
    throttle = AuthThrottle(limit=settings.auth_failure_limit, window_s=settings.auth_failure_window_s)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        s = store or await ControlStore.connect(settings.database_url)
        app.state.services = Services(settings=settings, store=s, secrets=box, policy=policy, throttle=throttle)
        try:
            yield
        finally:
            if store is None:
                await s.close()

    return lifespan


def allow_header_fixer(allow: dict[str, str]) -> Callable[[Message, Scope], Awaitable[None]]:
    """A ``before_send`` hook: ``Allow`` of an OPTIONS answer from ``allow`` (path template -> methods),
    which :func:`create_app` fills from the final route table."""

    async def fix_allow_header(message: Message, scope: Scope) -> None:
        # litestar 2 answers OPTIONS with only the first handler's method of a path (litestar#4169,
        # fixed in v3); tell the truth from the final route table.
        if message["type"] == "http.response.start" and scope.get("method") == "OPTIONS":
            methods = allow.get(scope.get("path_template", ""))
            if methods:
                headers = MutableScopeHeaders.from_message(message)
                headers["Allow"] = methods

    return fix_allow_header


def telemetry_plugin() -> OpenTelemetryPlugin:
    """Request spans and metrics, labelled by route template (:func:`route_template_details`)."""
    return OpenTelemetryPlugin(
        OpenTelemetryConfig(
            exclude=["/metrics", "/healthz", "/readyz"], scope_span_details_extractor=route_template_details
        )
    )
