"""Request and response bodies of the dead-letter API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from outbox_relay.domain import Destination, JobStatusName, LetterStatusName, Name
from outbox_relay.history import HistorySpec
from outbox_relay.store.dead_letters import DeadLetterFilter as DeadLetterFilter
from outbox_relay.store.dead_letters import ErrorClassName

Status = LetterStatusName
JobStatus = JobStatusName
ErrorClass = ErrorClassName
MAX_IDS = 1000


class Attempt(msgspec.Struct, kw_only=True):
    """One try to deliver the message: by the relay (``replay`` absent) or a replay."""

    at: datetime
    error: str | None = None
    """Why it failed; null for a replay the broker took."""
    replay: int | None = None
    """Which replay of the letter this was (1 for the first)."""
    target: str | None = None
    destination: str | None = None
    by: str | None = None
    """Who replayed: ``admin`` or ``key:<api key id>``."""


class Payload(msgspec.Struct, kw_only=True):
    kind: Literal["json", "text", "binary"]
    size: int
    base64: str
    """The bytes exactly as stored."""
    text: str | None
    """The payload as UTF-8 text, exactly, when it is valid UTF-8 (json and text)."""
    display: str
    """For reading only: JSON indented, control characters as \\u escapes, binary as a hex dump
    (the first 256 KiB)."""
    truncated: bool


class DeadLetterSummary(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    tenant: str
    relay: str
    target: str
    """The target the relay was publishing to when the message died."""
    partition: int
    outbox_id: int
    topic: str
    key: str | None
    destination: str | None
    error_class: str
    last_error: str
    attempts: int
    status: Status
    replay_count: int
    payload_size: int
    payload_preview: str
    created_at: datetime
    """When it was dead-lettered."""
    updated_at: datetime


class DeadLetter(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    tenant: str
    relay: str
    relay_exists: bool
    target: str
    partition: int
    outbox_id: int
    """The outbox row id (unique within one database's history only)."""
    message_id: str
    """The id the message was published with (``outbox-id``), which a replay carries again."""
    outbox_txid: int
    outbox_created_at: datetime | None
    topic: str
    key: str | None
    destination: str | None
    payload: Payload
    headers: dict[str, Any]
    """As the producer wrote them into the outbox."""
    error_class: str
    last_error: str
    attempts: list[Attempt]
    status: Status
    replay_count: int
    last_replayed_at: datetime | None
    discarded_at: datetime | None
    created_at: datetime
    updated_at: datetime


class DeadLetterCounts(msgspec.Struct, kw_only=True):
    total: int
    by_relay: dict[str, int]
    by_error_class: dict[str, int]


class DeadLetterPage(msgspec.Struct, kw_only=True):
    items: list[DeadLetterSummary]
    next_cursor: str | None = None
    counts: DeadLetterCounts | None = None
    """Over the whole filter (not just this page); on the first page only."""


LetterIds = Annotated[list[uuid.UUID], Meta(min_length=1, max_length=MAX_IDS)]


class ReplayRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    target: Name | None = None
    """Publish to this target of the tenant instead of the relay's current one."""
    destination: Destination | None = None
    """Routing key, stream or topic, instead of what the relay's topic mapping gives now."""


class DiscardRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Either `ids` or `filter`."""

    ids: LetterIds | None = None
    filter: DeadLetterFilter | None = None


class DiscardResult(msgspec.Struct, kw_only=True):
    discarded: int
    """How many dead letters were discarded (letters not dead any more are left alone)."""


class ReplayJobRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Either `ids` or `filter` (the same filters as the list; at most 100,000 letters)."""

    ids: LetterIds | None = None
    filter: DeadLetterFilter | None = None
    target: Name | None = None
    destination: Destination | None = None


class ReplayJob(msgspec.Struct, kw_only=True):
    """A replay job: of dead letters (`kind: dead_letters`), or of a relay's retained outbox rows
    (`kind: history`, from `POST /v1/relays/{name}/replays`; `relay` and `history` say which rows)."""

    id: uuid.UUID
    tenant: str | None
    """Null for an admin job over every tenant."""
    status: JobStatus
    total: int
    replayed: int
    failed: int
    skipped: int
    """Not dead when the job reached them: replayed, discarded or being replayed elsewhere."""
    remaining: int
    filter: DeadLetterFilter | None
    """The filter the letters were chosen by (null for an id list)."""
    target: str | None
    destination: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    kind: Literal["dead_letters", "history"] = "dead_letters"
    relay: str | None = None
    """A replay from history: the relay whose rows it publishes."""
    history: HistorySpec | None = None
    """A replay from history: the range, filter, target and mapping asked for, the rows the range held
    (`in_range`, the job's `total`; `skipped` counts those it does not publish), and where the retained
    history started when it was asked for (`oldest_retained_id`, `oldest_retained_at`)."""


class ReplayJobList(msgspec.Struct, kw_only=True):
    items: list[ReplayJob]


class ReplayFailure(msgspec.Struct, kw_only=True):
    """RFC 9457 problem: the replay reached for the broker and failed; the letter is dead again
    with the attempt appended."""

    type: str
    title: str
    status: int
    detail: str
    dead_letter_id: str
    error_class: str


class QueueProblem(msgspec.Struct, kw_only=True):
    """RFC 9457 problem: the job queue (Redis) could not take the job; nothing was replayed."""

    type: str
    title: str
    status: int
    detail: str
