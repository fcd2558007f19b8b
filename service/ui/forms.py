"""The dashboard's forms and filters: URL and form fields read into the API's own types, and back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import msgspec
from litestar import Request
from litestar.exceptions import HTTPException

from outbox_relay.store.dead_letters import STATUSES
from service.dead_letters.schemas import MAX_IDS, DeadLetterFilter
from service.dead_letters.service import DeadLetters
from service.deps import ServicesDep
from service.ui.auth import User

FILTER_FIELDS = ("tenant", "relay", "target", "topic", "key", "error_class", "since", "until")


def iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat() if value else ""


def utc(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def num(value: int) -> str:
    return f"{value:,}"


def duration(seconds: float | None) -> str:
    """An age for people: ``850 ms``, ``42 s``, ``3 min 5 s``, ``2 h 7 min``, ``3 d 4 h``."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{max(seconds, 0) * 1000:.0f} ms"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def parse_time(value: str | None) -> datetime | None:
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
            when = parse_time(values.get(local) if local in values else values.get(name))
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
            out[name] = iso(value) if isinstance(value, datetime) else str(value)
    if status != "dead":
        out["status"] = status
    return out


def url_with(path: str, params: dict[str, str]) -> str:
    return path + (f"?{urlencode(params)}" if params else "")


def parse_ids(values: list[str]) -> list[uuid.UUID]:
    out = []
    for value in values[: MAX_IDS + 1]:
        try:
            out.append(uuid.UUID(value))
        except ValueError:
            continue
    return list(dict.fromkeys(out))


def describe(f: DeadLetterFilter) -> list[tuple[str, str]]:
    labels = {"error_class": "error class", "since": "dead-lettered from", "until": "dead-lettered before"}
    out = []
    for name in FILTER_FIELDS:
        value = getattr(f, name)
        if value is not None:
            out.append((labels.get(name, name), utc(value) if isinstance(value, datetime) else str(value)))
    return out


def ops_for(services: ServicesDep, user: User) -> DeadLetters:
    return DeadLetters(services, user.caller, via="ui")


async def checked_form(request: Request[Any, Any, Any], user: User) -> Any:
    form = await request.form()
    if not user.session.csrf_ok(form.get("csrf")):
        raise HTTPException(status_code=403, detail="This form has expired; go back, reload the page and try again.")
    return form


async def target_names(services: ServicesDep, tenant_id: uuid.UUID) -> list[str]:
    return [r.name for r in await services.store.list_resources("targets", tenant_id, None, 500)]
