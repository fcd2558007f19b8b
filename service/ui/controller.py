"""The dead-letter dashboard at ``/ui``: server-rendered pages (jinja2) and a little JavaScript.

Sign in with an API key (a tenant's, or the admin key for every tenant); the session lives in the
control DB and the browser's HTTP-only cookie holds only its random token (``service.ui.session``);
every form, the sign-in form too, carries a CSRF token. Pages do
what the API does through the same operations (``service.dead_letters.service``), so the audit log
reads the same, marked ``via: ui``. Bulk actions go through a confirmation page; bulk replay is the
same background job as the API's, with a progress page. Times are sent in UTC and shown in the
browser's zone by ``static/ui.js``; the pages work without it, less comfortably.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import msgspec
from litestar import Controller, Request, Response, Router, get, post
from litestar.datastructures import CacheControlHeader
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from outbox_relay.domain import NAME_RE
from outbox_relay.replay import ReplayConflict, ReplayRefused
from outbox_relay.store.dead_letters import STATUSES, LetterFilter
from service.dead_letters import service as ops_mod
from service.dead_letters.schemas import MAX_IDS, DeadLetterFilter
from service.dead_letters.service import Caller, Conflict, DeadLetters, NotAllowed, QueueUnavailable, TooMany
from service.deps import Services, ServicesDep, client_of, throttled
from service.ui.session import (
    FLASH_COOKIE,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
    cleared,
    end_session,
    flash_cookie,
    login_cookie,
    login_csrf_ok,
    login_token,
    read_flash,
    read_session,
    session_cookie,
    start_session,
)

log = logging.getLogger("outbox_relay.ui")
HERE = Path(__file__).resolve().parent
PAGE_SIZES = (25, 50, 100, 200)
KNOWN_ERROR_CLASSES = ("refused", "too_large", "unavailable", "unroutable", "not_allowed")
FILTER_FIELDS = ("tenant", "relay", "target", "topic", "key", "error_class", "since", "until")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


# --- app wiring ------------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat() if value else ""


def _utc(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _num(value: int) -> str:
    return f"{value:,}"


def _filters(engine: JinjaTemplateEngine) -> None:
    engine.engine.filters.update(iso=_iso, utc=_utc, num=_num)


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


# --- who is signed in --------------------------------------------------------------------------------


class SignInRequired(Exception):
    """No valid session: the page sends the browser to the sign-in form."""


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


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


# --- responses ---------------------------------------------------------------------------------------


def _page(
    request: Request[Any, Any, Any],
    name: str,
    context: dict[str, Any],
    *,
    user: User | None = None,
    status_code: int = 200,
) -> Template:
    services = _services(request)
    flash = read_flash(request, services.secrets)
    ctx = {"user": user, "csrf": user.session.csrf if user else "", "flash": flash, "path": request.url.path}
    ctx.update(context)
    response = Template(
        template_name=name, context=ctx, status_code=status_code, media_type="text/html", headers=SECURITY_HEADERS
    )
    if request.cookies.get(FLASH_COOKIE):
        response.set_cookie(cleared(request, services.settings, FLASH_COOKIE))
    return response


def _redirect(request: Request[Any, Any, Any], to: str, flash: tuple[str, str] | None = None) -> Redirect:
    services = _services(request)
    cookies = [flash_cookie(request, services.settings, services.secrets, *flash)] if flash else None
    return Redirect(to, status_code=303, cookies=cookies)


_SAFE_BACK = re.compile(r"^/ui/[A-Za-z0-9/_.~%?&=+:-]*$")


def _back(value: str | None, default: str = "/ui/dead-letters") -> str:
    """Only a path inside the dashboard (no open redirect)."""
    if value and _SAFE_BACK.match(value) and "//" not in value:
        return value
    return default


def _signin_redirect(request: Request[Any, Any, Any], exc: SignInRequired) -> Response[Any]:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = urlencode({"next": target}) if request.method == "GET" and target != "/ui/dead-letters" else ""
    response = Redirect("/ui/login" + (f"?{query}" if query else ""), status_code=303)
    if request.cookies.get(SESSION_COOKIE):
        response.set_cookie(cleared(request, _services(request).settings))
    return response


def _login_form(
    request: Request[Any, Any, Any], services: Services, nxt: str, error: str | None, *, status_code: int = 200
) -> Response[Any]:
    """The sign-in page, with this browser's sign-in CSRF token (set in a cookie when it has none)."""
    token, sealed = login_token(request, services.secrets)
    response = _page(request, "login.html", {"next": nxt, "error": error, "csrf": token}, status_code=status_code)
    if sealed is not None:
        response.set_cookie(login_cookie(request, services.settings, sealed))
    return response


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    detail = str(exc.detail)
    if exc.status_code == 400 and isinstance(exc.extra, list) and exc.extra:
        detail = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in exc.extra)
    return _error_page(request, exc.status_code, detail)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_page(request, 500, "Something went wrong on our side; the operator has the details in the log.")


def _error_page(request: Request[Any, Any, Any], status: int, detail: str) -> Response[Any]:
    context = {"status": status, "detail": detail, "user": None, "csrf": "", "flash": None, "path": request.url.path}
    return Template(
        template_name="error.html",
        context=context,
        status_code=status,
        media_type="text/html",
        headers=SECURITY_HEADERS,
    )


# --- forms and filters -------------------------------------------------------------------------------


def _time(value: str | None) -> datetime | None:
    """ISO 8601; without a zone it is UTC."""
    if not value or not value.strip():
        return None
    when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_filter(values: Any) -> tuple[DeadLetterFilter, str, list[str]]:
    """The filters of a list URL or a form: (filter, status, errors). A bad field is left out and
    reported, never silently widened: the page shows the error and no rows."""
    errors: list[str] = []
    raw: dict[str, Any] = {}
    for name in ("tenant", "relay", "target", "topic", "key", "error_class"):
        value = (values.get(name) or "").strip()
        if value:
            raw[name] = value
    for name in ("since", "until"):
        # the visible field (browser-local, converted to UTC by ui.js, which then disables it) wins
        # when it was sent: without JavaScript it is read as UTC
        local = f"{name}_local"
        try:
            when = _time(values.get(local) if local in values else values.get(name))
        except ValueError:
            errors.append(f"{name}: not a date and time")
            continue
        if when is not None:
            raw[name] = when
    try:
        f = msgspec.convert(raw, DeadLetterFilter)
    except msgspec.ValidationError as exc:
        errors.append(str(exc).replace("`", "").replace("$.", ""))
        f = DeadLetterFilter()
    status = values.get("status") or "dead"
    if status not in (*STATUSES, "any"):
        errors.append(f"status: choose one of {', '.join((*STATUSES, 'any'))}")
        status = "dead"
    return f, status, errors


def filter_params(f: DeadLetterFilter, status: str) -> dict[str, str]:
    """The filter as URL query parameters (times in UTC)."""
    out: dict[str, str] = {}
    for name in FILTER_FIELDS:
        value = getattr(f, name)
        if value is not None:
            out[name] = _iso(value) if isinstance(value, datetime) else str(value)
    if status != "dead":
        out["status"] = status
    return out


def _url(path: str, params: dict[str, str]) -> str:
    return path + (f"?{urlencode(params)}" if params else "")


def _ids(values: list[str]) -> list[uuid.UUID]:
    out = []
    for value in values[: MAX_IDS + 1]:
        try:
            out.append(uuid.UUID(value))
        except ValueError:
            continue
    return list(dict.fromkeys(out))


def _describe(f: DeadLetterFilter) -> list[tuple[str, str]]:
    labels = {"error_class": "error class", "since": "dead-lettered from", "until": "dead-lettered before"}
    out = []
    for name in FILTER_FIELDS:
        value = getattr(f, name)
        if value is not None:
            out.append((labels.get(name, name), _utc(value) if isinstance(value, datetime) else str(value)))
    return out


def _ops(services: ServicesDep, user: User) -> DeadLetters:
    return DeadLetters(services, user.caller, via="ui")


async def _form(request: Request[Any, Any, Any], user: User) -> Any:
    form = await request.form()
    if not user.session.csrf_ok(form.get("csrf")):
        raise HTTPException(status_code=403, detail="This form has expired; go back, reload the page and try again.")
    return form


def _message(exc: Exception) -> str:
    if isinstance(exc, LookupError):
        return str(exc.args[0])
    return str(exc)


async def _target_names(services: ServicesDep, tenant_id: uuid.UUID) -> list[str]:
    return [r.name for r in await services.store.list_resources("targets", tenant_id, None, 500)]


# --- pages -------------------------------------------------------------------------------------------


class UIController(Controller):
    path = "/ui"
    include_in_schema = False
    dependencies = {"user": Provide(provide_user)}
    exception_handlers = {
        SignInRequired: _signin_redirect,
        HTTPException: _http_error,
        Exception: _internal_error,
    }

    @get("/")
    async def home(self) -> Redirect:
        return Redirect("/ui/dead-letters", status_code=303)

    @get("/login")
    async def login_page(self, request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
        nxt = _back(request.query_params.get("next"))
        session = await read_session(request, services.store)
        if session is not None and await ops_mod.caller_for_key_hash(services, session.key_hash) is not None:
            return Redirect(nxt, status_code=303)
        return _login_form(request, services, nxt, None)

    @post("/login", status_code=303)
    async def login(self, request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
        """Sign in. Refused: a form without this browser's sign-in token (403, a fresh form), a client past
        the failed-authentication limit (429 with Retry-After, the key not even looked at), a key that is
        not valid (401, counted as a failure)."""
        form = await request.form()
        nxt = _back(form.get("next"))
        if not login_csrf_ok(request, services.secrets, form.get("csrf")):
            error = "This sign-in form has expired; please sign in again."
            return _login_form(request, services, nxt, error, status_code=403)
        wait_s = throttled(request, services)
        if wait_s is not None:
            error = f"Too many failed sign-ins from this address; try again in {wait_s} seconds."
            response = _login_form(request, services, nxt, error, status_code=429)
            response.headers["Retry-After"] = str(wait_s)
            return response
        key = (form.get("key") or "").strip()
        caller = await ops_mod.caller_for_key(services, key) if key else None
        if caller is None:
            if key:
                services.throttle.failed(client_of(request))
            error = "That API key is not valid (or was revoked)." if key else "Enter an API key."
            return _login_form(request, services, nxt, error, status_code=401)
        token, _ = await start_session(services.store, key)
        response = Redirect(nxt, status_code=303)
        response.set_cookie(session_cookie(request, services.settings, token))
        response.set_cookie(cleared(request, services.settings, LOGIN_COOKIE))
        return response

    @post("/logout", status_code=303)
    async def logout(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Response[Any]:
        """Sign out: the session row goes, so the cookie stops working in every browser that has a copy."""
        await _form(request, user)
        await end_session(services.store, user.session)
        response = Redirect("/ui/login", status_code=303)
        response.set_cookie(cleared(request, services.settings))
        return response

    @get("/dead-letters")
    async def list_page(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Template:
        params = request.query_params
        f, status, errors = parse_filter(params)
        if user.caller.tenant is not None and f.tenant is not None and f.tenant != user.caller.tenant.name:
            errors.append("tenant: a tenant key sees only its own tenant")
        try:
            limit = int(params.get("limit") or 50)
        except ValueError:
            limit = 50
        limit = limit if limit in PAGE_SIZES else 50
        try:
            page_no = max(1, int(params.get("page") or 1))
        except ValueError:
            page_no = 1
        cursor = params.get("cursor") or None
        ops = _ops(services, user)
        rows: list[Any] = []
        next_cursor = None
        totals = None
        if not errors:
            try:
                where: LetterFilter = await ops.letter_filter(f, statuses=STATUSES if status == "any" else (status,))
                found, next_cursor, totals = await ops.page(where, cursor=cursor, limit=limit, with_counts=True)
                rows = [ops_mod.summary(r) for r in found]
            except ValueError as exc:
                errors.append(str(exc))
            except NotAllowed as exc:
                errors.append(str(exc))
        base = filter_params(f, status)
        if limit != 50:
            base["limit"] = str(limit)
        relays: list[str] = []
        if user.caller.tenant is not None:
            relays = [r.name for r in await services.store.relays_of_tenant(user.caller.tenant.id)]
        context = {
            "f": f,
            "status": status,
            "statuses": (*STATUSES, "any"),
            "limit": limit,
            "page_sizes": PAGE_SIZES,
            "rows": rows,
            "counts": totals,
            "errors": errors,
            "filtered": bool(filter_params(f, "dead")),
            "first": (page_no - 1) * limit + 1,
            "last": (page_no - 1) * limit + len(rows),
            "page_no": page_no,
            "next_url": _url("/ui/dead-letters", {**base, "cursor": next_cursor, "page": str(page_no + 1)})
            if next_cursor
            else None,
            "first_url": _url("/ui/dead-letters", base) if cursor else None,
            "here": _url("/ui/dead-letters", {**base, **({"cursor": cursor, "page": str(page_no)} if cursor else {})}),
            "clear_url": _url("/ui/dead-letters", {"status": status} if status != "dead" else {}),
            "chip_url": lambda name, value: _url("/ui/dead-letters", {**base, name: value}),
            "hidden": base,
            "error_classes": sorted(set(KNOWN_ERROR_CLASSES) | set(totals.by_error_class if totals else ())),
            "relay_names": sorted(set(relays) | set(totals.by_relay if totals else ())),
            "max_ids": MAX_IDS,
        }
        return _page(request, "list.html", context, user=user)

    @get("/dead-letters/{letter_id:uuid}")
    async def detail_page(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]
    ) -> Template:
        ops = _ops(services, user)
        try:
            letter, exists = await ops.get(letter_id)
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=_message(exc)) from None
        back = _back(request.query_params.get("back"))
        context = {
            "letter": ops_mod.full(letter, relay_exists=exists),
            "targets": await _target_names(services, letter.tenant_id),
            "back": back,
            "here": _url(f"/ui/dead-letters/{letter_id}", {"back": back}),
        }
        return _page(request, "detail.html", context, user=user)

    @get("/dead-letters/{letter_id:uuid}/payload")
    async def payload(self, user: UserDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]) -> Response[bytes]:
        try:
            letter, _ = await _ops(services, user).get(letter_id)
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=_message(exc)) from None
        return Response(
            letter.payload,
            media_type="application/octet-stream",
            headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="dead-letter-{letter_id}.bin"'},
        )

    @post("/dead-letters/{letter_id:uuid}/replay", status_code=303)
    async def replay(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]
    ) -> Redirect:
        form = await _form(request, user)
        back = _back(form.get("back"), f"/ui/dead-letters/{letter_id}")
        target = (form.get("target") or "").strip() or None
        destination = (form.get("destination") or "").strip() or None
        if target is not None and not NAME_RE.match(target):
            return _redirect(request, back, ("error", f"{target!r} is not a target name"))
        try:
            outcome = await _ops(services, user).replay(letter_id, target=target, destination=destination)
        except (LookupError, ReplayConflict, ReplayRefused) as exc:
            return _redirect(request, back, ("error", f"Not replayed: {_message(exc)}"))
        if outcome.replayed:
            text = (
                f"Replayed dead letter {str(letter_id)[:8]} to target {outcome.target_name!r} "
                f"({outcome.destination}); replay #{outcome.replay_count}."
            )
            return _redirect(request, back, ("notice", text))
        text = f"The replay failed: {outcome.error}. The letter is dead again, with this attempt recorded."
        return _redirect(request, back, ("error", text))

    @post("/dead-letters/{letter_id:uuid}/discard", status_code=303)
    async def discard(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]
    ) -> Redirect:
        form = await _form(request, user)
        back = _back(form.get("back"), f"/ui/dead-letters/{letter_id}")
        try:
            await _ops(services, user).discard(letter_id)
        except (LookupError, Conflict) as exc:
            return _redirect(request, back, ("error", f"Not discarded: {_message(exc)}"))
        return _redirect(request, back, ("notice", f"Discarded dead letter {str(letter_id)[:8]}."))

    @post("/dead-letters/confirm", status_code=200)
    async def confirm(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Response[Any]:
        """Bulk actions stop here first: what exactly will happen, to how many letters."""
        form = await _form(request, user)
        intent = form.get("intent") or ""
        action, _, scope = intent.partition("-")
        back = _back(form.get("back"))
        if action not in ("replay", "discard") or scope not in ("selected", "matching"):
            return _redirect(request, back, ("error", "Unknown action."))
        f, _, errors = parse_filter(form)
        if errors:
            return _redirect(request, back, ("error", "; ".join(errors)))
        ops = _ops(services, user)
        ids: list[uuid.UUID] = []
        if scope == "selected":
            ids = _ids(form.getall("ids", []))
            if not ids:
                return _redirect(request, back, ("error", "Select at least one dead letter first."))
            if len(ids) > MAX_IDS:
                return _redirect(request, back, ("error", f"Select at most {MAX_IDS:,} dead letters at once."))
            count = len(ids)
        else:
            try:
                count = (await ops.store.counts(await ops.letter_filter(f))).total
            except NotAllowed as exc:
                return _redirect(request, back, ("error", str(exc)))
        context = {
            "action": action,
            "scope": scope,
            "ids": ids,
            "count": count,
            "described": _describe(f),
            "hidden": filter_params(f, "dead"),
            "back": back,
            "targets": await _target_names(services, user.caller.tenant.id) if user.caller.tenant else [],
        }
        return _page(request, "confirm.html", context, user=user)

    @post("/dead-letters/bulk", status_code=303)
    async def bulk(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Redirect:
        form = await _form(request, user)
        action = form.get("action")
        scope = form.get("scope")
        back = _back(form.get("back"))
        f, _, errors = parse_filter(form)
        if errors or action not in ("replay", "discard") or scope not in ("selected", "matching"):
            return _redirect(request, back, ("error", "; ".join(errors) or "Unknown action."))
        ids = _ids(form.getall("ids", [])) if scope == "selected" else None
        if scope == "selected" and not ids:
            return _redirect(request, back, ("error", "Select at least one dead letter first."))
        selection = None if scope == "selected" else f
        ops = _ops(services, user)
        try:
            if action == "discard":
                count = await ops.discard_many(ids, selection)
                return _redirect(request, back, ("notice", f"Discarded {count:,} dead letter{'s' * (count != 1)}."))
            target = (form.get("target") or "").strip() or None
            destination = (form.get("destination") or "").strip() or None
            if target is not None and not NAME_RE.match(target):
                return _redirect(request, back, ("error", f"{target!r} is not a target name"))
            job = await ops.start_job(ids, selection, target=target, destination=destination)
        except (NotAllowed, TooMany, QueueUnavailable) as exc:
            return _redirect(request, back, ("error", str(exc)))
        return _redirect(request, _url(f"/ui/jobs/{job.id}", {"back": back}))

    @get("/jobs")
    async def jobs_page(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Template:
        jobs = [ops_mod.job(r) for r in await _ops(services, user).jobs(50)]
        return _page(request, "jobs.html", {"jobs": jobs}, user=user)

    @get("/jobs/{job_id:uuid}")
    async def job_page(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, job_id: FromPath[uuid.UUID]
    ) -> Template:
        try:
            row = await _ops(services, user).get_job(job_id)
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=_message(exc)) from None
        job = ops_mod.job(row)
        context = {
            "job": job,
            "described": _describe(job.filter) if job.filter else [],
            "back": _back(request.query_params.get("back")),
        }
        return _page(request, "job.html", context, user=user)

    @get("/jobs/{job_id:uuid}/progress")
    async def job_progress(self, user: UserDep, services: ServicesDep, job_id: FromPath[uuid.UUID]) -> Response[bytes]:
        try:
            row = await _ops(services, user).get_job(job_id)
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=_message(exc)) from None
        return Response(msgspec.json.encode(ops_mod.job(row)), media_type="application/json", headers=SECURITY_HEADERS)
