"""What every tenant resource endpoint shares: naming, read-back, paging, write-only secrets."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from litestar.params import Parameter
from msgspec import UNSET

from outbox_relay.crypto import SecretBox
from outbox_relay.domain import NAME_PATTERN, NAME_RE, Resource
from outbox_relay.store.control import KEEP, ResourceRow, Unchanged
from service.problems import Problem

R = TypeVar("R", bound=Resource)

NAME_PARAM = Parameter(
    pattern=NAME_PATTERN, description="Client-chosen name: lower-case letters, digits, '.', '_', '-'."
)
LIMIT_PARAM = Parameter(ge=1, le=500, description="Page size.")
CURSOR_PARAM = Parameter(
    description="`next_cursor` of the previous page.",
    required=False,
    pattern=r"^([A-Za-z0-9_-]{4})*([A-Za-z0-9_-]{2,3})?$",
    max_length=512,
)
META_FIELDS = ("name", "created_at", "updated_at", "password_set")


class Page(msgspec.Struct, kw_only=True):
    next_cursor: str | None = None


def check_name(kind: str, name: str) -> None:
    if not NAME_RE.match(name):
        raise Problem(
            422,
            f"invalid {kind} name {name!r}: use 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit",
            slug="invalid-name",
        )


def spec_json(body: Resource) -> bytes:
    """The resource as written, minus read-only and write-only fields, as stored JSON."""
    clean = msgspec.structs.replace(body, **{f: UNSET for f in (*META_FIELDS, "password") if hasattr(body, f)})
    return msgspec.json.encode(clean)


def secret_of(body: Resource, box: SecretBox) -> bytes | Unchanged | None:
    """Write-only secret: omitted keeps the stored one, null clears it, a string replaces it."""
    password = getattr(body, "password", UNSET)
    if password is UNSET:
        return KEEP
    if password is None:
        return None
    return box.encrypt(password)


def read_back(kind: Any, row: ResourceRow) -> Any:
    """Decode a stored resource and fill in its read-only fields."""
    obj = msgspec.json.decode(row.spec, type=kind)
    values: dict[str, Any] = {"name": row.name, "created_at": row.created_at, "updated_at": row.updated_at}
    if hasattr(obj, "password_set"):
        values["password_set"] = row.has_secret
    return msgspec.structs.replace(obj, **values)
