"""Errors as RFC 9457 problem details (``application/problem+json``), never a traceback."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from outbox_relay.errors import AddressNotAllowed, InvalidSpec, OutOfBounds, QuotaExceeded, TenantDatabaseError

log = logging.getLogger("outbox_relay.api")
MEDIA_TYPE = "application/problem+json"


class Problem(HTTPException):
    """An HTTP error with a problem type slug (``type`` becomes ``urn:outbox-relay:problem:<slug>``)."""

    def __init__(self, status_code: int, detail: str, *, slug: str | None = None, **extra: Any) -> None:
        super().__init__(detail=detail, status_code=status_code, extra=extra or None)
        self.slug = slug


def problem_response(status: int, detail: str, *, slug: str | None = None, **extra: Any) -> Response[Any]:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    body: dict[str, Any] = {
        "type": f"urn:outbox-relay:problem:{slug}" if slug else "about:blank",
        "title": phrase,
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


def spec_problem(exc: InvalidSpec, *, slug: str = "invalid-spec") -> Problem:
    """A spec the relay refuses (:mod:`outbox_relay.specs`): 422 naming the field and, in
    ``errors``, the field as a validation error's ``key``."""
    return Problem(422, str(exc), slug=slug, errors=[{"message": exc.reason, "key": exc.field, "source": "body"}])


def spec_handler(request: Request[Any, Any, Any], exc: InvalidSpec) -> Response[Any]:
    return http_exception_handler(request, spec_problem(exc))


def address_handler(request: Request[Any, Any, Any], exc: AddressNotAllowed) -> Response[Any]:
    return problem_response(422, str(exc), slug="address-not-allowed")


def tenant_db_handler(request: Request[Any, Any, Any], exc: TenantDatabaseError) -> Response[Any]:
    return problem_response(502, str(exc), slug="database-unreachable")


def quota_handler(request: Request[Any, Any, Any], exc: QuotaExceeded) -> Response[Any]:
    """409: the request is sound, but the tenant's current use leaves no room for it (deleting
    something, or a higher quota from the operator, makes the same request succeed)."""
    return problem_response(
        409, str(exc), slug="quota-exceeded", quota=exc.quota, limit=exc.limit, used=exc.used, requested=exc.requested
    )


def bounds_handler(request: Request[Any, Any, Any], exc: OutOfBounds) -> Response[Any]:
    return problem_response(422, str(exc), slug="out-of-bounds", field=exc.field, limit=exc.limit)


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(500, "internal error; the operator has the details in the service log")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    HTTPException: http_exception_handler,
    AddressNotAllowed: address_handler,
    InvalidSpec: spec_handler,
    TenantDatabaseError: tenant_db_handler,
    QuotaExceeded: quota_handler,
    OutOfBounds: bounds_handler,
    Exception: internal_error_handler,
}
