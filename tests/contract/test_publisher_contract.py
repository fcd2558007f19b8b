"""The publisher contract (``outbox_relay/brokers/base.py``), checked against every adapter on a real
broker: RabbitMQ (default exchange, and a topic exchange with topic permissions), Redis Streams,
Kafka (Tansu), NATS JetStream, and webhooks (a local HTTP receiver that verifies every signature).

Each test talks to the adapter only through :func:`open_publisher` and to the broker only through its
:class:`~tests.contract.harness.Harness`. Cases that an adapter does not promise are not generated:
refusals and outages are parametrised by what each harness lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from outbox_relay.brokers.base import OutgoingMessage, Publisher, PublishResult
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.domain import KafkaTarget
from outbox_relay.errors import MessageRejected, TargetUnavailable
from tests.contract.harness import HARNESSES, OUTAGE_TIMEOUT_MS, READ_DEADLINE_S, TIMEOUT_MS, Harness, Received
from tests.helpers import LOCAL

ADAPTERS = list(HARNESSES)
REFUSALS = [(name, kind) for name, cls in HARNESSES.items() for kind in cls.refusals]
OUTAGES = [(name, mode) for name, cls in HARNESSES.items() for mode in cls.outages]
STALLS = [name for name, cls in HARNESSES.items() if "stall" in cls.outages]

by_adapter = pytest.mark.parametrize("harness", ADAPTERS, indirect=True)


def bound(timeout_ms: int) -> float:
    """How long an unavailable broker may hold a call: a few waits of ``timeout_ms`` each (connect or
    confirm, then closing what is left), never an unbounded one."""
    return 4 * timeout_ms / 1000 + 1.0


def message(
    outbox_id: int,
    destination: str,
    *,
    key: str | None = "k",
    payload: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> OutgoingMessage:
    """A message as the relay builds it: the outbox id, topic and relay name in the headers."""
    if headers is None:
        headers = {"outbox-id": str(outbox_id), "outbox-topic": "orders", "outbox-relay": "contract"}
    return OutgoingMessage(
        id=outbox_id,
        destination=destination,
        key=key,
        payload=f"payload {outbox_id}".encode() if payload is None else payload,
        headers=headers,
    )


async def publisher_for(harness: Harness, **target: Any) -> Publisher:
    return await open_publisher(harness.target(**target), password=harness.password, policy=LOCAL)


def ids(messages: Sequence[OutgoingMessage] | Sequence[Received]) -> list[int]:
    return [m.id for m in messages]


def assert_complete_and_ordered(harness: Harness, sent: Sequence[OutgoingMessage], got: Sequence[Received]) -> None:
    """Every message once, and the messages of each key in the order they were sent."""
    assert sorted(ids(got)) == sorted(ids(sent))
    for key in {m.key for m in sent if m.key is not None}:
        assert [r.id for r in got if r.key == key] == [m.id for m in sent if m.key == key], f"key {key}"
    if harness.ordered_destination:
        assert ids(got) == ids(sent)


# --- delivery ----------------------------------------------------------------------------------------


@by_adapter
async def test_batch_arrives_complete_and_in_per_key_order(harness: Harness) -> None:
    destinations = [await harness.destination("order-a"), await harness.destination("order-b")]
    rng = random.Random(7)
    keys: list[str | None] = [f"key-{n}" for n in range(8)] + [None]
    batch = [message(n, rng.choice(destinations), key=rng.choice(keys)) for n in range(1, 201)]

    async with await publisher_for(harness) as publisher:
        assert await publisher.publish_batch(batch) == PublishResult(acked=200)

    for destination in destinations:
        sent = [m for m in batch if m.destination == destination]
        assert_complete_and_ordered(harness, sent, await harness.read(destination))


@by_adapter
async def test_key_headers_and_outbox_id_are_carried(harness: Harness) -> None:
    destination = await harness.destination("encoding")
    relay = {"outbox-topic": "orders", "outbox-relay": "contract"}
    batch = [
        message(1, destination, key="order-1", headers={"outbox-id": "1", **relay, "traceparent": "00-ab-01"}),
        message(2, destination, key=None, headers={"outbox-id": "2", **relay}),
        message(3, destination, key="ключ ✓/#?", headers={"outbox-id": "3", "ünï code": "välue ✓", "empty": ""}),
        message(9_007_199_254_740_993, destination, key="big", headers={"outbox-id": "9007199254740993"}),
        message(5, destination, key="no-id-header", headers={"x": "y"}),  # the relay always sets it; still
        message(6, destination, key="no-headers", headers={}),
    ]
    async with await publisher_for(harness) as publisher:
        assert await publisher.publish_batch(batch) == PublishResult(acked=len(batch))

    got = sorted(await harness.read(destination), key=lambda r: r.id)
    expected = [
        Received(id=m.id, key=m.key, headers=harness.expected_headers(m), payload=m.payload)
        for m in sorted(batch, key=lambda m: m.id)
    ]
    assert got == expected


@by_adapter
async def test_the_message_id_is_carried_where_consumers_read_it(harness: Harness) -> None:
    """The id consumers dedupe on (a UUID, ``OutgoingMessage.message_id``) is what the inbox's
    helpers read: the AMQP ``message_id``, the stream field ``outbox-id``, the Kafka header ``outbox-id``
    (added by the adapter when the headers lack it); the row id is never published in its place."""
    destination = await harness.destination("message-id")
    message_ids = [str(uuid.uuid4()) for _ in range(3)]
    batch = [
        OutgoingMessage(
            id=7,  # the same row id three times, as a restored database hands it out again
            message_id=message_id,
            destination=destination,
            key="k",
            payload=f"p{n}".encode(),
            headers={"outbox-id": message_id, "outbox-relay": "contract"} if n < 2 else {"outbox-relay": "contract"},
        )
        for n, message_id in enumerate(message_ids)
    ]
    async with await publisher_for(harness) as publisher:
        assert await publisher.publish_batch(batch) == PublishResult(acked=3)
    got = await harness.read(destination)
    assert [(r.message_id, r.payload) for r in got] == [(m, f"p{n}".encode()) for n, m in enumerate(message_ids)]


@by_adapter
async def test_payloads_are_bytes_exact(harness: Harness) -> None:
    destination = await harness.destination("payloads")
    payloads = [
        b"",
        b"\x00",
        bytes(range(256)),
        b"\xff\xfe not utf-8 \xc3\x28",
        "ünïcode ✓".encode(),
        b"\r\n.\r\n",
        random.Random(3).randbytes(300_000),  # several AMQP frames
        b"",
    ]
    batch = [message(n, destination, key="one-key", payload=p) for n, p in enumerate(payloads, 1)]
    async with await publisher_for(harness) as publisher:
        assert await publisher.publish_batch(batch) == PublishResult(acked=len(batch))
    assert [r.payload for r in await harness.read(destination)] == payloads


@by_adapter
async def test_empty_batch(harness: Harness) -> None:
    async with await publisher_for(harness) as publisher:
        assert await publisher.publish_batch([]) == PublishResult(acked=0)
        assert await publisher.publish_batch([]) == PublishResult(acked=0)


@by_adapter
async def test_close_is_idempotent(harness: Harness) -> None:
    destination = await harness.destination("close")
    publisher = await publisher_for(harness)
    async with publisher:
        assert await publisher.publish_batch([message(1, destination)]) == PublishResult(acked=1)
    await publisher.close()
    assert ids(await harness.read(destination)) == [1]


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("harness", "kind"), REFUSALS, indirect=["harness"])
async def test_refused_message(harness: Harness, kind: str) -> None:
    """The broker refuses one message for good: the result says which; those before it are acked and
    delivered; the publisher keeps working."""
    refusal = await harness.refusal(kind)
    destination = await harness.destination("refusal")
    batch = [message(n, destination, key=f"k{n % 2}") for n in range(1, 11)]
    at = 0 if refusal.whole_target else 4
    batch[at] = refusal.bad(batch[at])

    async with await publisher_for(harness, **refusal.target) as publisher:
        started = time.monotonic()
        result = await publisher.publish_batch(batch)
        # an answer, not a timeout: the relay sends a refused message again, alone, several times
        assert time.monotonic() - started < TIMEOUT_MS / 1000
        assert result.acked == at, result
        assert isinstance(result.rejected, MessageRejected), result
        assert result.rejected.index == at

        if refusal.whole_target:
            again = await publisher.publish_batch(batch[:2])  # still an answer, not an outage
            assert again.acked == 0 and again.rejected is not None and again.rejected.index == 0
            return
        got = ids(await harness.read(destination))
        if harness.parallel_keys:  # the keys in parallel: only each key's arrival order is the batch's
            assert set(got) >= set(ids(batch[:at]))
        else:
            assert got[:at] == ids(batch[:at])
        assert batch[at].id not in got
        # the messages after it may have been delivered; the publisher is still usable
        more = [message(n, destination, key="after") for n in range(100, 105)]
        assert await publisher.publish_batch(more) == PublishResult(acked=5)
    got = ids(await harness.read(destination))
    assert [n for n in got if n >= 100] == ids(more)


# --- outages -----------------------------------------------------------------------------------------


@by_adapter
async def test_unreachable_broker_is_unavailable(harness: Harness) -> None:
    target = harness.closed_port_target(timeout_ms=OUTAGE_TIMEOUT_MS)
    started = time.monotonic()
    with pytest.raises(TargetUnavailable):
        await open_publisher(target, password=harness.password, policy=LOCAL)
    assert time.monotonic() - started < bound(OUTAGE_TIMEOUT_MS)


@pytest.mark.parametrize("harness", STALLS, indirect=True)
async def test_connect_to_a_hanging_broker_times_out(harness: Harness) -> None:
    proxied = "stall" in harness.proxied_modes
    if proxied:
        await harness.proxy()
    target = harness.target(timeout_ms=OUTAGE_TIMEOUT_MS, via_proxy=proxied)
    async with harness.outage("stall"):
        started = time.monotonic()
        with pytest.raises(TargetUnavailable):
            await open_publisher(target, password=harness.password, policy=LOCAL)
        assert time.monotonic() - started < bound(OUTAGE_TIMEOUT_MS)


@pytest.mark.parametrize(("harness", "mode"), OUTAGES, indirect=["harness"])
async def test_outage_then_recovery(harness: Harness, mode: str) -> None:
    """While the broker is away a batch raises TargetUnavailable (within the timeout); the same
    publisher publishes the next batch once the broker is back. ``dropped``: the broker closed our
    connections and is up again at once, so the batch may also just succeed."""
    proxied = mode in harness.proxied_modes
    if proxied:
        await harness.proxy()
    destination = await harness.destination(f"outage-{mode}")
    before = [message(n, destination) for n in range(1, 11)]
    during = [message(n, destination) for n in range(11, 21)]
    after = [message(n, destination) for n in range(21, 31)]

    async with await publisher_for(harness, timeout_ms=OUTAGE_TIMEOUT_MS, via_proxy=proxied) as publisher:
        assert await publisher.publish_batch(before) == PublishResult(acked=10)
        async with harness.outage(mode):
            started = time.monotonic()
            if mode == "dropped":
                try:
                    assert await publisher.publish_batch(during) == PublishResult(acked=10)
                except TargetUnavailable:
                    pass
            else:
                with pytest.raises(TargetUnavailable):
                    await publisher.publish_batch(during)
            assert time.monotonic() - started < bound(OUTAGE_TIMEOUT_MS)
        assert await publisher.publish_batch(after) == PublishResult(acked=10)
    if proxied:
        await assert_no_connections_left(harness)

    got = ids(await harness.read(destination))
    assert [n for n in got if n > 20] == ids(after)


@pytest.mark.parametrize(
    ("harness", "mode"), [(name, mode) for name, mode in OUTAGES if mode != "dropped"], indirect=["harness"]
)
async def test_concurrent_batches_across_an_outage(harness: Harness, mode: str) -> None:
    """Several partitions hit the outage at once on the shared publisher: each batch raises
    TargetUnavailable within the timeout, and once the broker is back they all go through on it."""
    await harness.proxy()
    destination = await harness.destination(f"concurrent-{mode}")

    def batch(p: int, round_: int) -> list[OutgoingMessage]:
        return [message(p * 10_000 + round_ * 100 + n, destination, key=f"p{p}") for n in range(10)]

    async with await publisher_for(harness, timeout_ms=OUTAGE_TIMEOUT_MS, via_proxy=True) as publisher:
        results = await asyncio.gather(*(publisher.publish_batch(batch(p, 0)) for p in range(1, 5)))
        assert results == [PublishResult(acked=10)] * 4
        async with harness.outage(mode):
            started = time.monotonic()
            failures = await asyncio.gather(
                *(publisher.publish_batch(batch(p, 1)) for p in range(1, 5)), return_exceptions=True
            )
            assert all(isinstance(f, TargetUnavailable) for f in failures), failures
            assert time.monotonic() - started < bound(OUTAGE_TIMEOUT_MS)
        for round_ in (2, 3):
            results = await asyncio.gather(*(publisher.publish_batch(batch(p, round_)) for p in range(1, 5)))
            assert results == [PublishResult(acked=10)] * 4
    await assert_no_connections_left(harness)

    got = await harness.read(destination)
    for p in range(1, 5):
        after = [r.id for r in got if r.key == f"p{p}" and r.id % 10_000 >= 200]
        assert after == ids(batch(p, 2) + batch(p, 3))


async def assert_no_connections_left(harness: Harness) -> None:
    """``close()`` released every connection the publisher opened, the abandoned ones included."""
    proxy = await harness.proxy()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3):
            await proxy.wait_idle()
    assert proxy.live == 0, f"{proxy.live} connection(s) still open after close()"


# --- concurrency -------------------------------------------------------------------------------------


@by_adapter
async def test_concurrent_batches_on_one_publisher(harness: Harness) -> None:
    """The worker shares one publisher between partitions: concurrent batches keep their own order
    and their own acks."""
    destinations = [await harness.destination("shared-a"), await harness.destination("shared-b")]
    sent: list[OutgoingMessage] = []

    async def partition(p: int, publisher: Publisher) -> None:
        for b in range(5):
            batch = [message(p * 10_000 + b * 100 + n, destinations[n % 2], key=f"p{p}-k{n % 3}") for n in range(25)]
            sent.extend(batch)
            assert await publisher.publish_batch(batch) == PublishResult(acked=25)

    async with await publisher_for(harness) as publisher:
        await asyncio.gather(*(partition(p, publisher) for p in range(1, 5)))

    for destination in destinations:
        got = await harness.read(destination)
        expected = [m for m in sent if m.destination == destination]
        assert sorted(ids(got)) == sorted(ids(expected))
        for key in {m.key for m in expected}:
            assert [r.id for r in got if r.key == key] == [m.id for m in expected if m.key == key]


@pytest.mark.parametrize(
    ("harness", "kind"),
    [(name, kind) for name, kind in REFUSALS if kind != "missing_exchange"],
    indirect=["harness"],
)
async def test_a_refusal_in_one_batch_does_not_touch_concurrent_ones(harness: Harness, kind: str) -> None:
    """One partition's batch holds a message the broker refuses (on RabbitMQ possibly by closing the
    channel): only that batch reports it; the others, in flight at the same time, are all acked."""
    refusal = await harness.refusal(kind)
    destination = await harness.destination("concurrent-refusal")
    good: list[OutgoingMessage] = []
    bad_results: list[PublishResult] = []

    async def partition(p: int, round_: int, publisher: Publisher) -> None:
        batch = [message(p * 10_000 + round_ * 100 + n, destination, key=f"p{p}-k{n % 2}") for n in range(20)]
        if p == 0:
            batch[3] = refusal.bad(batch[3])
            bad_results.append(await publisher.publish_batch(batch))
        else:
            good.extend(batch)
            assert await publisher.publish_batch(batch) == PublishResult(acked=20)

    async with await publisher_for(harness) as publisher:
        for round_ in range(3):
            await asyncio.gather(*(partition(p, round_, publisher) for p in range(4)))

    for result in bad_results:
        assert result.acked == 3 and isinstance(result.rejected, MessageRejected), result
        assert result.rejected.index == 3
    got = [r for r in await harness.read(destination) if r.id >= 10_000]
    assert sorted(ids(got)) == sorted(ids(good))
    for key in {m.key for m in good}:
        assert [r.id for r in got if r.key == key] == [m.id for m in good if m.key == key]


# --- pipelining: batches in flight at once on one publisher ------------------------------------------

PARTITIONS = 10
"""More partitions than a RabbitMQ publisher has connections, so several batches share one."""


@by_adapter
async def test_per_key_order_under_pipelining(harness: Harness) -> None:
    """Many partitions keep a batch each in flight on one publisher at once, batch after batch:
    every message arrives once, and each key's messages in the order they were sent."""
    destinations = [await harness.destination("pipelined-a"), await harness.destination("pipelined-b")]
    sent: dict[int, list[OutgoingMessage]] = {p: [] for p in range(PARTITIONS)}

    async def partition(p: int, publisher: Publisher) -> None:
        for b in range(6):
            batch = [message(p * 10_000 + b * 100 + n, destinations[n % 2], key=f"p{p}-k{n % 4}") for n in range(40)]
            sent[p].extend(batch)
            assert await publisher.publish_batch(batch) == PublishResult(acked=40)

    async with await publisher_for(harness) as publisher:
        await asyncio.gather(*(partition(p, publisher) for p in range(PARTITIONS)))

    for destination in destinations:
        got = await harness.read(destination)
        expected = [m for p in range(PARTITIONS) for m in sent[p] if m.destination == destination]
        assert sorted(ids(got)) == sorted(ids(expected))
        for key in {m.key for m in expected}:
            assert [r.id for r in got if r.key == key] == [m.id for m in expected if m.key == key], key


@pytest.mark.parametrize(
    ("harness", "kind"),
    [(name, kind) for name, kind in REFUSALS if kind != "missing_exchange"],
    indirect=["harness"],
)
async def test_a_refusal_in_the_middle_of_pipelined_batches(harness: Harness, kind: str) -> None:
    """Batches of many partitions in flight at once, all carrying the same message ids (two
    databases on outbox version 1 relaying to one target); one batch holds two messages the broker
    refuses, mid-batch. The caller does what the relay does: takes the acknowledged prefix, notes the
    refusal and sends what follows again. Only those two are refused, each at its own index; every
    other message is acknowledged and arrives, in per-key order (at least once: what followed a
    refusal may arrive twice); the publisher stays usable."""
    refusal = await harness.refusal(kind)
    destination = await harness.destination("pipelined-refusal")
    acked: dict[int, list[OutgoingMessage]] = {p: [] for p in range(PARTITIONS)}
    refused: list[tuple[int, int, int]] = []
    bad_at = (9, 17)

    async def partition(p: int, publisher: Publisher) -> None:
        for round_ in range(4):
            batch = [message(round_ * 100 + n, destination, key=f"p{p}-k{n % 3}") for n in range(30)]
            if p == 0 and round_ == 1:
                for at in bad_at:
                    batch[at] = refusal.bad(batch[at])
            index = 0
            while index < len(batch):
                result = await publisher.publish_batch(batch[index:])
                acked[p].extend(batch[index : index + result.acked])
                index += result.acked
                if result.rejected is not None:
                    assert result.rejected.index == result.acked, result
                    refused.append((p, round_, index))
                    index += 1
                else:
                    assert index == len(batch), result

    async with await publisher_for(harness, **refusal.target) as publisher:
        await asyncio.gather(*(partition(p, publisher) for p in range(PARTITIONS)))
        assert sorted(refused) == [(0, 1, at) for at in bad_at]
        more = [message(1000 + n, destination, key="p0-after") for n in range(5)]
        assert await publisher.publish_batch(more) == PublishResult(acked=5)

    got = await harness.read(destination)
    assert all((100 + at, f"p0-k{at % 3}") not in {(r.id, r.key) for r in got} for at in bad_at)
    for p in range(PARTITIONS):
        for key in {m.key for m in acked[p]}:
            first_seen = list(dict.fromkeys(r.id for r in got if r.key == key))
            assert first_seen == [m.id for m in acked[p] if m.key == key], key
    assert [r.id for r in got if r.key == "p0-after"] == ids(more)


OUTAGE_CUTS = [name for name, cls in HARNESSES.items() if "down" in cls.proxied_modes]


@pytest.mark.parametrize("harness", OUTAGE_CUTS, indirect=True)
async def test_an_outage_in_the_middle_of_pipelined_batches(harness: Harness) -> None:
    """The broker goes away while the batches of several partitions are on their way (the proxy
    cuts the connections once a part of them was forwarded): a batch not wholly acknowledged raises
    TargetUnavailable, none reports a message acknowledged that the broker does not have, and once
    the broker is back the same publisher publishes every partition's next batch, in order."""
    proxy = await harness.proxy()
    destination = await harness.destination("pipelined-outage")
    partitions, size, payload = 6, 150, b"x" * 2000

    def batch(p: int, round_: int) -> list[OutgoingMessage]:
        return [message(p * 10_000 + round_ * 1000 + n, destination, key=f"p{p}", payload=payload) for n in range(size)]

    async with await publisher_for(harness, timeout_ms=OUTAGE_TIMEOUT_MS, via_proxy=True) as publisher:
        assert await publisher.publish_batch(batch(0, 0)) == PublishResult(acked=size)  # connected
        start = proxy.sent
        tasks = [asyncio.ensure_future(publisher.publish_batch(batch(p, 1))) for p in range(partitions)]
        async with asyncio.timeout(READ_DEADLINE_S):  # a guard against a hang, not a timing assertion
            await proxy.wait_sent(start + partitions * size * len(payload) // 8)
        await proxy.down()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.up()
        reported: list[OutgoingMessage] = []
        for p, outcome in enumerate(outcomes):
            if isinstance(outcome, PublishResult):
                assert outcome == PublishResult(acked=size), outcome
                reported.extend(batch(p, 1))
            else:
                assert isinstance(outcome, TargetUnavailable), outcome
        # at most an eighth (and a read's worth) went through before the cut: not all batches can be whole
        assert any(isinstance(outcome, TargetUnavailable) for outcome in outcomes), outcomes

        results = await asyncio.gather(*(publisher.publish_batch(batch(p, 2)) for p in range(partitions)))
        assert results == [PublishResult(acked=size)] * partitions
    await assert_no_connections_left(harness)

    got = await harness.read(destination)
    present = {r.id for r in got}
    assert [m.id for m in reported if m.id not in present] == []
    for p in range(partitions):
        assert [r.id for r in got if r.key == f"p{p}" and r.id % 10_000 >= 2000] == ids(batch(p, 2))


# --- adapter defaults --------------------------------------------------------------------------------


def test_kafka_keeps_the_idempotent_producer_by_default() -> None:
    """The contract targets turn it off only because Tansu refuses InitProducerId."""
    assert KafkaTarget(bootstrap_servers=["kafka:9092"]).enable_idempotence is True
