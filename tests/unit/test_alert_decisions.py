"""The alert decisions, pure: a stall alerted on once it lasted the channel's threshold, one alert per
(channel, subject, kind) per period, an unsent alert still owed as it is, and which channels want
which events (a tenant's own only; the operator's every tenant's)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from outbox_relay.alerts import Channel, Event, delivery_due, matches, stall_due, wants
from outbox_relay.config import Settings
from outbox_relay.domain import Alert, AlertKind
from outbox_relay.errors import ConfigError
from tests.harness.webhooks import new_secret

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
TENANT, OTHER = uuid.uuid4(), uuid.uuid4()


def event(kind: AlertKind = AlertKind.STALL, *, relay: str | None = "orders", lasted_s: float = 10) -> Event:
    return Event(
        kind=kind,
        subject="relay:x",
        tenant_id=TENANT,
        tenant="acme",
        relay=relay,
        cause=None,
        state="stalled",
        first_seen=NOW - timedelta(seconds=lasted_s),
        last_seen=NOW,
        summary="",
    )


def channel(tenant: uuid.UUID | None = TENANT, **spec: object) -> Channel:
    return Channel(key="alert:x", alert_id=None, tenant_id=tenant, spec=Alert(url="https://h.example/x", **spec))  # type: ignore[arg-type]


def test_a_stall_is_due_once_it_lasted_the_threshold() -> None:
    assert not stall_due(NOW - timedelta(seconds=4.9), NOW, 5)
    assert stall_due(NOW - timedelta(seconds=5), NOW, 5)
    assert not matches(event(lasted_s=299), channel(), NOW)  # the default 300 s
    assert matches(event(lasted_s=300), channel(), NOW)
    assert matches(event(lasted_s=3), channel(stall_after_s=2), NOW)
    assert matches(event(AlertKind.DEAD_LETTER, lasted_s=0), channel(), NOW)  # no threshold but the stall's


def test_one_alert_per_period() -> None:
    assert delivery_due(None, NOW, 900)  # never alerted on
    sent = (NOW - timedelta(seconds=899), NOW - timedelta(seconds=898))
    assert not delivery_due(sent, NOW, 900)  # a flapping relay: inside the period, nothing more
    assert delivery_due((NOW - timedelta(seconds=900), NOW - timedelta(seconds=890)), NOW, 900)
    # not taken by the endpoint: still owed as it is (sent again), never a second one beside it
    assert not delivery_due((NOW - timedelta(days=1), None), NOW, 900)


def test_which_channels_want_an_event() -> None:
    assert wants(channel(), event())
    assert not wants(channel(OTHER), event())  # another tenant's channel
    assert wants(channel(None), event())  # the operator's
    assert not wants(channel(events=["dead_letter"]), event())
    assert wants(channel(events=["dead_letter"]), event(AlertKind.DEAD_LETTER))
    assert wants(channel(relays=["orders"]), event())
    assert not wants(channel(relays=["billing"]), event())
    assert wants(channel(relays=["billing"]), event(AlertKind.QUOTA, relay=None))  # a tenant's quota: no relay


def test_the_operator_url_and_secret_are_checked_at_start_up() -> None:
    Settings(alert_operator_url="https://ops.example/alerts", alert_operator_secret=new_secret(1))
    with pytest.raises(ConfigError, match="ALERT_OPERATOR_URL") as url:
        Settings(alert_operator_url="ftp://ops.example/alerts")
    with pytest.raises(ConfigError, match="ALERT_OPERATOR_SECRET") as secret:
        Settings(alert_operator_url="https://ops.example/alerts", alert_operator_secret="whsec_c2hvcnQ=")
    assert "c2hvcnQ" not in str(secret.value) and "http" in str(url.value)
    with pytest.raises(ConfigError, match="without"):
        Settings(alert_operator_secret=new_secret(1))
