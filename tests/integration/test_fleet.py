"""The fleet data plane in-process, on the real control DB, tenant database and RabbitMQ: workers
share partitions evenly (+-1), rebalance when one joins or leaves (a closed worker hands over at once,
not after the ownership TTL), and relay through their lanes with every cursor write fenced."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from outbox_relay.brokers.factory import open_publisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.engine import PublisherCache, RelayRunner, TenantConnections
from outbox_relay.fleet import FleetEngine
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from outbox_relay.store.events import ControlEvents
from outbox_relay.store.fleet import FleetStore
from tests.integration.conftest import Setup, write


class Fleet:
    """Worker engines in this process, each with its own connections, as separate workers have."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engines: list[FleetEngine] = []
        self._closers: list[Callable[[], Any]] = []

    async def start(self) -> FleetEngine:
        settings = dataclasses.replace(self.settings, worker_id=f"fleet-test-{len(self.engines)}")
        store = await ControlStore.connect(settings.database_url, min_size=0, max_size=4)
        events = ControlEvents(settings.database_url)
        events.start()
        policy = AddressPolicy(allow_private=True)
        tenants = TenantConnections(policy=policy, timeout_s=2)
        publishers = PublisherCache(lambda target, password: open_publisher(target, password=password, policy=policy))
        runner = RelayRunner(
            settings=settings,
            store=store,
            secrets=SecretBox(settings.secret_keys),
            tenants=tenants,
            publishers=publishers,
            events=events,
        )
        engine = FleetEngine(settings=settings, runner=runner, fleet=FleetStore(store.pool))
        engine.start()
        self.engines.append(engine)

        async def close() -> None:
            await engine.close()
            for resource in (publishers, tenants, events, store):
                await resource.close()

        self._closers.append(close)
        return engine

    async def stop(self, engine: FleetEngine) -> None:
        index = self.engines.index(engine)
        self.engines.pop(index)
        await self._closers.pop(index)()

    async def close(self) -> None:
        while self.engines:
            await self.stop(self.engines[-1])


@pytest.fixture
async def fleet(settings: Settings) -> AsyncIterator[Fleet]:
    f = Fleet(dataclasses.replace(settings, lease_ttl_s=2.0))
    yield f
    await f.close()


def owned(engine: FleetEngine, relay_id: uuid.UUID) -> int:
    reader = engine.readers.get(relay_id)
    return len(reader.lanes) if reader else 0


async def until(condition: Callable[[], bool], timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_workers_split_partitions_evenly_and_hand_over_at_once(
    setup: Setup, store: ControlStore, fleet: Fleet
) -> None:
    body = {"database": "app", "target": "rabbit", "partitions": 10, "topic_mapping": {"*": "fleet-q"}}
    assert (await setup.tenant.put("/v1/relays/fleet", body)).status_code == 201
    relay_id = await setup.relay_id(store, "fleet")
    ttl = fleet.settings.lease_ttl_s

    # the shares are of every enabled relay's partitions (earlier tests' relays included)
    total = int(await store.pool.fetchval("SELECT sum(partitions) FROM relays WHERE enabled"))

    def even() -> bool:
        counts = [sum(len(r.lanes) for r in e.readers.values()) for e in fleet.engines]
        return sum(counts) == total and max(counts) - min(counts) <= 1

    def spread() -> list[int]:
        return sorted(owned(e, relay_id) for e in fleet.engines)

    a = await fleet.start()
    await until(lambda: even() and spread() == [10], 2 * ttl)
    await fleet.start()
    joined_s = await until(even, 2 * ttl)
    assert min(spread()) >= 4, spread()  # a relay's partitions spread over the workers: both publish it
    c = await fleet.start()
    await until(even, 2 * ttl)
    assert min(spread()) >= 2, spread()

    handed_over_at = time.monotonic()
    await fleet.stop(c)
    left_s = await until(even, ttl)  # well within one TTL: no waiting for the lapse
    assert sum(spread()) == 10
    print(f"\nbalanced {joined_s:.2f} s after a join, {left_s + time.monotonic() - handed_over_at:.2f} s after a leave")

    # relaying through the lanes: every message once, through whichever worker owns its partition
    queue = await setup.channel.declare_queue("fleet-q", durable=True)
    await queue.purge()
    ids = await write(setup.dsn, *[("orders", f"k{i % 7}", f"m{i}".encode()) for i in range(200)])
    received: list[str] = []
    deadline = time.monotonic() + 30
    while len(received) < len(ids) and time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        received.append(str(message.message_id))
    assert sorted(received) == sorted(str(i) for i in ids)
    assert owned(a, relay_id) >= 4, spread()
    assert (await setup.tenant.delete("/v1/relays/fleet")).status_code == 204
