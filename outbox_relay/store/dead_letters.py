"""Control DB access for dead letters and their replay jobs: every dead-letter query lives here.

Scoping: every query takes ``tenant_id``; ``None`` means every tenant and is only ever passed for
the admin key. Listing is keyset-paginated on ``(created_at DESC, id)``, which the
``dead_letters_tenant_created`` and ``dead_letters_created`` indexes serve in order.

A replay *claims* its letters first (``dead`` -> ``replaying``, with a token in ``claimed_by``) in
one compare-and-set UPDATE, so of two replays of the same letter exactly one gets it; finishing a
replay is fenced by the same token. A claim older than ``STALE_CLAIM_S`` (its process died) may be
taken over.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from msgspec import Meta

from outbox_relay.domain import JobStatus, LetterStatus, Name
from outbox_relay.errors import InvalidRequest
from outbox_relay.store.resources import relay_route, target_with_secret
from outbox_relay.store.rows import RelayRoute as RelayRoute
from outbox_relay.store.rows import TargetRow as TargetRow
from outbox_relay.store.tenants import tenant_id_by_name

STATUSES = tuple(LetterStatus)
STALE_CLAIM_S = 600.0
JOB_DEAD_LETTERS = "dead_letters"
JOB_HISTORY = "history"
STALE_JOB_S = 600.0
"""A queued or running job unchanged for this long (its worker died, or no worker took it) is no longer
counted in flight."""
MAX_JOB_LETTERS = 100_000
PREVIEW_BYTES = 160

# What a list row carries: no payload, only its size and first bytes.
_SUMMARY_COLUMNS = (
    "d.id, d.tenant_id, t.name AS tenant_name, d.relay_id, d.relay_name, d.target_name, d.partition, "
    "d.outbox_id, d.topic, d.key, d.destination, d.error_class, d.last_error, "
    "jsonb_array_length(d.attempts) AS attempt_count, d.status, d.replay_count, "
    "octet_length(d.payload) AS payload_size, substring(d.payload FROM 1 FOR $1::int) AS payload_head, "
    "d.created_at, d.updated_at"
)
_FULL_COLUMNS = (
    "d.id, d.tenant_id, t.name AS tenant_name, d.relay_id, d.relay_name, d.target_name, d.partition, "
    "d.outbox_id, d.outbox_txid, d.outbox_created_at, d.topic, d.key, d.destination, d.payload, "
    "d.headers::text AS headers, d.error_class, d.last_error, d.attempts::text AS attempts, d.status, "
    "d.replay_count, d.claimed_by, d.claimed_at, d.last_replayed_at, d.discarded_at, d.created_at, d.updated_at, "
    "d.message_id"
)
_CLAIMABLE = "(d.status = 'dead' OR (d.status = 'replaying' AND d.claimed_at < now() - make_interval(secs => {})))"
_JOB_COLUMNS = (
    "j.id, j.tenant_id, t.name AS tenant_name, j.actor, j.status, j.filter::text AS filter, j.target_name, "
    "j.destination, j.total, j.replayed, j.failed, j.skipped, j.error, j.created_at, j.started_at, "
    "j.finished_at, j.updated_at, j.kind, j.relay_id, j.relay_name, j.spec::text AS spec"
)


ErrorClassName = Annotated[  # the values: outbox_relay.domain.ErrorClass (a string here: any stored value reads)
    str,
    Meta(
        pattern=r"^[a-z_]{1,64}$",
        description="Why the letter is dead: `refused` (the broker refused it max_attempts times), "
        "`too_large` (over the relay's max_payload_bytes); after a failed replay also `unavailable`, "
        "`unroutable` or `not_allowed`.",
    ),
]
Topic = Annotated[str, Meta(min_length=1, max_length=249)]
Key = Annotated[str, Meta(min_length=1, max_length=1024)]


# The one filter of dead letters: the API's list and bulk bodies (the wire type: its docstring is the
# OpenAPI description), the dashboard's forms, a replay job's record and the store's queries. Text fields
# match exactly; ``since`` is inclusive and ``until`` exclusive, on the time the letter was dead-lettered.
# ``tenant`` is a name the caller's scope decides on: each query takes the resolved ``tenant_id``.
class DeadLetterFilter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """The list's filters, for bulk actions. Covers dead letters only (status `dead`)."""

    tenant: Name | None = None
    """Admin key only: one tenant's letters (without it, every tenant's)."""
    relay: Name | None = None
    target: Name | None = None
    topic: Topic | None = None
    key: Key | None = None
    error_class: ErrorClassName | None = None
    since: datetime | None = None
    """Dead-lettered at or after."""
    until: datetime | None = None
    """Dead-lettered before."""


def where(f: DeadLetterFilter, tenant_id: uuid.UUID | None, statuses: Sequence[str], params: list[Any]) -> str:
    """The WHERE clause (over alias ``d``) of the letters ``f`` matches among ``tenant_id``'s (None:
    every tenant's, admin only) in one of ``statuses`` (empty: any), appending its values to ``params``.
    ``f.tenant`` is not read here: the caller resolved it into ``tenant_id``."""
    unknown = set(statuses) - set(STATUSES)
    if unknown:
        raise InvalidRequest(f"unknown dead-letter status {sorted(unknown)}; use {', '.join(STATUSES)}")
    clauses: list[str] = []

    def add(template: str, value: Any) -> None:
        params.append(value)
        clauses.append(template.format(f"${len(params)}"))

    if tenant_id is not None:
        add("d.tenant_id = {}", tenant_id)
    if statuses:
        add("d.status = ANY({}::text[])", list(statuses))
    for column, value in (
        ("relay_name", f.relay),
        ("target_name", f.target),
        ("topic", f.topic),
        ("key", f.key),
        ("error_class", f.error_class),
    ):
        if value is not None:
            add(f"d.{column} = {{}}", value)
    if f.since is not None:
        add("d.created_at >= {}", _utc(f.since))
    if f.until is not None:
        add("d.created_at < {}", _utc(f.until))
    return " AND ".join(clauses) if clauses else "true"


def _utc(value: datetime) -> datetime:
    """Times without a zone are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class NewLetter:
    """A message leaving the relay for the dead-letter store (the engine writes it with
    ``ControlStore.dead_letter``, in the transaction that moves the partition's cursor past it)."""

    tenant_id: uuid.UUID
    relay_name: str
    target_name: str
    outbox_id: int
    outbox_txid: int
    outbox_created_at: datetime | None
    topic: str
    key: str | None
    destination: str | None
    payload: bytes
    headers: str
    """JSON object text."""
    error_class: str
    last_error: str
    attempts: list[dict[str, Any]]
    message_id: str | None = None
    """The id it was published with (``outbox-id``); a replay sends it again."""


async def insert_letter(conn: asyncpg.Connection, relay_id: uuid.UUID, partition: int, letter: NewLetter) -> None:
    """Store ``letter`` of ``relay_id``'s ``partition`` on ``conn`` (the caller's transaction); a letter
    already stored (the same outbox row of the same relay) is left as it is."""
    await conn.execute(
        "INSERT INTO dead_letters (tenant_id, relay_id, relay_name, target_name, partition, outbox_id, "
        "outbox_txid, outbox_created_at, topic, key, destination, payload, headers, error_class, "
        "last_error, attempts, message_id) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, $14, $15, $16::jsonb, $17) "
        "ON CONFLICT (relay_id, outbox_id, outbox_txid) DO NOTHING",
        letter.tenant_id,
        relay_id,
        letter.relay_name,
        letter.target_name,
        partition,
        letter.outbox_id,
        letter.outbox_txid,
        letter.outbox_created_at,
        letter.topic,
        letter.key,
        letter.destination,
        letter.payload,
        letter.headers,
        letter.error_class,
        letter.last_error[:4000],
        json.dumps(letter.attempts),
        letter.message_id,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LetterSummary:
    """A stored dead letter as a list shows it: no payload (its size and first bytes), no attempts
    (their number)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    tenant_name: str
    relay_id: uuid.UUID | None
    relay_name: str
    target_name: str
    partition: int
    outbox_id: int
    topic: str
    key: str | None
    destination: str | None
    error_class: str
    last_error: str
    attempt_count: int
    status: LetterStatus
    replay_count: int
    payload_size: int
    payload_head: bytes
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Letter(LetterSummary):
    """A whole stored dead letter, payload and attempts included (the read type; a list reads its
    :class:`LetterSummary` columns only)."""

    outbox_txid: int
    outbox_created_at: datetime | None
    payload: bytes
    headers: dict[str, Any]
    attempts: list[dict[str, Any]]
    claimed_by: str | None
    claimed_at: datetime | None
    last_replayed_at: datetime | None
    discarded_at: datetime | None
    message_id: str | None = None
    """The id the message was published with (``outbox-id``); None for a letter stored before
    message ids, whose messages carried the row id."""

    @property
    def dedupe_id(self) -> str:
        """The ``outbox-id`` a replay carries: the original message's."""
        return self.message_id or str(self.outbox_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Counts:
    total: int
    by_relay: dict[str, int] = field(default_factory=dict)
    by_error_class: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRow:
    id: uuid.UUID
    tenant_id: uuid.UUID | None
    tenant_name: str | None
    actor: str
    status: JobStatus
    filter: dict[str, Any] | None
    target_name: str | None
    destination: str | None
    total: int
    replayed: int
    failed: int
    skipped: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    kind: str = JOB_DEAD_LETTERS
    """``dead_letters`` (a bulk dead-letter replay) or ``history`` (a relay's retained rows)."""
    relay_id: uuid.UUID | None = None
    """A replay from history: its relay (None once the relay is deleted)."""
    relay_name: str | None = None
    spec: dict[str, Any] | None = None
    """A replay from history: its :class:`~outbox_relay.history.HistorySpec`, as JSON."""


class DeadLetterStore:
    """Dead letters and replay jobs in the control DB (an asyncpg pool shared with ControlStore)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def tenant_id(self, name: str) -> uuid.UUID | None:
        return await tenant_id_by_name(self.pool, name)

    # --- reading -----------------------------------------------------------------------------------

    async def list_letters(
        self,
        f: DeadLetterFilter,
        *,
        tenant_id: uuid.UUID | None,
        statuses: Sequence[str] = (LetterStatus.DEAD,),
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[LetterSummary]:
        """Newest first: ``created_at`` descending, ties by id; ``after`` is the last row of the
        previous page."""
        params: list[Any] = [PREVIEW_BYTES]
        sql = f"SELECT {_SUMMARY_COLUMNS} FROM dead_letters d JOIN tenants t ON t.id = d.tenant_id WHERE "
        sql += where(f, tenant_id, statuses, params)
        if after is not None:
            params.extend(after)
            a, b = f"${len(params) - 1}", f"${len(params)}"
            sql += f" AND d.created_at <= {a} AND (d.created_at < {a} OR d.id > {b})"
        params.append(limit)
        sql += f" ORDER BY d.created_at DESC, d.id LIMIT ${len(params)}"
        rows = await self.pool.fetch(sql, *params)
        return [LetterSummary(**{**dict(r), "status": LetterStatus(r["status"])}) for r in rows]

    async def counts(
        self, f: DeadLetterFilter, *, tenant_id: uuid.UUID | None, statuses: Sequence[str] = (LetterStatus.DEAD,)
    ) -> Counts:
        params: list[Any] = []
        rows = await self.pool.fetch(
            "SELECT d.relay_name, d.error_class, count(*) AS n FROM dead_letters d WHERE "
            + where(f, tenant_id, statuses, params)
            + " GROUP BY d.relay_name, d.error_class",
            *params,
        )
        by_relay: dict[str, int] = {}
        by_error: dict[str, int] = {}
        for r in rows:
            by_relay[r["relay_name"]] = by_relay.get(r["relay_name"], 0) + r["n"]
            by_error[r["error_class"]] = by_error.get(r["error_class"], 0) + r["n"]
        return Counts(
            total=sum(by_relay.values()),
            by_relay=dict(sorted(by_relay.items())),
            by_error_class=dict(sorted(by_error.items())),
        )

    async def matching_ids(
        self, f: DeadLetterFilter, *, tenant_id: uuid.UUID | None, cap: int = MAX_JOB_LETTERS
    ) -> list[uuid.UUID]:
        """Ids of the dead letters the filter matches, oldest first (the order a replay keeps), at most
        ``cap + 1`` so the caller can tell that there were more."""
        params: list[Any] = []
        sql = "SELECT d.id FROM dead_letters d WHERE " + where(f, tenant_id, (LetterStatus.DEAD,), params)
        params.append(cap + 1)
        rows = await self.pool.fetch(sql + f" ORDER BY d.created_at, d.id LIMIT ${len(params)}", *params)
        return [r["id"] for r in rows]

    async def get(self, letter_id: uuid.UUID, tenant_id: uuid.UUID | None) -> Letter | None:
        row = await self.pool.fetchrow(
            f"SELECT {_FULL_COLUMNS} FROM dead_letters d JOIN tenants t ON t.id = d.tenant_id "
            "WHERE d.id = $1 AND ($2::uuid IS NULL OR d.tenant_id = $2)",
            letter_id,
            tenant_id,
        )
        return _letter(row) if row else None

    # --- replay: claim, then finish ---------------------------------------------------------------

    async def claim(self, letter_id: uuid.UUID, tenant_id: uuid.UUID | None, token: str) -> Letter | None:
        """Take a dead letter for replay; None when it is not (or no longer) replayable."""
        claimed = await self.claim_many([letter_id], tenant_id, token)
        return claimed[0] if claimed else None

    async def claim_many(
        self, letter_ids: Sequence[uuid.UUID], tenant_id: uuid.UUID | None, token: str
    ) -> list[Letter]:
        """Take every replayable letter among ``letter_ids`` in one statement; the others (replayed,
        discarded, being replayed, gone, another tenant's) are left alone and not returned."""
        rows = await self.pool.fetch(
            "WITH c AS (UPDATE dead_letters d SET status = 'replaying', claimed_by = $3, claimed_at = now(), "
            "updated_at = now() WHERE d.id = ANY($1::uuid[]) AND ($2::uuid IS NULL OR d.tenant_id = $2) AND "
            + _CLAIMABLE.format("$4")
            + " RETURNING d.*) "
            + f"SELECT {_FULL_COLUMNS} FROM c d JOIN tenants t ON t.id = d.tenant_id "
            "ORDER BY d.relay_id, d.partition, d.outbox_txid, d.outbox_id",
            list(letter_ids),
            tenant_id,
            token,
            STALE_CLAIM_S,
        )
        return [_letter(r) for r in rows]

    async def finish_replayed(self, letter_id: uuid.UUID, token: str, attempt: dict[str, Any]) -> Letter | None:
        """The broker took the replay: the letter is ``replayed``; returns it so. None if the claim was lost."""
        return await self._finish(
            "status = 'replayed', last_replayed_at = now()", letter_id, token, json.dumps(attempt)
        )

    async def finish_failed(
        self, letter_id: uuid.UUID, token: str, *, error_class: str, error: str, attempt: dict[str, Any]
    ) -> Letter | None:
        """The replay failed: back to ``dead`` with the attempt appended and the new error; returns it
        so. None if the claim was lost."""
        return await self._finish(
            "status = 'dead', error_class = $4, last_error = $5",
            letter_id,
            token,
            json.dumps(attempt),
            error_class,
            error[:4000],
        )

    async def _finish(self, changes: str, letter_id: uuid.UUID, token: str, attempt: str, *more: Any) -> Letter | None:
        """End this claim (``token``) of a replaying letter with ``changes``, the attempt appended."""
        row = await self.pool.fetchrow(
            f"WITH c AS (UPDATE dead_letters SET {changes}, claimed_by = NULL, claimed_at = NULL, "
            "replay_count = replay_count + 1, attempts = attempts || jsonb_build_array($3::jsonb), "
            "updated_at = now() WHERE id = $1 AND claimed_by = $2 AND status = 'replaying' RETURNING *) "
            f"SELECT {_FULL_COLUMNS} FROM c d JOIN tenants t ON t.id = d.tenant_id",
            letter_id,
            token,
            attempt,
            *more,
        )
        return _letter(row) if row else None

    async def release(self, letter_ids: Sequence[uuid.UUID], token: str) -> int:
        """Give claimed letters back untouched (nothing was attempted)."""
        result = await self.pool.execute(
            "UPDATE dead_letters SET status = 'dead', claimed_by = NULL, claimed_at = NULL, updated_at = now() "
            "WHERE id = ANY($1::uuid[]) AND claimed_by = $2 AND status = 'replaying'",
            list(letter_ids),
            token,
        )
        return int(result.split()[-1])

    # --- discard -----------------------------------------------------------------------------------

    async def discard(self, letter_ids: Sequence[uuid.UUID], tenant_id: uuid.UUID | None) -> list[uuid.UUID]:
        """Discard the ``dead`` letters among ``letter_ids``; returns those it discarded."""
        rows = await self.pool.fetch(
            "UPDATE dead_letters d SET status = 'discarded', discarded_at = now(), updated_at = now() "
            "WHERE d.id = ANY($1::uuid[]) AND ($2::uuid IS NULL OR d.tenant_id = $2) AND d.status = 'dead' "
            "RETURNING d.id",
            list(letter_ids),
            tenant_id,
        )
        return [r["id"] for r in rows]

    async def discard_matching(self, f: DeadLetterFilter, *, tenant_id: uuid.UUID | None) -> int:
        """Discard the dead letters the filter matches; returns how many."""
        params: list[Any] = []
        result = await self.pool.execute(
            "UPDATE dead_letters d SET status = 'discarded', discarded_at = now(), updated_at = now() WHERE "
            + where(f, tenant_id, (LetterStatus.DEAD,), params),
            *params,
        )
        return int(result.split()[-1])

    # --- where a replay goes -----------------------------------------------------------------------

    async def relay_route(self, relay_id: uuid.UUID) -> RelayRoute | None:
        """Where a replay of the relay's letters goes by default (:func:`~outbox_relay.store.resources.relay_route`)."""
        return await relay_route(self.pool, relay_id)

    async def target(self, tenant_id: uuid.UUID, name: str) -> TargetRow | None:
        """A target with its secret, for a replay (:func:`~outbox_relay.store.resources.target_with_secret`)."""
        return await target_with_secret(self.pool, tenant_id, name)

    # --- replay jobs -------------------------------------------------------------------------------

    async def create_job(
        self,
        *,
        tenant_id: uuid.UUID | None,
        actor: str,
        letter_ids: Sequence[uuid.UUID],
        filter: dict[str, Any] | None,
        target_name: str | None,
        destination: str | None,
    ) -> JobRow:
        row = await self.pool.fetchrow(
            "WITH j AS (INSERT INTO dead_letter_jobs (tenant_id, actor, letter_ids, total, filter, target_name, "
            "destination) VALUES ($1, $2, $3::uuid[], $4, $5::jsonb, $6, $7) RETURNING *) "
            f"SELECT {_JOB_COLUMNS} FROM j LEFT JOIN tenants t ON t.id = j.tenant_id",
            tenant_id,
            actor,
            list(letter_ids),
            len(letter_ids),
            json.dumps(filter) if filter is not None else None,
            target_name,
            destination,
        )
        return _job(row)

    async def create_history_job(
        self,
        *,
        tenant_id: uuid.UUID,
        actor: str,
        relay_id: uuid.UUID,
        relay_name: str,
        spec: bytes,
        total: int,
        target_name: str | None,
        max_in_flight: int,
    ) -> JobRow | None:
        """A replay from history of ``relay_id``, queued; None when the tenant already has ``max_in_flight``
        of them in flight (counted under a lock on the tenant's row, so concurrent requests cannot overshoot)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
            if await _in_flight(conn, tenant_id) >= max_in_flight:
                return None
            row = await conn.fetchrow(
                "WITH j AS (INSERT INTO dead_letter_jobs (tenant_id, actor, kind, letter_ids, total, relay_id, "
                "relay_name, spec, target_name) VALUES ($1, $2, 'history', '{}', $3, $4, $5, $6::jsonb, $7) "
                f"RETURNING *) SELECT {_JOB_COLUMNS} FROM j LEFT JOIN tenants t ON t.id = j.tenant_id",
                tenant_id,
                actor,
                total,
                relay_id,
                relay_name,
                spec.decode(),
                target_name,
            )
            return _job(row)

    async def history_in_flight(self, tenant_id: uuid.UUID) -> int:
        """The tenant's replays from history queued or running (and not stale)."""
        async with self.pool.acquire() as conn:
            return await _in_flight(conn, tenant_id)

    async def get_job(self, job_id: uuid.UUID, tenant_id: uuid.UUID | None) -> JobRow | None:
        row = await self.pool.fetchrow(
            f"SELECT {_JOB_COLUMNS} FROM dead_letter_jobs j LEFT JOIN tenants t ON t.id = j.tenant_id "
            "WHERE j.id = $1 AND ($2::uuid IS NULL OR j.tenant_id = $2)",
            job_id,
            tenant_id,
        )
        return _job(row) if row else None

    async def list_jobs(self, tenant_id: uuid.UUID | None, *, limit: int) -> list[JobRow]:
        rows = await self.pool.fetch(
            f"SELECT {_JOB_COLUMNS} FROM dead_letter_jobs j LEFT JOIN tenants t ON t.id = j.tenant_id "
            "WHERE ($1::uuid IS NULL OR j.tenant_id = $1) ORDER BY j.created_at DESC, j.id LIMIT $2",
            tenant_id,
            limit,
        )
        return [_job(r) for r in rows]

    async def start_job(self, job_id: uuid.UUID) -> tuple[JobRow, list[uuid.UUID]] | None:
        """``queued`` -> ``running``, once: a second run of the same job gets None."""
        row = await self.pool.fetchrow(
            "WITH j AS (UPDATE dead_letter_jobs SET status = 'running', started_at = now(), updated_at = now() "
            "WHERE id = $1 AND status = 'queued' RETURNING *) "
            f"SELECT {_JOB_COLUMNS}, j.letter_ids FROM j LEFT JOIN tenants t ON t.id = j.tenant_id",
            job_id,
        )
        if row is None:
            return None
        return _job(row), list(row["letter_ids"])

    async def job_progress(self, job_id: uuid.UUID, *, replayed: int, failed: int, skipped: int) -> None:
        await self.pool.execute(
            "UPDATE dead_letter_jobs SET replayed = $2, failed = $3, skipped = $4, updated_at = now() WHERE id = $1",
            job_id,
            replayed,
            failed,
            skipped,
        )

    async def finish_job(self, job_id: uuid.UUID, *, status: JobStatus, error: str | None = None) -> JobRow | None:
        row = await self.pool.fetchrow(
            "WITH j AS (UPDATE dead_letter_jobs SET status = $2, error = $3, finished_at = now(), updated_at = now() "
            "WHERE id = $1 RETURNING *) "
            f"SELECT {_JOB_COLUMNS} FROM j LEFT JOIN tenants t ON t.id = j.tenant_id",
            job_id,
            status,
            error[:4000] if error else None,
        )
        return _job(row) if row else None


def _letter(row: Any) -> Letter:
    values = dict(row)
    values["payload"] = bytes(values["payload"])
    values["headers"] = json.loads(values["headers"])
    values["attempts"] = json.loads(values["attempts"])
    values["status"] = LetterStatus(values["status"])  # the column's CHECK allows exactly these
    values["attempt_count"] = len(values["attempts"])
    values["payload_size"] = len(values["payload"])
    values["payload_head"] = values["payload"][:PREVIEW_BYTES]
    return Letter(**values)


async def _in_flight(conn: asyncpg.Connection, tenant_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM dead_letter_jobs WHERE tenant_id = $1 AND kind = 'history' "
            "AND status IN ('queued', 'running') AND updated_at > now() - make_interval(secs => $2)",
            tenant_id,
            STALE_JOB_S,
        )
    )


def _job(row: Any) -> JobRow:
    values = {k: row[k] for k in JobRow.__dataclass_fields__}
    values["filter"] = json.loads(values["filter"]) if values["filter"] is not None else None
    values["spec"] = json.loads(values["spec"]) if values["spec"] is not None else None
    values["status"] = JobStatus(values["status"])  # the column's CHECK allows exactly these
    return JobRow(**values)
