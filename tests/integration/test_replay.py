"""Replaying dead letters the relay engine wrote, against real PostgreSQL and RabbitMQ.

The letters are made for real: a RabbitMQ target refuses the "poison" topic (mapped to a routing key
no queue is bound to) until the engine gives up on it. Then :class:`~outbox_relay.replay.Replayer`
(what the API and the job share) puts them right, once each, even when asked twice at once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from outbox_relay.brokers.base import OutgoingMessage, Publisher, PublishResult
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Target
from outbox_relay.engine import RelayRunner
from outbox_relay.netguard import AddressPolicy
from outbox_relay.replay import ReplayConflict, Replayer
from outbox_relay.store.control import ControlStore
from outbox_relay.store.dead_letters import DeadLetterStore, Letter
from tests.harness.brokers import RabbitMQAccount, free_port
from tests.helpers import LOCAL
from tests.integration.conftest import FAST_RETRY, Setup, run_until, write
from workers.replay import replay_dead_letters


async def dead_letters(
    setup: Setup, runner: RelayRunner, store: ControlStore, relay: str, keys: list[str]
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A relay whose "poison" topic the broker refuses, and one dead letter per key, for real."""
    body = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "policy": FAST_RETRY,
        "topic_mapping": {"poison": "no-such-queue"},
    }
    assert (await setup.tenant.put(f"/v1/relays/{relay}", body)).status_code == 201
    relay_id = await setup.relay_id(store, relay)
    await write(setup.dsn, *((("poison", key, json.dumps({"key": key}).encode())) for key in keys))

    async def all_dead() -> bool:
        n = await store.pool.fetchval("SELECT count(*) FROM dead_letters WHERE relay_id = $1", relay_id)
        return bool(n == len(keys))

    await run_until(runner, relay_id, 1, all_dead, max_slices=30)
    rows = await store.pool.fetch(
        "SELECT id FROM dead_letters WHERE relay_id = $1 ORDER BY outbox_txid, outbox_id", relay_id
    )
    return relay_id, [r["id"] for r in rows]


async def outbox_message_id_of(dsn: str, row_id: int) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT message_id FROM outbox_relay.outbox WHERE id = $1", row_id))
    finally:
        await conn.close()


async def fix_relay(setup: Setup, relay: str, queue: str) -> None:
    body = {
        "database": "app",
        "target": "rabbit",
        "partitions": 1,
        "enabled": False,
        "policy": FAST_RETRY,
        "topic_mapping": {"poison": queue},
    }
    assert (await setup.tenant.put(f"/v1/relays/{relay}", body)).status_code == 200


class CountedReads(DeadLetterStore):
    """The dead-letter store, counting how often a letter is read by id."""

    reads = 0

    async def get(self, letter_id: uuid.UUID, tenant_id: uuid.UUID | None) -> Letter | None:
        self.reads += 1
        return await super().get(letter_id, tenant_id)


def replayer(store: ControlStore, runner: RelayRunner, **kw: Any) -> Replayer:
    kw.setdefault("letters", DeadLetterStore(store.pool))
    return Replayer(secrets=runner.secrets, policy=AddressPolicy(allow_private=True), **kw)


async def test_engine_dead_letters_replayed_once_to_the_fixed_relay(
    setup: Setup, runner: RelayRunner, store: ControlStore
) -> None:
    _, letters = await dead_letters(setup, runner, store, "rp1", ["a", "b"])
    letters_store = DeadLetterStore(store.pool)
    first = await letters_store.get(letters[0], None)
    assert first is not None and first.status == "dead" and len(first.attempts) == 3
    assert first.destination == "no-such-queue" and first.error_class == "refused"

    # replaying before the relay is fixed fails again: back in the list with one more attempt
    async with replayer(store, runner) as r:
        outcome = await r.replay_one(letters[0], first.tenant_id, actor="test")
    assert not outcome.replayed and outcome.error_class == "refused" and "unroutable" in (outcome.error or "")
    again = await letters_store.get(letters[0], None)
    assert again is not None and again.status == "dead" and again.replay_count == 1
    assert len(again.attempts) == 4 and again.attempts[-1]["replay"] == 1 and again.attempts[-1]["by"] == "test"
    assert outcome.letter == again  # the letter as the replay left it, without reading it again

    await setup.channel.declare_queue("replay-fixed-q", durable=True)
    await fix_relay(setup, "rp1", "replay-fixed-q")
    counted = CountedReads(store.pool)
    async with replayer(store, runner, letters=counted) as r:
        outcome = await r.replay_one(letters[0], first.tenant_id, actor="test")
        assert outcome.replayed and outcome.destination == "replay-fixed-q" and outcome.replay_count == 2
        assert counted.reads == 0  # the claim is its one read of the letter
        assert outcome.letter is not None and outcome.letter.status == "replayed" and outcome.letter.replay_count == 2
        with pytest.raises(ReplayConflict):
            await r.replay_one(letters[0], first.tenant_id, actor="test")
        with pytest.raises(LookupError):  # another tenant's letter does not exist for this one
            await r.replay_one(letters[1], uuid.uuid4(), actor="test")
    got = await setup.drain("replay-fixed-q")
    assert [(key, body) for key, _, body in got] == [("a", b'{"key": "a"}')]
    _, message_id, _ = got[0]
    # the original message id: the one the outbox row holds, which the letter kept
    outbox_message_id = await outbox_message_id_of(setup.dsn, first.outbox_id)
    assert first.message_id == outbox_message_id and message_id == outbox_message_id
    done = await letters_store.get(letters[0], None)
    assert done is not None and done.status == "replayed" and done.last_replayed_at is not None
    assert done.attempts[-1]["error"] is None and done.claimed_by is None


class SlowPublisher:
    """Holds every batch for a moment, so two replays of one letter surely overlap."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner
        self.batches: list[list[OutgoingMessage]] = []

    async def publish_batch(self, messages: Any) -> PublishResult:
        self.batches.append(list(messages))
        await asyncio.sleep(0.3)
        return await self.inner.publish_batch(messages)

    async def close(self) -> None:
        await self.inner.close()

    async def __aenter__(self) -> SlowPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def test_concurrent_replays_of_one_letter_publish_it_once(
    setup: Setup, runner: RelayRunner, store: ControlStore
) -> None:
    _, letters = await dead_letters(setup, runner, store, "rp2", ["x"])
    await setup.channel.declare_queue("replay-race-q", durable=True)
    await fix_relay(setup, "rp2", "replay-race-q")
    published: list[SlowPublisher] = []

    async def slow(target: Target, password: str | None) -> Publisher:
        publisher = SlowPublisher(await open_publisher(target, password=password, policy=LOCAL))
        published.append(publisher)
        return publisher

    async def attempt() -> str:
        async with replayer(store, runner, publisher_factory=slow) as r:
            try:
                await r.replay_one(letters[0], None, actor=f"racer-{uuid.uuid4().hex[:4]}")
            except ReplayConflict as exc:
                return f"conflict:{exc.status}"
            return "replayed"

    results = await asyncio.gather(*(attempt() for _ in range(4)))
    assert sorted(results) == ["conflict:replaying"] * 3 + ["replayed"], results
    assert sum(len(p.batches) for p in published) == 1
    assert len(await setup.drain("replay-race-q")) == 1

    # a claim left behind by a process that died mid-replay is taken over once it is stale
    letter = await DeadLetterStore(store.pool).get(letters[0], None)
    assert letter is not None
    await store.pool.execute(
        "UPDATE dead_letters SET status = 'replaying', claimed_by = 'dead-process', "
        "claimed_at = now() - interval '11 minutes' WHERE id = $1",
        letter.id,
    )
    async with replayer(store, runner) as r:
        outcome = await r.replay_one(letter.id, None, actor="test")
    assert outcome.replayed and outcome.replay_count == 2
    assert len(await setup.drain("replay-race-q")) == 1


async def test_job_stops_at_an_unreachable_target_and_runs_once(
    setup: Setup, runner: RelayRunner, store: ControlStore, rabbitmq: RabbitMQAccount, settings: Any
) -> None:
    _, letters = await dead_letters(setup, runner, store, "rp3", ["m1", "m2", "m3"])
    closed = f"amqp://{rabbitmq.user}@127.0.0.1:{free_port()}/{rabbitmq.vhost}"
    body = {"kind": "rabbitmq", "url": closed, "password": rabbitmq.password, "timeout_ms": 500}
    assert (await setup.tenant.put("/v1/targets/down", body)).status_code == 201
    letters_store = DeadLetterStore(store.pool)
    tenant = await store.get_tenant(setup.tenant.name)
    assert tenant is not None

    job = await letters_store.create_job(
        tenant_id=tenant.id, actor="test", letter_ids=letters, filter=None, target_name="down", destination="q"
    )
    ctx = {"store": store, "secrets": SecretBox(settings.secret_keys), "policy": AddressPolicy(allow_private=True)}
    assert await replay_dead_letters(ctx, str(job.id)) == "failed"
    assert await replay_dead_letters(ctx, str(job.id)) == "not-queued"  # a job runs once
    row = await letters_store.get_job(job.id, tenant.id)
    assert row is not None and row.status == "failed" and row.failed == 3 and row.replayed == 0
    assert row.error is not None and "unavailable" in row.error and row.finished_at is not None
    for letter_id in letters:
        letter = await letters_store.get(letter_id, tenant.id)
        assert letter is not None and letter.status == "dead" and letter.error_class == "unavailable"
        assert letter.attempts[-1]["target"] == "down" and letter.claimed_by is None
    audit = await store.pool.fetchrow(
        "SELECT actor, detail::text AS detail FROM audit_log WHERE resource = $1 AND action = 'replay-finished'",
        f"dead-letter-jobs/{job.id}",
    )
    assert audit is not None and audit["actor"] == "test" and json.loads(audit["detail"])["failed"] == 3

    # the outage over (the relay's own target is up), the same letters go through, in outbox order
    await setup.channel.declare_queue("replay-mixed-q", durable=True)
    await fix_relay(setup, "rp3", "replay-mixed-q")
    async with replayer(store, runner) as r:
        counts = await r.replay_many(letters, tenant.id, actor="test", target_name="down")
        assert counts.stopped is not None and counts.failed == 3
        counts = await r.replay_many(letters, tenant.id, actor="test")
    assert (counts.replayed, counts.failed, counts.skipped, counts.stopped) == (3, 0, 0, None)
    assert [key for key, _, _ in await setup.drain("replay-mixed-q")] == ["m1", "m2", "m3"]  # in outbox order
