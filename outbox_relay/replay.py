"""Replaying dead letters: one at a time for the API, many for the arq job; the same code for both.

Where a replay goes: the target named in the request, else the relay's **current** target; the
destination named in the request, else the relay's current topic mapping for the letter's topic,
else the destination the letter failed on. So fixing the relay (its mapping or its target) and
replaying is the usual way to put a dead letter right.

What a replayed message carries: the payload and headers exactly as the outbox stored them, the
relay's own headers with the **original** message id (``outbox-id``, so consumers that dedupe on it
still do), ``outbox-replay-count`` (1 for the first replay of the letter) and
``outbox-dead-letter-id``.

Guarantees:

* A letter is replayed by one caller at a time: the replay claims it first (compare-and-set in
  :class:`~outbox_relay.store.dead_letters.DeadLetterStore`); of two concurrent replays one wins and
  the other gets :class:`ReplayConflict` (or, in a job, counts the letter as skipped).
* Every replay that reached for the broker is recorded on the letter as an attempt (``at``,
  ``error`` -- null when it went through --, ``replay``, ``target``, ``destination``, ``by``). One that
  failed puts the letter back in the dead-letter list with the new error.
* A replay that cannot start (no such target, no destination, an address the policy denies, a
  payload over the relay's ``max_payload_bytes``) raises :class:`ReplayRefused` before anything is
  attempted when it is a single letter (its claim is given back untouched); in a job it fails that
  letter and the job goes on.
* A job stops at the first target that is unreachable (no point charging every letter an attempt);
  what it had not attempted stays dead, untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

import msgspec

from outbox_relay.brokers.base import OutgoingMessage, Publisher
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.crypto import SecretBox
from outbox_relay.delivery import settle
from outbox_relay.domain import CloudEventsOptions, ErrorClass, LetterStatus, Relay, Target, route
from outbox_relay.engine import PublisherCache, PublisherFactory, cloud_event
from outbox_relay.errors import AddressNotAllowed, NotFound, OutboxRelayError, TargetUnavailable
from outbox_relay.errors import ReplayConflict as ReplayConflict
from outbox_relay.errors import ReplayError as ReplayError
from outbox_relay.errors import ReplayRefused as ReplayRefused
from outbox_relay.netguard import AddressPolicy, check_target
from outbox_relay.specs import check_target as check_target_spec
from outbox_relay.store.dead_letters import DeadLetterStore, Letter, RelayRoute, TargetRow

REPLAY_COUNT_HEADER = "outbox-replay-count"
DEAD_LETTER_HEADER = "outbox-dead-letter-id"
CHUNK = 100
REPLAY_JOB = "replay_dead_letters"
"""The arq function name of a bulk replay job (``workers.replay``)."""


@dataclass(frozen=True, slots=True)
class Route:
    target_id: uuid.UUID
    target_name: str
    target_version: datetime
    target: Target
    password: str | None
    destination: str


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    letter_id: uuid.UUID
    replayed: bool
    target_name: str
    destination: str
    replay_count: int
    """The letter's replay count after this replay (the ``outbox-replay-count`` it carried)."""
    error_class: str | None = None
    error: str | None = None
    letter: Letter | None = None
    """The letter as this replay left it (written back by its finish; None when the claim was lost
    meanwhile)."""


@dataclass
class JobCounts:
    replayed: int = 0
    failed: int = 0
    skipped: int = 0
    """Not dead when the job reached them (replayed, discarded, or being replayed elsewhere)."""
    stopped: str | None = None
    """Why the job stopped early (an unreachable target); None when it went through the list."""
    errors: dict[str, int] = field(default_factory=dict)


def replay_job_id(job_id: uuid.UUID) -> str:
    """The arq job id: one queued run per replay job."""
    return f"dead-letter-replay:{job_id}"


def new_token(actor: str) -> str:
    return f"{actor}/{uuid.uuid4().hex}"


def string_headers(headers: dict[str, Any]) -> dict[str, str]:
    """Outbox headers as broker headers: strings as they are, anything else as its JSON text."""
    return {str(k): v if isinstance(v, str) else msgspec.json.encode(v).decode() for k, v in headers.items()}


def replay_message(letter: Letter, destination: str, cloudevents: CloudEventsOptions | None = None) -> OutgoingMessage:
    headers = string_headers(letter.headers)
    headers.update(
        {
            "outbox-id": letter.dedupe_id,
            "outbox-topic": letter.topic,
            "outbox-relay": letter.relay_name,
            REPLAY_COUNT_HEADER: str(letter.replay_count + 1),
            DEAD_LETTER_HEADER: str(letter.id),
        }
    )
    return OutgoingMessage(
        id=letter.outbox_id,
        message_id=letter.dedupe_id,
        destination=destination,
        key=letter.key,
        payload=letter.payload,
        headers=headers,
        cloudevent=None
        if cloudevents is None
        else cloud_event(
            cloudevents, letter.relay_name, letter.dedupe_id, letter.topic, headers, letter.outbox_created_at
        ),
    )


def decode_target(row: TargetRow, secrets: SecretBox) -> tuple[Target, str | None]:
    """A stored target and its password, for a replay (of dead letters or from history); ReplayRefused
    (``not_allowed``) when its spec is one the relay refuses or its secret cannot be read."""
    try:
        target: Target = msgspec.json.decode(row.spec, type=Target)
        check_target_spec(target)
        return target, secrets.decrypt(row.secret) if row.secret else None
    except (msgspec.ValidationError, OutboxRelayError) as exc:
        raise ReplayRefused(f"target {row.name!r} cannot be used: {exc}", error_class=ErrorClass.NOT_ALLOWED) from None


async def address_refusal(policy: AddressPolicy, row: TargetRow, target: Target) -> str | None:
    """Why the address policy refuses the target's addresses (resolved now), or None."""
    try:
        await check_target(policy, target)
    except (AddressNotAllowed, ValueError) as exc:
        return f"target {row.name!r}: {exc}"
    return None


class Replayer:
    """Replays dead letters through the broker adapters. Keeps the publishers it opened until
    :meth:`close` (use ``async with``): a job sends many letters to few targets."""

    def __init__(
        self,
        *,
        letters: DeadLetterStore,
        secrets: SecretBox,
        policy: AddressPolicy,
        publisher_factory: PublisherFactory | None = None,
    ) -> None:
        self.letters = letters
        self.secrets = secrets
        self.policy = policy
        self._relays: dict[uuid.UUID, RelayRoute | None] = {}
        self._targets: dict[tuple[uuid.UUID, str], TargetRow | None] = {}
        self._checked: dict[tuple[uuid.UUID, datetime], str | None] = {}
        self._publishers = PublisherCache(
            publisher_factory or (lambda target, password: open_publisher(target, password=password, policy=policy))
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._publishers.close()

    # --- where to -----------------------------------------------------------------------------------

    async def route_for(
        self, letter: Letter, *, target_name: str | None = None, destination: str | None = None
    ) -> Route:
        """Where ``letter`` goes now (see the module docstring); ReplayRefused if nowhere."""
        relay_route = await self._relay(letter.relay_id) if letter.relay_id is not None else None
        relay = msgspec.json.decode(relay_route.relay_spec, type=Relay) if relay_route else None
        if target_name is not None:
            target_row = await self._target(letter.tenant_id, target_name)
            if target_row is None:
                raise ReplayRefused(f"target {target_name!r} does not exist")
        elif relay_route is not None:
            target_row = relay_route.target
        else:
            raise ReplayRefused(f"relay {letter.relay_name!r} no longer exists: name a target to replay to")
        dest = destination or (route(relay.topic_mapping, letter.topic) if relay else None) or letter.destination
        if not dest:
            raise ReplayRefused(
                f"no destination for topic {letter.topic!r}: the relay's topic mapping does not route it; "
                "give a destination"
            )
        if relay is not None and len(letter.payload) > relay.policy.max_payload_bytes:
            raise ReplayRefused(
                f"payload is {len(letter.payload)} bytes, over relay {letter.relay_name!r}'s max_payload_bytes "
                f"({relay.policy.max_payload_bytes}): raise it to replay this letter",
                error_class=ErrorClass.TOO_LARGE,
            )
        target, password = decode_target(target_row, self.secrets)
        refusal = await self._check(target_row, target)
        if refusal is not None:
            raise ReplayRefused(refusal, error_class=ErrorClass.NOT_ALLOWED)
        return Route(
            target_id=target_row.id,
            target_name=target_row.name,
            target_version=target_row.updated_at,
            target=target,
            password=password,
            destination=dest,
        )

    async def _relay(self, relay_id: uuid.UUID) -> RelayRoute | None:
        if relay_id not in self._relays:
            self._relays[relay_id] = await self.letters.relay_route(relay_id)
        return self._relays[relay_id]

    def _cloudevents(self, letter: Letter) -> CloudEventsOptions | None:
        """The CloudEvents options of the letter's relay (read by :meth:`route_for` just before),
        or None: a relay that publishes plain messages, or one that no longer exists."""
        relay_route = self._relays.get(letter.relay_id) if letter.relay_id is not None else None
        if relay_route is None:
            return None
        return msgspec.json.decode(relay_route.relay_spec, type=Relay).cloudevents

    async def _target(self, tenant_id: uuid.UUID, name: str) -> TargetRow | None:
        if (tenant_id, name) not in self._targets:
            self._targets[(tenant_id, name)] = await self.letters.target(tenant_id, name)
        return self._targets[(tenant_id, name)]

    async def _check(self, row: TargetRow, target: Target) -> str | None:
        """The address policy's refusal of the target, checked once per target version."""
        key = (row.id, row.updated_at)
        if key not in self._checked:
            self._checked[key] = await address_refusal(self.policy, row, target)
        return self._checked[key]

    # --- one ----------------------------------------------------------------------------------------

    async def replay_one(
        self,
        letter_id: uuid.UUID,
        tenant_id: uuid.UUID | None,
        *,
        actor: str,
        target_name: str | None = None,
        destination: str | None = None,
    ) -> ReplayOutcome:
        """Replay one letter now: claim it (its one read), find where it goes, publish it. NotFound if it
        does not exist (for this tenant), ReplayConflict if it is not dead, ReplayRefused if it has
        nowhere to go (the claim is given back untouched: nothing attempted)."""
        token = new_token(actor)
        claimed = await self.letters.claim(letter_id, tenant_id, token)
        if claimed is None:
            now = await self.letters.get(letter_id, tenant_id)
            if now is None:
                raise NotFound(f"dead letter {letter_id} not found")
            busy = now.status == LetterStatus.REPLAYING
            raise ReplayConflict(
                f"dead letter {letter_id} is {'being replayed' if busy else f'{now.status}, not dead'}",
                status=now.status,
            )
        try:
            target_route = await self.route_for(claimed, target_name=target_name, destination=destination)
            outcomes, _ = await self._publish(target_route, [(claimed, target_route.destination)], token, actor)
        except BaseException:
            await self._release([claimed.id], token)
            raise
        return outcomes[0]

    # --- many ---------------------------------------------------------------------------------------

    async def replay_many(
        self,
        letter_ids: Sequence[uuid.UUID],
        tenant_id: uuid.UUID | None,
        *,
        actor: str,
        target_name: str | None = None,
        destination: str | None = None,
        progress: Callable[[JobCounts], Awaitable[None]] | None = None,
    ) -> JobCounts:
        """Replay the letters in chunks: claim a chunk, publish it grouped by target in letter order,
        report progress. Letters not dead when reached are skipped."""
        counts = JobCounts()
        token = new_token(actor)
        for start in range(0, len(letter_ids), CHUNK):
            chunk = letter_ids[start : start + CHUNK]
            claimed = await self.letters.claim_many(chunk, tenant_id, token)
            counts.skipped += len(chunk) - len(claimed)
            try:
                if await self._replay_chunk(claimed, token, actor, target_name, destination, counts):
                    if progress is not None:
                        await progress(counts)
                    return counts
            except BaseException:
                await self._release([letter.id for letter in claimed], token)  # the unfinished ones
                raise
            if progress is not None:
                await progress(counts)
        return counts

    async def _replay_chunk(
        self,
        claimed: list[Letter],
        token: str,
        actor: str,
        target_name: str | None,
        destination: str | None,
        counts: JobCounts,
    ) -> bool:
        """Replay claimed letters grouped by target; True when a target was unreachable (stop)."""
        groups: dict[uuid.UUID, tuple[Route, list[tuple[Letter, str]]]] = {}
        for letter in claimed:
            try:
                letter_route = await self.route_for(letter, target_name=target_name, destination=destination)
            except ReplayRefused as exc:
                await self._failed(letter, token, actor, None, exc.error_class, str(exc))
                counts.failed += 1
                counts.errors[exc.error_class] = counts.errors.get(exc.error_class, 0) + 1
                continue
            group = groups.setdefault(letter_route.target_id, (letter_route, []))[1]
            group.append((letter, letter_route.destination))
        pending = list(groups.values())
        while pending:
            group_route, items = pending.pop(0)
            outcomes, unavailable = await self._publish(group_route, items, token, actor)
            for outcome in outcomes:
                if outcome.replayed:
                    counts.replayed += 1
                else:
                    counts.failed += 1
                    key = outcome.error_class or "error"
                    counts.errors[key] = counts.errors.get(key, 0) + 1
            if unavailable is not None:
                await self.letters.release([letter.id for _, rest in pending for letter, _ in rest], token)
                counts.stopped = unavailable
                return True
        return False

    async def _release(self, letter_ids: list[uuid.UUID], token: str) -> None:
        """Give back what this replay still holds and did not finish (after an unexpected error)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self.letters.release(letter_ids, token))

    # --- publishing ---------------------------------------------------------------------------------

    async def _publisher(self, target_route: Route) -> Publisher:
        return await self._publishers.get(
            target_route.target_id, target_route.target_version, target_route.target, target_route.password
        )

    async def _publish(
        self, target_route: Route, items: list[tuple[Letter, str]], token: str, actor: str
    ) -> tuple[list[ReplayOutcome], str | None]:
        """Publish claimed letters (each with its destination) to one target in order and finish
        each. Returns the outcomes and, when the target could not be reached, why (the letters not
        acknowledged by then failed)."""
        messages = [replay_message(letter, dest, self._cloudevents(letter)) for letter, dest in items]
        outcomes: list[ReplayOutcome] = []
        index = 0
        try:
            publisher = await self._publisher(target_route)
            while index < len(items):
                result = await publisher.publish_batch(messages[index:])
                settled = settle(items[index:], messages[index:], result)  # the relay's reading of an answer
                for letter, dest in items[index : index + settled.sent]:
                    outcomes.append(await self._replayed(letter, token, actor, target_route.target_name, dest))
                index += settled.sent
                if settled.refused is not None:
                    (letter, dest), _ = settled.refused
                    where = (target_route.target_name, dest)
                    outcomes.append(
                        await self._failed(letter, token, actor, where, ErrorClass.REFUSED, str(result.rejected))
                    )
                    index += 1  # what followed the refused one is sent again (same publisher): at least once
                elif settled.sent == 0:
                    break  # an adapter that neither acks nor refuses: do not spin
        except TargetUnavailable as exc:
            await self._drop_publisher(target_route)
            error = f"target {target_route.target_name!r} unavailable: {exc}"
            for letter, dest in items[index:]:
                where = (target_route.target_name, dest)
                outcomes.append(await self._failed(letter, token, actor, where, ErrorClass.UNAVAILABLE, error))
            return outcomes, error
        for letter, dest in items[index:]:
            where = (target_route.target_name, dest)
            error = "the broker neither acknowledged nor refused the message"
            outcomes.append(await self._failed(letter, token, actor, where, ErrorClass.REFUSED, error))
        return outcomes, None

    async def _drop_publisher(self, target_route: Route) -> None:
        await self._publishers.discard(target_route.target_id)

    async def _replayed(
        self, letter: Letter, token: str, actor: str, target_name: str, destination: str
    ) -> ReplayOutcome:
        attempt = _attempt(letter, actor, target_name, destination, None)
        return ReplayOutcome(
            letter_id=letter.id,
            replayed=True,
            target_name=target_name,
            destination=destination,
            replay_count=letter.replay_count + 1,
            letter=await self.letters.finish_replayed(letter.id, token, attempt),
        )

    async def _failed(
        self,
        letter: Letter,
        token: str,
        actor: str,
        where: tuple[str, str] | None,
        error_class: str,
        error: str,
    ) -> ReplayOutcome:
        target_name, destination = where if where else ("", "")
        attempt = _attempt(letter, actor, target_name or None, destination or None, error)
        finished = await self.letters.finish_failed(
            letter.id, token, error_class=error_class, error=error, attempt=attempt
        )
        return ReplayOutcome(
            letter_id=letter.id,
            replayed=False,
            target_name=target_name,
            destination=destination,
            replay_count=letter.replay_count + 1,
            error_class=error_class,
            error=error,
            letter=finished,
        )


def _attempt(
    letter: Letter, actor: str, target: str | None, destination: str | None, error: str | None
) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC).isoformat(),
        "error": error,
        "replay": letter.replay_count + 1,
        "target": target,
        "destination": destination,
        "by": actor,
    }
