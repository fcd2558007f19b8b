"""What every tenant resource endpoint shares: naming, read-back, paging, write-only secrets, and
:class:`Resources`, the one list/get/put/delete path of databases, targets, relays and alerts (read-back, the
in-use check, the audit entry with the caller's key as its actor)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
from litestar import Response
from litestar.di import Provide
from litestar.params import Parameter
from msgspec import UNSET

from outbox_relay.crypto import SecretBox
from outbox_relay.domain import NAME_PATTERN, NAME_RE, Alert, Database, Relay, Resource, Rotation, Target
from outbox_relay.errors import InUse, NotFound
from outbox_relay.store.control import KEEP, ResourceRow, ResourceTable, TenantRow, Unchanged
from outbox_relay.store.rotations import SecretTable
from service.deps import (
    ActorDep,
    Services,
    ServicesDep,
    TenantDep,
    decode_cursor,
    encode_cursor,
    provide_key_actor,
    provide_tenant,
)
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
META_FIELDS = ("name", "created_at", "updated_at", "password_set", "rotation")


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


def without_user(spec: Any) -> Any:
    """The spec without the user it logs in as (a DSN's or URL's user, Kafka's ``username``): what a
    rotation may change along with the password (PostgreSQL has one password per role: a rotation
    without a gap there can move to a second role)."""
    changes: dict[str, Any] = {}
    for field in ("dsn", "url"):
        value = getattr(spec, field, None)
        if isinstance(value, str):
            parts = urlsplit(value)
            changes[field] = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if hasattr(spec, "username"):
        changes["username"] = None
    return msgspec.structs.replace(spec, **changes)


def read_back(kind: Any, row: ResourceRow) -> Any:
    """Decode a stored resource and fill in its read-only fields."""
    obj = msgspec.json.decode(row.spec, type=kind)
    values: dict[str, Any] = {"name": row.name, "created_at": row.created_at, "updated_at": row.updated_at}
    if hasattr(obj, "password_set"):
        values["password_set"] = row.has_secret
    return msgspec.structs.replace(obj, **values)


@dataclass(frozen=True, slots=True)
class Kind(Generic[R]):
    """One kind of tenant resource: its table, its noun in messages, the type the API reads back."""

    table: ResourceTable
    noun: str
    type: Any
    """The read-back type (``Target`` is a union, so not a ``type[R]``)."""


DATABASES: Kind[Database] = Kind("databases", "database", Database)
TARGETS: Kind[Target] = Kind("targets", "target", Target)
RELAYS: Kind[Relay] = Kind("relays", "relay", Relay)
ALERTS: Kind[Alert] = Kind("alerts", "alert", Alert)


@dataclass(frozen=True, slots=True)
class Resources(Generic[R]):
    """The resources of one kind of one tenant, as one caller (``actor``) sees and changes them."""

    kind: Kind[R]
    services: Services
    tenant: TenantRow
    actor: str
    """The audit log's "who": ``key:<api key id>`` of the calling key (the dashboard's signed-in key)."""

    async def row(self, name: str) -> ResourceRow:
        """The stored row; NotFound when the tenant has none of that name."""
        row = await self.services.store.get_resource(self.kind.table, self.tenant.id, name)
        if row is None:
            raise NotFound(f"{self.kind.noun} {name!r} not found")
        return row

    async def get(self, name: str) -> R:
        return await self.shown(await self.row(name))

    async def page(self, cursor: str | None, limit: int) -> tuple[list[R], str | None]:
        """One page by name: the items and the next page's cursor (None on the last page)."""
        store = self.services.store
        rows = await store.list_resources(self.kind.table, self.tenant.id, decode_cursor(cursor), limit + 1)
        next_cursor = encode_cursor(rows[limit - 1].name) if len(rows) > limit else None
        return [await self.shown(r) for r in rows[:limit]], next_cursor

    def read_back(self, row: ResourceRow) -> R:
        return read_back(self.kind.type, row)  # type: ignore[no-any-return]

    async def shown(self, row: ResourceRow) -> R:
        """The resource read back, with its rotation in progress (if any) as the workers report it."""
        obj = self.read_back(row)
        if row.rotation_started_at is None or self.kind.table not in ("databases", "targets"):
            return obj
        table: SecretTable = "databases" if self.kind.table == "databases" else "targets"
        status = await self.services.store.rotation_status(table, row.id, self.services.settings.lease_ttl_s)
        if status is None:  # completed since the row was read
            return obj
        error = status.error
        rotation = Rotation(
            state="refused" if error else "switching",
            started_at=status.started_at,
            workers=len(status.workers),
            switched=status.switched,
            error=error,
        )
        return msgspec.structs.replace(obj, rotation=rotation)

    async def written(
        self, name: str, row: ResourceRow, created: bool, detail: dict[str, Any] | None = None
    ) -> Response[R]:
        """After a store's put: the audit entry, and the resource read back (201 when it was created)."""
        await self.audit("create" if created else "put", name, detail)
        return Response(await self.shown(row), status_code=201 if created else 200)

    async def put_with_secret(
        self,
        name: str,
        body: R,
        put: Callable[[bytes | Unchanged | None], Awaitable[tuple[ResourceRow, bool]]],
    ) -> Response[R]:
        """A database's or target's PUT: a rotation when it changes only the password
        (:meth:`rotate`), otherwise ``put`` with the body's secret (an ordinary replace, which
        restarts the relays using it)."""
        rotated = await self.rotate(name, body)
        if rotated is not None:
            return rotated
        row, created = await put(secret_of(body, self.services.secrets))
        return await self.written(name, row, created)

    async def rotate(self, name: str, body: R) -> Response[R] | None:
        """Rotate the credential of a resource that has a password, when the PUT changes nothing else
        but the password (and perhaps the user it logs in as): the new one is stored as pending next to
        the current one (the relays keep running; the workers switch to it one by one, see
        ``outbox_relay/rotation.py``). The current credential again cancels a pending rotation; the
        pending one again changes nothing. None: not a rotation (an ordinary replace)."""
        password = getattr(body, "password", UNSET)
        if not isinstance(password, str) or self.kind.table not in ("databases", "targets"):
            return None
        table: SecretTable = "databases" if self.kind.table == "databases" else "targets"
        store, box = self.services.store, self.services.secrets
        stored = await store.stored_secrets(table, self.tenant.id, name)
        if stored is None or stored.secret is None:
            return None
        spec = spec_json(body)
        new, now = self._spec(spec), self._spec(stored.spec)
        if new != now and without_user(new) != without_user(now):
            return None  # more than the credential changes
        pending_spec = spec if new != now else None
        if pending_spec is None and password == box.decrypt(stored.secret):
            if stored.pending is None or not await store.cancel_rotation(table, self.tenant.id, name, stored.spec):
                return None
            await self.audit("rotation-cancel", name)
            return Response(await self.shown(await self.row(name)), status_code=200)
        if (
            stored.pending is not None
            and password == box.decrypt(stored.pending)
            and new == self._spec(stored.pending_spec or stored.spec)
        ):
            started = await store.start_rotation(table, self.tenant.id, name, stored.spec, None)
            if started is None:
                return None
            return await self.written(name, started[0], False)  # already rotating to it: nothing changes
        encrypted = box.encrypt(password)
        started = await store.start_rotation(table, self.tenant.id, name, stored.spec, encrypted, pending_spec)
        if started is None:
            return None
        detail: dict[str, Any] = {"version": started[1], "user_changes": pending_spec is not None}
        await self.audit("rotation-start", name, detail)
        # nobody uses it (no relay runs on it): nothing to wait for, the new password replaces the old now
        await store.complete_rotations(self.services.settings.lease_ttl_s, self.actor)
        return Response(await self.shown(await self.row(name)), status_code=200)

    def _spec(self, spec: bytes) -> Any:
        return msgspec.json.decode(spec, type=self.kind.type)

    async def delete(self, name: str) -> None:
        """Idempotent; 409 ``in-use`` (:class:`InUse`) while relays use a database or target."""
        store = self.services.store
        if self.kind.table in ("databases", "targets"):
            users = await store.relays_using(self.kind.table, self.tenant.id, name)
            if users:
                raise InUse(f"{self.kind.noun} {name!r} is used by relays {users}; delete them first")
        if await store.delete_resource(self.kind.table, self.tenant.id, name):  # InUse in a race
            await self.audit("delete", name)

    async def audit(self, action: str, name: str, detail: dict[str, Any] | None = None) -> None:
        resource = f"{self.kind.table}/{name}"
        await self.services.store.audit(
            self.tenant.id, self.actor, action, resource, json.dumps(detail) if detail else "{}"
        )


def provide_resources(kind: Kind[R]) -> dict[str, Provide]:
    """A tenant controller's dependencies: ``tenant``, ``actor`` and ``resources`` (of ``kind``)."""

    async def resources(services: ServicesDep, tenant: TenantDep, actor: ActorDep) -> Resources[Any]:
        return Resources(kind, services, tenant, actor)

    return {"tenant": Provide(provide_tenant), "actor": Provide(provide_key_actor), "resources": Provide(resources)}
