"""The arq worker, made to ride out its Redis going away.

arq 0.28's main loop has no error handling of its own: a Redis restart raises
``redis.exceptions.ConnectionError`` out of ``Worker.main`` and the process exits, and a Redis that is
down at start-up ends it after five tries. :class:`RelayWorker` keeps arq (its polling, cron, health
check, signal handling) and adds what a long-lived service needs: a poll iteration that fails on
Redis backs off and tries again (redis-py reconnects on the next command), start-up waits for Redis
however long it takes, and shutdown does not fail on a Redis that is gone. One log line per outage
(:class:`outbox_relay.outages.Outages`), not one per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

from arq.connections import create_pool
from arq.worker import Worker
from redis.exceptions import RedisError

from outbox_relay.outages import Outages

REDIS = "arq's Redis"
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 5.0


class RelayWorker(Worker):
    def __init__(self, *args: Any, outages: Outages | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outages = outages or Outages()
        self._failures = 0

    async def main(self) -> None:
        while self._pool is None:
            try:
                self._pool = await create_pool(
                    self.redis_settings,
                    job_deserializer=self.job_deserializer,
                    job_serializer=self.job_serializer,
                    default_queue_name=self.queue_name,
                    expires_extra_ms=self.expires_extra_ms,
                    retry=self.redis_settings.conn_retries if self.redis_settings else 0,  # ours back off
                )
            except (RedisError, OSError) as exc:
                await self._back_off(exc)
        self.outages.up(REDIS)
        self._failures = 0
        await super().main()

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            await self._back_off(exc)
        else:
            if self._failures:
                self._failures = 0
                self.outages.up(REDIS)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's, one job at a time, giving back the job slot arq takes before a Redis call that
        fails (arq would leak it: after enough outages the worker would take no job at all)."""
        for job_id in job_ids:
            if self.job_counter >= self.max_jobs:
                return
            counter = self.job_counter
            try:
                await super().start_jobs([job_id])
            except (RedisError, OSError):
                if self.job_counter > counter:
                    self.job_counter = counter
                    self.sem.release()
                raise

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await super().close()
            return
        # Redis is gone: arq's close stopped at deleting its health key; finish the rest
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        if self._pool is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pool.aclose(close_connection_pool=True)
            self._pool = None

    async def _back_off(self, exc: BaseException) -> None:
        self._failures += 1
        self.outages.down(REDIS, exc)
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(self._failures, 10))
        await asyncio.sleep(random.uniform(0.5, 1.0) * delay)
