"""Alerts in the control DB: a tenant's alert channels (a resource like a target), the quota refusals
and lease losses recorded as they happen, and what the fleet's evaluation reads and owes
(``outbox_relay/alerts.py``). Every read of the evaluation starts from what has something to report
(a partition with a cause, new dead letters, new restores, recent lease losses and refusals), so its
cost grows with those, not with the number of relays."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from outbox_relay.errors import QuotaExceeded
from outbox_relay.store.base import StoreBase
from outbox_relay.store.rows import ResourceRow, Unchanged, _resource

ALERTS_LOCK = 0x6F72_6C79_616C_7274
"""The advisory lock (transaction-scoped) one evaluation holds: one at a time over the fleet."""
CLAIM_S = 60.0
"""An alert being sent is the sender's this long (then another evaluation may send it again)."""


class AlertsStore(StoreBase):
    async def put_alert(
        self, tenant_id: uuid.UUID, name: str, spec: bytes, secret: bytes | Unchanged | None, *, limit: int
    ) -> tuple[ResourceRow, bool]:
        """Create or replace; creating raises QuotaExceeded (quota ``alerts``) past ``limit`` channels."""
        async with self.transaction() as conn:
            # the tenant row locked, as the other quotas do: two creations count one after the other
            await conn.execute("SELECT 1 FROM tenants WHERE id = $1 FOR NO KEY UPDATE", tenant_id)
            exists = await conn.fetchval("SELECT true FROM alerts WHERE tenant_id = $1 AND name = $2", tenant_id, name)
            if not exists:
                used = await conn.fetchval("SELECT count(*) FROM alerts WHERE tenant_id = $1", tenant_id)
                if used + 1 > limit:
                    raise QuotaExceeded(quota="alerts", limit=limit, used=used)
            keep = isinstance(secret, Unchanged)
            row = await conn.fetchrow(
                "INSERT INTO alerts (tenant_id, name, spec, secret) VALUES ($1, $2, $3::jsonb, $4) "
                "ON CONFLICT (tenant_id, name) DO UPDATE SET spec = EXCLUDED.spec, "
                "secret = CASE WHEN $5 THEN alerts.secret ELSE EXCLUDED.secret END, updated_at = now() "
                "RETURNING id, name, spec::text AS spec, secret IS NOT NULL AS has_secret, created_at, updated_at, "
                "(xmax = 0) AS inserted",
                tenant_id,
                name,
                spec.decode(),
                None if keep else secret,
                keep,
            )
        return _resource(row), bool(row["inserted"])

    async def alert_deliveries(self, alert_id: uuid.UUID, limit: int) -> list[asyncpg.Record]:
        """The channel's alerts, newest first: what each is about, when raised and sent, how often tried."""
        return list(
            await self.pool.fetch(
                "SELECT id, kind, body->>'relay' AS relay, body->>'summary' AS summary, raised_at, sent_at, attempts, "
                "last_error FROM alert_deliveries WHERE alert_id = $1 ORDER BY raised_at DESC, id LIMIT $2",
                alert_id,
                limit,
            )
        )

    async def record_quota_refusal(self, tenant_id: uuid.UUID, quota: str, detail: str) -> None:
        """A request of the tenant a quota refused (one row per tenant and quota, counted)."""
        await self.pool.execute(
            "INSERT INTO quota_refusals (tenant_id, quota, detail) VALUES ($1, $2, $3) "
            "ON CONFLICT (tenant_id, quota) DO UPDATE SET detail = EXCLUDED.detail, "
            "count = quota_refusals.count + 1, last_at = now()",
            tenant_id,
            quota,
            detail[:2000],
        )


async def record_lease_losses(pool: asyncpg.Pool, partitions: Sequence[tuple[uuid.UUID, int]]) -> None:
    """Partitions whose lease a worker lost (taken over, or its membership lapsed)."""
    if partitions:
        await pool.execute(
            "INSERT INTO lease_losses (relay_id, partition) SELECT u.relay_id, u.partition "
            "FROM unnest($1::uuid[], $2::int[]) AS u(relay_id, partition) "
            "WHERE EXISTS (SELECT 1 FROM relays WHERE id = u.relay_id)",
            [relay for relay, _ in partitions],
            [partition for _, partition in partitions],
        )


async def begin_evaluation(conn: asyncpg.Connection, interval_s: float) -> tuple[datetime, datetime] | None:
    """In the evaluation's transaction: the lock and the mark. ``(since, now)`` when this worker
    evaluates now; None when another one is, or one did less than ``interval_s`` ago."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", ALERTS_LOCK):
        return None
    row = await conn.fetchrow(
        "UPDATE alert_marks m SET evaluated_at = now(), evaluations = m.evaluations + 1 "
        "FROM (SELECT evaluated_at FROM alert_marks) o "
        "WHERE m.evaluated_at <= now() - make_interval(secs => $1) RETURNING o.evaluated_at AS since, now() AS now",
        interval_s,
    )
    return (row["since"], row["now"]) if row else None


async def evaluations(pool: asyncpg.Pool) -> int:
    """How many evaluations the fleet has run (tests wait on it)."""
    return int(await pool.fetchval("SELECT evaluations FROM alert_marks"))


_WAITS = "(coalesce(p.pending_estimate, 0) > 0 OR coalesce(p.lag_s, 0) > 0)"
CAUSES_SQL = (
    # the relays from the partitions found (usually none), not the other way round: joined, the plan
    # read every relay to match it against nothing
    "SELECT r.id AS relay_id FROM relays r WHERE r.enabled AND r.id = ANY(ARRAY("
    "SELECT p.relay_id FROM relay_partitions p WHERE p.retry_outbox_id IS NOT NULL OR p.stall IS NOT NULL "
    "UNION ALL SELECT p.relay_id FROM relay_partitions p WHERE p.last_error_at > now() - interval '60 seconds' "
    # from the stopped workers' keys (usually none) through the owner index: as a join, the planner
    # hashed an estimate of 357 stopped workers and scanned every partition for them (all 16,000 of
    # them every 5 s at 1,000 idle relays in the fleet bench)
    "UNION ALL SELECT p.relay_id FROM relay_partitions p WHERE p.lease_holder = ANY(ARRAY(SELECT w.key FROM workers w "
    "WHERE w.heartbeat_at + make_interval(secs => $1) < now() - interval '30 seconds')) "
    f"AND p.lease_expires_at IS NULL AND {_WAITS} "
    "UNION ALL SELECT p.relay_id FROM relay_partitions p WHERE p.lease_expires_at IS NOT NULL "
    f"AND p.lease_holder IS NOT NULL AND p.lease_expires_at < now() - interval '30 seconds' AND {_WAITS}"
    "))"
)
"""``relays_with_causes``: $1 the ownership TTL in seconds."""


async def fetch_by_index(conn: asyncpg.Connection, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run ``sql`` with sequential scans and JIT off for that statement
    alone: for a query whose every part has an index that finds its few rows, on tables whose
    statistics may not know it yet. On ``relay_partitions`` before its first ANALYZE (new relays'
    rows) the planner took ``IS NOT NULL`` for almost every row and scanned all partitions for the
    troubled ones (16,000 every 5 s at 1,000 idle relays in the fleet bench); with scans off alone,
    the plan's cost passed ``jit_above_cost`` and every evaluation compiled it (180-214 ms)."""
    async with conn.transaction():  # a savepoint in the caller's, or a transaction of its own
        before = await conn.fetchrow(
            "SELECT current_setting('enable_seqscan') AS seqscan, current_setting('jit') AS jit, "
            "set_config('enable_seqscan', 'off', true), set_config('jit', 'off', true)"
        )
        assert before is not None
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        await conn.execute(
            "SELECT set_config('enable_seqscan', $1, true), set_config('jit', $2, true)",
            before["seqscan"],
            before["jit"],
        )
    return rows


async def relays_with_causes(conn: asyncpg.Connection, ttl_s: float) -> list[uuid.UUID]:
    """The enabled relays with a partition that may have a status cause (the status's own rules then
    decide, from every partition of these relays): a message retrying or a transaction holding the
    horizon (the partial index ``relay_partitions_troubled``), a recent error (``relay_partitions_errors``),
    or a lapsed lease over
    waiting rows: a fleet worker whose heartbeat stopped (from the few such workers through
    ``relay_partitions_owner``) or a per-slice lease past its expiry (``relay_partitions_expiring``)."""
    rows = await fetch_by_index(conn, CAUSES_SQL, ttl_s)
    return [r["relay_id"] for r in rows]


async def relay_names(conn: asyncpg.Connection, relay_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, asyncpg.Record]:
    """Each relay's name and its tenant's id and name."""
    rows = await conn.fetch(
        "SELECT r.id, r.name, r.enabled, r.tenant_id, t.name AS tenant FROM relays r JOIN tenants t "
        "ON t.id = r.tenant_id WHERE r.id = ANY($1::uuid[])",
        list(relay_ids),
    )
    return {r["id"]: r for r in rows}


async def track_stalls(
    conn: asyncpg.Connection, causes: Mapping[uuid.UUID, tuple[str, bytes]], now: datetime
) -> dict[uuid.UUID, datetime]:
    """Keep each relay's cause and since when it has lasted (a change of kind starts it anew), forget
    the relays without one; each relay's first sighting of its current cause."""
    ids = list(causes)
    await conn.execute("DELETE FROM alert_stalls WHERE NOT (relay_id = ANY($1::uuid[]))", ids)
    if not ids:
        return {}
    rows = await conn.fetch(
        "INSERT INTO alert_stalls (relay_id, kind, cause, first_seen, last_seen) "
        "SELECT id, kind, cause::jsonb, $4, $4 FROM unnest($1::uuid[], $2::text[], $3::text[]) AS c(id, kind, cause) "
        "WHERE EXISTS (SELECT 1 FROM relays WHERE relays.id = c.id) "
        "ON CONFLICT (relay_id) DO UPDATE SET cause = EXCLUDED.cause, last_seen = EXCLUDED.last_seen, "
        "first_seen = CASE WHEN alert_stalls.kind = EXCLUDED.kind THEN alert_stalls.first_seen "
        "ELSE EXCLUDED.first_seen END, kind = EXCLUDED.kind RETURNING relay_id, first_seen",
        ids,
        [causes[i][0] for i in ids],
        [causes[i][1].decode() for i in ids],
        now,
    )
    return {r["relay_id"]: r["first_seen"] for r in rows}


async def new_dead_letters(conn: asyncpg.Connection, since: datetime, now: datetime) -> list[asyncpg.Record]:
    """Per relay, the dead letters that appeared in ``(since, now]``: count, first and the newest one."""
    return list(
        await conn.fetch(
            "SELECT DISTINCT ON (d.relay_id) d.relay_id, d.id, d.outbox_id, d.message_id, d.error_class, d.last_error, "
            "d.created_at, count(*) OVER w AS count, min(d.created_at) OVER w AS first_at "
            "FROM dead_letters d WHERE d.created_at > $1 AND d.created_at <= $2 AND d.relay_id IS NOT NULL "
            "WINDOW w AS (PARTITION BY d.relay_id) ORDER BY d.relay_id, d.created_at DESC, d.id",
            since,
            now,
        )
    )


async def new_restores(conn: asyncpg.Connection, since: datetime, now: datetime) -> list[asyncpg.Record]:
    """Per relay, the partitions that detected a restore in ``(since, now]``."""
    return list(
        await conn.fetch(
            "SELECT relay_id, count(*) AS partitions, min(restore_detected_at) AS first_at, "
            "max(restore_detected_at) AS last_at, sum(restore_rows) AS rows, "
            "(array_agg(restore_policy ORDER BY restore_detected_at DESC))[1] AS policy "
            "FROM relay_partitions WHERE restore_detected_at > $1 AND restore_detected_at <= $2 GROUP BY relay_id",
            since,
            now,
        )
    )


async def lease_loss_counts(conn: asyncpg.Connection, window_s: float, threshold: int) -> list[asyncpg.Record]:
    """Per relay, the lease losses within the window when at least ``threshold`` (older ones are forgotten)."""
    await conn.execute("DELETE FROM lease_losses WHERE at < now() - make_interval(secs => $1)", window_s)
    return list(
        await conn.fetch(
            "SELECT relay_id, count(*) AS count, min(at) AS first_at, max(at) AS last_at, "
            "count(DISTINCT partition) AS partitions FROM lease_losses GROUP BY relay_id HAVING count(*) >= $1",
            threshold,
        )
    )


async def new_quota_refusals(conn: asyncpg.Connection, since: datetime, now: datetime) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT q.tenant_id, t.name AS tenant, q.quota, q.detail, q.count, q.first_at, q.last_at "
            "FROM quota_refusals q JOIN tenants t ON t.id = q.tenant_id WHERE q.last_at > $1 AND q.last_at <= $2",
            since,
            now,
        )
    )


async def alert_channels(conn: asyncpg.Connection, tenant_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    """The alert channels of these tenants, with their (encrypted) secrets."""
    return list(
        await conn.fetch(
            "SELECT id, tenant_id, name, spec::text AS spec, secret FROM alerts WHERE tenant_id = ANY($1::uuid[])",
            list(tenant_ids),
        )
    )


async def forget_old_deliveries(conn: asyncpg.Connection, older_than_s: float) -> None:
    """Alerts taken longer ago than any period: nothing is decided by them any more (a deleted relay's)."""
    await conn.execute("DELETE FROM alert_deliveries WHERE sent_at < now() - make_interval(secs => $1)", older_than_s)


async def deliveries_of(
    conn: asyncpg.Connection, triples: Sequence[tuple[str, str, str]]
) -> dict[tuple[str, str, str], Any]:
    """The last alert owed on each of these (channel, subject, kind): raised and sent when."""
    rows = await conn.fetch(
        "SELECT d.channel, d.subject, d.kind, d.raised_at, d.sent_at FROM unnest($1::text[], $2::text[], $3::text[]) "
        "AS t(channel, subject, kind) JOIN alert_deliveries d "
        "ON (d.channel, d.subject, d.kind) = (t.channel, t.subject, t.kind)",
        [t[0] for t in triples],
        [t[1] for t in triples],
        [t[2] for t in triples],
    )
    return {(r["channel"], r["subject"], r["kind"]): r for r in rows}


async def raise_alert(
    conn: asyncpg.Connection,
    *,
    channel: str,
    alert_id: uuid.UUID | None,
    subject: str,
    kind: str,
    delivery_id: uuid.UUID,
    tenant_id: uuid.UUID,
    body: bytes,
    raised_at: datetime,
) -> None:
    """Owe a new alert on the triple (replacing the one sent before it, whose period has passed)."""
    await conn.execute(
        "INSERT INTO alert_deliveries (channel, alert_id, subject, kind, id, tenant_id, body, raised_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8) ON CONFLICT (channel, subject, kind) DO UPDATE SET "
        "id = EXCLUDED.id, alert_id = EXCLUDED.alert_id, tenant_id = EXCLUDED.tenant_id, body = EXCLUDED.body, "
        "raised_at = EXCLUDED.raised_at, sent_at = NULL, attempts = 0, last_error = NULL, claimed_until = NULL",
        channel,
        alert_id,
        subject,
        kind,
        delivery_id,
        tenant_id,
        body.decode(),
        raised_at,
    )


async def claim_unsent(pool: asyncpg.Pool, limit: int) -> list[asyncpg.Record]:
    """Alerts owed and not taken yet (an endpoint that was down is tried again), claimed for a while
    so that no other evaluation sends them at the same time; with their channel's spec and secret."""
    return list(
        await pool.fetch(
            "UPDATE alert_deliveries d SET claimed_until = now() + make_interval(secs => $2) "
            "FROM (SELECT channel, subject, kind FROM alert_deliveries WHERE sent_at IS NULL "
            "AND (claimed_until IS NULL OR claimed_until < now()) ORDER BY raised_at LIMIT $1 "
            "FOR UPDATE SKIP LOCKED) c "
            "WHERE (d.channel, d.subject, d.kind) = (c.channel, c.subject, c.kind) "
            "RETURNING d.channel, d.subject, d.kind, d.id, d.alert_id, d.body::text AS body, d.attempts, "
            "(SELECT a.spec::text FROM alerts a WHERE a.id = d.alert_id) AS spec, "
            "(SELECT a.secret FROM alerts a WHERE a.id = d.alert_id) AS secret",
            limit,
            CLAIM_S,
        )
    )


async def settle(pool: asyncpg.Pool, row: Any, error: str | None) -> None:
    """The endpoint took the alert (``error`` None: sent, never again for this period) or did not
    (counted, the error kept, sent again at the next evaluation)."""
    await pool.execute(
        "UPDATE alert_deliveries SET sent_at = CASE WHEN $5::text IS NULL THEN now() END, "
        "attempts = attempts + 1, last_error = $5, claimed_until = NULL "
        "WHERE channel = $1 AND subject = $2 AND kind = $3 AND id = $4",
        row["channel"],
        row["subject"],
        row["kind"],
        row["id"],
        error[:2000] if error else None,
    )
