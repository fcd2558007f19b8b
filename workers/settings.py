"""arq ``WorkerSettings`` built from :class:`outbox_relay.config.Settings`."""

from __future__ import annotations

from typing import Any

from arq import cron, func
from arq.connections import RedisSettings

from outbox_relay.brokers.base import Publisher
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Target
from outbox_relay.engine import PublisherCache, RelayRunner, TenantConnections
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore
from workers.jobs import maintain_outboxes, relay_partition, schedule
from workers.replay import replay_dead_letters


def worker_settings(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (``Worker(**worker_settings())``)."""
    settings = settings or Settings.from_env()

    async def startup(ctx: dict[str, Any]) -> None:
        store = await ControlStore.connect(settings.database_url, max_size=20)
        policy = AddressPolicy(allow_private=settings.allow_private_networks, extra_denied=settings.denied_networks)
        tenants = TenantConnections(policy=policy, timeout_s=settings.connect_timeout_s)

        async def factory(target: Target, password: str | None) -> Publisher:
            # the adapter checks the target's addresses at every connect, and dials only those
            return await open_publisher(target, password=password, policy=policy)

        publishers = PublisherCache(factory)
        ctx.update(
            store=store,
            tenants=tenants,
            publishers=publishers,
            worker_id=settings.worker_id,
            policy=policy,
            secrets=SecretBox(settings.secret_keys),
            runner=RelayRunner(
                settings=settings,
                store=store,
                secrets=SecretBox(settings.secret_keys),
                tenants=tenants,
                publishers=publishers,
            ),
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        for name in ("publishers", "tenants", "store"):
            if name in ctx:
                await ctx[name].close()

    seconds = max(1, int(settings.schedule_interval_s))
    return {
        "functions": [
            func(relay_partition, name="relay_partition", keep_result=0, max_tries=1),
            func(replay_dead_letters, name="replay_dead_letters", keep_result=0, max_tries=1, timeout=3600),
        ],
        # arq derives a cron run's job id from the cron's name and time alone, and job ids are
        # global to the Redis database: two deployments on different queues sharing a Redis
        # would take each other's ticks. The queue name in the cron's name keeps them apart.
        "cron_jobs": [
            cron(
                schedule,
                name=f"schedule:{settings.queue_name}",
                second=set(range(0, 60, seconds)),
                run_at_startup=True,
                keep_result=0,
            ),
            cron(
                maintain_outboxes,
                name=f"maintain_outboxes:{settings.queue_name}",
                second=0,
                run_at_startup=True,
                keep_result=0,
                timeout=300,
            ),
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
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
