"""``/v1/dead-letters``: list, inspect, replay and discard dead letters; bulk replay as a job.

A tenant API key sees its own tenant's letters; the admin key sees every tenant's (``tenant``
narrows it to one). Every change is written to the audit log: who, what, which filter, how many.
What the operations raise (NotFound, Conflict, ReplayRefused ...) is answered by the app's one table,
``service.problems.PROBLEMS``: the handlers here do not catch it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, FromPath, JSONBody, Parameter

from outbox_relay.store.dead_letters import STATUSES
from service.dead_letters.schemas import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterPage,
    DiscardRequest,
    DiscardResult,
    QueueProblem,
    ReplayFailure,
    ReplayJob,
    ReplayJobList,
    ReplayJobRequest,
    ReplayRequest,
)
from service.dead_letters.service import (
    Caller,
    DeadLetters,
    caller_for_key,
    counts,
    full,
    job,
    summary,
)
from service.deps import ServicesDep, api_key_of, bad_key, missing_key, refuse_if_throttled
from service.problems import MEDIA_TYPE, Problem
from service.resources import CURSOR_PARAM, NAME_PARAM

CallerDep = NamedDependency[Caller]
NAME_FILTER = Parameter(pattern=NAME_PARAM.pattern, required=False, description="Exact name.")
LIMIT = Parameter(ge=1, le=500, description="Page size.")


async def provide_caller(request: Request[Any, Any, Any], services: ServicesDep) -> Caller:
    refuse_if_throttled(request, services)
    key = api_key_of(request)
    if key is None:
        raise missing_key()
    caller = await caller_for_key(services, key)
    if caller is None:
        raise bad_key(request, services)
    return caller


def _ops(services: ServicesDep, caller: Caller) -> DeadLetters:
    return DeadLetters(services, caller, via="api")


def _bulk(ids: list[uuid.UUID] | None, f: DeadLetterFilter | None) -> None:
    if (ids is None) == (f is None):
        raise Problem(422, "give either `ids` or `filter`", slug="invalid-selection")


class DeadLetterController(Controller):
    path = "/v1/dead-letters"
    tags = ["dead letters"]
    dependencies = {"caller": Provide(provide_caller)}

    @get(
        "/",
        operation_id="listDeadLetters",
        summary="List dead letters, newest first",
        description="Filters match exactly; `since` is inclusive and `until` exclusive (when the message was "
        "dead-lettered). The first page (no `cursor`) also carries the counts per relay and per error class "
        "over the whole filter.",
    )
    async def list_dead_letters(
        self,
        caller: CallerDep,
        services: ServicesDep,
        tenant: Annotated[str | None, Parameter(pattern=NAME_PARAM.pattern, description="Admin key only.")] = None,
        relay: Annotated[str | None, NAME_FILTER] = None,
        target: Annotated[str | None, NAME_FILTER] = None,
        topic: Annotated[str | None, Parameter(min_length=1, max_length=249)] = None,
        key: Annotated[str | None, Parameter(min_length=1, max_length=1024, description="Message key.")] = None,
        error_class: Annotated[
            str | None, Parameter(pattern=r"^[a-z_]{1,64}$", description="`refused`, `too_large`, ...")
        ] = None,
        since: Annotated[datetime | None, Parameter(description="Dead-lettered at or after (ISO 8601).")] = None,
        until: Annotated[datetime | None, Parameter(description="Dead-lettered before (ISO 8601).")] = None,
        status: Annotated[
            Literal["dead", "replaying", "replayed", "discarded", "any"],
            Parameter(description="`dead` (the default) lists what still needs attention."),
        ] = "dead",
        limit: Annotated[int, LIMIT] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> DeadLetterPage:
        ops = _ops(services, caller)
        f = DeadLetterFilter(
            tenant=tenant,
            relay=relay,
            target=target,
            topic=topic,
            key=key,
            error_class=error_class,
            since=since,
            until=until,
        )
        statuses = STATUSES if status == "any" else (status,)
        rows, next_cursor, totals = await ops.page(
            f, statuses=statuses, cursor=cursor, limit=limit, with_counts=cursor is None
        )
        return DeadLetterPage(
            items=[summary(r) for r in rows],
            next_cursor=next_cursor,
            counts=counts(totals) if totals is not None else None,
        )

    @get(
        "/{letter_id:uuid}",
        operation_id="getDeadLetter",
        summary="Read a dead letter: payload, headers, every attempt",
    )
    async def get_dead_letter(
        self, caller: CallerDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]
    ) -> DeadLetter:
        letter, exists = await _ops(services, caller).get(letter_id)
        return full(letter, relay_exists=exists)

    @post(
        "/{letter_id:uuid}/replay",
        operation_id="replayDeadLetter",
        summary="Replay one dead letter now",
        description="Publishes to the relay's current target and topic mapping, or to `target` / "
        "`destination` when given. `409` when the letter is not dead (another replay has it, or it was "
        "replayed or discarded); `502` when the broker did not take it: the letter is dead again with "
        "the attempt appended.",
        status_code=200,
        responses={
            502: ResponseSpec(
                data_container=ReplayFailure,
                media_type=MEDIA_TYPE,
                description="The replay failed at the broker; the letter is dead again",
                generate_examples=False,
            ),
        },
    )
    async def replay_dead_letter(
        self,
        caller: CallerDep,
        services: ServicesDep,
        letter_id: FromPath[uuid.UUID],
        data: Annotated[ReplayRequest | None, Body(description="Optional: where to publish instead.")] = None,
    ) -> DeadLetter:
        ops = _ops(services, caller)
        body = data or ReplayRequest()
        outcome = await ops.replay(letter_id, target=body.target, destination=body.destination)
        if not outcome.replayed:
            raise Problem(
                502,
                f"the replay failed: {outcome.error}",
                slug="replay-failed",
                dead_letter_id=str(letter_id),
                error_class=outcome.error_class,
            )
        if outcome.letter is None:  # its claim was taken over meanwhile (a stale claim): read it as it is
            letter, exists = await ops.get(letter_id)
            return full(letter, relay_exists=exists)
        return full(outcome.letter, relay_exists=await ops.relay_exists(outcome.letter))

    @post(
        "/{letter_id:uuid}/discard",
        operation_id="discardDeadLetter",
        summary="Discard one dead letter",
        description="It stays readable with status `discarded`; `409` when it is not dead.",
        status_code=200,
    )
    async def discard_dead_letter(
        self, caller: CallerDep, services: ServicesDep, letter_id: FromPath[uuid.UUID]
    ) -> DeadLetter:
        ops = _ops(services, caller)
        await ops.discard(letter_id)
        letter, exists = await ops.get(letter_id)
        return full(letter, relay_exists=exists)

    @post(
        "/discard",
        operation_id="discardDeadLetters",
        summary="Discard many dead letters, by id or by filter",
        status_code=200,
    )
    async def discard_dead_letters(
        self, caller: CallerDep, services: ServicesDep, data: JSONBody[DiscardRequest]
    ) -> DiscardResult:
        _bulk(data.ids, data.filter)
        discarded = await _ops(services, caller).discard_many(data.ids, data.filter)
        return DiscardResult(discarded=discarded)

    @post(
        "/replay-jobs",
        operation_id="startReplayJob",
        summary="Replay many dead letters in the background, by id or by filter",
        description="Chooses the letters now (the ids, or what the filter matches: at most 100,000) and "
        "replays them in a worker, in outbox order; poll the job for progress.",
        status_code=202,
        responses={
            503: ResponseSpec(
                data_container=QueueProblem,
                media_type=MEDIA_TYPE,
                description="The job queue is down",
                generate_examples=False,
            )
        },
    )
    async def start_replay_job(
        self, caller: CallerDep, services: ServicesDep, data: JSONBody[ReplayJobRequest]
    ) -> ReplayJob:
        _bulk(data.ids, data.filter)
        row = await _ops(services, caller).start_job(
            data.ids, data.filter, target=data.target, destination=data.destination
        )
        return job(row)

    @get("/replay-jobs", operation_id="listReplayJobs", summary="Recent replay jobs, newest first")
    async def list_replay_jobs(
        self, caller: CallerDep, services: ServicesDep, limit: Annotated[int, Parameter(ge=1, le=100)] = 20
    ) -> ReplayJobList:
        return ReplayJobList(items=[job(r) for r in await _ops(services, caller).jobs(limit)])

    @get("/replay-jobs/{job_id:uuid}", operation_id="getReplayJob", summary="A replay job's progress")
    async def get_replay_job(self, caller: CallerDep, services: ServicesDep, job_id: FromPath[uuid.UUID]) -> ReplayJob:
        row = await _ops(services, caller).get_job(job_id)
        return job(row)
