"""arq ``WorkerSettings`` built from :class:`outbox_relay.config.Settings`."""

from __future__ import annotations

import asyncio
from typing import Any

from arq import cron, func
from arq.connections import RedisSettings

from outbox_relay.alerts import AlertEvaluator
from outbox_relay.brokers.base import Publisher
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Target
from outbox_relay.engine import PublisherCache, RelayRunner, TenantConnections
from outbox_relay.fleet import FleetEngine
from outbox_relay.netguard import AddressPolicy
from outbox_relay.outages import CONTROL_DB, Outages
from outbox_relay.store.control import ControlStore, control_unavailable
from outbox_relay.store.events import ControlEvents
from outbox_relay.store.fleet import FleetStore
from outbox_relay.tenant.db import SessionLimits
from workers.jobs import maintain_outboxes
from workers.replay import replay_dead_letters, replay_history


def worker_settings(settings: Settings | None = None, *, data_plane: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (``Worker(**worker_settings())``). ``data_plane=False``
    runs the jobs only (replay, maintenance), without joining the fleet that relays partitions."""
    settings = settings or Settings.from_env()

    async def startup(ctx: dict[str, Any]) -> None:
        outages: Outages = ctx.setdefault("outages", Outages())
        store = await _control_store(settings, outages)
        events = ControlEvents(settings.database_url, timeout_s=settings.connect_timeout_s)
        events.start()
        policy = AddressPolicy(allow_private=settings.allow_private_networks, extra_denied=settings.denied_networks)
        tenants = TenantConnections(
            policy=policy,
            timeout_s=settings.connect_timeout_s,
            pool_size=settings.tenant_pool_size,
            session=SessionLimits.of(settings),
        )

        async def factory(target: Target, password: str | None) -> Publisher:
            # the adapter checks the target's addresses at every connect, and dials only those
            return await open_publisher(target, password=password, policy=policy)

        publishers = PublisherCache(factory)
        runner = RelayRunner(
            settings=settings,
            store=store,
            secrets=SecretBox(settings.secret_keys),
            tenants=tenants,
            publishers=publishers,
            events=events,
        )
        fleet = FleetEngine(settings=settings, runner=runner, fleet=FleetStore(store.pool), outages=outages)
        if data_plane:
            fleet.start()
        # every worker takes part; the advisory lock and the mark make it one evaluation per interval
        alerts = AlertEvaluator(settings=settings, store=store, secrets=SecretBox(settings.secret_keys), policy=policy)
        alerts.start()
        ctx.update(
            store=store,
            events=events,
            tenants=tenants,
            publishers=publishers,
            worker_id=settings.worker_id,
            policy=policy,
            secrets=SecretBox(settings.secret_keys),
            runner=runner,
            fleet=fleet,
            alerts=alerts,
            settings=settings,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        for name in ("alerts", "fleet", "publishers", "tenants", "events", "store"):
            if name in ctx:
                await ctx[name].close()

    return {**_arq_options(settings), "on_startup": startup, "on_shutdown": shutdown}


async def _control_store(settings: Settings, outages: Outages) -> ControlStore:
    """The worker's control-DB store, once the control DB answers (waited for, however long it is
    down at start-up)."""
    # no connection floor (min_size=0): asyncpg logs a traceback each time it fails to restore one
    # one connection of the control-pool budget is the LISTEN of configuration changes
    store = await ControlStore.connect(settings.database_url, min_size=0, max_size=settings.control_pool_size - 1)
    failures = 0
    while True:
        try:
            await store.ping()
            break
        except Exception as exc:
            if not control_unavailable(exc):
                raise
            failures += 1
            outages.down(CONTROL_DB, exc)
            await asyncio.sleep(min(5.0, 0.2 * 2**failures))
    outages.up(CONTROL_DB)
    return store


def _arq_options(settings: Settings) -> dict[str, Any]:
    """arq's options for the worker: its jobs, its cron, its queue and limits."""
    return {
        "functions": [
            func(replay_dead_letters, name="replay_dead_letters", keep_result=0, max_tries=1, timeout=3600),
            func(replay_history, name="replay_history", keep_result=0, max_tries=1, timeout=3600),
        ],
        # arq derives a cron run's job id from the cron's name and time alone, and job ids are
        # global to the Redis database: two deployments on different queues sharing a Redis
        # would take each other's ticks. The queue name in the cron's name keeps them apart.
        "cron_jobs": [
            cron(
                maintain_outboxes,
                name=f"maintain_outboxes:{settings.queue_name}",
                second=0,
                run_at_startup=True,
                keep_result=0,
                timeout=300,
            ),
        ],
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        "job_timeout": settings.slice_s + 60,
        "keep_result": 0,
        "max_tries": 1,
        "poll_delay": 0.2,
        "handle_signals": True,
        "health_check_interval": 10,
    }
