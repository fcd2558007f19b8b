"""A tenant database restored into another PostgreSQL cluster, on real servers.

The test makes a second cluster of its own (``pg_createcluster``), dumps the tenant database from the
first one with ``pg_dump``, restores it with ``pg_restore``, writes on the new cluster and moves the
database to the new DSN with a ``PUT``, while a relay runs. The new cluster's transaction counter is
far behind the old one's, so the restored rows carry transaction ids above the new server's horizon,
and its identity sequence hands out again the row ids the old cluster used after the dump.

What must hold: every message is delivered; no two different messages share an ``outbox-id`` (the
row ids do collide, which the test checks, so the collision is real); the restored backlog is handled
per ``policy.on_restore`` within seconds, resent before anything written on the new cluster of the
same key (``resend``) or not at all (``skip``); and the relay's status says which and how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from outbox_relay.client import add
from outbox_relay.config import Settings
from outbox_relay.engine import RelayRunner
from outbox_relay.store.control import ControlStore
from tests.conftest import PG_USER, RUN_ID
from tests.fleet import Fleet
from tests.harness.brokers import free_port
from tests.integration.conftest import Setup

pytestmark = pytest.mark.slow

KEYS = [f"key-{k}" for k in range(8)]
MAIN_HBA = Path("/etc/postgresql/15/main/pg_hba.conf")


@contextlib.contextmanager
def second_cluster() -> Iterator[int]:
    """A PostgreSQL 15 cluster of the test's own, trust auth copied from the main one; its port.
    Dropped (stopped first) at the end, whatever happened."""
    if shutil.which("pg_createcluster") is None or not MAIN_HBA.exists():
        pytest.skip("needs Debian's postgresql-common (pg_createcluster) and the main cluster's pg_hba.conf")
    name, port = f"restore{RUN_ID}{uuid.uuid4().hex[:4]}", free_port()
    run = ["pg_createcluster", "15", name, "--port", str(port)]
    subprocess.run(run, check=True, capture_output=True, timeout=120)
    try:
        hba = Path(f"/etc/postgresql/15/{name}/pg_hba.conf")
        shutil.copyfile(MAIN_HBA, hba)
        shutil.chown(hba, "postgres", "postgres")
        subprocess.run(["pg_ctlcluster", "15", name, "start"], check=True, capture_output=True, timeout=120)
        yield port
    finally:
        subprocess.run(["pg_dropcluster", "--stop", "15", name], capture_output=True, timeout=120)


def dsn_at(port: int, database: str) -> str:
    return f"postgresql://{PG_USER}@127.0.0.1:{port}/{database}"


async def write(dsn: str, phase: str, count: int) -> list[bytes]:
    """``count`` messages over the keys, one transaction each; their bodies, which name them."""
    bodies = []
    conn = await asyncpg.connect(dsn)
    try:
        for n in range(count):
            key = KEYS[n % len(KEYS)]
            body = json.dumps({"phase": phase, "n": n, "key": key}).encode()
            async with conn.transaction():
                await add(conn, "events", key, body)
            bodies.append(body)
    finally:
        await conn.close()
    return bodies


async def row_ids(dsn: str, bodies: list[bytes]) -> set[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id FROM outbox_relay.outbox WHERE payload = ANY($1::bytea[])", bodies)
        return {r["id"] for r in rows}
    finally:
        await conn.close()


class Relaying:
    """Runs every partition's slices back to back, as a worker would, until stopped."""

    def __init__(self, runner: RelayRunner, relay_id: uuid.UUID, partitions: int) -> None:
        self.runner, self.relay_id, self.partitions = runner, relay_id, partitions
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while not self._stop.is_set():
            await asyncio.gather(
                *(self.runner.run_slice(self.relay_id, p, "restore-test") for p in range(self.partitions))
            )

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=30)
            self._task = None


class FleetRelaying:
    """The worker's data plane in this process (one fleet engine), started and stopped like Relaying."""

    def __init__(self, settings: Settings) -> None:
        self.fleet = Fleet(settings)

    def start(self) -> None:
        self._starting = asyncio.create_task(self.fleet.start())

    async def stop(self) -> None:
        await self._starting
        await self.fleet.close()


class Consumer:
    """Everything the queue delivered, in order: (outbox-id, key, body, when)."""

    def __init__(self, setup: Setup, queue: str) -> None:
        self.setup, self.queue = setup, queue
        self.received: list[tuple[str, str, bytes, float]] = []

    async def drain(self) -> None:
        now = time.monotonic()
        for key, message_id, body in await self.setup.drain(self.queue):
            self.received.append((message_id, key, body, now))

    async def until(self, condition: Any, timeout_s: float, what: str) -> float:
        """Drain until ``condition()``; how long it took."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"{what} not within {timeout_s} s")
            await asyncio.sleep(0.05)
            await self.drain()
        return time.monotonic() - started

    def bodies(self, since: int = 0) -> list[bytes]:
        return [body for _, _, body, _ in self.received[since:]]


@pytest.fixture
async def new_cluster() -> AsyncIterator[int]:
    with second_cluster() as port:
        yield port


@pytest.mark.parametrize("on_restore", ["resend", "skip"])
@pytest.mark.parametrize("data_plane", ["slices", "fleet"])
async def test_restore_into_another_cluster_keeps_ids_unique_and_handles_the_backlog_at_once(
    setup: Setup,
    runner: RelayRunner,
    store: ControlStore,
    settings: Settings,
    new_cluster: int,
    tmp_path: Path,
    on_restore: str,
    data_plane: str,
) -> None:
    queue = f"restore-{on_restore}-{data_plane}-q"
    await setup.channel.declare_queue(queue, durable=True)
    policy: dict[str, Any] = {"poll_interval_ms": 50, "batch_size": 50}
    if on_restore != "resend":  # resend is the default: the relay names nothing
        policy["on_restore"] = on_restore
    body = {"database": "app", "target": "rabbit", "partitions": 2, "topic_mapping": {"*": queue}, "policy": policy}
    relay = f"restore-{on_restore}-{data_plane}"
    assert (await setup.tenant.put(f"/v1/relays/{relay}", body)).status_code == 201, body
    relay_id = await setup.relay_id(store, relay)
    relaying: Relaying | FleetRelaying = (
        Relaying(runner, relay_id, 2) if data_plane == "slices" else FleetRelaying(settings)
    )
    consumer = Consumer(setup, queue)

    # on the old cluster: A published; B written while the relay lags; the dump holds A and B
    old_dsn = setup.dsn
    relaying.start()
    a = await write(old_dsn, "A", 120)
    await consumer.until(lambda: set(a) <= set(consumer.bodies()), 30, "A delivered")
    await relaying.stop()
    b = await write(old_dsn, "B", 40)
    dump = tmp_path / "tenant.dump"
    await asyncio.to_thread(
        subprocess.run, ["pg_dump", "-Fc", "-f", str(dump), old_dsn], check=True, capture_output=True, timeout=120
    )
    # after the dump, the old cluster writes C and the relay publishes B and C from it
    relaying.start()
    c = await write(old_dsn, "C", 60)
    await consumer.until(lambda: set(b + c) <= set(consumer.bodies()), 30, "B and C delivered")
    await relaying.stop()

    # the restore into the new cluster; the application moves first (D1), then the relay (PUT)
    admin = await asyncpg.connect(dsn_at(new_cluster, "postgres"))
    try:
        await admin.execute("CREATE DATABASE restored")
    finally:
        await admin.close()
    new_dsn = dsn_at(new_cluster, "restored")
    await asyncio.to_thread(
        subprocess.run, ["pg_restore", "--no-owner", "-d", new_dsn, str(dump)], check=True, capture_output=True
    )
    d1 = await write(new_dsn, "D1", 30)
    before_put = len(consumer.received)
    assert (await setup.tenant.put("/v1/databases/app", {"dsn": new_dsn})).status_code == 200
    relaying.start()
    d2 = await write(new_dsn, "D2", 30)
    restored, written_after = set(a + b), set(d1 + d2)

    wanted = restored | written_after if on_restore == "resend" else written_after
    try:
        took_s: float | None = await consumer.until(
            lambda: wanted <= set(consumer.bodies(before_put)), 20, "delivery after the PUT"
        )
        await asyncio.sleep(1.5)  # anything else (a late restored row, say) would arrive now
        await consumer.drain()
    except AssertionError:
        took_s = None  # checked below, after what the ids say
    finally:
        await relaying.stop()

    # the collision is real: the new cluster handed out again row ids the old one used for C ...
    assert await row_ids(new_dsn, d1 + d2) & await row_ids(old_dsn, c)
    # ... but no outbox-id ever names two different messages, and every message arrived
    bodies_of: dict[str, set[bytes]] = defaultdict(set)
    for message_id, _, body, _ in consumer.received:
        bodies_of[message_id].add(body)
    shared = {m: sorted(v) for m, v in bodies_of.items() if len(v) > 1}
    assert not shared, f"{len(shared)} outbox-ids shared by different messages, e.g. {list(shared.items())[:2]}"
    missing = wanted - set(consumer.bodies(before_put))
    assert took_s is not None, (
        f"{len(missing)} messages not delivered within 20 s of the PUT, e.g. {sorted(missing)[:3]}"
    )
    print(f"\non_restore={on_restore}: everything delivered {took_s:.2f} s after the PUT")
    assert set(a + b + c + d1 + d2) <= set(consumer.bodies())
    ids_of = {body: message_id for message_id, _, body, _ in consumer.received}
    assert all(uuid.UUID(ids_of[body]) for body in ids_of)  # message ids are UUIDs

    after_put = consumer.received[before_put:]
    resent = [body for _, _, body, _ in after_put if body in restored]
    if on_restore == "resend":
        assert set(resent) == restored  # the whole backlog again, with its ids: consumers drop the duplicates
        for key in KEYS:  # ... before anything of its key written on the new cluster
            order = [body for _, k, body, _ in after_put if k == key]
            last_restored = max(i for i, body in enumerate(order) if body in restored)
            first_new = min(i for i, body in enumerate(order) if body in written_after)
            assert last_restored < first_new, f"{key}: a message written after the restore overtook a restored one"
    else:
        assert resent == [], "skipped rows were published again"
    assert [body for _, _, body, _ in after_put if body in set(c)] == []  # C never existed on the new cluster

    status = (await setup.tenant.get(f"/v1/relays/{relay}/status")).json()
    summary = status["restore"]
    assert summary is not None, status
    assert summary["policy"] == on_restore
    assert summary["state"] == ("resent" if on_restore == "resend" else "skipped")
    assert summary["rows"] == summary["done"] == len(restored)
    assert sum(p["restore"]["rows"] for p in status["partitions"]) == len(restored)
    assert summary["duration_s"] is not None and summary["duration_s"] < 10, summary
    assert all(p["resets"] >= 1 for p in status["partitions"])
    print(
        f"on_restore={on_restore}: backlog of {summary['rows']} restored rows {summary['state']}, "
        f"{summary['duration_s']:.2f} s from detection to the last one"
    )
