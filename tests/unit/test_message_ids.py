"""Message ids and restore reporting, without servers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.client import ClientError
from outbox_relay.client.inbox import message_id
from outbox_relay.domain import Relay
from outbox_relay.engine import build_messages
from outbox_relay.store.control import PartitionState
from outbox_relay.tenant.db import OutboxRow, derived_message_id
from service.relays.status import relay_status

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def row(row_id: int, message: str = "") -> OutboxRow:
    return OutboxRow(
        txid=10, id=row_id, topic="t", key="k", payload=b"", headers="{}", created_at=NOW, message_id=message
    )


def test_the_message_id_is_published_as_outbox_id_and_the_row_id_only_without_one() -> None:
    mid = str(uuid.uuid4())
    with_id, legacy = build_messages(Relay(database="d", target="t"), "r", [row(501, mid), row(502)])
    assert with_id is not None and legacy is not None
    assert (with_id.id, with_id.message_id, with_id.dedupe_id, with_id.headers["outbox-id"]) == (501, mid, mid, mid)
    assert (legacy.dedupe_id, legacy.headers["outbox-id"]) == ("502", "502")  # an outbox of schema version 1
    assert OutgoingMessage(id=3, destination="x", key=None, payload=b"", headers={}).dedupe_id == "3"


def test_derived_ids_are_stable_per_outbox_and_differ_between_outboxes() -> None:
    ours, theirs = uuid.uuid4(), uuid.uuid4()
    first = derived_message_id(ours, 14_100, 501)
    assert first == derived_message_id(ours, 14_100, 501) == str(uuid.uuid5(ours, "14100:501"))
    assert uuid.UUID(first).version == 5
    # the same row id in another transaction (a restore that reused it), or in another outbox
    assert len({first, derived_message_id(ours, 7_900, 501), derived_message_id(theirs, 14_100, 501)}) == 3


def test_the_inbox_stores_ids_in_one_canonical_form() -> None:
    mid = uuid.uuid4()
    assert message_id(mid) == message_id(str(mid).upper()) == message_id(f" {mid} ") == str(mid)
    assert message_id("0042") == message_id(42) == "42"
    for bad in ("", "4e2", "12-34", "-1"):
        with pytest.raises(ClientError):
            message_id(bad)
    with pytest.raises(ClientError):
        message_id(True)


def partition(n: int, **restore: Any) -> PartitionState:
    base: dict[str, object] = {
        "partition": n,
        "cursor_txid": 0,
        "cursor_id": 0,
        "published_count": 0,
        "pending_estimate": 0,
        "oldest_pending_at": None,
        "lag_s": None,
        "lease_holder": None,
        "lease_epoch": 1,
        "lease_expires_at": None,
        "last_published_at": None,
        "last_error": None,
        "last_error_class": None,
        "last_error_at": None,
        "dead_count": 0,
        "retried_count": 0,
        "retry_outbox_id": None,
        "retry_attempts": 0,
        "retry_next_at": None,
        "resets": 1 if restore else 0,
        "last_reset_reason": None,
        "stall": None,
        "restore_policy": None,
        "restore_state": None,
        "restore_rows": 0,
        "restore_done": 0,
        "restore_detected_at": None,
        "restore_finished_at": None,
    }
    base.update({f"restore_{k}": v for k, v in restore.items()})
    return PartitionState(**base)


def test_the_status_sums_a_restore_over_partitions_and_says_resending_until_all_are_done() -> None:
    t0 = NOW
    parts = [
        partition(0, policy="resend", state="resent", rows=70, done=70, detected_at=t0, finished_at=t0 + timedelta(1)),
        partition(1, policy="resend", state="resending", rows=90, done=40, detected_at=t0 + timedelta(seconds=2)),
        partition(2),
    ]
    status = relay_status("r", True, parts, now=t0)
    assert status.restore is not None
    assert (status.restore.state, status.restore.rows, status.restore.done) == ("resending", 160, 110)
    assert status.restore.finished_at is None and status.restore.detected_at == t0
    assert status.partitions[2].restore is None
    assert status.partitions[0].restore is not None and status.partitions[0].restore.duration_s == 86_400.0

    parts[1] = msgspec.structs.replace(
        parts[1], restore_state="resent", restore_done=90, restore_finished_at=t0 + timedelta(seconds=3)
    )
    done = relay_status("r", True, parts, now=t0).restore
    assert done is not None and (done.state, done.done, done.finished_at) == ("resent", 160, t0 + timedelta(1))
    assert relay_status("r", True, [partition(0)], now=t0).restore is None
