"""The control DB's row types and the helpers every store shares (table names, key hashes, how a
control-DB outage looks)."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import asyncpg
import msgspec

ResourceTable = Literal["databases", "targets", "relays", "alerts"]
RESOURCE_TABLES: frozenset[str] = frozenset(get_args(ResourceTable))


def _table(table: str) -> str:
    """``table`` for interpolation into SQL, once it is known to be one of the resource tables (the
    type says so to mypy; this says so at run time, for a caller that passed a string through)."""
    if table not in RESOURCE_TABLES:
        raise ValueError(f"not a resource table: {table!r}")
    return table


KEY_PREFIX = "orly_"

HELD_BY_LEASE = "relay_id = $1 AND partition = $2 AND lease_epoch = $3 AND lease_holder IS NOT NULL"
"""The fence of every write that moves a partition's state: $1 relay, $2 partition, $3 the writer's
lease epoch. It fails once another worker took the lease (new epoch) or the writer gave it back."""


def control_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the control DB could not be reached (down, restarting, connection
    lost), as opposed to a statement that failed: the first is worth retrying, the second is not."""
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        # a pooled connection the server closed mid-statement can report itself as busy
        # ("cannot switch to state ...; another operation is in progress"): the pool replaces it
        | asyncpg.InternalClientError
        | asyncpg.CannotConnectNowError
        | asyncpg.exceptions.OperatorInterventionError,
    )


def hash_key(key: str) -> bytes:
    """API keys are 256-bit random tokens: a plain SHA-256 is the right hash (no stretching needed)."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class TenantRow:
    id: uuid.UUID
    name: str
    display_name: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyOwner:
    """Who an API key belongs to: the tenant and the key's id (the audit log's "who")."""

    tenant: TenantRow
    key_id: uuid.UUID

    @property
    def actor(self) -> str:
        """The audit log's "who" of this key: ``key:<api key id>``."""
        return f"key:{self.key_id}"


@dataclass(frozen=True, slots=True)
class TenantQuotas:
    """A tenant's quota overrides (None: the service default) and what it uses of each quota now."""

    overrides: dict[str, int | None]
    usage: dict[str, int]


@dataclass(frozen=True, slots=True)
class UISession:
    """A signed-in dashboard browser: the hash of the API key it signed in with, and its CSRF token."""

    key_hash: bytes
    csrf: str
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: uuid.UUID
    prefix: str
    description: str
    created_at: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class ResourceRow:
    id: uuid.UUID
    name: str
    spec: bytes
    """The resource as written, JSON, without secrets."""
    has_secret: bool
    created_at: datetime
    updated_at: datetime
    rotation_started_at: datetime | None = None
    """Set while a rotation of the resource's password is in progress (a pending secret is stored)."""


@dataclass(frozen=True, slots=True)
class RelayPlan:
    """Everything a worker needs to run one relay, secrets decrypted by the caller."""

    relay_id: uuid.UUID
    tenant_id: uuid.UUID
    tenant_name: str
    relay_name: str
    target_name: str
    relay_spec: bytes
    relay_version: datetime
    enabled: bool
    partitions: int
    database_id: uuid.UUID
    database_spec: bytes
    database_secret: bytes | None
    database_version: datetime
    target_id: uuid.UUID
    target_spec: bytes
    target_secret: bytes | None
    target_version: datetime
    database_secret_version: int = 0
    """The version of ``database_secret`` (a rotation's completion moves it, not ``database_version``)."""
    target_secret_version: int = 0


@dataclass(frozen=True, slots=True)
class RetryState:
    """The message a partition is retrying: its outbox id, failed attempts so far, their errors."""

    outbox_id: int
    attempts: int
    errors: list[dict[str, Any]]
    next_at: datetime | None


@dataclass(frozen=True, slots=True)
class Lease:
    relay_id: uuid.UUID
    partition: int
    holder: str
    epoch: int
    cursor_txid: int
    cursor_id: int
    system_identifier: str | None
    retry: RetryState | None = None


RestorePolicy = Literal["resend", "skip"]
RestorePhase = Literal["resending", "resent", "skipped"]


@dataclass(frozen=True, slots=True)
class RestoreState:
    """The last restore a partition detected (``relay_partitions.restore_*``; see migration 0008).

    While ``state`` is ``resending`` the partition's cursor is its position in the restored backlog;
    afterwards the ordinary read leaves the backlog (``max_id``, ``max_created_at``) out."""

    policy: RestorePolicy
    state: RestorePhase
    next_xid: int
    max_id: int
    max_created_at: datetime
    rows: int
    done: int
    detected_at: datetime
    finished_at: datetime | None


def lease_of(row: Any, *, relay_id: uuid.UUID, partition: int, holder: str) -> Lease:
    """A Lease from a ``relay_partitions`` row (epoch, cursor, identity and retry columns)."""
    return Lease(
        relay_id=relay_id,
        partition=partition,
        holder=holder,
        epoch=row["lease_epoch"],
        cursor_txid=row["cursor_txid"],
        cursor_id=row["cursor_id"],
        system_identifier=row["system_identifier"],
        retry=RetryState(
            outbox_id=row["retry_outbox_id"],
            attempts=row["retry_attempts"],
            errors=json.loads(row["retry_errors"]),
            next_at=row["retry_next_at"],
        )
        if row["retry_outbox_id"] is not None
        else None,
    )


class Unchanged:
    """Marker: keep the stored secret as it is."""


KEEP = Unchanged()


def _select(table: ResourceTable) -> str:
    if table == "relays":
        return "SELECT id, name, spec::text AS spec, false AS has_secret, created_at, updated_at FROM relays"
    if table == "alerts":  # a signing secret, never rotated
        return (
            "SELECT id, name, spec::text AS spec, secret IS NOT NULL AS has_secret, created_at, updated_at FROM alerts"
        )
    return (
        "SELECT id, name, spec::text AS spec, secret IS NOT NULL AS has_secret, created_at, updated_at, "
        f"rotation_started_at FROM {_table(table)}"
    )


def _tenant(row: Any) -> TenantRow:
    return TenantRow(
        id=row["id"],
        name=row["name"],
        display_name=row["display_name"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _resource(row: Any) -> ResourceRow:
    return ResourceRow(
        id=row["id"],
        name=row["name"],
        spec=row["spec"].encode(),
        has_secret=bool(row["has_secret"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        rotation_started_at=row.get("rotation_started_at"),
    )


class PartitionState(msgspec.Struct, kw_only=True):
    """One relay partition's row as the status reads it (:meth:`PartitionsStore.partition_states_of`):
    its cursor, lease, counts, last error, retry, lag sample and restore."""

    partition: int
    relay_id: uuid.UUID | None = None
    cursor_txid: int = 0
    cursor_id: int = 0
    lease_holder: str | None = None
    lease_epoch: int = 0
    lease_expires_at: datetime | None = None
    """A fleet owner's partition lapses with the owner's heartbeat (its own column is null)."""
    lease_expired: bool | None = None
    last_published_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_error_class: str | None = None
    published_count: int = 0
    filtered_count: int = 0
    dead_count: int = 0
    retried_count: int = 0
    retry_outbox_id: int | None = None
    retry_attempts: int | None = None
    retry_next_at: datetime | None = None
    resets: int = 0
    last_reset_at: datetime | None = None
    last_reset_reason: str | None = None
    pending_estimate: int | None = None
    oldest_pending_at: datetime | None = None
    pending_checked_at: datetime | None = None
    stall: str | None = None
    """The stall the worker's lag probe found, as JSON text (a long-running transaction's pid, age...)."""
    lag_s: float | None = None
    throttled_s: float | None = None
    """Seconds its batches waited on the target's limits over the owner's last lag sample."""
    throttled_at: datetime | None = None
    """When the owner last saw them wait."""
    restore_policy: RestorePolicy | None = None
    restore_state: RestorePhase | None = None
    restore_rows: int = 0
    restore_done: int = 0
    restore_detected_at: datetime | None = None
    restore_finished_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayRoute:
    """A relay as it is now, with its current target: where a replay goes by default."""

    relay_id: uuid.UUID
    relay_name: str
    relay_spec: bytes
    target: TargetRow


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetRow:
    id: uuid.UUID
    name: str
    spec: bytes
    secret: bytes | None
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSecrets:
    """A database's or target's spec and secrets, encrypted: what a PUT compares its password with."""

    id: uuid.UUID
    spec: bytes
    secret: bytes | None
    pending: bytes | None
    pending_spec: bytes | None
    """The spec the pending secret goes with, when the rotation also changes the user (None: ``spec``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialDue:
    """A resource a worker has open whose credential moved on from the version the worker uses: a
    rotation is pending (switch to ``pending`` at ``pending_version``), or one completed meanwhile
    (switch to ``secret`` at ``secret_version``)."""

    table: Literal["databases", "targets"]
    id: uuid.UUID
    spec: bytes
    secret: bytes | None
    secret_version: int
    pending: bytes | None
    pending_version: int | None
    pending_spec: bytes | None = None
    """The spec that goes with ``pending`` when the rotation changes the user too (None: ``spec``)."""

    @property
    def rotating(self) -> bool:
        return self.pending_version is not None and self.pending is not None

    @property
    def target_spec(self) -> bytes:
        """The spec of :attr:`version` (the user it logs in as may change with the password)."""
        return self.pending_spec if self.rotating and self.pending_spec is not None else self.spec

    @property
    def version(self) -> int:
        """The version the worker should use."""
        return self.pending_version if self.pending_version is not None and self.rotating else self.secret_version

    @property
    def token(self) -> bytes | None:
        """The (encrypted) secret of :attr:`version`."""
        return self.pending if self.rotating else self.secret


class RotationWorker(msgspec.Struct, kw_only=True):
    """One live worker's part in a rotation (the status of a resource's GET): no secrets."""

    worker: str
    version: int | None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RotationStatus:
    """Where a rotation stands: the version it moves to, the live workers that use the resource, which
    of them switched, and the refusals (authentication failed with the new password ...)."""

    started_at: datetime
    version: int
    workers: list[RotationWorker]

    @property
    def switched(self) -> int:
        return sum(1 for w in self.workers if w.version == self.version)

    @property
    def error(self) -> str | None:
        return next((w.error for w in self.workers if w.error and w.version != self.version), None)
