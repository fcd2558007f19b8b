"""The dashboard's responses: pages (jinja2 templates with the security headers), redirects with a
flash, the sign-in redirect and form, error pages (never a stack trace), and what the operations raise
(:data:`UI_REFUSALS`)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from litestar import Request, Response, Router
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import HTTPException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from outbox_relay.errors import OutboxRelayError
from service.deps import Services
from service.problems import PROBLEMS, problem_type
from service.ui.auth import SignInRequired, User, services_of
from service.ui.forms import duration, iso, num, utc
from service.ui.session import (
    FLASH_COOKIE,
    SESSION_COOKIE,
    cleared,
    flash_cookie,
    login_cookie,
    login_token,
    read_flash,
)

log = logging.getLogger("outbox_relay.ui")
HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _filters(engine: JinjaTemplateEngine) -> None:
    engine.engine.filters.update(iso=iso, utc=utc, num=num, duration=duration)


def ui_template_config() -> TemplateConfig[JinjaTemplateEngine]:
    """The app's template config (only the dashboard renders templates)."""
    return TemplateConfig(directory=HERE / "templates", engine=JinjaTemplateEngine, engine_callback=_filters)


ui_static_files: Router = create_static_files_router(
    path="/ui/static",
    directories=[HERE / "static"],
    include_in_schema=False,
    cache_control=CacheControlHeader(max_age=300),
    name="ui-static",
)


def page(
    request: Request[Any, Any, Any],
    name: str,
    context: dict[str, Any],
    *,
    user: User | None = None,
    status_code: int = 200,
) -> Template:
    services = services_of(request)
    flash = read_flash(request, services.secrets)
    ctx = {"user": user, "csrf": user.session.csrf if user else "", "flash": flash, "path": request.url.path}
    ctx.update(context)
    response = Template(
        template_name=name, context=ctx, status_code=status_code, media_type="text/html", headers=SECURITY_HEADERS
    )
    if request.cookies.get(FLASH_COOKIE):
        response.set_cookie(cleared(request, services.settings, FLASH_COOKIE))
    return response


def redirect(request: Request[Any, Any, Any], to: str, flash: tuple[str, str] | None = None) -> Redirect:
    services = services_of(request)
    cookies = [flash_cookie(request, services.settings, services.secrets, *flash)] if flash else None
    return Redirect(to, status_code=303, cookies=cookies)


_SAFE_BACK = re.compile(r"^/ui/[A-Za-z0-9/_.~%?&=+:-]*$")


def safe_back(value: str | None, default: str = "/ui/dead-letters") -> str:
    """Only a path inside the dashboard (no open redirect)."""
    if value and _SAFE_BACK.match(value) and "//" not in value:
        return value
    return default


def signin_redirect(request: Request[Any, Any, Any], exc: SignInRequired) -> Response[Any]:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = urlencode({"next": target}) if request.method == "GET" and target != "/ui/dead-letters" else ""
    response = Redirect("/ui/login" + (f"?{query}" if query else ""), status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        response.set_cookie(cleared(request, services_of(request).settings))
    return response


def login_form(
    request: Request[Any, Any, Any], services: Services, nxt: str, error: str | None, *, status_code: int = 200
) -> Response[Any]:
    """The sign-in page, with this browser's sign-in CSRF token (set in a cookie when it has none)."""
    token, sealed = login_token(request, services.secrets)
    response = page(request, "login.html", {"next": nxt, "error": error, "csrf": token}, status_code=status_code)
    if sealed is not None:
        response.set_cookie(login_cookie(request, services.settings, sealed))
    return response


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    detail = str(exc.detail)
    if exc.status_code == 400 and isinstance(exc.extra, list) and exc.extra:
        detail = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in exc.extra)
    return error_page(request, exc.status_code, detail)


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_page(request, 500, "Something went wrong on our side; the operator has the details in the log.")


def on_refusal(request: Request[Any, Any, Any], back: str, prefix: str = "") -> None:
    """Make what the operations raise from here on a redirect to ``back`` with the message (after
    ``prefix``) as an error flash, instead of an error page: for an action, once it knows where it goes back."""
    request.state[_REFUSAL] = (back, prefix)


_REFUSAL = "ui_refusal"


def refusal(request: Request[Any, Any, Any], exc: OutboxRelayError) -> Response[Any]:
    """The dashboard's answer to an error of the table: in an action that called :func:`on_refusal`, a
    redirect back with the message; elsewhere the error page with the API's status for it (404 for NotFound)."""
    entry = problem_type(exc)
    if entry is None:  # pragma: no cover - registered for the table's classes only
        return internal_error(request, exc)
    after = request.state.get(_REFUSAL)
    if after is not None:
        back, prefix = after
        return redirect(request, back, ("error", f"{prefix}{exc}"))
    return error_page(request, entry.status, str(exc))


UI_REFUSALS: dict[Any, Any] = dict.fromkeys(PROBLEMS, refusal)
"""The dashboard's exception handlers for every class the API's table answers (NotFound, Conflict,
ReplayRefused, NotAllowed, TooMany, QueueUnavailable ...): all through :func:`refusal`, with the API's
status, so the dashboard never answers with problem JSON and its handlers translate nothing by hand."""


def error_page(request: Request[Any, Any, Any], status: int, detail: str) -> Response[Any]:
    context = {"status": status, "detail": detail, "user": None, "csrf": "", "flash": None, "path": request.url.path}
    return Template(
        template_name="error.html",
        context=context,
        status_code=status,
        media_type="text/html",
        headers=SECURITY_HEADERS,
    )
