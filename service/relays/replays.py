"""``POST /v1/relays/{name}/replays``: publish a relay's retained outbox rows again (:mod:`outbox_relay.history`).

The request is checked here, before anything is queued: the range, the filter (as ``PUT`` checks a
relay's), the target (the tenant's own), and then, on a guarded connection to the relay's database,
the range's size against ``replay_max_rows``. A dry run answers the count and a sample; a real run
becomes a replay job (the dead-letter replay's job model, progress, status endpoint and limits), counted
against the tenant's ``replay_max_in_flight``, audited, and queued for a worker.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from outbox_relay import history
from outbox_relay.domain import Database, Destination, ErrorClass, Filter, JobStatus, Name, Relay
from outbox_relay.errors import QueueUnavailable, ReplayRefused, ReplaysInFlight, TooMany, UnknownReference
from outbox_relay.filters import check
from outbox_relay.replay import address_refusal, decode_target
from outbox_relay.specs import check_database
from outbox_relay.store.dead_letters import DeadLetterStore, JobRow
from outbox_relay.store.resources import target_with_secret
from outbox_relay.tenant import db as tenant_db
from service.dead_letters import render
from service.dead_letters.service import enqueue_replay
from service.problems import Problem
from service.resources import Resources

log = logging.getLogger("outbox_relay.api")


class HistoryReplayRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Exactly one range: `inserted_at` or `ids`. Only rows the outbox still holds can be replayed."""

    inserted_at: history.TimeRange | None = None
    """Rows inserted at or after `from` and before `to`."""
    ids: history.IdRange | None = None
    """Rows whose outbox row id lies between `from` and `to`, both included."""
    filter: Filter | None = None
    """Publish only the rows of the range that match (the relay filter's language and bounds; the
    relay's own filter applies as well)."""
    target: Name | None = None
    """Publish to this target of the tenant instead of the relay's current one."""
    topic_mapping: (
        Annotated[dict[Annotated[str, Meta(min_length=1, max_length=249)], Destination], Meta(min_length=1)] | None
    ) = None
    """Route with this mapping instead of the relay's current one."""
    dry_run: bool = False
    """Count and sample the rows, publish nothing."""

    def spec(self) -> history.HistorySpec:
        return history.HistorySpec(
            inserted_at=self.inserted_at,
            ids=self.ids,
            filter=self.filter,
            target=self.target,
            topic_mapping=self.topic_mapping,
        )


class SampleMessage(msgspec.Struct, kw_only=True):
    outbox_id: int
    message_id: str
    """The `outbox-id` the replayed message carries (the original's)."""
    topic: str
    key: str | None
    inserted_at: datetime
    destination: str
    payload_size: int
    payload_preview: str
    """One line of the payload's first bytes (no more is read)."""


class ReplayPreview(msgspec.Struct, kw_only=True):
    """A dry run: what a replay of this request would publish now; nothing was published or queued."""

    relay: str
    target: str
    in_range: int
    """Rows the range holds (committed), matching or not."""
    matching: int
    """Of those, the rows the replay would publish: routed by the topic mapping, matched by the relay's
    filter and the request's."""
    sample: list[SampleMessage]
    """The first few of them, in the order a replay sends them."""
    oldest_retained_id: int | None
    """The oldest row the outbox still holds (lowest id); older rows are gone and cannot be replayed.
    Null: the outbox is empty."""
    oldest_retained_at: datetime | None
    retention_hours: int
    """The relay's `policy.retention_hours`: rows are kept at least this long."""
    max_rows: int
    """The most rows one replay's range may hold on this service."""


async def start_replay(
    relays: Resources[Relay], name: str, body: HistoryReplayRequest, *, via: str = "api"
) -> ReplayPreview | JobRow:
    """Check the request, then answer a dry run's preview or queue the replay job (audited)."""
    services, tenant = relays.services, relays.tenant
    settings = services.settings
    row = await relays.row(name)  # NotFound (404) for another tenant's relay too
    relay = relays.read_back(row)
    spec = body.spec()
    problem = history.range_problem(spec)
    if problem is not None:
        raise Problem(422, problem, slug="invalid-range")
    if body.filter is not None:
        check(body.filter)  # InvalidFilter: 422 invalid-filter naming the field, as PUT /v1/relays answers
    target_name = await _check_target(relays, body.target or relay.target)
    letters = DeadLetterStore(services.store.pool)
    if not body.dry_run:
        in_flight = await letters.history_in_flight(tenant.id)
        if in_flight >= settings.replay_max_in_flight:
            raise ReplaysInFlight(limit=settings.replay_max_in_flight, in_flight=in_flight)
    conn, schema = await _connect(relays, relay.database)
    try:
        by, low, high = spec.bounds()
        spec.snapshot = await tenant_db.snapshot(conn)
        cap = settings.replay_max_rows + 1
        spec.in_range = await tenant_db.history_count(conn, schema, by, low, high, seen=spec.snapshot, cap=cap)
        if spec.in_range > settings.replay_max_rows:
            raise TooMany(
                f"the range holds more than {settings.replay_max_rows:,} rows, the most one replay takes "
                "(replay_max_rows); narrow it, or replay it in parts"
            )
        oldest = await tenant_db.oldest_row(conn, schema)
        spec.oldest_retained_id, spec.oldest_retained_at = oldest if oldest else (None, None)
        if body.dry_run:
            layout = await tenant_db.read_layout(conn, schema)
            found = await history.preview(conn, schema, layout, spec, history.Selection.of(relay, name, spec))
            return _preview(name, target_name, relay, spec, found, settings.replay_max_rows)
    finally:
        await conn.close()
    return await _queue(relays, name, row.id, spec, letters, via=via)


async def _check_target(relays: Resources[Relay], name: str) -> str:
    """The target a replay publishes to, checked now as the job checks it again: the tenant's own
    (UnknownReference, 422, otherwise), usable, its addresses allowed (ReplayRefused, 422)."""
    services = relays.services
    target_row = await target_with_secret(services.store.pool, relays.tenant.id, name)
    if target_row is None:
        raise UnknownReference(f"target {name!r} not found")
    target, _ = decode_target(target_row, services.secrets)
    refusal = await address_refusal(services.policy, target_row, target)
    if refusal is not None:
        raise ReplayRefused(refusal, error_class=ErrorClass.NOT_ALLOWED)
    return target_row.name


async def _connect(relays: Resources[Relay], database: str) -> tuple[tenant_db.Connection, str]:
    """A connection to the relay's database through :func:`~outbox_relay.tenant.db.connect` (the address
    policy, the session limits), and the outbox's schema; TenantDatabaseError (502) when it cannot be opened."""
    services = relays.services
    db_row = await services.store.get_resource("databases", relays.tenant.id, database)
    assert db_row is not None  # a relay's database cannot be deleted while the relay exists
    db = msgspec.json.decode(db_row.spec, type=Database)
    check_database(db)  # stored before a check existed: never handed to asyncpg
    secret = await services.store.get_secret("databases", relays.tenant.id, database)
    conn = await tenant_db.connect(
        db,
        services.secrets.decrypt(secret) if secret else None,
        policy=services.policy,
        timeout_s=services.settings.connect_timeout_s,
        session=tenant_db.SessionLimits.of(services.settings),
    )
    return conn, db.schema


def _preview(
    name: str, target: str, relay: Relay, spec: history.HistorySpec, found: history.Preview, max_rows: int
) -> ReplayPreview:
    return ReplayPreview(
        relay=name,
        target=target,
        in_range=spec.in_range,
        matching=found.matching,
        sample=[
            SampleMessage(
                outbox_id=s.outbox_id,
                message_id=s.message_id,
                topic=s.topic,
                key=s.key,
                inserted_at=s.inserted_at,
                destination=s.destination,
                payload_size=s.payload_size,
                payload_preview=render.preview(s.payload_head, s.payload_size),
            )
            for s in found.sample
        ],
        oldest_retained_id=spec.oldest_retained_id,
        oldest_retained_at=spec.oldest_retained_at,
        retention_hours=relay.policy.retention_hours,
        max_rows=max_rows,
    )


async def _queue(
    relays: Resources[Relay],
    name: str,
    relay_id: uuid.UUID,
    spec: history.HistorySpec,
    letters: DeadLetterStore,
    *,
    via: str,
) -> JobRow:
    """Create the job (ReplaysInFlight past the tenant's limit), audit it, and queue it."""
    services, tenant = relays.services, relays.tenant
    settings = services.settings
    job = await letters.create_history_job(
        tenant_id=tenant.id,
        actor=relays.actor,
        relay_id=relay_id,
        relay_name=name,
        spec=msgspec.json.encode(spec),
        total=spec.in_range,
        target_name=spec.target,
        max_in_flight=settings.replay_max_in_flight,
    )
    if job is None:
        in_flight = await letters.history_in_flight(tenant.id)
        raise ReplaysInFlight(limit=settings.replay_max_in_flight, in_flight=in_flight)
    detail = {**msgspec.to_builtins(spec), "via": via}
    await services.store.audit(tenant.id, relays.actor, "replay", f"relays/{name}/replays/{job.id}", json.dumps(detail))
    if spec.in_range == 0:
        return await letters.finish_job(job.id, status=JobStatus.DONE) or job
    try:
        await enqueue_replay(services, job.id, history.HISTORY_JOB)
    except Exception as exc:
        log.warning("could not queue replay %s: %s", job.id, exc)
        await letters.finish_job(job.id, status=JobStatus.FAILED, error=f"could not queue the job: {exc}")
        raise QueueUnavailable("the job queue (Redis) is unavailable; nothing was replayed") from None
    return job
