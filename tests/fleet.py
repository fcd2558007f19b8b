"""In-process fleet engines (the worker's data plane) for integration tests: each with its own
connections, as separate worker processes have."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from outbox_relay.brokers.factory import open_publisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.engine import PublisherCache, RelayRunner, TenantConnections
from outbox_relay.fleet import FleetEngine
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from outbox_relay.store.events import ControlEvents
from outbox_relay.store.fleet import FleetStore


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
