"""The relay engine: one bounded time slice of poll → publish → advance cursor for one partition.

A slice runs under a fenced lease (``ControlStore.acquire_lease``): a background task renews it,
every cursor write carries the epoch, and the slice stops as soon as the lease is lost, so a worker
that wakes up late cannot move a cursor it no longer owns.

The read is write-free (``outbox_relay.tenant.sql.poll_sql``): rows below the tenant DB's xmin
horizon, after the cursor ``(txid, id)``, in order. The cursor moves only past rows the broker
acknowledged (or rows no topic mapping routes, or the relay's filter leaves out: those are passed,
the filtered ones counted), so nothing committed is ever skipped.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from outbox_relay.brokers.base import CloudEvent, OutgoingMessage, Publisher, PublishResult
from outbox_relay.brokers.grouped import GroupPublisher, split
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.delivery import DeadLetterNow, DeliveryPolicy, Settled, backoff_s, settle
from outbox_relay.domain import (
    CauseKind,
    CloudEventsOptions,
    Database,
    ErrorClass,
    PartitionErrorClass,
    Relay,
    SliceOutcome,
    Target,
    route,
)
from outbox_relay.errors import AddressNotAllowed, TargetUnavailable, TenantDatabaseError
from outbox_relay.errors import LeaseLost as LeaseLost
from outbox_relay.filters import Predicate, shared_filter
from outbox_relay.netguard import AddressPolicy
from outbox_relay.specs import usable_database, usable_target
from outbox_relay.store.alerts import record_lease_losses
from outbox_relay.store.control import (
    ControlStore,
    Lease,
    RelayPlan,
    RestoreState,
    RetryState,
    control_unavailable,
)
from outbox_relay.store.dead_letters import NewLetter
from outbox_relay.store.events import ControlEvents
from outbox_relay.tasks import cancel_and_wait
from outbox_relay.telemetry import PendingSample, instruments, labels
from outbox_relay.tenant import db as tenant_db
from outbox_relay.tenant.sql import newest_sql, notify_channel, quote_ident

log = logging.getLogger("outbox_relay.engine")
tracer = trace.get_tracer("outbox_relay.engine")
_propagator = TraceContextTextMapPropagator()
PENDING_CHECK_S = 5.0
LISTEN_PROBE_S = 15.0
"""How often a LISTEN connection reads the outbox's newest row: it finds a connection that died
silently, and wakes the database's readers when something was committed that no notification told."""
STALL_AFTER_S = 5.0
MAX_LINKS = 64

PublisherFactory = Callable[[Target, str | None], Awaitable[Publisher]]


# --- tenant database connections and wake-ups --------------------------------------------------


def parse_buckets(payload: str) -> list[int] | None:
    """The buckets an insert notification names, or None for "any" (empty or unreadable)."""
    if not payload:
        return None
    try:
        return [int(b) for b in payload.split(",")]
    except ValueError:
        return None


BucketCallback = Callable[[list[int] | None], None]
"""Called with the buckets a committed insert wrote (None: any, e.g. after a LISTEN reconnect)."""


@dataclass
class _Server:
    """One pool per tenant server, database and credentials, shared by every resource naming them."""

    pool: tenant_db.Pool
    users: set[uuid.UUID] = field(default_factory=set)


@dataclass
class _TenantDb:
    version: datetime
    server: tuple[str, str | None]
    db: Database
    password: str | None
    secret_version: int = 0
    """The credential version ``password`` is (:mod:`outbox_relay.rotation` moves it)."""
    waiters: dict[asyncio.Event, tuple[int, int]] = field(default_factory=dict)
    """Each waiting partition's event, with its relay's (partitions, partition)."""
    watchers: dict[int, BucketCallback] = field(default_factory=dict)
    hot: set[int] = field(default_factory=set)
    """Watchers that read on their own, paced, as long as their reads find rows: when every
    watcher is hot (and no partition waits), the LISTEN connection stops listening."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when ``watchers``, ``waiters`` or ``hot`` changed: the LISTEN task looks again."""
    listener: asyncio.Task[None] | None = None
    listening: bool = False
    """True while the LISTEN connection is up: polling can then be rare."""
    up: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while :attr:`listening` (what a rotation waits for before it stops the old connection)."""

    def mute(self) -> bool:
        """Whether nobody needs the notifications now."""
        return bool(self.watchers) and not self.waiters and self.hot.issuperset(self.watchers)


class Watch:
    """A watcher of a database's inserts (:meth:`TenantConnections.watch`): ``hot(True)`` while its
    reads keep finding rows and it reads on its own; calling it stops watching."""

    __slots__ = ("_entry", "_token")

    def __init__(self, entry: _TenantDb | None, token: int) -> None:
        self._entry, self._token = entry, token

    def hot(self, hot: bool) -> None:
        entry = self._entry
        if entry is None or (self._token in entry.hot) == hot:
            return
        if hot:
            entry.hot.add(self._token)
        else:
            entry.hot.discard(self._token)
        entry.changed.set()

    def __call__(self) -> None:
        entry = self._entry
        if entry is not None:
            entry.watchers.pop(self._token, None)
            entry.hot.discard(self._token)
            entry.changed.set()


def _waker(entry: _TenantDb) -> Callable[..., None]:
    """The LISTEN callback of a tenant database: wake the readers whose partitions a notification
    names (all of them for a notification without buckets, or when called with none)."""

    def wake(_conn: Any = None, _pid: int = 0, _channel: str = "", payload: str = "") -> None:
        buckets = parse_buckets(payload)
        for event, (partitions, partition) in list(entry.waiters.items()):
            if buckets is None or any(b % partitions == partition for b in buckets):
                event.set()
        for callback in list(entry.watchers.values()):
            callback(buckets)

    return wake


class TenantConnections:
    """Per-worker pools to tenant databases, plus one LISTEN connection per database that wakes
    the waiting partitions (or relay readers) of that database that read a bucket an insert wrote,
    when it commits.

    Pools are keyed by server, database and credentials, small (``pool_size``, 2 by default), and
    closed when no database resource uses them any more (:meth:`release`): a worker holds
    connections only where it owns partitions."""

    def __init__(
        self,
        *,
        policy: AddressPolicy,
        timeout_s: float,
        pool_size: int = 2,
        session: tenant_db.SessionLimits = tenant_db.DEFAULT_SESSION,
    ) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        self.session = session
        self._dbs: dict[uuid.UUID, _TenantDb] = {}
        self._servers: dict[tuple[str, str | None], _Server] = {}
        self._lock = asyncio.Lock()
        self._watch_ids = itertools.count()
        self._retiring: set[asyncio.Task[None]] = set()
        """Old pools and LISTEN connections of a rotated credential, closing."""

    async def pool(
        self,
        database_id: uuid.UUID,
        version: datetime,
        db: Database,
        password: str | None,
        *,
        secret_version: int = 0,
    ) -> tenant_db.Pool:
        """The pool of the database at spec ``version``; opened with ``password`` (credential version
        ``secret_version``) when the worker has none open at that version. A pool switched to a
        rotated credential since (:meth:`rotate`) is returned as it is."""
        entry = self._dbs.get(database_id)
        if entry is not None and entry.version == version:  # the common case: no waiting
            return self._servers[entry.server].pool
        async with self._lock:
            entry = self._dbs.get(database_id)
            if entry is not None and entry.version == version:
                return self._servers[entry.server].pool
            if entry is not None:
                await self._drop(database_id)
            usable_database(db)  # a spec stored before a check existed never reaches asyncpg
            key = (db.dsn, password)
            server = self._servers.get(key)
            if server is None:
                server = self._servers[key] = _Server(pool=await self._open_pool(db, password))
            server.users.add(database_id)
            entry = _TenantDb(version=version, server=key, db=db, password=password, secret_version=secret_version)
            entry.listener = asyncio.create_task(self._listen(entry, db, password))
            self._dbs[database_id] = entry
            return server.pool

    async def _open_pool(self, db: Database, password: str | None) -> tenant_db.Pool:
        try:
            return await tenant_db.create_pool(
                db,
                password,
                policy=self.policy,
                timeout_s=self.timeout_s,
                max_size=self.pool_size,
                session=self.session,
            )
        except AddressNotAllowed:
            raise
        except tenant_db.DRIVER_ERRORS as exc:
            raise TenantDatabaseError(f"cannot connect to the database: {tenant_db.describe(exc)}") from None

    def in_use(self) -> dict[uuid.UUID, int]:
        """The databases this worker has open, with the credential version each uses."""
        return {database_id: entry.secret_version for database_id, entry in self._dbs.items()}

    async def rotate(
        self, database_id: uuid.UUID, secret_version: int, password: str | None, db: Database | None = None
    ) -> bool:
        """Switch the database's pool and LISTEN connection to ``password`` (credential version
        ``secret_version``; ``db``: the spec with the user it goes with, when that changes too),
        make-before-break: the new pool opens a connection first (a refused
        password raises TenantDatabaseError and leaves the old pool in use), readers get the new
        pool from their next read, and the old one closes once the reads in flight gave their
        connections back (asyncpg's graceful close). False when the worker does not have it open."""
        async with self._lock:
            entry = self._dbs.get(database_id)
            if entry is None:
                return False
            if entry.secret_version == secret_version and entry.password == password:
                return True
            db = db or entry.db
            usable_database(db)
            key = (db.dsn, password)
            if key == entry.server:  # the same password under a new version (a rotation cancelled)
                entry.secret_version = secret_version
                return True
            server = self._servers.get(key)
            if server is None:
                pool = await self._open_pool(db, password)
                try:
                    async with asyncio.timeout(self.timeout_s + 1):
                        await pool.execute("SELECT 1")  # the credential works; the connection stays pooled
                except tenant_db.DRIVER_ERRORS as exc:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pool.close(), timeout=5)
                    raise TenantDatabaseError(f"cannot connect to the database: {tenant_db.describe(exc)}") from None
                server = self._servers[key] = _Server(pool=pool)
            server.users.add(database_id)
            old_key, old_listener = entry.server, entry.listener
            entry.server, entry.password, entry.secret_version, entry.db = key, password, secret_version, db
            entry.up.clear()
            entry.listener = asyncio.create_task(self._listen(entry, db, password))
            self._retire(database_id, old_key, old_listener)
            return True

    def _retire(self, database_id: uuid.UUID, key: tuple[str, str | None], listener: asyncio.Task[None] | None) -> None:
        """After a switch: stop the old LISTEN connection once the new one listens, and close the old
        pool (gracefully) when no other resource shares it."""
        old = self._servers.get(key)
        if old is not None:
            old.users.discard(database_id)
            if not old.users and key not in (e.server for e in self._dbs.values()):
                self._servers.pop(key, None)
            else:
                old = None

        async def retire() -> None:
            entry = self._dbs.get(database_id)
            if entry is not None:  # the old LISTEN connection goes once the new one listens
                await wait_event(entry.up, self.timeout_s + 5)
            await cancel_and_wait(listener)
            if old is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(old.pool.close(), timeout=30)
                old.pool.terminate()

        task = asyncio.create_task(retire(), name="retire-credential")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def listening(self, database_id: uuid.UUID) -> bool:
        entry = self._dbs.get(database_id)
        return entry is not None and entry.listening

    @contextlib.asynccontextmanager
    async def waiter(self, database_id: uuid.UUID, partitions: int, partition: int) -> AsyncIterator[asyncio.Event]:
        """An event set when a committed insert wrote a bucket that ``partition`` (of ``partitions``)
        reads, or when the LISTEN connection (re)starts."""
        event = asyncio.Event()
        entry = self._dbs.get(database_id)
        if entry is not None:
            entry.waiters[event] = (partitions, partition)
            entry.changed.set()
        try:
            yield event
        finally:
            if entry is not None:
                entry.waiters.pop(event, None)

    def watch(self, database_id: uuid.UUID, callback: BucketCallback) -> Watch:
        """Call ``callback`` with the buckets of every committed insert into the database (after
        :meth:`pool` opened it), and with None when the LISTEN connection (re)starts listening;
        returns the :class:`Watch` (call it to stop watching)."""
        entry = self._dbs.get(database_id)
        token = next(self._watch_ids)
        if entry is not None:
            entry.watchers[token] = callback
            entry.changed.set()
        return Watch(entry, token)

    async def release(self, database_id: uuid.UUID) -> None:
        """This worker no longer reads the database: close its LISTEN connection, and its pool once
        no other resource shares it."""
        async with self._lock:
            await self._drop(database_id)

    async def _listen(self, entry: _TenantDb, db: Database, password: str | None) -> None:
        """Keep one LISTEN connection open; polling covers the gaps while it reconnects."""
        attempt = 0
        channel = notify_channel(db.schema)
        wake = _waker(entry)
        while True:
            try:
                conn = await tenant_db.connect(
                    db, password, policy=self.policy, timeout_s=self.timeout_s, session=self.session
                )
            except Exception as exc:
                log.debug("LISTEN connection failed: %s", exc)
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, base_s=0.5, cap_s=30))
                continue
            try:
                await conn.add_listener(channel, wake)
                entry.listening = True
                if entry.listener is asyncio.current_task():
                    entry.up.set()
                wake()  # catch what was inserted while we were not listening
                newest = await conn.fetchrow(newest_sql(db.schema), timeout=self.timeout_s)
                attempt = 0  # listening and probing: a failure from here on is a new outage
                await self._listening(entry, conn, db, wake, newest)
                attempt += 1  # the server closed it: the next connection waits its turn as well
            except Exception as exc:
                # a connection that opens and then fails at once (the outbox table is missing, the
                # role lost its grants) backs off like one that does not open: it reconnected in a
                # busy loop, about 1,400 sessions a second against the tenant's database
                log.debug("LISTEN connection lost: %s", exc)
                attempt += 1
            finally:
                if entry.listener is asyncio.current_task():  # not the one a rotation replaced
                    entry.listening = False
                    entry.up.clear()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await conn.close()
            if attempt:
                await asyncio.sleep(backoff_s(attempt, base_s=0.5, cap_s=30))

    async def _listening(
        self, entry: _TenantDb, conn: Any, db: Database, wake: Callable[..., None], newest: Any
    ) -> None:
        """Serve an open LISTEN connection until its socket closes (at once) or a probe fails (a
        silent one): mute and unmute it as the readers ask, and probe the newest row now and then."""
        channel = notify_channel(db.schema)
        muted = False
        probe_at = time.monotonic() + LISTEN_PROBE_S
        while not conn.is_closed():
            await wait_event(entry.changed, max(0.0, probe_at - time.monotonic()))
            entry.changed.clear()
            if entry.mute() != muted:
                # every reader of the database reads on its own while its reads find rows (a
                # notification per commit would only wake it sooner than its pace); once one
                # wants them again, LISTEN, then wake them all: what was committed in between
                # is read after the LISTEN took effect
                muted = not muted
                if muted:
                    await conn.remove_listener(channel, wake)
                else:
                    await conn.add_listener(channel, wake)
                    wake()
            if time.monotonic() < probe_at:
                continue
            probe_at = time.monotonic() + LISTEN_PROBE_S
            # the probe is also the safety net of the wake-ups: a row committed since the last
            # probe wakes every reader of the database (one index probe per database, instead
            # of each relay polling its outbox)
            now = await conn.fetchrow(newest_sql(db.schema), timeout=self.timeout_s)
            if now != newest:
                newest = now
                wake()

    async def _drop(self, database_id: uuid.UUID) -> None:
        entry = self._dbs.pop(database_id, None)
        if entry is None:
            return
        await cancel_and_wait(entry.listener)
        server = self._servers.get(entry.server)
        if server is not None:
            server.users.discard(database_id)
            if not server.users:
                self._servers.pop(entry.server, None)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.pool.close(), timeout=5)

    async def close(self) -> None:
        for database_id in list(self._dbs):
            await self._drop(database_id)
        for task in list(self._retiring):
            await cancel_and_wait(task)


@dataclass(slots=True)
class _Cached:
    version: datetime
    secret_version: int
    target: Target
    publisher: Publisher


class PublisherCache:
    """One publisher per target and target version, shared by the partitions a worker runs.

    Each is a :class:`~outbox_relay.brokers.grouped.GroupPublisher`: the batches its partitions hand
    it in one event-loop turn go to the broker in one round trip. A cached publisher is returned
    without waiting; connecting a new one waits only for that
    target (a lock per target), so a worker that meets 200 new targets at once connects them side
    by side instead of making every partition of every target queue behind each connect."""

    def __init__(self, factory: PublisherFactory) -> None:
        self.factory = factory
        self._publishers: dict[uuid.UUID, _Cached] = {}
        self._locks: dict[uuid.UUID, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    async def get(
        self,
        target_id: uuid.UUID,
        version: datetime,
        target: Target,
        password: str | None,
        *,
        secret_version: int = 0,
    ) -> Publisher:
        """The target's publisher at spec ``version``; connected with ``password`` (credential version
        ``secret_version``) when there is none at that version. One switched to a rotated credential
        since (:meth:`rotate`) is returned as it is."""
        cached = self._publishers.get(target_id)
        if cached is not None and cached.version == version:
            return cached.publisher
        async with self._locks.setdefault(target_id, asyncio.Lock()):
            cached = self._publishers.get(target_id)
            if cached is not None and cached.version == version:
                return cached.publisher
            if cached is not None:
                self._publishers.pop(target_id)
                with contextlib.suppress(Exception):
                    await cached.publisher.close()
            usable_target(target)  # before the factory resolves any of its hosts
            publisher = GroupPublisher(await self.factory(target, password))
            self._publishers[target_id] = _Cached(version, secret_version, target, publisher)
            return publisher

    def has(self, target_id: uuid.UUID) -> bool:
        return target_id in self._publishers

    def in_use(self) -> dict[uuid.UUID, int]:
        """The targets this worker has a publisher of, with the credential version each uses."""
        return {target_id: cached.secret_version for target_id, cached in self._publishers.items()}

    async def rotate(
        self, target_id: uuid.UUID, secret_version: int, password: str | None, target: Target | None = None
    ) -> bool:
        """Switch the target's publisher to ``password`` (credential version ``secret_version``;
        ``target``: the spec with the user it goes with, when that changes too), make-before-break:
        the new one connects (and authenticates) first, a refusal raises TargetUnavailable and leaves
        the old one in use; batches handed to the old one are answered by it before it closes. False
        when the worker has no publisher of the target."""
        async with self._locks.setdefault(target_id, asyncio.Lock()):
            cached = self._publishers.get(target_id)
            if cached is None:
                return False
            if cached.secret_version == secret_version:
                return True
            target = target or cached.target
            usable_target(target)
            publisher = GroupPublisher(await self.factory(target, password))
            self._publishers[target_id] = _Cached(cached.version, secret_version, target, publisher)
        old = cached.publisher

        async def retire() -> None:
            if isinstance(old, GroupPublisher):
                await old.drain(cached.target.timeout_ms / 1000 + 1)
            with contextlib.suppress(Exception):
                await old.close()

        task = asyncio.create_task(retire(), name="retire-publisher")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def discard(self, target_id: uuid.UUID) -> None:
        async with self._locks.setdefault(target_id, asyncio.Lock()):
            cached = self._publishers.pop(target_id, None)
        if cached is not None:
            with contextlib.suppress(Exception):
                await cached.publisher.close()

    async def close(self) -> None:
        for target_id in list(self._publishers):
            await self.discard(target_id)
        for task in list(self._retiring):
            await task


# --- the slice ----------------------------------------------------------------------------------


def pending_sql(schema: str) -> str:
    """Rows after the cursor of one partition (committed, whether or not below the horizon), up to
    100,000, and the oldest one's insert time. $1 txid, $2 id, $3 partitions, $4 partition."""
    return (
        "SELECT count(*) AS pending, min(created_at) AS oldest FROM ("
        f"SELECT created_at FROM {quote_ident(schema)}.outbox "
        "WHERE (txid, id) > ($1::bigint::text::xid8, $2::bigint) AND bucket % $3::int = $4::int LIMIT 100000) s"
    )


# The oldest transaction holding the xmin horizon (pid and age are visible to the monitoring role).
BLOCKER_SQL = (
    "SELECT pid, state, datname, extract(epoch FROM now() - xact_start) AS age_s FROM pg_stat_activity "
    "WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
    "ORDER BY age(backend_xid) DESC LIMIT 1"
)


def traced() -> bool:
    """Whether this process records spans (a tracer provider was installed: ``telemetry.configure``
    with an OTLP exporter, or a test's): the per-batch spans are skipped otherwise, since even the
    API's no-op spans cost a context switch of their own per batch."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def producer_links(messages: list[OutgoingMessage]) -> list[Link]:
    """Links from the publish span to the traces the writers recorded (``traceparent`` headers)."""
    links: list[Link] = []
    seen: set[str] = set()
    for message in messages:
        parent = message.headers.get("traceparent")
        if not parent or parent in seen or len(links) >= MAX_LINKS:
            continue
        seen.add(parent)
        context = trace.get_current_span(_propagator.extract({"traceparent": parent})).get_span_context()
        if context.is_valid:
            links.append(Link(context, {"outbox.id": message.id}))
    return links


IDENTITY_SQL = (
    "SELECT (pg_control_system()).system_identifier::text AS system_identifier, "
    "(pg_control_checkpoint()).timeline_id AS timeline, "
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin"
)


@dataclass
class _Partition:
    """What one slice knows about its partition while it runs."""

    plan: RelayPlan
    lease: Lease
    relay: Relay
    cursor: tuple[int, int]
    retry: RetryState | None
    published: int = 0
    skipped: int = 0
    filtered: int = 0
    """Rows the relay's filter left out that the cursor passed (``skipped`` counts the unrouted ones)."""
    dead: int = 0
    last_poll_empty: bool = False
    identity_checked: bool = False
    """The slice checked the tenant database's identity (its first turn)."""
    pending_checked: float = 0.0
    lease_until: float = 0.0
    """Monotonic time the lease is known to hold until (its last acquire or renewal + TTL)."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the relay's configuration changed (disabled, deleted, edited): finish the batch in
    flight, then end the slice so the next one runs the new plan (or none)."""
    layout: tenant_db.OutboxLayout | None = None
    """The outbox's schema version and id namespace, read at the start of the slice."""
    restore: RestoreState | None = None
    """The last restore this partition detected (its backlog bounds, and whether it is being read)."""
    backlog_batch: list[tuple[int, int]] = field(default_factory=list)
    """``(txid, id)`` of the backlog rows last polled, to count how many the cursor has passed."""

    @functools.cached_property
    def delivery(self) -> DeliveryPolicy:
        """The relay's delivery policy (retries, dead letters, size limit), built once."""
        return DeliveryPolicy(self.relay.policy)

    @functools.cached_property
    def accepts(self) -> Predicate | None:
        """The relay's filter, compiled once per plan (shared by its partitions; None: no filter)."""
        return shared_filter(self.relay.filter)

    @functools.cached_property
    def labels(self) -> dict[str, Any]:
        """The metric labels, built once (the same for every partition of a relay)."""
        return labels(self.plan.tenant_name, self.plan.relay_name, self.plan.target_name)


@dataclass(slots=True)
class OutboxBatch:
    """One partition's rows on their way to the broker (:meth:`RelayRunner.prepare`)."""

    part: _Partition
    rows: list[tenant_db.OutboxRow]
    """The rows this batch settles: up to an over-size one, or only the first while one is retried."""
    messages: list[OutgoingMessage | None]
    """Per row: its message, or None for a row the topic mapping does not route (skipped)."""
    sendable: list[OutgoingMessage]
    too_big: tuple[tenant_db.OutboxRow, OutgoingMessage | None] | None
    """The over-size row that ended the batch: dead-lettered once everything before it is acked."""
    filtered: list[int] = field(default_factory=list)
    """Indexes (ascending) of the rows without a message because the relay's filter left them out."""

    def filtered_within(self, passed: int) -> int:
        """How many of the first ``passed`` rows the filter left out."""
        return bisect.bisect_left(self.filtered, passed) if self.filtered else 0


@dataclass(frozen=True, slots=True)
class SliceResult:
    outcome: str
    """``ran``, ``busy`` (another holder has the lease), ``gone`` (relay deleted or disabled),
    ``lost`` (the lease was taken over mid-slice), ``changed`` (the relay was disabled, deleted
    or edited mid-slice)."""
    published: int = 0
    skipped: int = 0
    filtered: int = 0
    dead: int = 0


async def horizon_stall(pool: tenant_db.Pool) -> dict[str, Any] | None:
    """The transaction holding the xmin horizon back, as the status's stall cause, when it has been
    open for ``STALL_AFTER_S`` or more; None otherwise."""
    blocker = await pool.fetchrow(BLOCKER_SQL)
    if blocker is None or blocker["age_s"] is None or blocker["age_s"] < STALL_AFTER_S:
        return None
    return {
        "cause": CauseKind.LONG_RUNNING_TRANSACTION,
        "pid": blocker["pid"],
        "age_s": round(float(blocker["age_s"]), 1),
        "state": blocker["state"],
        # the horizon is server-wide: the holder may be in another database
        "database": blocker["datname"],
    }


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> None:
    """Return when ``event`` is set or after ``timeout_s`` (None: no timeout). Unlike
    :func:`wait_any`, no task per wait: the fleet's lanes and readers wait this way on every batch."""
    if event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


async def wait_any(events: list[asyncio.Event], timeout_s: float | None) -> None:
    """Return when one of ``events`` is set or after ``timeout_s`` (None: no timeout)."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def restart_reason(part: _Partition, identity: str, xmin: int) -> str | None:
    """Why the partition must start over (a restore or failover of its database), or None."""
    known = part.lease.system_identifier
    in_backlog = part.restore is not None and part.restore.state == "resending"
    if known is not None and known != identity:
        return (
            f"the tenant database changed identity ({known} -> {identity}: restored into a new cluster "
            "or failed over); relaying its outbox again from the start, consumers will see duplicates"
        )
    if part.cursor[0] > 0 and xmin <= part.cursor[0] and not in_backlog:
        # (a backlog's cursor lies above the counter by design: those rows are the backlog)
        return (
            f"the tenant database's transaction ids went backwards (cursor at {part.cursor[0]}, database "
            f"at {xmin}: restored from a backup?); relaying its outbox again from the start, "
            "consumers will see duplicates"
        )
    return None


def plan_keys(plan: RelayPlan) -> tuple[str, str, str]:
    """The configuration-change keys (``store.events``) a running relay listens to."""
    return (f"relays:{plan.relay_id}", f"databases:{plan.database_id}", f"targets:{plan.target_id}")


async def plan_change(store: ControlStore, plan: RelayPlan, changed: asyncio.Event) -> RelayPlan | None:
    """Wait until the relay of ``plan`` is disabled, deleted or edited (its database or target
    included) and return what it is now (None: deleted). ``changed`` is the subscription to
    :func:`plan_keys`; a wake-up that changed nothing (a reconnect, say) costs one plan read."""
    while True:
        await changed.wait()
        changed.clear()
        try:
            now = await store.relay_plan(plan.relay_id)
        except Exception as exc:
            log.debug("re-reading the plan of relay %s failed: %s", plan.relay_id, exc)
            changed.set()
            await asyncio.sleep(0.5)
            continue
        before = (True, plan.relay_version, plan.database_version, plan.target_version)
        if now is None or (now.enabled, now.relay_version, now.database_version, now.target_version) != before:
            return now


def build_messages(
    plan_relay: Relay,
    relay_name: str,
    rows: list[tenant_db.OutboxRow],
    *,
    accepts: Predicate | None = None,
    filtered: list[int] | None = None,
) -> list[OutgoingMessage | None]:
    """One OutgoingMessage per row, or None for rows the topic mapping does not route, rows of a
    restored backlog that was resent (or skipped) on its own (``OutboxRow.fenced``), and rows the
    relay's filter ``accepts`` (compiled once per plan: ``_Partition.accepts``) leaves out, whose
    indexes are appended to ``filtered``."""
    out: list[OutgoingMessage | None] = []
    for index, row in enumerate(rows):
        destination = None if row.fenced else route(plan_relay.topic_mapping, row.topic)
        if destination is None:
            out.append(None)
            continue
        try:
            headers = msgspec.json.decode(row.headers, type=dict[str, str])
        except msgspec.ValidationError:
            raw = msgspec.json.decode(row.headers)
            headers = {str(k): v if isinstance(v, str) else msgspec.json.encode(v).decode() for k, v in raw.items()}
        if accepts is not None and not accepts(row.topic, headers, row.payload):
            out.append(None)
            if filtered is not None:
                filtered.append(index)
            continue
        message_id = row.outgoing_id
        headers.update({"outbox-id": message_id, "outbox-topic": row.topic, "outbox-relay": relay_name})
        out.append(
            OutgoingMessage(
                id=row.id,
                message_id=message_id,
                destination=destination,
                key=row.key,
                payload=row.payload,
                headers=headers,
                cloudevent=None
                if plan_relay.cloudevents is None
                else cloud_event(plan_relay.cloudevents, relay_name, message_id, row.topic, headers, row.created_at),
            )
        )
    return out


def cloud_event(
    options: CloudEventsOptions,
    relay_name: str,
    message_id: str,
    topic: str,
    headers: dict[str, str],
    created_at: datetime | None,
) -> CloudEvent:
    """The CloudEvents attributes of one message (the relay's ``cloudevents`` options): ``id`` the
    message id consumers dedupe on, ``type`` the header the options name or else the outbox topic,
    ``time`` when the row was inserted (None: a dead letter from before the time was kept, now)."""
    event_type = headers.get(options.type_header) if options.type_header else None
    at = created_at if created_at is not None else datetime.now(UTC)
    return CloudEvent(
        id=message_id,
        source=options.source or f"/relays/{relay_name}",
        type=event_type or topic,
        time=at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        datacontenttype=options.data_content_type,
    )


class RelayRunner:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ControlStore,
        secrets: SecretBox,
        tenants: TenantConnections,
        publishers: PublisherCache,
        events: ControlEvents | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.secrets = secrets
        self.tenants = tenants
        self.publishers = publishers
        self.events = events

    def _decrypt(self, token: bytes | None) -> str | None:
        return self.secrets.decrypt(token) if token else None

    async def run_slice(self, relay_id: uuid.UUID, partition: int, holder: str) -> SliceResult:
        plan = await self.store.relay_plan(relay_id)
        if plan is None or not plan.enabled:
            return SliceResult(SliceOutcome.GONE)
        lease = await self.store.acquire_lease(relay_id, partition, holder, self.settings.lease_ttl_s)
        if lease is None:
            return SliceResult(SliceOutcome.BUSY)
        metric_labels = labels(plan.tenant_name, plan.relay_name, plan.target_name)
        instruments().lease_acquired.add(1, metric_labels)
        instruments().leases_held.add(1, metric_labels)
        lost = asyncio.Event()
        part = self._partition(plan, lease)
        keeper = asyncio.create_task(self._keep_lease(part, lost))
        work = asyncio.create_task(self._run_watched(part))
        try:
            lost_wait = asyncio.create_task(lost.wait())
            done, _ = await asyncio.wait({work, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            lost_wait.cancel()
            if work in done:
                return work.result()
            await cancel_and_wait(work)
            instruments().lease_lost.add(1, metric_labels)
            await self._record_lost(relay_id, partition)
            return SliceResult(SliceOutcome.LOST)
        except LeaseLost:
            log.warning("lease lost: relay %s partition %s (a cursor write was fenced)", relay_id, partition)
            instruments().lease_lost.add(1, metric_labels)
            await self._record_lost(relay_id, partition)
            return SliceResult(SliceOutcome.LOST)
        finally:
            instruments().leases_held.add(-1, metric_labels)
            await cancel_and_wait(keeper)
            await cancel_and_wait(work)
            if not lost.is_set():
                with contextlib.suppress(Exception):
                    await self.store.release_lease(lease)

    async def _record_lost(self, relay_id: uuid.UUID, partition: int) -> None:
        """Count the lost lease (the ``lease_lost`` alert's); a control DB that fails here loses the count only."""
        try:
            await record_lease_losses(self.store.pool, [(relay_id, partition)])
        except Exception as exc:
            log.debug("lease loss not recorded: %s", exc)

    def _partition(self, plan: RelayPlan, lease: Lease) -> _Partition:
        return _Partition(
            plan=plan,
            lease=lease,
            relay=msgspec.json.decode(plan.relay_spec, type=Relay),
            cursor=(lease.cursor_txid, lease.cursor_id),
            retry=lease.retry,
            lease_until=time.monotonic() + self.settings.lease_ttl_s,
        )

    async def _keep_lease(self, part: _Partition, lost: asyncio.Event) -> None:
        lease, interval = part.lease, self.settings.lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            try:
                ok = await self.store.renew_lease(lease, self.settings.lease_ttl_s)
            except Exception as exc:
                log.debug("lease renewal failed: %s", exc)  # the worker logs the outage once
                continue
            if not ok:
                log.warning("lease lost: relay %s partition %s", lease.relay_id, lease.partition)
                lost.set()
                return
            part.lease_until = started + self.settings.lease_ttl_s

    async def _run_watched(self, part: _Partition) -> SliceResult:
        """The slice, ended early (after the batch in flight) when the relay's configuration changes."""
        if self.events is None:
            return await self._run(part)
        with self.events.subscribe(plan_keys(part.plan)) as changed:
            watcher = asyncio.create_task(self._watch_plan(part, changed))
            try:
                result = await self._run(part)
            finally:
                await cancel_and_wait(watcher)
        if part.stop.is_set():
            return dataclasses.replace(result, outcome=SliceOutcome.CHANGED)
        return result

    async def _watch_plan(self, part: _Partition, changed: asyncio.Event) -> None:
        await plan_change(self.store, part.plan, changed)
        part.stop.set()

    async def _sleep(self, part: _Partition, seconds: float, *events: asyncio.Event) -> None:
        """Sleep up to ``seconds``; wake early when the slice must stop or one of ``events`` fires."""
        await wait_any([part.stop, *events], max(0.0, seconds))

    async def _fenced(self, part: _Partition, write: Callable[[], Awaitable[bool]]) -> bool:
        """A fenced write that rides out a control-DB blip: retried with backoff while the lease is
        known to hold, so a batch the broker took is not sent again because the cursor write met a
        restarting control DB. While the control DB is down nobody can take the lease over; past its
        expiry another worker may have, and the fence (holder, epoch) decides."""
        attempt = 0
        while True:
            try:
                return await write()
            except Exception as exc:
                if not control_unavailable(exc) or time.monotonic() >= part.lease_until:
                    raise
                attempt += 1
                log.debug("fenced write failed (attempt %d), retrying: %s", attempt, exc)
                delay = backoff_s(attempt, base_s=0.05, cap_s=1.0)
                await asyncio.sleep(min(delay, part.lease_until - time.monotonic()))

    async def _advance_cursor(
        self, part: _Partition, txid: int, row_id: int, published: int, filtered: int = 0
    ) -> bool:
        """Move the partition's cursor (fenced); the fleet engine batches these across partitions."""
        return await self._fenced(
            part, lambda: self.store.advance_cursor(part.lease, txid, row_id, published, filtered)
        )

    async def _run(self, part: _Partition) -> SliceResult:
        plan, lease, relay = part.plan, part.lease, part.relay
        database = msgspec.json.decode(plan.database_spec, type=Database)
        target: Target = msgspec.json.decode(plan.target_spec, type=Target)
        # decrypted once per slice, not per batch: the plan (and so each secret) is fixed for the slice
        database_password = self._decrypt(plan.database_secret)
        target_password = self._decrypt(plan.target_secret)
        policy = relay.policy
        deadline = time.monotonic() + self.settings.slice_s
        failures = 0

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        async def pause(reason: str, error_class: str, outage: TargetUnavailable | None = None) -> None:
            nonlocal failures
            failures += 1
            with contextlib.suppress(Exception):
                await self.store.record_error(lease, reason, error_class)
            delay = backoff_s(failures, base_s=policy.backoff_base_ms / 1000, cap_s=policy.backoff_max_ms / 1000)
            if outage is not None:  # the target's own Retry-After, when it gave one
                delay = outage.pause_s(delay, floor_s=policy.backoff_base_ms / 1000)
            await self._sleep(part, min(delay, remaining()))

        while remaining() > 0 and not part.stop.is_set():
            try:
                if await self._turn(part, database, database_password, target, target_password, remaining):
                    failures = 0
            except TargetUnavailable as exc:
                # the publisher stays cached: it is shared with this worker's other partitions of
                # the target, and every adapter reconnects by itself on its next batch (the contract
                # suite's outage-then-recovery case); closing it would fail their batches in flight
                await pause(f"target unavailable: {exc}", PartitionErrorClass.TARGET_UNAVAILABLE, exc)
            except (TenantDatabaseError, AddressNotAllowed) as exc:
                await pause(str(exc), PartitionErrorClass.DATABASE_UNAVAILABLE)
        return SliceResult(
            SliceOutcome.RAN, published=part.published, skipped=part.skipped, filtered=part.filtered, dead=part.dead
        )

    async def _turn(
        self,
        part: _Partition,
        database: Database,
        database_password: str | None,
        target: Target,
        target_password: str | None,
        remaining: Callable[[], float],
    ) -> bool:
        """One poll of a slice and the publish of what it read; True when a batch went out (False:
        the partition waited, for its retry's backoff or for rows)."""
        plan, lease, policy = part.plan, part.lease, part.relay.policy
        pool = await self.tenants.pool(
            plan.database_id,
            plan.database_version,
            database,
            database_password,
            secret_version=plan.database_secret_version,
        )
        if not part.identity_checked:
            await self._check_identity(pool, part)
            part.identity_checked = True
        if part.retry is not None and part.retry.next_at is not None:
            wait = (part.retry.next_at - datetime.now(UTC)).total_seconds()
            if wait > 0:  # a refused message waits out its backoff, holding only this partition
                await self._sleep(part, min(wait, remaining()))
                return False
        async with self.tenants.waiter(plan.database_id, plan.partitions, lease.partition) as woken:
            poll_started = time.time_ns()
            rows = await self._poll(pool, database, part, policy.batch_size)
            part.last_poll_empty = not rows
            if time.monotonic() - part.pending_checked > PENDING_CHECK_S:
                await self._sample_pending(pool, database, part)
            if not rows:
                await self._sleep(part, min(policy.poll_interval_ms / 1000, remaining()), woken)
                return False
        await self._publish_traced(part, rows, poll_started, target, target_password)
        return True

    async def _publish_traced(
        self, part: _Partition, rows: list[tenant_db.OutboxRow], poll_started: int, target: Target, password: str | None
    ) -> None:
        """A slice's polled batch published inside its ``relay.batch`` span (the poll a child span
        from ``poll_started``, in ns)."""
        plan = part.plan
        with tracer.start_as_current_span(
            "relay.batch",
            start_time=poll_started,
            attributes={
                "outbox.tenant": plan.tenant_name,
                "outbox.relay": plan.relay_name,
                "outbox.target": plan.target_name,
                "outbox.partition": part.lease.partition,
                "outbox.batch_size": len(rows),
            },
        ):
            tracer.start_span("outbox.poll", start_time=poll_started).end()
            publisher = await self.publishers.get(
                plan.target_id, plan.target_version, target, password, secret_version=plan.target_secret_version
            )
            await self._publish(publisher, part, rows)

    async def _publish(self, publisher: Publisher, part: _Partition, rows: list[tenant_db.OutboxRow]) -> None:
        """Publish one polled batch; move the cursor over what the broker took; charge refusals."""
        if await self.publish_batches(publisher, [self.prepare(part, rows)]):
            raise LeaseLost()

    def prepare(self, part: _Partition, rows: list[tenant_db.OutboxRow]) -> OutboxBatch:
        """The messages of a partition's next batch, cut before an over-size payload."""
        if part.retry is not None:
            # while a refused message is retried, send it alone: the messages behind it (its key's
            # later ones among them) must not overtake it again and again
            rows = rows[:1]
        filtered: list[int] = []
        messages = build_messages(part.relay, part.plan.relay_name, rows, accepts=part.accepts, filtered=filtered)
        too_big: tuple[tenant_db.OutboxRow, OutgoingMessage | None] | None = None
        cut = part.delivery.cut_oversize(messages)
        if cut is not None:  # publish what comes before it, then dead-letter it without retrying
            too_big = (rows[cut], messages[cut])
            rows, messages = rows[:cut], messages[:cut]
            filtered = filtered[: bisect.bisect_left(filtered, cut)]
        return OutboxBatch(part, rows, messages, [m for m in messages if m is not None], too_big, filtered)

    async def publish_batches(self, publisher: Publisher, batches: list[OutboxBatch]) -> list[_Partition]:
        """Publish the batches of one or more partitions of one target in one round trip, then, per
        partition, move the cursor over what the broker took and charge a refusal; returns the
        partitions whose lease was lost meanwhile (their cursor did not move).

        The broker's answer is split per batch as in :mod:`outbox_relay.brokers.grouped`: batches
        before the first message not acknowledged are acknowledged; the one holding it gets its
        prefix and the refusal; the batches after it are neither refused nor published (no attempt
        charged), and are sent again in the next round."""
        sendable = [m for batch in batches for m in batch.sendable]
        tracing = traced()
        publishing = (
            tracer.start_as_current_span("broker.publish", kind=SpanKind.PRODUCER)
            if tracing
            else contextlib.nullcontext(trace.INVALID_SPAN)
        )
        with publishing as publish_span:
            if publish_span.is_recording():  # no exporter: no links to parse
                for link in producer_links(sendable):
                    publish_span.add_link(link.context, link.attributes)
                publish_span.set_attribute("messaging.batch.message_count", len(sendable))
            try:
                result = await publisher.publish_batch(sendable) if sendable else PublishResult(acked=0)
            except TargetUnavailable:
                for batch in batches:
                    if batch.sendable:
                        instruments().failed.add(len(batch.sendable), batch.part.labels)
                raise
        settled: list[tuple[OutboxBatch, PublishResult, Settled[tenant_db.OutboxRow, OutgoingMessage]]] = []
        writes: list[tuple[_Partition, int, int, int, int]] = []
        answers = split(result, [len(batch.sendable) for batch in batches])
        for batch, split_answer in zip(batches, answers, strict=True):
            answer = split_answer or PublishResult(acked=0)  # None: after the refusal, sent again
            outcome = settle(batch.rows, batch.messages, answer)
            filtered = batch.filtered_within(outcome.sent + outcome.skipped)  # of the rows the cursor passes
            batch.part.skipped += outcome.skipped - filtered
            settled.append((batch, answer, outcome))
            if outcome.last is not None:
                writes.append((batch.part, outcome.last.txid, outcome.last.id, outcome.sent, filtered))
        with tracer.start_as_current_span("cursor.commit") if tracing else contextlib.nullcontext():
            moved = await self._advance_cursors(writes) if writes else []
        lost = {id(part) for (part, *_), ok in zip(writes, moved, strict=True) if not ok}
        for part, *_, filtered in writes:
            if filtered and id(part) not in lost:
                part.filtered += filtered
                instruments().add_filtered(part.labels, filtered)
        return await self._apply_outcomes(settled, lost)

    async def _apply_outcomes(
        self,
        settled: list[tuple[OutboxBatch, PublishResult, Settled[tenant_db.OutboxRow, OutgoingMessage]]],
        lost: set[int],
    ) -> list[_Partition]:
        """After the cursor writes of :meth:`publish_batches`: move each partition's cursor in
        memory, count what was sent, charge a refusal or dead-letter an over-size payload; returns
        the partitions whose lease was lost (``lost`` holds those whose cursor write was fenced off)."""
        out: list[_Partition] = []
        now = datetime.now(UTC)
        # one latency observation per relay and call, its oldest message's: an upper
        # bound for all of them (each record hashes the labels, the largest metric cost)
        oldest_by_relay: dict[uuid.UUID, tuple[dict[str, Any], datetime]] = {}
        for batch, answer, outcome in settled:
            part, sent, last = batch.part, outcome.sent, outcome.last
            if id(part) in lost:
                out.append(part)
                continue
            if last is not None:
                part.cursor = (last.txid, last.id)
                part.published += sent
                part.retry = None
                if sent:
                    instruments().add_sent(part.labels, sent)
                    oldest = min(r.created_at for r, m in zip(batch.rows, batch.messages, strict=True) if m is not None)
                    seen = oldest_by_relay.get(part.plan.relay_id)
                    if seen is None or oldest < seen[1]:
                        oldest_by_relay[part.plan.relay_id] = (part.labels, oldest)
            try:
                if outcome.refused is not None:
                    await self._refused(
                        part, *outcome.refused, error=str(answer.rejected), error_class=ErrorClass.REFUSED
                    )
                elif batch.too_big is not None and answer.acked == len(batch.sendable):
                    row, message = batch.too_big
                    error = part.delivery.oversize_error(len(row.payload))
                    attempt = {"at": datetime.now(UTC).isoformat(), "error": error}
                    await self._dead_letter(part, row, message, ErrorClass.TOO_LARGE, error, [attempt])
            except LeaseLost:
                out.append(part)
        for metric_labels, oldest in oldest_by_relay.values():
            instruments().latency.record(max(0.0, (now - oldest).total_seconds()), metric_labels)
        return out

    async def _advance_cursors(self, writes: list[tuple[_Partition, int, int, int, int]]) -> list[bool]:
        """Move each partition's cursor (``txid``, ``id``, messages published, rows filtered out);
        whether each moved."""
        return [
            await self._advance_cursor(part, txid, row_id, sent, filtered)
            for part, txid, row_id, sent, filtered in writes
        ]

    async def _refused(
        self, part: _Partition, row: tenant_db.OutboxRow, message: OutgoingMessage, *, error: str, error_class: str
    ) -> None:
        """Charge an attempt to a refused message (:meth:`DeliveryPolicy.decide`): record its retry,
        or dead-letter it once it has used its budget."""
        decision = part.delivery.decide(part.retry, row.id, error, datetime.now(UTC))
        instruments().failed.add(1, part.labels)
        if isinstance(decision, DeadLetterNow):
            await self._dead_letter(part, row, message, error_class, error, decision.attempts)
            return
        instruments().retried.add(1, part.labels)
        retry = decision.state
        if not await self._fenced(part, lambda: self.store.record_retry(part.lease, retry, decision.reason)):
            raise LeaseLost()
        part.retry = retry

    async def _dead_letter(
        self,
        part: _Partition,
        row: tenant_db.OutboxRow,
        message: OutgoingMessage | None,
        error_class: str,
        error: str,
        attempts: list[dict[str, Any]],
    ) -> None:
        letter = NewLetter(
            tenant_id=part.plan.tenant_id,
            relay_name=part.plan.relay_name,
            target_name=part.plan.target_name,
            outbox_id=row.id,
            outbox_txid=row.txid,
            outbox_created_at=row.created_at,
            topic=row.topic,
            key=row.key,
            destination=message.destination if message else None,
            payload=row.payload,
            headers=row.headers,
            error_class=error_class,
            last_error=error,
            attempts=attempts,
            message_id=message.message_id if message else row.outgoing_id,
        )
        if not await self._fenced(part, lambda: self.store.dead_letter(part.lease, letter)):
            raise LeaseLost()
        instruments().dead.add(1, part.labels)
        log.warning("relay %s: outbox message %s dead-lettered: %s", part.plan.relay_name, row.id, error)
        part.cursor = (row.txid, row.id)
        part.retry = None
        part.dead += 1

    async def _sample_pending(self, pool: tenant_db.Pool, database: Database, part: _Partition) -> None:
        """Count what waits after the cursor (capped) and, when nothing can be read although rows
        wait, find the transaction holding the horizon back: the stall cause the status API shows."""
        part.pending_checked = time.monotonic()
        try:
            row = await pool.fetchrow(
                pending_sql(database.schema),
                part.cursor[0],
                part.cursor[1],
                part.plan.partitions,
                part.lease.partition,
            )
            assert row is not None
            pending, oldest = int(row["pending"]), row["oldest"]
            stall = await horizon_stall(pool) if pending and part.last_poll_empty else None
        except tenant_db.DRIVER_ERRORS as exc:
            log.debug("pending check failed: %s", exc)
            return
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        key = (part.plan.tenant_name, part.plan.relay_name, part.plan.target_name, part.lease.partition)
        instruments().pending[key] = PendingSample(labels=part.labels, pending=pending, oldest_age_s=max(age, 0.0))
        with contextlib.suppress(Exception):
            await self.store.record_pending(part.lease, pending, oldest, stall)

    async def _check_identity(self, pool: tenant_db.Pool, part: _Partition) -> None:
        """Read the outbox's layout and the partition's restore state, and detect a restore or
        failover (new cluster identity, or transaction ids gone backwards).

        After one, the partition starts over, deterministically and at once. The rows that existed
        then and lie above the server's transaction counter (the restored rows of another cluster's
        history, which the horizon read would hold back until this server's counter caught up) bound
        the restored backlog (:class:`~outbox_relay.tenant.db.RestoreFence`); by the relay's
        ``policy.on_restore`` it is read first, before anything written after the restore
        (``resend``), or left out (``skip``). Then the ordinary read starts from the beginning, without
        the backlog: every other row is published again (duplicates, never a skipped message).
        """
        schema = msgspec.json.decode(part.plan.database_spec, type=Database).schema
        identity, xmin, part.layout = await self._read_identity(pool, schema)
        part.restore = await self.store.restore_state(part.lease.relay_id, part.lease.partition)
        reason = restart_reason(part, identity, xmin)
        if reason is not None:
            log.warning("relay %s partition %s: %s", part.plan.relay_name, part.lease.partition, reason)
            await self._start_over(pool, schema, part, identity, reason)
        elif part.lease.system_identifier is None and not await self.store.set_identity(part.lease, identity):
            raise LeaseLost()

    async def _read_identity(self, pool: tenant_db.Pool, schema: str) -> tuple[str, int, tenant_db.OutboxLayout]:
        """The tenant database's identity (system identifier/timeline), its xmin horizon, and the
        outbox's layout: one read for all the partitions of a relay."""
        try:
            row = await pool.fetchrow(IDENTITY_SQL)
            layout = await tenant_db.read_layout(pool, schema)
        except tenant_db.DRIVER_ERRORS as exc:
            raise TenantDatabaseError(f"reading the database identity failed: {tenant_db.describe(exc)}") from None
        assert row is not None
        return f"{row['system_identifier']}/{row['timeline']}", int(row["xmin"]), layout

    async def _start_over(
        self, pool: tenant_db.Pool, schema: str, part: _Partition, identity: str, reason: str
    ) -> None:
        """Reset the partition after a detected restore, with its restored backlog when it has one."""
        policy = part.relay.policy.on_restore
        try:
            bounds = await tenant_db.restore_bounds(pool, schema)
            fence = (
                tenant_db.RestoreFence(
                    max_id=bounds.max_id, max_created_at=bounds.max_created_at, next_xid=bounds.next_xid
                )
                if bounds.max_id is not None
                else None
            )
            rows = (
                await tenant_db.backlog_count(
                    pool, schema, fence=fence, partitions=part.plan.partitions, partition=part.lease.partition
                )
                if fence is not None
                else 0
            )
        except tenant_db.DRIVER_ERRORS as exc:
            raise TenantDatabaseError(f"reading the restored outbox failed: {tenant_db.describe(exc)}") from None
        part.cursor = (0, 0)
        part.retry = None
        part.backlog_batch = []
        if fence is None:
            part.restore = None
            if not await self.store.reset_cursor(part.lease, identity, reason):
                raise LeaseLost()
            return
        done = "resent at once, before anything written after it" if policy == "resend" else "skipped"
        reason += (
            f"; the restored backlog ({rows} row(s) of this partition with id <= {fence.max_id}, "
            f"{bounds.next_xid} being the server's next transaction id) is {done}"
        )
        part.restore = await self.store.start_restore(
            part.lease,
            identity,
            reason,
            policy=policy,
            next_xid=fence.next_xid,
            max_id=fence.max_id,
            max_created_at=fence.max_created_at,
            rows=rows,
        )
        if part.restore is None:
            raise LeaseLost()
        log.warning(
            "relay %s partition %s: restored backlog of %s row(s) %s",
            part.plan.relay_name,
            part.lease.partition,
            rows,
            done,
        )

    async def _poll(
        self, pool: tenant_db.Pool, database: Database, part: _Partition, limit: int
    ) -> list[tenant_db.OutboxRow]:
        """The next rows: a restored backlog's while it is being resent, then the ordinary read."""
        plan, lease, restore = part.plan, part.lease, part.restore
        fence = (
            tenant_db.RestoreFence(
                max_id=restore.max_id, max_created_at=restore.max_created_at, next_xid=restore.next_xid
            )
            if restore is not None
            else None
        )
        try:
            if restore is not None and fence is not None and restore.state == "resending":
                rows = await self._poll_backlog(pool, database, part, restore, fence, limit)
                if rows is not None:
                    return rows
            return await tenant_db.poll(
                pool,
                database.schema,
                cursor=part.cursor,
                partitions=plan.partitions,
                partition=lease.partition,
                limit=limit,
                layout=part.layout,
                fence=fence,
            )
        except tenant_db.DRIVER_ERRORS as exc:
            raise TenantDatabaseError(f"reading the outbox failed: {tenant_db.describe(exc)}") from None

    async def _poll_backlog(
        self,
        pool: tenant_db.Pool,
        database: Database,
        part: _Partition,
        restore: RestoreState,
        fence: tenant_db.RestoreFence,
        limit: int,
    ) -> list[tenant_db.OutboxRow] | None:
        """The next rows of a restored backlog being resent (none yet while transactions open at the
        detection hold some back); None once it is done: the state is ``resent`` and the ordinary read
        starts over from the beginning."""
        plan, lease = part.plan, part.lease
        await self._count_backlog_progress(part, restore)
        cursor, partitions, partition = part.cursor, plan.partitions, lease.partition
        rows = await tenant_db.poll_backlog(
            pool,
            database.schema,
            cursor=cursor,
            partitions=partitions,
            partition=partition,
            limit=limit,
            layout=part.layout,
            fence=fence,
        )
        if rows:
            part.backlog_batch = [(r.txid, r.id) for r in rows]
            return rows
        done = await tenant_db.backlog_done(
            pool, database.schema, cursor=cursor, partitions=partitions, partition=partition, fence=fence
        )
        if not done:
            return []  # rows below the counter wait for transactions open at detection
        finished_at = await self.store.finish_restore(lease)
        if finished_at is None:
            raise LeaseLost()
        log.info(
            "relay %s partition %s: restored backlog of %s row(s) resent in %.1f s",
            plan.relay_name,
            lease.partition,
            restore.rows,
            (finished_at - restore.detected_at).total_seconds(),
        )
        part.restore = dataclasses.replace(restore, state="resent", done=restore.rows, finished_at=finished_at)
        part.cursor = (0, 0)
        part.backlog_batch = []
        return None

    async def _count_backlog_progress(self, part: _Partition, restore: RestoreState) -> None:
        """Record how many backlog rows the cursor has passed since the last poll (best effort)."""
        passed = sum(1 for position in part.backlog_batch if position <= part.cursor)
        part.backlog_batch = []
        if not passed:
            return
        done = min(restore.done + passed, restore.rows)
        part.restore = dataclasses.replace(restore, done=done)
        with contextlib.suppress(Exception):
            await self.store.restore_progress(part.lease, done)
