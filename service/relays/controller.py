"""Relays: one database's outbox published to one target, with a topic mapping and a policy."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from outbox_relay.domain import Relay
from outbox_relay.store.dead_letters import JobRow
from service.dead_letters.schemas import QueueProblem, ReplayJob
from service.dead_letters.service import job
from service.deps import authenticate_tenant
from service.problems import MEDIA_TYPE
from service.relays.replays import HistoryReplayRequest, ReplayPreview, start_replay
from service.relays.service import put_relay as put_relay_spec
from service.relays.status import RelayStatus, relay_status
from service.resources import CURSOR_PARAM, LIMIT_PARAM, NAME_PARAM, RELAYS, Page, Resources, provide_resources

RelaysDep = NamedDependency[Resources[Relay]]


class RelayPage(Page, kw_only=True):
    items: list[Relay]


class RelayController(Controller):
    path = "/v1/relays"
    tags = ["relays"]
    guards = [authenticate_tenant]
    dependencies = provide_resources(RELAYS)

    @get("/", operation_id="listRelays", summary="List relays")
    async def list_relays(
        self,
        resources: RelaysDep,
        limit: Annotated[int, LIMIT_PARAM] = 50,
        cursor: Annotated[str | None, CURSOR_PARAM] = None,
    ) -> RelayPage:
        items, next_cursor = await resources.page(cursor, limit)
        return RelayPage(items=items, next_cursor=next_cursor)

    @get("/{name:str}", operation_id="getRelay", summary="Read a relay")
    async def get_relay(self, resources: RelaysDep, name: Annotated[str, NAME_PARAM]) -> Relay:
        return await resources.get(name)

    @put(
        "/{name:str}",
        operation_id="putRelay",
        summary="Create or replace a relay",
        description="Idempotent. `partitions` and `database` are fixed once the relay exists. Creating one "
        "counts against the tenant's `relays` and `partitions` quotas (409 `quota-exceeded`); the service bounds "
        "`partitions` per relay and `policy.poll_interval_ms` from below (422 `out-of-bounds`, naming the limit).",
        responses={201: ResponseSpec(data_container=Relay, description="Created", generate_examples=False)},
    )
    async def put_relay(
        self, resources: RelaysDep, name: Annotated[str, NAME_PARAM], data: JSONBody[Relay]
    ) -> Response[Relay]:
        row, created = await put_relay_spec(resources, name, data)
        return Response(resources.read_back(row), status_code=201 if created else 200)

    @delete("/{name:str}", operation_id="deleteRelay", summary="Delete a relay (idempotent)")
    async def delete_relay(self, resources: RelaysDep, name: Annotated[str, NAME_PARAM]) -> None:
        await resources.delete(name)

    @get("/{name:str}/status", operation_id="getRelayStatus", summary="State, cause of a stall, lag, leases")
    async def relay_status(self, resources: RelaysDep, name: Annotated[str, NAME_PARAM]) -> RelayStatus:
        row = await resources.row(name)
        relay = resources.read_back(row)
        return relay_status(name, relay.enabled, await resources.services.store.partition_states(row.id))

    @post(
        "/{name:str}/replays",
        operation_id="startRelayReplay",
        summary="Publish retained outbox rows again: a time or id range, as a background job",
        description="Re-publishes the relay's rows of a range (`inserted_at` or `ids`) that the outbox still "
        "holds, in outbox order, to the relay's target and topic mapping (or `target` / `topic_mapping`), of "
        "the rows both the relay's filter and `filter` match; each message carries `outbox-replay: <job id>`. "
        "The relay's cursor and its own delivery are not touched. `dry_run: true` answers 200 with the count "
        "and a sample, publishing nothing; otherwise 202 with the replay job: poll "
        "`GET /v1/dead-letters/replay-jobs/{id}`. 422 `invalid-range`, `invalid-filter`, `unknown-reference` "
        "(no such target), `too-many` (more rows than `replay_max_rows`); 409 `replays-in-flight`.",
        status_code=202,
        responses={
            200: ResponseSpec(data_container=ReplayPreview, description="A dry run", generate_examples=False),
            503: ResponseSpec(
                data_container=QueueProblem,
                media_type=MEDIA_TYPE,
                description="The job queue is down",
                generate_examples=False,
            ),
        },
    )
    async def start_relay_replay(
        self, resources: RelaysDep, name: Annotated[str, NAME_PARAM], data: JSONBody[HistoryReplayRequest]
    ) -> Response[ReplayJob]:
        answer = await start_replay(resources, name, data)
        if isinstance(answer, JobRow):
            return Response(job(answer), status_code=202)
        return Response(answer, status_code=200)  # type: ignore[arg-type]
