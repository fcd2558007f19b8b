"""Replaying from history: publishing a relay's retained outbox rows again, as a replay job.

The outbox keeps rows for the relays' ``retention_hours`` after their cursors pass them
(:mod:`outbox_relay.maintenance` drops whole days only then), so a consumer that lost messages can
have a range of them again: ``POST /v1/relays/{name}/replays`` with an insert-time or a row-id range.

What a replay is, and is not:

* **A closed set.** The range holds the rows of the transactions that had committed in the snapshot
  taken when the replay was asked for (:mod:`outbox_relay.tenant.sql`, "replay from history"), so the
  rows counted then are the rows the job reads (fewer only when maintenance dropped a day meanwhile;
  those count as skipped). Only retained rows can be replayed: the answer names the oldest. A row the
  relay has not published yet (held back behind a long transaction) may be replayed first; the relay
  still publishes it in its turn.
* **What the relay would publish.** A row is replayed when the topic mapping (the relay's, or the
  request's) routes it, the relay's own filter matches it and the request's filter, if any, matches it;
  the other rows of the range are skipped. The messages are the relay's (payload and headers as stored,
  ``outbox-id`` the original message id, so consumers that dedupe on it still do), plus
  ``outbox-replay: <job id>``.
* **Beside the live stream, never in it.** The job reads through its own guarded connection
  (:func:`outbox_relay.tenant.db.connect`: the address policy and session limits of every tenant
  connection) and publishes through its own publisher; it never reads or writes a relay cursor, so the
  relay's own delivery goes on as before, in its order. Within the replay, rows go in outbox order
  ``(txid, id)``, one batch after the broker acknowledged the last, so per-key order holds.
* **No retries.** A message the broker refuses, or one over the relay's ``max_payload_bytes``, counts as
  failed and the replay goes on; a target that cannot be reached stops it (``failed``, with the reason).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from outbox_relay.brokers.base import OutgoingMessage, Publisher
from outbox_relay.domain import Destination, ErrorClass, Filter, Relay
from outbox_relay.engine import build_messages
from outbox_relay.errors import TargetUnavailable
from outbox_relay.filters import Predicate, compile_filter, reads_payload
from outbox_relay.replay import JobCounts
from outbox_relay.tenant import db as tenant_db

REPLAY_HEADER = "outbox-replay"
"""Every replayed message carries it; its value is the replay job's id."""
HISTORY_JOB = "replay_history"
"""The arq function name of a replay from history (``workers.replay``)."""
SAMPLE_ROWS = 10
"""Rows a dry run shows."""
PREVIEW_BYTES = 160
"""Of each sampled row's payload, at most this many bytes are read (and shown as one line)."""
DRY_RUN_PAGE = 500
PROGRESS_EVERY_S = 1.0
"""A job writes its counts at most this often (and once at its end)."""


class TimeRange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Rows inserted at or after ``from`` and before ``to`` (ISO 8601; without a zone, UTC)."""

    from_: datetime = msgspec.field(name="from")
    to: datetime


class IdRange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Rows whose outbox row id is between ``from`` and ``to``, both included."""

    from_: Annotated[int, Meta(ge=1, le=2**63 - 1)] = msgspec.field(name="from")
    to: Annotated[int, Meta(ge=1, le=2**63 - 1)]


class HistorySpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A replay from history as its job keeps it (``dead_letter_jobs.spec``) and the API shows it."""

    inserted_at: TimeRange | None = None
    ids: IdRange | None = None
    filter: Filter | None = None
    """The request's filter (the relay's own applies as well)."""
    target: str | None = None
    """The target named in the request; null: the relay's current target."""
    topic_mapping: dict[str, Destination] | None = None
    """The mapping named in the request; null: the relay's current mapping."""
    snapshot: str = ""
    """The tenant database's snapshot when the replay was asked for (``pg_current_snapshot()``): only
    the rows of transactions committed then are read."""
    in_range: int = 0
    """Rows the range held then (matching or not)."""
    oldest_retained_id: int | None = None
    """The oldest row the outbox still held then (lowest id); older rows were dropped by maintenance
    and cannot be replayed. Null: the outbox was empty."""
    oldest_retained_at: datetime | None = None

    def bounds(self) -> tuple[str, Any, Any]:
        """The range as ``(by, low, high)`` for :mod:`outbox_relay.tenant.db`."""
        if self.inserted_at is not None:
            return "inserted_at", utc(self.inserted_at.from_), utc(self.inserted_at.to)
        assert self.ids is not None
        return "ids", self.ids.from_, self.ids.to


def utc(value: datetime) -> datetime:
    """Times without a zone are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def range_problem(spec: HistorySpec) -> str | None:
    """What is wrong with the request's range, or None."""
    if (spec.inserted_at is None) == (spec.ids is None):
        return "give exactly one range: `inserted_at` ({from, to}: times) or `ids` ({from, to}: outbox row ids)"
    if spec.inserted_at is not None and utc(spec.inserted_at.from_) >= utc(spec.inserted_at.to):
        return "inserted_at.from must be before inserted_at.to (`to` is exclusive)"
    if spec.ids is not None and spec.ids.from_ > spec.ids.to:
        return "ids.from must not be above ids.to (both are included)"
    return None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which rows of the range a replay publishes, and as what: the relay's messages (built by the
    relay's own :func:`~outbox_relay.engine.build_messages`) under the effective topic mapping, of the
    rows both filters match."""

    relay: Relay
    """The relay, its topic mapping replaced by the request's when one was given."""
    relay_name: str
    accepts: Predicate | None
    reads_payload: bool

    @classmethod
    def of(cls, relay: Relay, relay_name: str, spec: HistorySpec) -> Selection:
        if spec.topic_mapping is not None:
            relay = msgspec.structs.replace(relay, topic_mapping=spec.topic_mapping)
        own, asked = compile_filter(relay.filter), compile_filter(spec.filter)
        accepts: Predicate | None
        if own is not None and asked is not None:

            def accepts(topic: str, headers: Any, payload: bytes) -> bool:
                return own(topic, headers, payload) and asked(topic, headers, payload)

        else:
            accepts = own or asked
        return cls(relay, relay_name, accepts, reads_payload(relay.filter) or reads_payload(spec.filter))

    def messages(self, rows: list[tenant_db.OutboxRow], job_id: str | None) -> list[OutgoingMessage | None]:
        """One message per row, None for a row it skips; each carries ``outbox-replay: job_id``."""
        out = build_messages(self.relay, self.relay_name, rows, accepts=self.accepts)
        if job_id is not None:
            for message in out:
                if message is not None:
                    message.headers[REPLAY_HEADER] = job_id
        return out


@dataclass(frozen=True, slots=True)
class SampleRow:
    outbox_id: int
    message_id: str
    topic: str
    key: str | None
    inserted_at: datetime
    destination: str
    payload_size: int
    payload_head: bytes


@dataclass
class Preview:
    matching: int = 0
    sample: list[SampleRow] = field(default_factory=list)


async def preview(
    conn: tenant_db.Connection,
    schema: str,
    layout: tenant_db.OutboxLayout,
    spec: HistorySpec,
    selection: Selection,
) -> Preview:
    """A dry run: how many rows of the range the replay would publish, and the first few of them. Reads
    payloads only for a filter with a payload leaf, and of the others only their first bytes."""
    result = Preview()
    pages = _pages(
        conn, schema, layout, spec, limit=DRY_RUN_PAGE, payloads=selection.reads_payload, head_bytes=PREVIEW_BYTES
    )
    async for page in pages:
        for item, message in zip(page, selection.messages([h.row for h in page], None), strict=True):
            if message is None:
                continue
            result.matching += 1
            if len(result.sample) < SAMPLE_ROWS:
                row = item.row
                result.sample.append(
                    SampleRow(
                        outbox_id=row.id,
                        message_id=row.outgoing_id,
                        topic=row.topic,
                        key=row.key,
                        inserted_at=row.created_at,
                        destination=message.destination,
                        payload_size=item.size,
                        payload_head=item.head,
                    )
                )
    return result


async def _pages(
    conn: tenant_db.Connection,
    schema: str,
    layout: tenant_db.OutboxLayout,
    spec: HistorySpec,
    *,
    limit: int,
    payloads: bool,
    head_bytes: int,
) -> AsyncGenerator[list[tenant_db.HistoryRow], None]:
    """The range's rows in ``(txid, id)`` order, ``limit`` a page; the next page is read when the
    caller asks for it (after it dealt with the last)."""
    by, low, high = spec.bounds()
    after = (0, 0)
    while True:
        page = await tenant_db.history_page(
            conn,
            schema,
            by,
            low,
            high,
            seen=spec.snapshot,
            after=after,
            limit=limit,
            payloads=payloads,
            head_bytes=head_bytes,
            layout=layout,
        )
        if not page:
            return
        yield page
        after = (page[-1].row.txid, page[-1].row.id)


Progress = Callable[[JobCounts], Awaitable[None]]


async def replay(
    conn: tenant_db.Connection,
    schema: str,
    layout: tenant_db.OutboxLayout,
    spec: HistorySpec,
    selection: Selection,
    publisher: Publisher,
    *,
    job_id: uuid.UUID,
    target_name: str,
    progress: Progress,
) -> JobCounts:
    """Publish the range's selected rows in ``(txid, id)`` order, a page (the relay's ``batch_size``) at
    a time, each after the broker acknowledged the last; write the counts as it goes."""
    policy = selection.relay.policy
    counts = JobCounts()
    read = 0
    reported = time.monotonic()
    pages = _pages(conn, schema, layout, spec, limit=policy.batch_size, payloads=True, head_bytes=0)
    async with contextlib.aclosing(pages):  # closed at once when the job stops before the last page
        async for page in pages:
            rows = [h.row for h in page]
            read += len(rows)
            sendable: list[OutgoingMessage] = []
            for message in selection.messages(rows, str(job_id)):
                if message is None:
                    counts.skipped += 1
                elif len(message.payload) > policy.max_payload_bytes:
                    _fail(counts, ErrorClass.TOO_LARGE)
                else:
                    sendable.append(message)
            try:
                await _publish(publisher, sendable, counts)
            except TargetUnavailable as exc:
                counts.stopped = f"target {target_name!r} unavailable: {exc}"
                break
            if time.monotonic() - reported >= PROGRESS_EVERY_S:
                await progress(counts)
                reported = time.monotonic()
    if counts.stopped is None:
        counts.skipped += max(0, spec.in_range - read)  # dropped by maintenance since the replay was asked for
    await progress(counts)
    return counts


async def _publish(publisher: Publisher, messages: list[OutgoingMessage], counts: JobCounts) -> None:
    """Send ``messages`` in order; a refused one counts as failed and what follows it is sent again."""
    index = 0
    while index < len(messages):
        result = await publisher.publish_batch(messages[index:])
        counts.replayed += result.acked
        index += result.acked
        if result.rejected is not None:
            _fail(counts, ErrorClass.REFUSED)
            index += 1
        elif result.acked == 0:  # an adapter that neither acks nor refuses: do not spin
            for _ in messages[index:]:
                _fail(counts, ErrorClass.REFUSED)
            return


def _fail(counts: JobCounts, error_class: str) -> None:
    counts.failed += 1
    counts.errors[error_class] = counts.errors.get(error_class, 0) + 1
