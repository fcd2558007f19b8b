"""The CloudEvents attributes a relay publishes (``engine.cloud_event``), for new rows and for
replayed dead letters: ``id`` the message id, ``source`` the configured one or the relay,
``type`` the named header or the topic, ``time`` RFC 3339 in UTC."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from outbox_relay.domain import CloudEventsOptions, Relay
from outbox_relay.engine import build_messages, cloud_event
from outbox_relay.tenant.db import OutboxRow

AT = datetime(2026, 12, 3, 11, 30, 5, 123456, tzinfo=timezone(timedelta(hours=2)))


def test_the_defaults_and_the_header_that_names_the_type() -> None:
    options = CloudEventsOptions(type_header="event-type")
    event = cloud_event(options, "orders", "m-1", "orders", {"event-type": "order.created"}, AT)
    assert (event.id, event.source, event.type, event.specversion) == ("m-1", "/relays/orders", "order.created", "1.0")
    assert event.time == "2026-12-03T09:30:05.123456Z"
    assert event.datacontenttype == "application/json"
    # no such header on the row: the topic
    assert cloud_event(options, "orders", "m-2", "orders.paid", {}, AT).type == "orders.paid"
    custom = CloudEventsOptions(source="urn:shop", data_content_type="application/avro")
    event = cloud_event(custom, "orders", "m-3", "t", {"event-type": "ignored"}, AT)
    assert (event.source, event.type, event.datacontenttype) == ("urn:shop", "t", "application/avro")


def test_a_letter_without_an_insert_time_is_stamped_now() -> None:
    before = datetime.now(UTC)
    event = cloud_event(CloudEventsOptions(), "r", "m", "t", {}, None)
    assert before <= datetime.fromisoformat(event.time) <= datetime.now(UTC)


def test_build_messages_sets_the_event_only_when_the_relay_asks() -> None:
    row = OutboxRow(
        txid=1,
        id=7,
        topic="orders",
        key="k",
        payload=b"{}",
        headers="{}",
        created_at=AT,
        message_id=str(uuid.uuid4()),
    )
    plain = Relay(database="d", target="t")
    events = Relay(database="d", target="t", cloudevents=CloudEventsOptions())
    [without] = build_messages(plain, "r", [row])
    [with_event] = build_messages(events, "r", [row])
    assert without is not None and without.cloudevent is None
    assert with_event is not None and with_event.cloudevent is not None
    assert with_event.cloudevent.id == row.message_id == with_event.headers["outbox-id"]
