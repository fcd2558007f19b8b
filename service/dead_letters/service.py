"""What the dead-letter API and the dashboard both do: scope, list, replay, discard, audit.

Callers are a tenant API key (its own tenant's letters) or the admin key (every tenant's, or one
tenant's with ``tenant``). Errors are raised as the classes of :mod:`outbox_relay.errors` -- NotFound,
ReplayConflict, ReplayRefused, Conflict, NotAllowed, TooMany, QueueUnavailable, InvalidRequest -- and each
front end shows them its own way, from one table each: problem details (``service.problems.PROBLEMS``) or
a message in the page (``service.ui.responses.UI_REFUSALS``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from arq.connections import RedisSettings, create_pool

from outbox_relay.domain import JobStatus, LetterStatus
from outbox_relay.errors import Conflict as Conflict
from outbox_relay.errors import InvalidRequest, NotFound
from outbox_relay.errors import NotAllowed as NotAllowed
from outbox_relay.errors import QueueUnavailable as QueueUnavailable
from outbox_relay.errors import TooMany as TooMany
from outbox_relay.history import HistorySpec
from outbox_relay.replay import REPLAY_JOB, Replayer, ReplayOutcome, replay_job_id
from outbox_relay.store.control import TenantRow, hash_key
from outbox_relay.store.dead_letters import (
    MAX_JOB_LETTERS,
    Counts,
    DeadLetterFilter,
    DeadLetterStore,
    JobRow,
    Letter,
    LetterSummary,
)
from service.dead_letters import render
from service.dead_letters.schemas import (
    Attempt,
    DeadLetter,
    DeadLetterCounts,
    DeadLetterSummary,
    Payload,
    ReplayJob,
)
from service.deps import Services

log = logging.getLogger("outbox_relay.api")
NO_TENANT = uuid.UUID(int=0)
"""Scope of an admin filter naming a tenant that does not exist: matches nothing."""


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: TenantRow | None
    """None for the admin key."""
    actor: str
    """``admin`` or ``key:<api key id>``: the audit log's "who"."""

    @property
    def is_admin(self) -> bool:
        return self.tenant is None


async def caller_for_key(services: Services, key: str) -> Caller | None:
    admin = services.settings.admin_api_key
    if admin and hmac.compare_digest(key.encode(), admin.encode()):
        return Caller(tenant=None, actor="admin")
    owner = await services.store.key_owner(key)
    return Caller(tenant=owner.tenant, actor=owner.actor) if owner else None


async def caller_for_key_hash(services: Services, digest: bytes) -> Caller | None:
    """``caller_for_key`` of the key with this hash: the dashboard's sessions keep only the hash. The admin
    key counts while it is the configured one (changing it ends the admin's sessions)."""
    admin = services.settings.admin_api_key
    if admin and hmac.compare_digest(digest, hash_key(admin)):
        return Caller(tenant=None, actor="admin")
    owner = await services.store.key_owner_by_hash(digest)
    return Caller(tenant=owner.tenant, actor=owner.actor) if owner else None


# --- cursors ----------------------------------------------------------------------------------------


def encode_cursor(row: LetterSummary) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """InvalidRequest (a ValueError) for anything this service did not issue."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, letter_id = raw.partition("|")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive time")
        return when, uuid.UUID(letter_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("invalid pagination cursor") from None


# --- conversions ------------------------------------------------------------------------------------


def summary(row: LetterSummary) -> DeadLetterSummary:
    return DeadLetterSummary(
        id=row.id,
        tenant=row.tenant_name,
        relay=row.relay_name,
        target=row.target_name,
        partition=row.partition,
        outbox_id=row.outbox_id,
        topic=row.topic,
        key=row.key,
        destination=row.destination,
        error_class=row.error_class,
        last_error=row.last_error,
        attempts=row.attempt_count,
        status=row.status,  # type: ignore[arg-type]
        replay_count=row.replay_count,
        payload_size=row.payload_size,
        payload_preview=render.preview(row.payload_head, row.payload_size),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def attempts(raw: list[dict[str, Any]]) -> list[Attempt]:
    out = []
    for item in raw:
        try:
            out.append(msgspec.convert(item, Attempt))
        except msgspec.ValidationError:
            out.append(Attempt(at=datetime.fromtimestamp(0, UTC), error=str(item.get("error", item))))
    return out


def full(letter: Letter, *, relay_exists: bool) -> DeadLetter:
    shown = render.render(letter.payload)
    return DeadLetter(
        id=letter.id,
        tenant=letter.tenant_name,
        relay=letter.relay_name,
        relay_exists=relay_exists,
        target=letter.target_name,
        partition=letter.partition,
        outbox_id=letter.outbox_id,
        message_id=letter.dedupe_id,
        outbox_txid=letter.outbox_txid,
        outbox_created_at=letter.outbox_created_at,
        topic=letter.topic,
        key=letter.key,
        destination=letter.destination,
        payload=Payload(
            kind=shown.kind,
            size=shown.size,
            base64=render.b64(letter.payload),
            text=shown.text,
            display=shown.display,
            truncated=shown.truncated,
        ),
        headers=letter.headers,
        error_class=letter.error_class,
        last_error=letter.last_error,
        attempts=attempts(letter.attempts),
        status=letter.status,  # type: ignore[arg-type]
        replay_count=letter.replay_count,
        last_replayed_at=letter.last_replayed_at,
        discarded_at=letter.discarded_at,
        created_at=letter.created_at,
        updated_at=letter.updated_at,
    )


def counts(value: Counts) -> DeadLetterCounts:
    return DeadLetterCounts(total=value.total, by_relay=value.by_relay, by_error_class=value.by_error_class)


def job(row: JobRow) -> ReplayJob:
    return ReplayJob(
        id=row.id,
        tenant=row.tenant_name,
        status=row.status,  # type: ignore[arg-type]
        total=row.total,
        replayed=row.replayed,
        failed=row.failed,
        skipped=row.skipped,
        remaining=max(0, row.total - row.replayed - row.failed - row.skipped),
        filter=msgspec.convert(row.filter, DeadLetterFilter) if row.filter is not None else None,
        target=row.target_name,
        destination=row.destination,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        updated_at=row.updated_at,
        kind=row.kind,  # type: ignore[arg-type]
        relay=row.relay_name,
        history=msgspec.convert(row.spec, HistorySpec) if row.spec is not None else None,
    )


# --- the operations ---------------------------------------------------------------------------------


class DeadLetters:
    """The operations, for one caller; ``via`` (``api`` or ``ui``) goes into the audit log."""

    def __init__(self, services: Services, caller: Caller, *, via: str) -> None:
        self.services = services
        self.caller = caller
        self.via = via
        self.store = DeadLetterStore(services.store.pool)

    async def scope(self, tenant: str | None) -> uuid.UUID | None:
        """The tenant id every query is limited to (None: all, for the admin key)."""
        if self.caller.tenant is not None:
            if tenant is not None and tenant != self.caller.tenant.name:
                raise NotAllowed("a tenant API key sees only its own tenant's dead letters")
            return self.caller.tenant.id
        if tenant is None:
            return None
        return await self.store.tenant_id(tenant) or NO_TENANT

    async def page(
        self,
        f: DeadLetterFilter,
        *,
        statuses: Sequence[str] = (LetterStatus.DEAD,),
        cursor: str | None,
        limit: int,
        with_counts: bool,
    ) -> tuple[list[LetterSummary], str | None, Counts | None]:
        """One page of what ``f`` matches in the caller's scope (``statuses`` empty: any), with the
        counts over all of it when asked."""
        tenant_id = await self.scope(f.tenant)
        after = decode_cursor(cursor) if cursor else None
        rows = await self.store.list_letters(f, tenant_id=tenant_id, statuses=statuses, after=after, limit=limit + 1)
        next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
        totals = await self.store.counts(f, tenant_id=tenant_id, statuses=statuses) if with_counts else None
        return rows[:limit], next_cursor, totals

    async def count(self, f: DeadLetterFilter) -> int:
        """How many dead letters ``f`` matches in the caller's scope."""
        return (await self.store.counts(f, tenant_id=await self.scope(f.tenant))).total

    async def get(self, letter_id: uuid.UUID) -> tuple[Letter, bool]:
        """The letter and whether its relay still exists; NotFound if not found."""
        letter = await self.store.get(letter_id, self._tenant_id)
        if letter is None:
            raise NotFound(f"dead letter {letter_id} not found")
        return letter, await self.relay_exists(letter)

    async def relay_exists(self, letter: Letter) -> bool:
        """Whether the letter's relay still exists (a replay without a target needs it)."""
        return letter.relay_id is not None and await self.store.relay_route(letter.relay_id) is not None

    async def replay(
        self, letter_id: uuid.UUID, *, target: str | None = None, destination: str | None = None
    ) -> ReplayOutcome:
        services = self.services
        async with Replayer(letters=self.store, secrets=services.secrets, policy=services.policy) as replayer:
            outcome = await replayer.replay_one(
                letter_id, self._tenant_id, actor=self.caller.actor, target_name=target, destination=destination
            )
        await self._audit(
            outcome.letter.tenant_id if outcome.letter else self._tenant_id,
            "replay",
            f"dead-letters/{letter_id}",
            {
                "outcome": "replayed" if outcome.replayed else "failed",
                "target": outcome.target_name,
                "destination": outcome.destination,
                "replay_count": outcome.replay_count,
                "error": outcome.error,
            },
        )
        return outcome

    async def discard(self, letter_id: uuid.UUID) -> Letter:
        """NotFound if not found; Conflict if it is not dead."""
        done = await self.store.discard([letter_id], self._tenant_id)
        letter = await self.store.get(letter_id, self._tenant_id)
        if letter is None:
            raise NotFound(f"dead letter {letter_id} not found")
        if not done:
            raise Conflict(f"dead letter {letter_id} is {letter.status}; only dead letters can be discarded")
        await self._audit(letter.tenant_id, "discard", f"dead-letters/{letter_id}", {})
        return letter

    async def discard_many(self, ids: list[uuid.UUID] | None, f: DeadLetterFilter | None) -> int:
        if ids is not None:
            count = len(await self.store.discard(ids, self._tenant_id))
            detail: dict[str, Any] = {"ids": [str(i) for i in ids], "discarded": count}
            tenant_id = self._tenant_id
        else:
            assert f is not None
            scope = await self.scope(f.tenant)
            count = await self.store.discard_matching(f, tenant_id=scope)
            detail = {"filter": msgspec.to_builtins(f), "discarded": count}
            tenant_id = scope if scope != NO_TENANT else None
        await self._audit(tenant_id, "discard", "dead-letters", detail)
        return count

    async def matching(self, f: DeadLetterFilter) -> list[uuid.UUID]:
        ids = await self.store.matching_ids(f, tenant_id=await self.scope(f.tenant))
        if len(ids) > MAX_JOB_LETTERS:
            raise TooMany(f"the filter matches more than {MAX_JOB_LETTERS:,} dead letters; narrow it")
        return ids

    async def start_job(
        self,
        ids: list[uuid.UUID] | None,
        f: DeadLetterFilter | None,
        *,
        target: str | None = None,
        destination: str | None = None,
    ) -> JobRow:
        """Create a replay job over the ids, or over what the filter matches now, and queue it."""
        tenant_id = self._tenant_id
        if ids is None:
            assert f is not None
            if f.tenant is not None:
                tenant_id = await self.scope(f.tenant)
            ids = await self.matching(f)
        else:
            ids = list(dict.fromkeys(ids))
        row = await self.store.create_job(
            tenant_id=tenant_id if tenant_id != NO_TENANT else None,
            actor=self.caller.actor,
            letter_ids=ids,
            filter=msgspec.to_builtins(f) if f is not None else None,
            target_name=target,
            destination=destination,
        )
        await self._audit(
            row.tenant_id,
            "replay",
            f"dead-letter-jobs/{row.id}",
            {
                "filter": row.filter,
                "ids": len(ids),
                "total": row.total,
                "target": target,
                "destination": destination,
            },
        )
        if row.total == 0:
            return await self.store.finish_job(row.id, status=JobStatus.DONE) or row
        try:
            await enqueue_replay(self.services, row.id)
        except Exception as exc:
            log.warning("could not queue replay job %s: %s", row.id, exc)
            await self.store.finish_job(row.id, status=JobStatus.FAILED, error=f"could not queue the job: {exc}")
            raise QueueUnavailable("the job queue (Redis) is unavailable; nothing was replayed") from None
        return row

    async def get_job(self, job_id: uuid.UUID) -> JobRow:
        row = await self.store.get_job(job_id, self._tenant_id)
        if row is None:
            raise NotFound(f"replay job {job_id} not found")
        return row

    async def jobs(self, limit: int) -> list[JobRow]:
        return await self.store.list_jobs(self._tenant_id, limit=limit)

    @property
    def _tenant_id(self) -> uuid.UUID | None:
        return self.caller.tenant.id if self.caller.tenant is not None else None

    async def _audit(self, tenant_id: uuid.UUID | None, action: str, resource: str, detail: dict[str, Any]) -> None:
        detail = {**detail, "via": self.via}
        await self.services.store.audit(tenant_id, self.caller.actor, action, resource, json.dumps(detail, default=str))


async def enqueue_replay(services: Services, job_id: uuid.UUID, function: str = REPLAY_JOB) -> None:
    """Queue the arq job ``function`` (a dead-letter replay, or a replay from history) of the job row."""
    settings = services.settings
    redis_settings = dataclasses.replace(RedisSettings.from_dsn(settings.redis_url), conn_retries=1, conn_timeout=3)
    redis = await create_pool(redis_settings, default_queue_name=settings.queue_name)
    try:
        await redis.enqueue_job(function, str(job_id), _job_id=replay_job_id(job_id))
    finally:
        await redis.aclose()
