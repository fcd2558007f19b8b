"""The data plane's rows: relay plans, partitions, leases, fenced cursor writes, retries, restores and
the outbox maintenance's bookkeeping."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from outbox_relay.domain import PartitionErrorClass
from outbox_relay.store.base import StoreBase
from outbox_relay.store.dead_letters import NewLetter, insert_letter
from outbox_relay.store.rows import (
    HELD_BY_LEASE,
    Lease,
    PartitionState,
    RelayPlan,
    ResourceRow,
    RestorePhase,
    RestorePolicy,
    RestoreState,
    RetryState,
    _resource,
    _select,
    lease_of,
)


class PartitionsStore(StoreBase):
    # --- data plane: scheduling, leases, cursors -------------------------------------------------

    async def relay_plan(self, relay_id: uuid.UUID) -> RelayPlan | None:
        return (await self.relay_plans([relay_id])).get(relay_id)

    async def relay_plans(self, relay_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, RelayPlan]:
        """The plans of the relays that exist among ``relay_ids``, in one query (a worker that
        claims the partitions of a thousand relays at start reads their plans at once)."""
        if not relay_ids:
            return {}
        rows = await self.pool.fetch(
            "SELECT r.id AS relay_id, t.id AS tenant_id, t.name AS tenant_name, r.name AS relay_name, "
            "g.name AS target_name, r.spec::text AS relay_spec, "
            "r.updated_at AS relay_version, r.enabled, r.partitions, "
            "d.id AS database_id, d.spec::text AS database_spec, d.secret AS database_secret, "
            "d.updated_at AS database_version, d.secret_version AS database_secret_version, "
            "g.id AS target_id, g.spec::text AS target_spec, g.secret AS target_secret, "
            "g.updated_at AS target_version, g.secret_version AS target_secret_version "
            "FROM relays r JOIN tenants t ON t.id = r.tenant_id JOIN databases d ON d.id = r.database_id "
            "JOIN targets g ON g.id = r.target_id WHERE r.id = ANY($1::uuid[])",
            list(relay_ids),
        )
        plans: dict[uuid.UUID, RelayPlan] = {}
        for row in rows:
            values = dict(row)
            for k in ("relay_spec", "database_spec", "target_spec"):
                values[k] = values[k].encode()
            for k in ("database_secret", "target_secret"):
                values[k] = bytes(values[k]) if values[k] is not None else None
            plans[row["relay_id"]] = RelayPlan(**values)
        return plans

    async def acquire_lease(self, relay_id: uuid.UUID, partition: int, holder: str, ttl_s: float) -> Lease | None:
        """Compare-and-set: take the partition if its lease is free or expired; bumps the epoch."""
        row = await self.pool.fetchrow(
            "UPDATE relay_partitions SET lease_holder = $3, lease_epoch = lease_epoch + 1, "
            "lease_expires_at = now() + make_interval(secs => $4), updated_at = now() "
            "WHERE relay_id = $1 AND partition = $2 "
            # free, or a slice lease that expired (a fleet owner's partition has no expiry of its own:
            # it lapses with the owner's heartbeat, and the fleet frees it)
            "AND (lease_holder IS NULL OR lease_expires_at < now()) "
            "RETURNING lease_epoch, cursor_txid, cursor_id, system_identifier, "
            "retry_outbox_id, retry_attempts, retry_errors::text AS retry_errors, retry_next_at",
            relay_id,
            partition,
            holder,
            ttl_s,
        )
        if row is None:
            return None
        return lease_of(row, relay_id=relay_id, partition=partition, holder=holder)

    async def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        return (
            await self.pool.fetchval(
                "UPDATE relay_partitions SET lease_expires_at = now() + make_interval(secs => $4) "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                ttl_s,
            )
            is True
        )

    async def release_lease(self, lease: Lease) -> None:
        await self.pool.execute(
            "UPDATE relay_partitions SET lease_holder = NULL, lease_expires_at = NULL "
            "WHERE relay_id = $1 AND partition = $2 AND lease_epoch = $3",
            lease.relay_id,
            lease.partition,
            lease.epoch,
        )

    async def advance_cursor(self, lease: Lease, txid: int, row_id: int, published: int, filtered: int = 0) -> bool:
        """Move the cursor, fenced: refused (False) once another holder took the lease. ``filtered``:
        rows the relay's filter left out that the cursor passes."""
        return (
            await self.pool.fetchval(
                "UPDATE relay_partitions SET cursor_txid = $4, cursor_id = $5, "
                "published_count = published_count + $6, filtered_count = filtered_count + $7, "
                "last_published_at = CASE WHEN $6 > 0 THEN now() ELSE last_published_at END, "
                "last_error = NULL, last_error_class = NULL, stall = NULL, "
                "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', "
                "retry_next_at = NULL, updated_at = now() "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                txid,
                row_id,
                published,
                filtered,
            )
            is True
        )

    async def record_error(self, lease: Lease, error: str, error_class: str = PartitionErrorClass.ERROR) -> None:
        await self.pool.execute(
            "UPDATE relay_partitions SET last_error = $4, last_error_at = now(), last_error_class = $5 "
            "WHERE relay_id = $1 AND partition = $2 AND lease_epoch = $3",
            lease.relay_id,
            lease.partition,
            lease.epoch,
            error[:2000],
            error_class,
        )

    async def record_pending(
        self, lease: Lease, pending: int, oldest_at: datetime | None, stall: dict[str, Any] | None
    ) -> None:
        await self.pool.execute(
            "UPDATE relay_partitions SET pending_estimate = $4, oldest_pending_at = $5, pending_checked_at = now(), "
            "stall = $6::jsonb WHERE relay_id = $1 AND partition = $2 AND lease_epoch = $3",
            lease.relay_id,
            lease.partition,
            lease.epoch,
            pending,
            oldest_at,
            json.dumps(stall) if stall is not None else None,
        )

    async def record_retry(self, lease: Lease, retry: RetryState, error: str) -> bool:
        """Remember a refused message's attempts (fenced); False once the lease is lost."""
        return (
            await self.pool.fetchval(
                "UPDATE relay_partitions SET retry_outbox_id = $4, retry_attempts = $5, retry_errors = $6::jsonb, "
                "retry_next_at = $7, retried_count = retried_count + 1, last_error = $8, last_error_at = now(), "
                "last_error_class = 'refused', "
                "updated_at = now() "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                retry.outbox_id,
                retry.attempts,
                json.dumps(retry.errors),
                retry.next_at,
                error[:2000],
            )
            is True
        )

    async def dead_letter(self, lease: Lease, letter: NewLetter) -> bool:
        """Store the letter and move the cursor past it, in one transaction, fenced by the epoch."""
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await conn.fetchval(
                "UPDATE relay_partitions SET cursor_txid = $4, cursor_id = $5, dead_count = dead_count + 1, "
                "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', retry_next_at = NULL, "
                "last_error = $6, last_error_at = now(), updated_at = now() "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                letter.outbox_txid,
                letter.outbox_id,
                f"dead-lettered outbox message {letter.outbox_id}: {letter.last_error}"[:2000],
            )
            if moved is not True:
                return False
            await insert_letter(conn, lease.relay_id, lease.partition, letter)
            return True

    async def set_identity(self, lease: Lease, identity: str) -> bool:
        return (
            await self.pool.fetchval(
                f"UPDATE relay_partitions SET system_identifier = $4 WHERE {HELD_BY_LEASE} RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                identity,
            )
            is True
        )

    async def reset_cursor(self, lease: Lease, identity: str | None, reason: str) -> bool:
        """Start the partition over from the beginning of the outbox (after a restore or failover
        that left no row above the server's transaction counter): everything is published again,
        nothing is left out (an earlier restore's backlog bounds are dropped too)."""
        return (
            await self.pool.fetchval(
                "UPDATE relay_partitions SET cursor_txid = 0, cursor_id = 0, system_identifier = $4, "
                "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', retry_next_at = NULL, "
                "resets = resets + 1, last_reset_at = now(), last_reset_reason = $5, "
                "last_error = $5, last_error_at = now(), updated_at = now(), "
                "restore_policy = NULL, restore_state = NULL, restore_next_xid = NULL, restore_max_id = NULL, "
                "restore_max_created_at = NULL, restore_rows = 0, restore_done = 0, "
                "restore_detected_at = NULL, restore_finished_at = NULL "
                f"WHERE {HELD_BY_LEASE} "
                "RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                identity,
                reason[:2000],
            )
            is True
        )

    async def start_restore(
        self,
        lease: Lease,
        identity: str | None,
        reason: str,
        *,
        policy: RestorePolicy,
        next_xid: int,
        max_id: int,
        max_created_at: datetime,
        rows: int,
    ) -> RestoreState | None:
        """Start over after a restore whose backlog is known (fenced; None once the lease is lost).

        ``resend``: the cursor starts at the beginning of the backlog, which is read first.
        ``skip``: the backlog is done at once (counted, never published again) and the ordinary
        read starts from the beginning of the outbox, without it."""
        state: RestorePhase = (
            "resending" if policy == "resend" and rows > 0 else ("skipped" if policy == "skip" else "resent")
        )
        row = await self.pool.fetchrow(
            "UPDATE relay_partitions SET cursor_txid = 0, cursor_id = 0, system_identifier = $4, "
            "retry_outbox_id = NULL, retry_attempts = 0, retry_errors = '[]', retry_next_at = NULL, "
            "resets = resets + 1, last_reset_at = now(), last_reset_reason = $5, "
            "last_error = $5, last_error_at = now(), updated_at = now(), "
            "restore_policy = $6::text, restore_state = $7::text, restore_next_xid = $8::bigint, "
            "restore_max_id = $9::bigint, restore_max_created_at = $10::timestamptz, restore_rows = $11::bigint, "
            "restore_done = CASE WHEN $7::text = 'resending' THEN 0 ELSE $11::bigint END, restore_detected_at = now(), "
            "restore_finished_at = CASE WHEN $7::text = 'resending' THEN NULL ELSE now() END "
            f"WHERE {HELD_BY_LEASE} "
            "RETURNING restore_detected_at, restore_finished_at, restore_done",
            lease.relay_id,
            lease.partition,
            lease.epoch,
            identity,
            reason[:2000],
            policy,
            state,
            next_xid,
            max_id,
            max_created_at,
            rows,
        )
        if row is None:
            return None
        return RestoreState(
            policy=policy,
            state=state,
            next_xid=next_xid,
            max_id=max_id,
            max_created_at=max_created_at,
            rows=rows,
            done=row["restore_done"],
            detected_at=row["restore_detected_at"],
            finished_at=row["restore_finished_at"],
        )

    async def restore_state(self, relay_id: uuid.UUID, partition: int) -> RestoreState | None:
        """The partition's last detected restore with a backlog, if any."""
        return (await self.restore_states(relay_id, [partition])).get(partition)

    async def restore_states(self, relay_id: uuid.UUID, partitions: list[int]) -> dict[int, RestoreState]:
        """The last detected restore of each of ``partitions`` that has one, in one query."""
        rows = await self.pool.fetch(
            "SELECT partition, restore_policy, restore_state, restore_next_xid, restore_max_id, "
            "restore_max_created_at, restore_rows, restore_done, restore_detected_at, restore_finished_at "
            "FROM relay_partitions WHERE relay_id = $1 AND partition = ANY($2::int[]) AND restore_state IS NOT NULL",
            relay_id,
            partitions,
        )
        return {
            row["partition"]: RestoreState(
                policy=row["restore_policy"],
                state=row["restore_state"],
                next_xid=row["restore_next_xid"],
                max_id=row["restore_max_id"],
                max_created_at=row["restore_max_created_at"],
                rows=row["restore_rows"],
                done=row["restore_done"],
                detected_at=row["restore_detected_at"],
                finished_at=row["restore_finished_at"],
            )
            for row in rows
        }

    async def restore_progress(self, lease: Lease, done: int) -> bool:
        """How many backlog rows a resending partition has passed so far (fenced)."""
        return (
            await self.pool.fetchval(
                f"UPDATE relay_partitions SET restore_done = $4 WHERE {HELD_BY_LEASE} "
                "AND restore_state = 'resending' RETURNING true",
                lease.relay_id,
                lease.partition,
                lease.epoch,
                done,
            )
            is True
        )

    async def finish_restore(self, lease: Lease) -> datetime | None:
        """The backlog is through: the ordinary read starts from the beginning of the outbox,
        without the backlog (fenced; None once the lease is lost)."""
        value: datetime | None = await self.pool.fetchval(
            "UPDATE relay_partitions SET cursor_txid = 0, cursor_id = 0, restore_state = 'resent', "
            "restore_done = restore_rows, restore_finished_at = now(), updated_at = now() "
            f"WHERE {HELD_BY_LEASE} AND restore_state = 'resending' "
            "RETURNING restore_finished_at",
            lease.relay_id,
            lease.partition,
            lease.epoch,
        )
        return value

    async def relays_of_tenant(self, tenant_id: uuid.UUID) -> list[ResourceRow]:
        rows = await self.pool.fetch(_select("relays") + " WHERE tenant_id = $1 ORDER BY name", tenant_id)
        return [_resource(r) for r in rows]

    async def databases_with_relays(self, *, due_after_s: float = 0.0, spread_s: float = 60.0) -> list[dict[str, Any]]:
        """Tenant databases some relay reads (the ones outbox maintenance looks after) and that were
        not maintained in the last ``due_after_s``, least recently maintained first; at most a
        ``spread_s / due_after_s`` share of them (at least one), so that a run every ``spread_s``
        maintains each about every ``due_after_s`` without all of them falling due in one run."""
        rows = await self.pool.fetch(
            "WITH read AS (SELECT d.id, d.spec::text AS spec, d.secret, d.updated_at, d.maintained_at "
            "FROM databases d WHERE EXISTS (SELECT 1 FROM relays r WHERE r.database_id = d.id)) "
            "SELECT id, spec, secret, updated_at FROM read "
            "WHERE maintained_at IS NULL OR maintained_at < now() - make_interval(secs => $1) "
            "ORDER BY maintained_at NULLS FIRST, id "
            "LIMIT CASE WHEN $1 <= $2 THEN NULL ELSE greatest(1, ceil((SELECT count(*) FROM read) * $2 / $1))::int END",
            due_after_s,
            spread_s,
        )
        return [dict(r) for r in rows]

    async def relay_cursors(self, database_id: uuid.UUID) -> list[tuple[int, int, dict[int, tuple[int, int]]]]:
        """(partitions, retention_hours, {partition: cursor}) of every relay reading the database."""
        return (await self.relay_cursors_of([database_id])).get(database_id, [])

    async def relay_cursors_of(
        self, database_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, list[tuple[int, int, dict[int, tuple[int, int]]]]]:
        """:meth:`relay_cursors` of many databases in one query (one maintenance run reads every
        partition's cursor once, not once per database)."""
        rows = await self.pool.fetch(
            "SELECT r.database_id, r.id, r.partitions, "
            "coalesce((r.spec->'policy'->>'retention_hours')::int, 168) AS retention, "
            "array_agg(p.partition ORDER BY p.partition) AS parts, "
            # a partition still reading a restored backlog has read nothing of the rest yet
            "array_agg(CASE WHEN p.restore_state = 'resending' THEN 0 ELSE p.cursor_txid END "
            "ORDER BY p.partition) AS txids, "
            "array_agg(CASE WHEN p.restore_state = 'resending' THEN 0 ELSE p.cursor_id END "
            "ORDER BY p.partition) AS ids "
            "FROM relays r JOIN relay_partitions p ON p.relay_id = r.id WHERE r.database_id = ANY($1::uuid[]) "
            "GROUP BY r.id",
            database_ids,
        )
        out: dict[uuid.UUID, list[tuple[int, int, dict[int, tuple[int, int]]]]] = {}
        for r in rows:
            cursors = {p: (tx, i) for p, tx, i in zip(r["parts"], r["txids"], r["ids"], strict=True)}
            out.setdefault(r["database_id"], []).append((r["partitions"], r["retention"], cursors))
        return out

    async def record_maintenance(self, database_id: uuid.UUID, error: str | None) -> None:
        await self.pool.execute(
            "UPDATE databases SET maintained_at = now(), maintenance_error = $2 WHERE id = $1", database_id, error
        )

    async def partition_states(self, relay_id: uuid.UUID) -> list[PartitionState]:
        return (await self.partition_states_of([relay_id])).get(relay_id, [])

    async def partition_states_of(
        self, relay_ids: list[uuid.UUID], ownership_ttl_s: float = 10.0
    ) -> dict[uuid.UUID, list[PartitionState]]:
        """Every partition's state of each relay, by relay, in one query (the tenant overview)."""
        rows = await self.pool.fetch(
            "SELECT p.relay_id, p.partition, p.cursor_txid, p.cursor_id, p.lease_holder, p.lease_epoch, "
            # a fleet owner's partition lapses with the owner's heartbeat
            "coalesce(p.lease_expires_at, w.heartbeat_at + make_interval(secs => $2)) AS lease_expires_at, "
            "p.last_published_at, p.last_error, p.last_error_at, p.published_count, p.filtered_count, p.dead_count, "
            "p.retried_count, p.retry_outbox_id, p.retry_attempts, p.retry_next_at, p.resets, p.last_reset_at, "
            "p.last_reset_reason, p.last_error_class, p.pending_estimate, p.oldest_pending_at, "
            "p.pending_checked_at, p.stall::text AS stall, p.lag_s, p.throttled_s, p.throttled_at, "
            "p.restore_policy, p.restore_state, p.restore_rows, p.restore_done, p.restore_detected_at, "
            "p.restore_finished_at, "
            "coalesce(p.lease_expires_at, w.heartbeat_at + make_interval(secs => $2)) < now() AS lease_expired "
            "FROM relay_partitions p LEFT JOIN workers w ON w.key = p.lease_holder "
            "WHERE p.relay_id = ANY($1::uuid[]) ORDER BY p.relay_id, p.partition",
            relay_ids,
            ownership_ttl_s,
        )
        by_relay: dict[uuid.UUID, list[PartitionState]] = {}
        for r in rows:
            by_relay.setdefault(r["relay_id"], []).append(PartitionState(**dict(r)))
        return by_relay
