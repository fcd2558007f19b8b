"""A worker's side of a credential rotation (``store/rotations.py`` has the control DB's side).

While a rotation is pending, the tenant's server takes both the old and the new password. Every
worker switches each database pool and target publisher it has open to the newest credential,
make-before-break (:meth:`TenantConnections.rotate`, :meth:`PublisherCache.rotate`: the new
connection authenticates first, the batches in flight finish on the old one), and reports the
version it uses. A new password the server refuses leaves the old one in use: the refusal is
reported (the resource's GET shows it) and tried again every ``RETRY_REFUSED_S``, so a tenant who
PUT the new password before setting it on the server is switched as soon as the server takes it.
Once every live worker using the resource reports the new version, the first worker to see it
completes the rotation: the old secret is deleted from the store.

The checks are cheap enough to run every ``CHECK_S``: one read of the rows whose credential moved
on (among the resources open here), and one of the pending rotations that could complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import msgspec

from outbox_relay.crypto import SecretBox
from outbox_relay.domain import Database, Target
from outbox_relay.engine import PublisherCache, TenantConnections, wait_event
from outbox_relay.errors import AddressNotAllowed, TargetUnavailable, TenantDatabaseError
from outbox_relay.store.control import ControlStore, control_unavailable
from outbox_relay.store.events import ControlEvents
from outbox_relay.store.rotations import SecretTable
from outbox_relay.store.rows import CredentialDue
from outbox_relay.tasks import cancel_and_wait

log = logging.getLogger("outbox_relay.rotation")
CHECK_S = 2.0
"""How often a worker looks for credentials that moved on while a rotation is under way here (a
notification comes sooner)."""
IDLE_CHECK_S = 30.0
"""How often it looks while none is: a rotation's start and every worker's report come as
notifications (``rotations:*``), and this is the safety net. Each look reads every database and
target the worker has open: every 2 s, about 200 rows a second at 1,000 idle relays."""
RETRY_REFUSED_S = 5.0
"""A new password the server refused is tried again after this long (each try is one connection)."""
Report = tuple[int, int | None, str | None]
"""What a worker last reported of a resource: the version it uses, the one refused, the error."""


class Rotator:
    """Switches this worker's open pools and publishers to rotated credentials (see the module)."""

    def __init__(
        self,
        *,
        store: ControlStore,
        secrets: SecretBox,
        tenants: TenantConnections,
        publishers: PublisherCache,
        events: ControlEvents | None,
        worker_key: Callable[[], str],
        ttl_s: float,
        read_targets: Callable[[], set[uuid.UUID]] = set,
    ) -> None:
        self.store = store
        self.secrets = secrets
        self.tenants = tenants
        self.publishers = publishers
        self.events = events
        self.worker_key = worker_key
        self.ttl_s = ttl_s
        self.read_targets = read_targets
        """The targets of the relays this worker reads: one without a publisher open yet (an idle
        relay's) is reported at its newest version, which the worker connects with when it does."""
        self._reported: dict[tuple[str, SecretTable, uuid.UUID], Report] = {}
        self._refused_at: dict[tuple[SecretTable, uuid.UUID, int], float] = {}
        self._busy = True
        """The last look found something to switch, retry or report again: look again soon."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="credential-rotation")

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    async def run(self) -> None:
        if self.events is None:
            changed = asyncio.Event()
            while True:
                await self._check_logged()
                await wait_event(changed, CHECK_S)
        with self.events.subscribe(["rotations:*"]) as changed:
            while True:
                changed.clear()
                await self._check_logged()
                await wait_event(changed, CHECK_S if self._busy or self._refused_at else IDLE_CHECK_S)

    async def _check_logged(self) -> None:
        try:
            await self.check()
        except Exception as exc:
            self._busy = True
            if not control_unavailable(exc):
                log.exception("credential rotation check failed")

    async def check(self) -> None:
        """One pass: switch what moved on, report, complete what every worker switched to."""
        self._busy = False
        await self._switch_all("databases", self.tenants.in_use())
        open_targets = self.publishers.in_use()
        await self._switch_all("targets", open_targets)
        idle = self.read_targets() - open_targets.keys()
        if idle:
            for due in await self.store.credentials_due("targets", dict.fromkeys(idle, -1)):
                await self._report("targets", due.id, (due.version, None, None))
        for tenant_id, resource in await self.store.complete_rotations(self.ttl_s, f"worker:{self.worker_key()}"):
            log.info("tenant %s: credential rotation of %s complete; the old secret is deleted", tenant_id, resource)

    async def _switch_all(self, table: SecretTable, in_use: dict[uuid.UUID, int]) -> None:
        for due in await self.store.credentials_due(table, in_use):
            self._busy = True  # a rotation is under way here
            await self._switch(due, in_use[due.id])
        for resource_id, version in in_use.items():  # what this worker uses, reported once per change
            key = (self.worker_key(), table, resource_id)
            last = self._reported.get(key)
            if last is None or last[0] != version:
                await self._report(table, resource_id, (version, None, None))

    async def _switch(self, due: CredentialDue, using: int) -> None:
        attempt = (due.table, due.id, due.version)
        refused_at = self._refused_at.get(attempt)
        if refused_at is not None and time.monotonic() - refused_at < RETRY_REFUSED_S:
            return
        password = self.secrets.decrypt(due.token) if due.token else None
        try:
            if due.table == "databases":
                db = msgspec.json.decode(due.target_spec, type=Database)
                switched = await self.tenants.rotate(due.id, due.version, password, db)
            else:
                target: Target = msgspec.json.decode(due.target_spec, type=Target)
                switched = await self.publishers.rotate(due.id, due.version, password, target)
        except (TenantDatabaseError, TargetUnavailable, AddressNotAllowed, ValueError) as exc:
            self._refused_at[attempt] = time.monotonic()
            log.warning("%s %s: the new credential (version %d) does not work: %s", due.table, due.id, due.version, exc)
            await self._report(due.table, due.id, (using, due.version, str(exc)))
            return
        self._refused_at.pop(attempt, None)
        if switched:
            log.info("%s %s: switched to credential version %d", due.table, due.id, due.version)
            await self._report(due.table, due.id, (due.version, None, None))

    async def _report(self, table: SecretTable, resource_id: uuid.UUID, report: Report) -> None:
        key = (self.worker_key(), table, resource_id)
        if self._reported.get(key) == report:
            return
        version, refused, error = report
        written = await self.store.report_credential(
            key[0], table, resource_id, version, refused_version=refused, error=error
        )
        if written:
            self._reported[key] = report
        else:  # not yet a member: reported again at the next check, soon
            self._busy = True
