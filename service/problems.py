"""Errors as RFC 9457 problem details (``application/problem+json``), never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.exceptions import HTTPException, ValidationException

from outbox_relay.errors import (
    AddressNotAllowed,
    Conflict,
    ImmutableField,
    InUse,
    InvalidDatabaseSpec,
    InvalidFilter,
    InvalidRequest,
    InvalidSpec,
    InvalidTargetSpec,
    MissingPrivileges,
    NotAllowed,
    NotFound,
    OutboxRelayError,
    OutOfBounds,
    ProvisionFailed,
    QueueUnavailable,
    QuotaExceeded,
    RelayChanged,
    ReplayConflict,
    ReplayRefused,
    ReplaysInFlight,
    TenantDatabaseError,
    TooMany,
    UnknownReference,
)

log = logging.getLogger("outbox_relay.api")
MEDIA_TYPE = "application/problem+json"


class Problem(HTTPException, OutboxRelayError):
    """An HTTP error with a problem type slug (``type`` becomes ``urn:outbox-relay:problem:<slug>``).

    In the project's tree (:mod:`outbox_relay.errors`) but defined here, as it is litestar's
    HTTPException too: :func:`http_exception_handler` answers it."""

    def __init__(self, status_code: int, detail: str, *, slug: str | None = None, **extra: Any) -> None:
        super().__init__(detail=detail, status_code=status_code, extra=extra or None)
        self.slug = slug


def problem_response(
    status: int, detail: str, *, slug: str | None = None, title: str | None = None, **extra: Any
) -> Response[Any]:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    body: dict[str, Any] = {
        "type": f"urn:outbox-relay:problem:{slug}" if slug else "about:blank",
        "title": title or phrase,
        "status": status,
        "detail": detail,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return Response(body, status_code=status, media_type=MEDIA_TYPE)


def http_exception_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        errors = exc.extra if isinstance(exc.extra, list) else None
        detail = _validation_detail(errors) or str(exc.detail)
        return problem_response(400 if status == 400 else status, detail, slug="invalid-request", errors=errors)
    extra = exc.extra if isinstance(exc.extra, dict) else {}
    slug = getattr(exc, "slug", None)
    headers = exc.headers or {}
    response = problem_response(status, str(exc.detail), slug=slug, **extra)
    response.headers.update(headers)
    return response


def _validation_detail(errors: list[Any] | None) -> str | None:
    if not errors:
        return None
    first = errors[0]
    if isinstance(first, dict) and first.get("message"):
        where = first.get("key") or first.get("source") or ""
        msg = str(first["message"])
        if msg == repr(first.get("key")):  # litestar's message for a missing body or parameter
            return "a JSON request body is required" if first.get("key") == "data" else f"missing {where}"
        return f"invalid {where}: {msg}" if where and where not in msg else msg
    return None


def _spec_errors(exc: InvalidSpec) -> list[dict[str, str]]:
    return [{"message": exc.reason, "key": exc.field, "source": "body"}]


@dataclass(frozen=True, slots=True)
class ProblemType:
    """How the API answers one exception class: ``status``, the problem type's ``slug`` (a string, or a
    function of the exception for a type chosen at run time), the ``title`` (None: the status's HTTP
    phrase) and the ``extra`` members of the body drawn from the exception. The detail is ``str(exc)``."""

    status: int
    slug: str | Callable[[Any], str]
    title: str | None = None
    extra: Callable[[Any], dict[str, Any]] | None = None

    def response(self, exc: Exception) -> Response[Any]:
        slug = self.slug(exc) if callable(self.slug) else self.slug
        extra = self.extra(exc) if self.extra is not None else {}
        return problem_response(self.status, str(exc), slug=slug, title=self.title, **extra)


PROBLEMS: dict[type[OutboxRelayError], ProblemType] = {
    AddressNotAllowed: ProblemType(422, "address-not-allowed"),
    # a refused spec names its field, also as a validation error's key (``errors``)
    InvalidSpec: ProblemType(422, "invalid-spec", extra=lambda exc: {"errors": _spec_errors(exc)}),
    InvalidDatabaseSpec: ProblemType(422, "invalid-dsn", extra=lambda exc: {"errors": _spec_errors(exc)}),
    InvalidTargetSpec: ProblemType(422, "invalid-target", extra=lambda exc: {"errors": _spec_errors(exc)}),
    InvalidRequest: ProblemType(400, "invalid-request"),
    InvalidFilter: ProblemType(422, "invalid-filter", extra=lambda exc: {"field": exc.where}),
    TenantDatabaseError: ProblemType(502, "database-unreachable"),
    ProvisionFailed: ProblemType(422, "provision-failed"),
    MissingPrivileges: ProblemType(422, "missing-privileges", extra=lambda exc: {"missing": exc.missing}),
    InUse: ProblemType(409, "in-use"),
    # 409: the request is sound, but the tenant's current use leaves no room for it (deleting
    # something, or a higher quota from the operator, makes the same request succeed)
    QuotaExceeded: ProblemType(
        409,
        "quota-exceeded",
        extra=lambda exc: {"quota": exc.quota, "limit": exc.limit, "used": exc.used, "requested": exc.requested},
    ),
    OutOfBounds: ProblemType(422, "out-of-bounds", extra=lambda exc: {"field": exc.field, "limit": exc.limit}),
    UnknownReference: ProblemType(422, "unknown-reference"),
    ImmutableField: ProblemType(409, "immutable-field"),
    RelayChanged: ProblemType(409, "conflict"),
    NotFound: ProblemType(404, "not-found"),
    NotAllowed: ProblemType(403, "forbidden"),
    Conflict: ProblemType(409, "conflict"),
    ReplayConflict: ProblemType(409, "conflict"),
    ReplayRefused: ProblemType(422, lambda exc: f"replay-{exc.error_class.replace('_', '-')}"),
    TooMany: ProblemType(422, "too-many"),
    ReplaysInFlight: ProblemType(
        409, "replays-in-flight", extra=lambda exc: {"limit": exc.limit, "in_flight": exc.in_flight}
    ),
    QueueUnavailable: ProblemType(503, "queue-unavailable"),
}
"""Exception class -> the API's answer. Every class of :mod:`outbox_relay.errors` a request can raise is
here; one the table lacks is an internal error (500, logged). A subclass answers as its nearest listed
ancestor."""


def problem_type(exc: BaseException) -> ProblemType | None:
    """The table's entry for ``exc``: its class's, else its nearest listed ancestor's."""
    return next((PROBLEMS[cls] for cls in type(exc).__mro__ if cls in PROBLEMS), None)


def problem_handler(request: Request[Any, Any, Any], exc: OutboxRelayError) -> Response[Any]:
    """The exception handler of every class in :data:`PROBLEMS`. A quota's refusal of a tenant's request
    is recorded too, after the answer (the tenant's and the operator's ``quota`` alerts)."""
    entry = problem_type(exc)
    if entry is None:  # pragma: no cover - registered for the table's classes only
        return internal_error_handler(request, exc)
    response = entry.response(exc)
    refused = _refused_quota(exc)
    tenant = getattr(request.state, "tenant", None)
    services = getattr(request.app.state, "services", None)
    if refused is not None and tenant is not None and services is not None:
        response.background = BackgroundTask(_record_refusal, services.store, tenant.id, refused, str(exc))
    return response


def _refused_quota(exc: Exception) -> str | None:
    """The quota that refused the request, if one did."""
    if isinstance(exc, QuotaExceeded):
        return exc.quota
    if isinstance(exc, ReplaysInFlight):
        return "replays_in_flight"
    return None


async def _record_refusal(store: Any, tenant_id: Any, quota: str, detail: str) -> None:
    try:
        await store.record_quota_refusal(tenant_id, quota, detail)
    except Exception as exc:  # the answer is gone already; the alert is what is lost
        log.warning("quota refusal not recorded: %s", exc)


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(500, "internal error; the operator has the details in the service log")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    HTTPException: http_exception_handler,
    **dict.fromkeys(PROBLEMS, problem_handler),
    Exception: internal_error_handler,
}
