"""The relay engine: one bounded time slice of poll → publish → advance cursor for one partition.

A slice runs under a fenced lease (``ControlStore.acquire_lease``): a background task renews it,
every cursor write carries the epoch, and the slice stops as soon as the lease is lost, so a worker
that wakes up late cannot move a cursor it no longer owns.

The read is write-free (``outbox_relay.tenant.sql.poll_sql``): rows below the tenant DB's xmin
horizon, after the cursor ``(txid, id)``, in order. The cursor moves only past rows the broker
acknowledged (or rows no topic mapping routes), so nothing committed is ever skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from outbox_relay.brokers.base import OutgoingMessage, Publisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Database, Relay, Target, route
from outbox_relay.errors import AddressNotAllowed, MessageRejected, TargetUnavailable, TenantDatabaseError
from outbox_relay.netguard import AddressPolicy
from outbox_relay.store.control import ControlStore, Lease, RelayPlan
from outbox_relay.tenant import db as tenant_db
from outbox_relay.tenant.sql import notify_channel

log = logging.getLogger("outbox_relay.engine")

PublisherFactory = Callable[[Target, str | None], Awaitable[Publisher]]


def backoff_s(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30))))


# --- tenant database connections and wake-ups --------------------------------------------------


@dataclass
class _TenantDb:
    version: datetime
    pool: asyncpg.Pool
    waiters: set[asyncio.Event] = field(default_factory=set)
    listener: asyncio.Task[None] | None = None


class TenantConnections:
    """Per-worker pools to tenant databases, plus one LISTEN connection per database that wakes
    every waiting partition of that database when an insert commits."""

    def __init__(self, *, policy: AddressPolicy, timeout_s: float) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self._dbs: dict[uuid.UUID, _TenantDb] = {}
        self._lock = asyncio.Lock()

    async def pool(self, database_id: uuid.UUID, version: datetime, db: Database, password: str | None) -> asyncpg.Pool:
        async with self._lock:
            entry = self._dbs.get(database_id)
            if entry is not None and entry.version == version:
                return entry.pool
            if entry is not None:
                await self._drop(database_id)
            try:
                pool = await tenant_db.create_pool(db, password, policy=self.policy, timeout_s=self.timeout_s)
            except AddressNotAllowed:
                raise
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise TenantDatabaseError(f"cannot connect to the database: {tenant_db.describe(exc)}") from None
            entry = _TenantDb(version=version, pool=pool)
            entry.listener = asyncio.create_task(self._listen(entry, db, password))
            self._dbs[database_id] = entry
            return pool

    @contextlib.asynccontextmanager
    async def waiter(self, database_id: uuid.UUID) -> AsyncIterator[asyncio.Event]:
        event = asyncio.Event()
        entry = self._dbs.get(database_id)
        if entry is not None:
            entry.waiters.add(event)
        try:
            yield event
        finally:
            if entry is not None:
                entry.waiters.discard(event)

    async def _listen(self, entry: _TenantDb, db: Database, password: str | None) -> None:
        """Keep one LISTEN connection open; polling covers the gaps while it reconnects."""
        attempt = 0
        channel = notify_channel(db.schema)

        def wake(*_: Any) -> None:
            for event in list(entry.waiters):
                event.set()

        while True:
            try:
                conn = await tenant_db.connect(db, password, policy=self.policy, timeout_s=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - any failure: retry later, polling goes on
                log.debug("LISTEN connection failed: %s", exc)
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, base_s=0.5, cap_s=30))
                continue
            attempt = 0
            try:
                await conn.add_listener(channel, wake)
                wake()  # catch what was inserted while we were not listening
                while not conn.is_closed():
                    await asyncio.sleep(5)
                    await conn.fetchval("SELECT 1", timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001
                log.debug("LISTEN connection lost: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), timeout=2)

    async def _drop(self, database_id: uuid.UUID) -> None:
        entry = self._dbs.pop(database_id, None)
        if entry is None:
            return
        if entry.listener:
            entry.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry.listener
        with contextlib.suppress(Exception):
            await asyncio.wait_for(entry.pool.close(), timeout=5)

    async def close(self) -> None:
        for database_id in list(self._dbs):
            await self._drop(database_id)


class PublisherCache:
    """One publisher per target and target version, shared by the partitions a worker runs."""

    def __init__(self, factory: PublisherFactory) -> None:
        self.factory = factory
        self._publishers: dict[uuid.UUID, tuple[datetime, Publisher]] = {}
        self._lock = asyncio.Lock()

    async def get(self, target_id: uuid.UUID, version: datetime, target: Target, password: str | None) -> Publisher:
        async with self._lock:
            cached = self._publishers.get(target_id)
            if cached is not None and cached[0] == version:
                return cached[1]
            if cached is not None:
                self._publishers.pop(target_id)
                with contextlib.suppress(Exception):
                    await cached[1].close()
            publisher = await self.factory(target, password)
            self._publishers[target_id] = (version, publisher)
            return publisher

    async def discard(self, target_id: uuid.UUID) -> None:
        async with self._lock:
            cached = self._publishers.pop(target_id, None)
        if cached is not None:
            with contextlib.suppress(Exception):
                await cached[1].close()

    async def close(self) -> None:
        for target_id in list(self._publishers):
            await self.discard(target_id)


# --- the slice ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SliceResult:
    outcome: str
    """``ran``, ``busy`` (another holder has the lease), ``gone`` (relay deleted or disabled),
    ``lost`` (the lease was taken over mid-slice)."""
    published: int = 0
    skipped: int = 0


class LeaseLost(Exception):
    pass


def build_messages(plan_relay: Relay, relay_name: str, rows: list[tenant_db.OutboxRow]) -> list[OutgoingMessage | None]:
    """One OutgoingMessage per row, or None for rows the topic mapping does not route."""
    out: list[OutgoingMessage | None] = []
    for row in rows:
        destination = route(plan_relay.topic_mapping, row.topic)
        if destination is None:
            out.append(None)
            continue
        try:
            headers = msgspec.json.decode(row.headers, type=dict[str, str])
        except msgspec.ValidationError:
            raw = msgspec.json.decode(row.headers)
            headers = {str(k): v if isinstance(v, str) else msgspec.json.encode(v).decode() for k, v in raw.items()}
        headers.update({"outbox-id": str(row.id), "outbox-topic": row.topic, "outbox-relay": relay_name})
        out.append(OutgoingMessage(id=row.id, destination=destination, key=row.key, payload=row.payload, headers=headers))
    return out


class RelayRunner:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ControlStore,
        secrets: SecretBox,
        tenants: TenantConnections,
        publishers: PublisherCache,
    ) -> None:
        self.settings = settings
        self.store = store
        self.secrets = secrets
        self.tenants = tenants
        self.publishers = publishers

    def _decrypt(self, token: bytes | None) -> str | None:
        return self.secrets.decrypt(token) if token else None

    async def run_slice(self, relay_id: uuid.UUID, partition: int, holder: str) -> SliceResult:
        plan = await self.store.relay_plan(relay_id)
        if plan is None or not plan.enabled:
            return SliceResult("gone")
        lease = await self.store.acquire_lease(relay_id, partition, holder, self.settings.lease_ttl_s)
        if lease is None:
            return SliceResult("busy")
        lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(lease, lost))
        work = asyncio.create_task(self._run(plan, lease))
        try:
            lost_wait = asyncio.create_task(lost.wait())
            done, _ = await asyncio.wait({work, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            lost_wait.cancel()
            if work in done:
                return work.result()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            return SliceResult("lost")
        except LeaseLost:
            return SliceResult("lost")
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
            if not lost.is_set():
                with contextlib.suppress(Exception):
                    await self.store.release_lease(lease)

    async def _keep_lease(self, lease: Lease, lost: asyncio.Event) -> None:
        interval = self.settings.lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await self.store.renew_lease(lease, self.settings.lease_ttl_s)
            except Exception as exc:  # noqa: BLE001 - the control DB hiccuped; the fence still holds
                log.warning("lease renewal failed: %s", exc)
                continue
            if not ok:
                log.warning("lease lost: relay %s partition %s", lease.relay_id, lease.partition)
                lost.set()
                return

    async def _run(self, plan: RelayPlan, lease: Lease) -> SliceResult:
        relay = msgspec.json.decode(plan.relay_spec, type=Relay)
        database = msgspec.json.decode(plan.database_spec, type=Database)
        target: Target = msgspec.json.decode(plan.target_spec, type=Target)  # type: ignore[arg-type]
        policy = relay.policy
        deadline = time.monotonic() + self.settings.slice_s
        cursor = (lease.cursor_txid, lease.cursor_id)
        published = skipped = 0
        failures = 0

        async def pause(reason: str) -> None:
            nonlocal failures
            failures += 1
            with contextlib.suppress(Exception):
                await self.store.record_error(lease, reason)
            delay = backoff_s(failures, base_s=policy.backoff_base_ms / 1000, cap_s=policy.backoff_max_ms / 1000)
            await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))

        while time.monotonic() < deadline:
            try:
                pool = await self.tenants.pool(
                    plan.database_id, plan.database_version, database, self._decrypt(plan.database_secret)
                )
                async with self.tenants.waiter(plan.database_id) as woken:
                    rows = await self._poll(pool, database, cursor, plan, lease, policy.batch_size)
                    if not rows:
                        remaining = deadline - time.monotonic()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(woken.wait(), timeout=min(policy.poll_interval_ms / 1000, remaining))
                        continue
                publisher = await self.publishers.get(
                    plan.target_id, plan.target_version, target, self._decrypt(plan.target_secret)
                )
                messages = build_messages(relay, plan.relay_name, rows)
                sendable = [m for m in messages if m is not None]
                result = await publisher.publish_batch(sendable) if sendable else None
                acked = result.acked if result else 0
                # advance past every row up to (not including) the first unacknowledged message
                sent = 0
                last = None
                for row, message in zip(rows, messages, strict=True):
                    if message is not None:
                        if sent >= acked:
                            break
                        sent += 1
                    else:
                        skipped += 1
                    last = row
                if last is not None:
                    if not await self.store.advance_cursor(lease, last.txid, last.id, sent):
                        raise LeaseLost()
                    cursor = (last.txid, last.id)
                    published += sent
                    failures = 0
                if result is not None and result.rejected is not None:
                    await pause(f"message refused by the target: {result.rejected}")
            except TargetUnavailable as exc:
                await self.publishers.discard(plan.target_id)
                await pause(f"target unavailable: {exc}")
            except (TenantDatabaseError, AddressNotAllowed) as exc:
                await pause(str(exc))
            except MessageRejected as exc:
                await pause(f"message refused by the target: {exc}")
        return SliceResult("ran", published=published, skipped=skipped)

    async def _poll(
        self,
        pool: asyncpg.Pool,
        database: Database,
        cursor: tuple[int, int],
        plan: RelayPlan,
        lease: Lease,
        limit: int,
    ) -> list[tenant_db.OutboxRow]:
        try:
            return await tenant_db.poll(
                pool, database.schema, cursor=cursor, partitions=plan.partitions, partition=lease.partition, limit=limit
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise TenantDatabaseError(f"reading the outbox failed: {tenant_db.describe(exc)}") from None
