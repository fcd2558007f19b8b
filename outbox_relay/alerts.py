"""Alerts: a webhook POST to a tenant's alert channels (``/v1/alerts``) and to the operator's URL when a
relay stalls for longer than a threshold, dead letters appear, a restore is detected, leases keep
being lost, or a quota refuses a request of the tenant.

Evaluated by the workers every ``alert_interval_s``, once per fleet: the worker that takes the
advisory lock, when the last evaluation is older than the interval (``alert_marks``). One
evaluation, in one control-DB transaction, reads what has something to report (the partitions that
may have a status cause, then those relays' status computed exactly as the status API does it, and
the dead letters, restores, lease losses and quota refusals since the last evaluation) and owes an
alert (``alert_deliveries``) per channel, subject (a relay, or a tenant's quota) and event kind, at
most one per the channel's ``period_s``. The alerts owed are then POSTed through a
:class:`~outbox_relay.brokers.webhook.WebhookPublisher` (its netguard, timeouts, failure classes and
Standard Webhooks signature, the same as a webhook target's); one the endpoint did not take is sent
again, the same body and id, at the next evaluation, and one taken is never sent again.

The decisions (:func:`stall_due`, :func:`delivery_due`, :func:`wants`) are pure functions of what
the store read, tested without a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import msgspec

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.brokers.webhook import WebhookPublisher
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.domain import ALERT_PERIOD_MAX_S, Alert, AlertKind, AlertKindName
from outbox_relay.netguard import AddressPolicy
from outbox_relay.specs import webhook_secrets
from outbox_relay.status import Cause, RelayStatus, relay_status
from outbox_relay.store import alerts as db
from outbox_relay.store.control import ControlStore, control_unavailable

log = logging.getLogger("outbox_relay.alerts")
OPERATOR = "operator"
"""The channel of the operator's URL (``alert_operator_url``)."""
SEND_BATCH = 100
"""Alerts sent per evaluation at most (the rest, the next time)."""
SETTLE_S = 2.0
"""New dead letters, restores and refusals are read this far behind the evaluation's time: their rows
carry their transaction's start time (``now()``), and one that committed after the evaluation read
must still fall into the next window."""


class AlertBody(msgspec.Struct, kw_only=True):
    """What an alert channel receives (the request's body, JSON; docs/delivery.md, "Alerts")."""

    id: str
    """The alert's id (a UUID, also the ``webhook-id``): the same on every attempt to send it."""
    event: AlertKindName
    tenant: str
    relay: str | None
    """Null for a ``quota`` alert."""
    summary: str
    """One human line."""
    cause: Cause | None
    """The relay's status cause as ``GET /v1/relays/{name}/status`` shows it now (null: none)."""
    state: str | None
    """The relay's status state (``stalled``, ``failing``, ...) now; null for a ``quota`` alert."""
    first_seen: datetime
    last_seen: datetime
    raised_at: datetime
    details: dict[str, Any]
    """Per event: ``dead_letter`` {count, newest: {id, outbox_id, message_id, error_class, error}}, ``restore``
    {partitions, rows, policy}, ``lease_lost`` {count, partitions, window_s}, ``quota`` {quota, count,
    detail}, ``stall`` {stalled_for_s}."""


@dataclass(frozen=True, slots=True)
class Event:
    """One thing to report, before it is matched to channels."""

    kind: AlertKind
    subject: str
    tenant_id: uuid.UUID
    tenant: str
    relay: str | None
    cause: Cause | None
    state: str | None
    first_seen: datetime
    last_seen: datetime
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Channel:
    key: str
    """``alert:<uuid>`` or :data:`OPERATOR`."""
    alert_id: uuid.UUID | None
    tenant_id: uuid.UUID | None
    """None: the operator's, which hears of every tenant."""
    spec: Alert


# --- the decisions ---------------------------------------------------------------------------------


def stall_due(first_seen: datetime, now: datetime, stall_after_s: float) -> bool:
    """A cause that has lasted ``stall_after_s`` is a stall to alert on."""
    return (now - first_seen).total_seconds() >= stall_after_s


def delivery_due(previous: tuple[datetime, datetime | None] | None, now: datetime, period_s: float) -> bool:
    """Whether a new alert is owed on a (channel, subject, kind), given the last one (raised at,
    sent at): none yet; or the last one was taken and raised ``period_s`` ago or more. One not yet
    taken is still owed as it is (sent again), so no second one is raised beside it."""
    if previous is None:
        return True
    raised_at, sent_at = previous
    return sent_at is not None and (now - raised_at).total_seconds() >= period_s


def wants(channel: Channel, event: Event) -> bool:
    """The channel is the tenant's (or the operator's), subscribes to the kind and covers the relay."""
    spec = channel.spec
    if channel.tenant_id is not None and channel.tenant_id != event.tenant_id:
        return False
    if event.kind.value not in spec.events:
        return False
    return spec.relays is None or event.relay is None or event.relay in spec.relays


def matches(event: Event, channel: Channel, now: datetime) -> bool:
    """The channel wants the event, and a stall has lasted the channel's ``stall_after_s``."""
    if not wants(channel, event):
        return False
    return event.kind is not AlertKind.STALL or stall_due(event.first_seen, now, channel.spec.stall_after_s)


def body_of(event: Event, delivery_id: uuid.UUID, now: datetime) -> AlertBody:
    details = dict(event.details)
    if event.kind is AlertKind.STALL:
        details["stalled_for_s"] = round((now - event.first_seen).total_seconds(), 3)
    return AlertBody(
        id=str(delivery_id),
        event=event.kind.value,
        tenant=event.tenant,
        relay=event.relay,
        summary=event.summary,
        cause=event.cause,
        state=event.state,
        first_seen=event.first_seen,
        last_seen=event.last_seen,
        raised_at=now,
        details=details,
    )


# --- the summaries -----------------------------------------------------------------------------------


def stall_summary(tenant: str, status: RelayStatus, cause: Cause, first_seen: datetime, now: datetime) -> str:
    lasted = (now - first_seen).total_seconds()
    return (
        f"relay {status.relay!r} of tenant {tenant!r} has been {status.state} ({cause.kind}) for "
        f"{lasted:.0f} s: {cause.detail}"
    )


# --- the evaluation -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Relays:
    """The relays one evaluation reports on (their control-DB rows and status, by id), and the events
    about each."""

    names: dict[uuid.UUID, Any]
    statuses: dict[uuid.UUID, RelayStatus]

    def causes(self, troubled: Iterable[uuid.UUID]) -> dict[uuid.UUID, tuple[str, bytes]]:
        """The status cause (its kind, and the cause encoded) of each troubled relay that has one."""
        troubled = set(troubled)
        return {
            rid: (s.cause.kind, msgspec.json.encode(s.cause))
            for rid, s in self.statuses.items()
            if s.cause is not None and rid in troubled
        }

    def event(
        self, rid: uuid.UUID, kind: AlertKind, first: datetime, last: datetime, summary: str, **details: Any
    ) -> Event:
        r, status = self.names[rid], self.statuses[rid]
        return Event(
            kind=kind,
            subject=f"relay:{rid}",
            tenant_id=r["tenant_id"],
            tenant=r["tenant"],
            relay=r["name"],
            cause=status.cause,
            state=status.state,
            first_seen=first,
            last_seen=last,
            summary=summary,
            details=details,
        )

    def stall_event(self, rid: uuid.UUID, first: datetime, now: datetime) -> Event:
        status = self.statuses[rid]
        assert status.cause is not None
        summary = stall_summary(self.names[rid]["tenant"], status, status.cause, first, now)
        return self.event(rid, AlertKind.STALL, first, now, summary)

    def dead_letter_event(self, row: Any) -> Event:
        n, relay = row["count"], self.names[row["relay_id"]]["name"]
        newest = {
            "id": str(row["id"]),
            "outbox_id": row["outbox_id"],
            "message_id": row["message_id"],
            "error_class": row["error_class"],
            "error": row["last_error"],
        }
        summary = (
            f"{n} new dead letter{'s' if n != 1 else ''} on relay {relay!r}; the newest ({row['id']}, outbox "
            f"row {row['outbox_id']}): {row['error_class']}: {row['last_error']}"
        )
        first, last = row["first_at"], row["created_at"]
        return self.event(row["relay_id"], AlertKind.DEAD_LETTER, first, last, summary, count=n, newest=newest)

    def restore_event(self, row: Any) -> Event:
        relay = self.names[row["relay_id"]]["name"]
        summary = (
            f"a restore (or failover) of relay {relay!r}'s database was detected on {row['partitions']} "
            f"partition(s); {row['rows'] or 0} restored row(s) to {row['policy'] or 'resend'}"
        )
        return self.event(
            row["relay_id"],
            AlertKind.RESTORE,
            row["first_at"],
            row["last_at"],
            summary,
            partitions=row["partitions"],
            rows=int(row["rows"] or 0),
            policy=row["policy"],
        )

    def lease_lost_event(self, row: Any, window_s: float) -> Event:
        relay = self.names[row["relay_id"]]["name"]
        summary = (
            f"relay {relay!r} lost {row['count']} partition leases ({row['partitions']} partition(s)) "
            f"in the last {window_s:.0f} s: workers are dying or cannot keep their heartbeat"
        )
        return self.event(
            row["relay_id"],
            AlertKind.LEASE_LOST,
            row["first_at"],
            row["last_at"],
            summary,
            count=row["count"],
            partitions=row["partitions"],
            window_s=window_s,
        )


def quota_event(row: Any) -> Event:
    """A quota's refusal of a tenant's request (one event per tenant and quota)."""
    summary = (
        f"a request of tenant {row['tenant']!r} was refused by its {row['quota']} quota "
        f"({row['count']} time(s) so far): {row['detail']}"
    )
    return Event(
        kind=AlertKind.QUOTA,
        subject=f"quota:{row['tenant_id']}:{row['quota']}",
        tenant_id=row["tenant_id"],
        tenant=row["tenant"],
        relay=None,
        cause=None,
        state=None,
        first_seen=row["first_at"],
        last_seen=row["last_at"],
        summary=summary,
        details={"quota": row["quota"], "count": row["count"], "detail": row["detail"]},
    )


class AlertEvaluator:
    """One worker's part in the fleet's alert evaluation: :meth:`evaluate` (and :meth:`send`) every
    ``alert_interval_s`` (:meth:`start`), until :meth:`close`."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: ControlStore,
        secrets: SecretBox,
        policy: AddressPolicy,
        settle_s: float = SETTLE_S,
    ) -> None:
        self.settings = settings
        self.settle_s = settle_s
        self.store = store
        self.secrets = secrets
        self.policy = policy
        self.operator_policy = AddressPolicy(allow_private=True, extra_denied=settings.denied_networks)
        """The operator's own URL may be a private address (an in-cluster receiver); never a link-local
        or metadata one."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alerts")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alert_interval_s)
            try:
                await self.evaluate()
                await self.send()
            except Exception as exc:
                if not control_unavailable(exc):
                    log.exception("alert evaluation failed")
                else:
                    log.debug("alert evaluation skipped: the control DB is unavailable (%s)", exc)

    def operator(self) -> Channel | None:
        url = self.settings.alert_operator_url
        if not url:
            return None
        spec = Alert(
            url=url,
            stall_after_s=int(self.settings.alert_operator_stall_after_s),
            period_s=int(self.settings.alert_operator_period_s),
        )
        return Channel(key=OPERATOR, alert_id=None, tenant_id=None, spec=spec)

    async def evaluate(self) -> int:
        """One evaluation, unless another worker runs one or did within the interval: the alerts
        owed now. Returns how many were raised."""
        # a little short of the interval: this worker's own sleep and the query take some of it
        interval_s = self.settings.alert_interval_s * 0.8
        async with self.store.transaction() as conn:
            window = await db.begin_evaluation(conn, interval_s)
            if window is None:
                return 0
            since, now = window
            await db.forget_old_deliveries(conn, ALERT_PERIOD_MAX_S + 86_400)
            events = await self._collect(conn, since, now)
            if not events:
                return 0
            channels = await self._channels(conn, {e.tenant_id for e in events})
            wanted = [(event, channel) for event in events for channel in channels if matches(event, channel, now)]
            previous = await db.deliveries_of(conn, [(c.key, e.subject, e.kind.value) for e, c in wanted])
            raised = 0
            for event, channel in wanted:
                last = previous.get((channel.key, event.subject, event.kind.value))
                if not delivery_due((last["raised_at"], last["sent_at"]) if last else None, now, channel.spec.period_s):
                    continue
                delivery_id = uuid.uuid4()
                await db.raise_alert(
                    conn,
                    channel=channel.key,
                    alert_id=channel.alert_id,
                    subject=event.subject,
                    kind=event.kind.value,
                    delivery_id=delivery_id,
                    tenant_id=event.tenant_id,
                    body=msgspec.json.encode(body_of(event, delivery_id, now)),
                    raised_at=now,
                )
                raised += 1
            return raised

    async def _channels(self, conn: Any, tenant_ids: set[uuid.UUID]) -> list[Channel]:
        channels = []
        for row in await db.alert_channels(conn, list(tenant_ids)):
            spec = msgspec.json.decode(row["spec"], type=Alert)
            channels.append(
                Channel(key=f"alert:{row['id']}", alert_id=row["id"], tenant_id=row["tenant_id"], spec=spec)
            )
        operator = self.operator()
        if operator is not None:
            channels.append(operator)
        return channels

    async def _collect(self, conn: Any, since: datetime, now: datetime) -> list[Event]:
        """What there is to report: stalls, new dead letters, new restores, lease losses, refusals."""
        ttl_s = self.settings.lease_ttl_s
        troubled = await db.relays_with_causes(conn, ttl_s)
        # what appeared in (since, now], each a settle behind: a row stamped with its transaction's start
        # and committed after this snapshot is still read next time
        settle = timedelta(seconds=self.settle_s)
        since_settled, now_settled = since - settle, now - settle
        dead = await db.new_dead_letters(conn, since_settled, now_settled)
        restores = await db.new_restores(conn, since_settled, now_settled)
        window_s = self.settings.alert_lease_lost_window_s
        losses = await db.lease_loss_counts(conn, window_s, self.settings.alert_lease_lost_threshold)
        involved = {*troubled, *(r["relay_id"] for r in [*dead, *restores, *losses])}
        relays = await self._relays(conn, involved, now)
        first_seen = await db.track_stalls(conn, relays.causes(troubled), now)
        events = [relays.stall_event(rid, first, now) for rid, first in first_seen.items()]
        events += [relays.dead_letter_event(row) for row in dead if row["relay_id"] in relays.names]
        events += [relays.restore_event(row) for row in restores if row["relay_id"] in relays.names]
        events += [relays.lease_lost_event(row, window_s) for row in losses if row["relay_id"] in relays.names]
        events += [quota_event(row) for row in await db.new_quota_refusals(conn, since_settled, now_settled)]
        return events

    async def _relays(self, conn: Any, involved: set[uuid.UUID], now: datetime) -> _Relays:
        """The relays an evaluation reports on: their names and tenants, and their status computed
        exactly as the status API does it."""
        names = await db.relay_names(conn, list(involved))
        ttl_s = self.settings.lease_ttl_s
        states = await self.store.partition_states_of(list(involved), ttl_s) if involved else {}
        statuses = {rid: relay_status(r["name"], r["enabled"], states.get(rid, []), now) for rid, r in names.items()}
        return _Relays(names, statuses)

    async def send(self) -> int:
        """POST the alerts owed (claimed, so no other worker sends them at the same time); each one
        taken is marked sent, each one not taken keeps its error and is sent again next time."""
        rows = await db.claim_unsent(self.store.pool, SEND_BATCH)
        by_channel: dict[str, list[Any]] = {}
        for row in rows:
            by_channel.setdefault(row["channel"], []).append(row)
        sent = 0
        for channel, owed in by_channel.items():
            sent += await self._send_channel(channel, owed)
        return sent

    async def _send_channel(self, channel: str, owed: Sequence[Any]) -> int:
        try:
            publisher = self._publisher(channel, owed[0])
        except Exception as exc:  # a channel that cannot be used: each of its alerts says why
            for row in owed:
                await db.settle(self.store.pool, row, f"{type(exc).__name__}: {exc}")
            return 0
        sent = 0
        async with publisher:
            for row in owed:
                error = await self._post(publisher, row)
                await db.settle(self.store.pool, row, error)
                sent += error is None
                if error is not None and row["attempts"] == 0:  # once per alert, not at every retry
                    log.warning(
                        "alert %s (%s) to %s not taken, sent again later: %s", row["id"], row["kind"], channel, error
                    )
        return sent

    def _publisher(self, channel: str, row: Any) -> WebhookPublisher:
        if channel == OPERATOR:
            url, password = self.settings.alert_operator_url, self.settings.alert_operator_secret
            timeout_ms = 10_000
            if not url:
                raise ValueError("no operator alert URL is configured (OUTBOX_RELAY_ALERT_OPERATOR_URL)")
        else:
            spec = msgspec.json.decode(row["spec"], type=Alert)
            url, timeout_ms = spec.url, spec.timeout_ms
            password = self.secrets.decrypt(bytes(row["secret"])) if row["secret"] is not None else None
        keys = webhook_secrets(password) if password else []
        return WebhookPublisher(
            url=url,
            secrets=keys,
            policy=self.operator_policy if channel == OPERATOR else self.policy,
            timeout_ms=timeout_ms,
            connect_timeout_ms=min(5_000, timeout_ms),
            max_concurrent_requests=1,
        )

    async def _post(self, publisher: WebhookPublisher, row: Any) -> str | None:
        """None when the endpoint took the alert (2xx), else why not."""
        message = OutgoingMessage(
            id=0,
            message_id=str(row["id"]),
            destination=f"alert/{row['kind']}",
            key=None,
            payload=row["body"].encode(),
            headers={},
        )
        try:
            result = await publisher.publish_batch([message])
        except Exception as exc:  # TargetUnavailable, an address the policy denies: sent again next time
            return f"{type(exc).__name__}: {exc}"
        if result.rejected is not None:
            return str(result.rejected)
        return None
