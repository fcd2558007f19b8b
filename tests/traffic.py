"""Application traffic for end-to-end tests: writers that commit and roll back, and the checks."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict

import asyncpg

from outbox_relay.client import add


async def write_messages(
    dsn: str, seed: int, *, messages: int = 1000, keys: int = 100, writers: int = 5, rollback_share: float = 0.2
) -> tuple[dict[str, list[uuid.UUID]], set[uuid.UUID]]:
    """Write ``messages`` messages; returns committed message ids per key (in write order) and the
    rolled-back ones.

    Writer ``w`` owns the keys ``k`` with ``k % writers == w``, so one key's transactions are
    sequential, and the order the test expects per key is well defined.
    """
    committed: dict[str, list[uuid.UUID]] = defaultdict(list)
    rolled_back: set[uuid.UUID] = set()
    per_writer = messages // writers

    async def writer(w: int) -> None:
        rng = random.Random(seed * 100 + w)
        owned = [f"key-{k:03d}" for k in range(keys) if k % writers == w]
        conn = await asyncpg.connect(dsn)
        try:
            written = 0
            while written < per_writer:
                size = min(rng.randint(1, 5), per_writer - written)
                batch: list[tuple[str, uuid.UUID]] = []
                rollback = rng.random() < rollback_share
                tx = conn.transaction()
                await tx.start()
                for _ in range(size):
                    key = rng.choice(owned)
                    payload = {"writer": w, "n": written, "key": key}
                    batch.append((key, await add(conn, "orders", key, payload, headers={"writer": str(w)})))
                    written += 1
                if rollback:
                    await tx.rollback()
                    rolled_back.update(i for _, i in batch)
                else:
                    await tx.commit()
                    for key, i in batch:
                        committed[key].append(i)
                await asyncio.sleep(0)
        finally:
            await conn.close()

    await asyncio.gather(*(writer(w) for w in range(writers)))
    return committed, rolled_back


def check_delivery(
    name: str,
    received: list[tuple[str, uuid.UUID]],
    committed: dict[str, list[uuid.UUID]],
    rolled_back: set[uuid.UUID],
) -> None:
    ids = [i for _, i in received]
    expected = {i for v in committed.values() for i in v}
    assert not set(ids) & rolled_back, f"{name}: rolled-back messages were published"
    assert set(ids) == expected, f"{name}: missing {sorted(map(str, expected - set(ids)))[:10]}"
    assert len(ids) == len(set(ids)), f"{name}: duplicates in the steady state"
    by_key: dict[str, list[uuid.UUID]] = defaultdict(list)
    for key, i in received:
        by_key[key].append(i)
    for key, order in committed.items():
        assert by_key[key] == order, f"{name}: key {key} out of order"
