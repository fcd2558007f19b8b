"""The dead-letter dashboard at ``/ui``: server-rendered pages (jinja2) and a little JavaScript.

Sign in with an API key (a tenant's, or the admin key for every tenant); the session lives in the
control DB and the browser's HTTP-only cookie holds only its random token (``service.ui.session``);
every form, the sign-in form too, carries a CSRF token. Pages do
what the API does through the same operations (``service.dead_letters.service``), so the audit log
reads the same, marked ``via: ui``. Bulk actions go through a confirmation page; bulk replay is the
same background job as the API's, with a progress page. Times are sent in UTC and shown in the
browser's zone by ``static/ui.js``; the pages work without it, less comfortably.
The module holds the handlers; ``auth`` who is signed in, ``forms`` the forms and filters,
``responses`` the pages, redirects and error pages.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response import Redirect, Template

from outbox_relay.domain import NAME_RE, ErrorClass
from outbox_relay.store.dead_letters import STATUSES
from service.dead_letters import service as ops_mod
from service.dead_letters.schemas import MAX_IDS
from service.dead_letters.service import NotAllowed
from service.deps import ServicesDep, client_of, throttled
from service.ui.auth import SignInRequired, UserDep, provide_user
from service.ui.forms import (
    checked_form,
    describe,
    filter_params,
    ops_for,
    parse_filter,
    parse_ids,
    target_names,
    url_with,
)
from service.ui.responses import (
    SECURITY_HEADERS,
    UI_REFUSALS,
    http_error,
    internal_error,
    login_form,
    on_refusal,
    page,
    redirect,
    safe_back,
    signin_redirect,
)
from service.ui.session import (
    LOGIN_COOKIE,
    cleared,
    end_session,
    login_csrf_ok,
    read_session,
    session_cookie,
    start_session,
)

PAGE_SIZES = (25, 50, 100, 200)
KNOWN_ERROR_CLASSES = tuple(ErrorClass)


# --- pages -------------------------------------------------------------------------------------------


def _paging(params: Any) -> tuple[int, int, str | None]:
    """The list URL's page size (one of PAGE_SIZES, else 50), page number (from 1) and cursor."""
    try:
        limit = int(params.get("limit") or 50)
    except ValueError:
        limit = 50
    try:
        page_no = max(1, int(params.get("page") or 1))
    except ValueError:
        page_no = 1
    return (limit if limit in PAGE_SIZES else 50), page_no, params.get("cursor") or None


class UIController(Controller):
    path = "/ui"
    include_in_schema = False
    dependencies = {"user": Provide(provide_user)}
    exception_handlers = {
        SignInRequired: signin_redirect,
        HTTPException: http_error,
        **UI_REFUSALS,
        Exception: internal_error,
    }

    @get("/")
    async def home(self) -> Redirect:
        return Redirect("/ui/dead-letters", status_code=303)

    @get("/login")
    async def login_page(self, request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
        nxt = safe_back(request.query_params.get("next"))
        session = await read_session(request, services.store)
        if session is not None and await ops_mod.caller_for_key_hash(services, session.key_hash) is not None:
            return Redirect(nxt, status_code=303)
        return login_form(request, services, nxt, None)

    @post("/login", status_code=303)
    async def login(self, request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
        """Sign in. Refused: a form without this browser's sign-in token (403, a fresh form), a client past
        the failed-authentication limit (429 with Retry-After, the key not even looked at), a key that is
        not valid (401, counted as a failure)."""
        form = await request.form()
        nxt = safe_back(form.get("next"))
        if not login_csrf_ok(request, services.secrets, form.get("csrf")):
            error = "This sign-in form has expired; please sign in again."
            return login_form(request, services, nxt, error, status_code=403)
        wait_s = throttled(request, services)
        if wait_s is not None:
            error = f"Too many failed sign-ins from this address; try again in {wait_s} seconds."
            response = login_form(request, services, nxt, error, status_code=429)
            response.headers["Retry-After"] = str(wait_s)
            return response
        key = (form.get("key") or "").strip()
        caller = await ops_mod.caller_for_key(services, key) if key else None
        if caller is None:
            if key:
                services.throttle.failed(client_of(request))
            error = "That API key is not valid (or was revoked)." if key else "Enter an API key."
            return login_form(request, services, nxt, error, status_code=401)
        token, _ = await start_session(services.store, key)
        response = Redirect(nxt, status_code=303)
        response.set_cookie(session_cookie(request, services.settings, token))
        response.set_cookie(cleared(request, services.settings, LOGIN_COOKIE))
        return response

    @post("/logout", status_code=303)
    async def logout(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Response[Any]:
        """Sign out: the session row goes, so the cookie stops working in every browser that has a copy."""
        await checked_form(request, user)
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
        limit, page_no, cursor = _paging(params)
        ops = ops_for(services, user)
        rows: list[Any] = []
        next_cursor = None
        totals = None
        if not errors:
            try:
                statuses = STATUSES if status == "any" else (status,)
                found, next_cursor, totals = await ops.page(
                    f, statuses=statuses, cursor=cursor, limit=limit, with_counts=True
                )
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
            "next_url": url_with("/ui/dead-letters", {**base, "cursor": next_cursor, "page": str(page_no + 1)})
            if next_cursor
            else None,
            "first_url": url_with("/ui/dead-letters", base) if cursor else None,
            "here": url_with(
                "/ui/dead-letters", {**base, **({"cursor": cursor, "page": str(page_no)} if cursor else {})}
            ),
            "clear_url": url_with("/ui/dead-letters", {"status": status} if status != "dead" else {}),
            "chip_url": lambda name, value: url_with("/ui/dead-letters", {**base, name: value}),
            "hidden": base,
            "error_classes": sorted(set(KNOWN_ERROR_CLASSES) | set(totals.by_error_class if totals else ())),
            "relay_names": sorted(set(relays) | set(totals.by_relay if totals else ())),
            "max_ids": MAX_IDS,
        }
        return page(request, "list.html", context, user=user)

    @get("/dead-letters/{letter_id:uuid}")
    async def detail_page(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]
    ) -> Template:
        ops = ops_for(services, user)
        letter, exists = await ops.get(letter_id)
        back = safe_back(request.query_params.get("back"))
        context = {
            "letter": ops_mod.full(letter, relay_exists=exists),
            "targets": await target_names(services, letter.tenant_id),
            "back": back,
            "here": url_with(f"/ui/dead-letters/{letter_id}", {"back": back}),
        }
        return page(request, "detail.html", context, user=user)

    @get("/dead-letters/{letter_id:uuid}/payload")
    async def payload(self, user: UserDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]) -> Response[bytes]:
        letter, _ = await ops_for(services, user).get(letter_id)
        return Response(
            letter.payload,
            media_type="application/octet-stream",
            headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="dead-letter-{letter_id}.bin"'},
        )

    @post("/dead-letters/{letter_id:uuid}/replay", status_code=303)
    async def replay(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]
    ) -> Redirect:
        form = await checked_form(request, user)
        back = safe_back(form.get("back"), f"/ui/dead-letters/{letter_id}")
        target = (form.get("target") or "").strip() or None
        destination = (form.get("destination") or "").strip() or None
        if target is not None and not NAME_RE.match(target):
            return redirect(request, back, ("error", f"{target!r} is not a target name"))
        on_refusal(request, back, "Not replayed: ")
        outcome = await ops_for(services, user).replay(letter_id, target=target, destination=destination)
        if outcome.replayed:
            text = (
                f"Replayed dead letter {str(letter_id)[:8]} to target {outcome.target_name!r} "
                f"({outcome.destination}); replay #{outcome.replay_count}."
            )
            return redirect(request, back, ("notice", text))
        text = f"The replay failed: {outcome.error}. The letter is dead again, with this attempt recorded."
        return redirect(request, back, ("error", text))

    @post("/dead-letters/{letter_id:uuid}/discard", status_code=303)
    async def discard(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]
    ) -> Redirect:
        form = await checked_form(request, user)
        back = safe_back(form.get("back"), f"/ui/dead-letters/{letter_id}")
        on_refusal(request, back, "Not discarded: ")
        await ops_for(services, user).discard(letter_id)
        return redirect(request, back, ("notice", f"Discarded dead letter {str(letter_id)[:8]}."))

    @post("/dead-letters/confirm", status_code=200)
    async def confirm(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Response[Any]:
        """Bulk actions stop here first: what exactly will happen, to how many letters."""
        form = await checked_form(request, user)
        intent = form.get("intent") or ""
        action, _, scope = intent.partition("-")
        back = safe_back(form.get("back"))
        if action not in ("replay", "discard") or scope not in ("selected", "matching"):
            return redirect(request, back, ("error", "Unknown action."))
        f, _, errors = parse_filter(form)
        if errors:
            return redirect(request, back, ("error", "; ".join(errors)))
        ops = ops_for(services, user)
        ids: list[uuid.UUID] = []
        if scope == "selected":
            ids = parse_ids(form.getall("ids", []))
            if not ids:
                return redirect(request, back, ("error", "Select at least one dead letter first."))
            if len(ids) > MAX_IDS:
                return redirect(request, back, ("error", f"Select at most {MAX_IDS:,} dead letters at once."))
            count = len(ids)
        else:
            on_refusal(request, back)
            count = await ops.count(f)
        context = {
            "action": action,
            "scope": scope,
            "ids": ids,
            "count": count,
            "described": describe(f),
            "hidden": filter_params(f, "dead"),
            "back": back,
            "targets": await target_names(services, user.caller.tenant.id) if user.caller.tenant else [],
        }
        return page(request, "confirm.html", context, user=user)

    @post("/dead-letters/bulk", status_code=303)
    async def bulk(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Redirect:
        form = await checked_form(request, user)
        action = form.get("action")
        scope = form.get("scope")
        back = safe_back(form.get("back"))
        f, _, errors = parse_filter(form)
        if errors or action not in ("replay", "discard") or scope not in ("selected", "matching"):
            return redirect(request, back, ("error", "; ".join(errors) or "Unknown action."))
        ids = parse_ids(form.getall("ids", [])) if scope == "selected" else None
        if scope == "selected" and not ids:
            return redirect(request, back, ("error", "Select at least one dead letter first."))
        selection = None if scope == "selected" else f
        ops = ops_for(services, user)
        on_refusal(request, back)
        if action == "discard":
            count = await ops.discard_many(ids, selection)
            return redirect(request, back, ("notice", f"Discarded {count:,} dead letter{'s' * (count != 1)}."))
        target = (form.get("target") or "").strip() or None
        destination = (form.get("destination") or "").strip() or None
        if target is not None and not NAME_RE.match(target):
            return redirect(request, back, ("error", f"{target!r} is not a target name"))
        job = await ops.start_job(ids, selection, target=target, destination=destination)
        return redirect(request, url_with(f"/ui/jobs/{job.id}", {"back": back}))

    @get("/jobs")
    async def jobs_page(self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep) -> Template:
        jobs = [ops_mod.job(r) for r in await ops_for(services, user).jobs(50)]
        return page(request, "jobs.html", {"jobs": jobs}, user=user)

    @get("/jobs/{job_id:uuid}")
    async def job_page(
        self, request: Request[Any, Any, Any], user: UserDep, services: ServicesDep, job_id: FromPath[uuid.UUID]
    ) -> Template:
        row = await ops_for(services, user).get_job(job_id)
        job = ops_mod.job(row)
        context = {
            "job": job,
            "described": describe(job.filter) if job.filter else [],
            "back": safe_back(request.query_params.get("back")),
        }
        return page(request, "job.html", context, user=user)

    @get("/jobs/{job_id:uuid}/progress")
    async def job_progress(self, user: UserDep, services: ServicesDep, job_id: FromPath[uuid.UUID]) -> Response[bytes]:
        row = await ops_for(services, user).get_job(job_id)
        return Response(msgspec.json.encode(ops_mod.job(row)), media_type="application/json", headers=SECURITY_HEADERS)
