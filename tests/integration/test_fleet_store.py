"""The fleet's batch writes on the real control DB: the bulk ones nobody waits for (lag samples, idle
cursors, releases) go in chunks, so a relay's cursor write waits behind one chunk, not behind all
of a wide relay's rows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from outbox_relay.store.control import ControlStore
from outbox_relay.store.fleet import BULK_CHUNK_ROWS, CursorWrite, FleetStore, LagSample
from tests.integration.conftest import Setup

KEY = "chunk-test-worker"


async def test_a_cursor_write_does_not_wait_for_a_wide_relays_whole_lag_sample(
    setup: Setup, store: ControlStore
) -> None:
    """One lag statement over 1,024 partitions took 15-31 ms in the fleet bench, and every cursor
    write of the relay's drain waited for it behind the write lock."""
    partitions = 256
    body = {"database": "app", "target": "rabbit", "partitions": partitions, "enabled": False}
    assert (await setup.tenant.put("/v1/relays/wide", body)).status_code == 201, "relay not created"
    relay_id = await setup.relay_id(store, "wide")
    fleet = FleetStore(store.pool)
    try:
        await store.pool.execute(
            "UPDATE relay_partitions SET lease_holder = $2, lease_epoch = lease_epoch + 1 WHERE relay_id = $1",
            relay_id,
            KEY,
        )
        leases = [lease for lease in await fleet.owned(KEY) if lease.relay_id == relay_id]
        assert len(leases) == partitions > 2 * BULK_CHUNK_ROWS - 1
        now = datetime.now(UTC)
        samples = [LagSample(lease=lease, lag_s=3.0, pending=5, oldest_at=now, stall=None) for lease in leases]

        lag = asyncio.create_task(fleet.record_lag(samples))
        await asyncio.sleep(0)  # the lag sample takes the write lock first
        moved = await fleet.advance_cursors([CursorWrite(lease=leases[0], txid=1, row_id=1, published=1)])
        assert moved == {(relay_id, 0)}
        assert not lag.done(), "the cursor write waited for the whole lag sample"
        await lag

        recorded = await store.pool.fetchval(
            "SELECT count(*) FROM relay_partitions WHERE relay_id = $1 AND pending_estimate = 5", relay_id
        )
        assert recorded == partitions  # every chunk written

        released = await fleet.release(KEY, [(lease.relay_id, lease.partition) for lease in leases])
        assert released == partitions
        assert await fleet.owned(KEY) == []
    finally:
        await store.pool.execute("UPDATE relay_partitions SET lease_holder = NULL WHERE lease_holder = $1", KEY)
        assert (await setup.tenant.delete("/v1/relays/wide")).status_code == 204
