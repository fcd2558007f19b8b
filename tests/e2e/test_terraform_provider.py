"""The Terraform provider in-process, without Terraform: schema, state mapping, validation, plan
tweaks, and its edge cases against the live API (fast; the e2e module drives the real CLI).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
import pytest
from tf import types as tft
from tf.iface import CreateContext, DeleteContext, ImportContext, PlanContext, ReadContext, UpdateContext
from tf.utils import Diagnostics

from outbox_relay import domain
from outbox_relay.cli_api import ApiClient
from tests.conftest import LiveServer
from tests.e2e.terraform.harness import PROVIDER_SRC
from tests.helpers import ADMIN_KEY

if str(PROVIDER_SRC) not in sys.path:
    sys.path.insert(0, str(PROVIDER_SRC))

from terraform_provider_outboxrelay.fields import UNSET_KIND, fields_of, from_api, to_api
from terraform_provider_outboxrelay.provider import OutboxRelayProvider
from terraform_provider_outboxrelay.resources import (
    AlertResource,
    DatabaseResource,
    RelayResource,
    TargetResource,
    TenantResource,
)

pytestmark = pytest.mark.e2e


def attrs(resource: Any) -> dict[str, Any]:
    return {a.name: a for a in resource.get_schema().attributes}


# --- schema ----------------------------------------------------------------------------------------


def test_every_relay_policy_field_is_an_optional_attribute() -> None:
    relay = attrs(RelayResource)
    for name in domain.RelayPolicy.__struct_fields__:
        assert relay[name].optional and not relay[name].computed and not relay[name].required, name
    assert relay["database"].required and relay["database"].requires_replace
    assert relay["partitions"].optional and relay["partitions"].computed and relay["partitions"].requires_replace
    assert relay["partitions"].default == 16
    for resource in (DatabaseResource, TargetResource, RelayResource, TenantResource):
        schema = resource.get_schema()
        assert schema.version == 0
        schema.to_pb()  # encodes


def test_secrets_are_sensitive_and_write_only_fields_are_not_computed() -> None:
    for resource in (DatabaseResource, TargetResource):
        password = attrs(resource)["password"]
        assert password.sensitive and password.optional and not password.computed
        assert attrs(resource)["password_set"].computed
    provider = {a.name: a for a in OutboxRelayProvider().get_provider_schema(Diagnostics()).attributes}
    assert provider["api_key"].sensitive


class NewPolicy(msgspec.Struct, kw_only=True):
    batch_size: int = 100
    burst: Annotated[int, msgspec.Meta(description="new")] = 3


class NewThing(msgspec.Struct, kw_only=True):
    target: str
    policy: NewPolicy = msgspec.field(default_factory=NewPolicy)


class ClashPolicy(msgspec.Struct):
    target: int = 1


class ClashThing(msgspec.Struct):
    target: str
    policy: ClashPolicy = msgspec.field(default_factory=ClashPolicy)


def test_a_new_policy_field_becomes_an_attribute_with_its_default() -> None:
    fields = {f.name: f for f in fields_of({UNSET_KIND: NewThing})}
    assert fields["burst"].path == ("policy", "burst")
    assert fields["burst"].defaults == {UNSET_KIND: 3}
    assert fields["burst"].description == "new"
    assert fields["target"].required


def test_flattened_fields_must_not_clash() -> None:
    with pytest.raises(TypeError, match="clash"):
        fields_of({UNSET_KIND: ClashThing})


# --- state <-> API -----------------------------------------------------------------------------------

RELAY_DOC = {
    "name": "r",
    "database": "db",
    "target": "t",
    "topic_mapping": {"*": "{topic}"},
    "partitions": 16,
    "policy": {"batch_size": 100, "max_attempts": 3, "poll_interval_ms": 1000, "some_future_knob": 7},
    "enabled": True,
    "created_at": "2025-01-01T00:00:00Z",
    "updated_at": "2025-01-01T00:00:00Z",
}


def test_defaults_read_back_as_null_unless_written() -> None:
    fields = RelayResource.fields
    state = from_api(fields, RELAY_DOC, prior=None)
    assert state["batch_size"] is None and state["topic_mapping"] is None and state["enabled"] is None
    assert state["max_attempts"] == 3  # not the default: reported
    assert state["partitions"] == 16  # computed: always reported
    assert "some_future_knob" not in state  # unknown to the provider: ignored
    written = from_api(fields, RELAY_DOC, prior={"batch_size": 100, "enabled": True})
    assert written["batch_size"] == 100 and written["enabled"] is True


def test_request_body_nests_policy_and_leaves_nulls_out() -> None:
    state = {"database": "db", "target": "t", "batch_size": 5, "max_attempts": None, "partitions": tft.Unknown}
    assert to_api(RelayResource.fields, state) == {"database": "db", "target": "t", "policy": {"batch_size": 5}}


def test_the_filter_is_a_json_string_attribute_that_keeps_its_text() -> None:
    assert isinstance(attrs(RelayResource)["filter"].type, tft.String) and attrs(RelayResource)["filter"].optional
    fields = RelayResource.fields
    written = '{ "any": [ {"topic": {"eq": "a"}}, {"payload": "n", "eq": 1} ] }'  # a heredoc, say
    body = to_api(fields, {"database": "db", "target": "t", "filter": written})
    assert body["filter"] == {"any": [{"topic": {"eq": "a"}}, {"payload": "n", "eq": 1}]}
    doc = {**RELAY_DOC, "filter": body["filter"]}
    assert from_api(fields, doc, prior={"filter": written})["filter"] == written  # same document: no drift
    assert from_api(fields, doc, prior=None)["filter"] == '{"any":[{"topic":{"eq":"a"}},{"eq":1,"payload":"n"}]}'
    changed = {**doc, "filter": {"any": [{"topic": {"eq": "a"}}, {"payload": "n", "eq": True}]}}
    assert from_api(fields, changed, prior={"filter": written})["filter"] != written, "true is not 1"
    assert from_api(fields, RELAY_DOC, prior={"filter": written})["filter"] is None  # removed behind our back
    assert to_api(fields, {"database": "db", "target": "t", "filter": "not json"})["filter"] == "not json"


def test_target_fields_follow_the_kind() -> None:
    fields = TargetResource.fields
    body = to_api(fields, {"bootstrap_servers": ["k:9092"], "acks": "1", "url": "x"}, "kafka")
    assert body == {"bootstrap_servers": ["k:9092"], "acks": 1}
    state = from_api(fields, {"kind": "kafka", "bootstrap_servers": ["k:9092"], "acks": 1, "timeout_ms": 10000},
                     prior=None, kind="kafka")  # fmt: skip
    assert state["acks"] == "1" and state["timeout_ms"] is None and state["url"] is None


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"kind": "redis_streams", "url": "redis://h", "exchange": "x"}, "exchange does not apply to redis_streams"),
        ({"kind": "kafka"}, "kafka targets need bootstrap_servers"),
        ({"kind": "rabbitmq"}, "rabbitmq targets need url"),
        ({"kind": "sqs", "url": "x"}, "Unknown target kind"),
        ({"kind": "nats"}, "nats targets need servers"),
        ({"kind": "nats", "servers": ["nats://h"], "url": "x"}, "url does not apply to nats"),
        ({"kind": "nats", "servers": ["nats://h"], "username": "u", "password": "p"}, None),
        ({"kind": "rabbitmq", "url": "amqp://h", "exchange": "e", "mandatory": False}, None),
        ({"kind": tft.Unknown, "url": "x"}, None),
    ],
)
def test_target_validation(config: dict[str, Any], error: str | None) -> None:
    diags = Diagnostics()
    full = {a: None for a in attrs(TargetResource)} | config
    TargetResource(None).validate(diags, "outboxrelay_target", full)
    messages = [d.summary for d in diags.diagnostics]
    if error is None:
        assert messages == []
    else:
        assert any(error in m for m in messages), messages


def test_plan_marks_what_an_update_changes() -> None:
    db = DatabaseResource(None)
    prior = {"name": "d", "dsn": "x", "password": "a", "password_set": True, "updated_at": "t0"}
    ctx = PlanContext(Diagnostics(), "outboxrelay_database", changed_fields=set())
    assert db.plan(ctx, prior, dict(prior)) == prior
    ctx = PlanContext(Diagnostics(), "outboxrelay_database", changed_fields={"password"})
    planned = db.plan(ctx, prior, {**prior, "password": None})
    assert planned is not None
    assert planned["updated_at"] is tft.Unknown and planned["password_set"] is False


# --- against the live API ----------------------------------------------------------------------------


@pytest.fixture
def provider(live_api: LiveServer) -> Iterator[OutboxRelayProvider]:
    admin = ApiClient(endpoint=live_api.url, api_key=ADMIN_KEY)
    tenant = f"tfp-{secrets.token_hex(4)}"
    admin.put(f"/v1/tenants/{tenant}", {})
    key = admin.post(f"/v1/tenants/{tenant}/api-keys", {})["key"]
    p = OutboxRelayProvider()
    diags = Diagnostics()
    p.configure_provider(diags, {"endpoint": live_api.url, "api_key": key, "timeout_s": None})
    assert not diags.has_errors()
    yield p
    admin.delete(f"/v1/tenants/{tenant}")


def planned_state(resource: Any, **values: Any) -> dict[str, Any]:
    state = {a.name: None for a in resource.get_schema().attributes}
    state.update(created_at=tft.Unknown, updated_at=tft.Unknown, password_set=tft.Unknown)
    return state | values


def test_configure_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OUTBOX_RELAY_API_KEY", raising=False)
    diags = Diagnostics()
    OutboxRelayProvider().configure_provider(diags, {"endpoint": None, "api_key": None, "timeout_s": None})
    assert diags.has_errors()
    monkeypatch.setenv("OUTBOX_RELAY_API_KEY", "k")
    monkeypatch.setenv("OUTBOX_RELAY_ENDPOINT", "http://example.invalid:1")
    p = OutboxRelayProvider()
    p.configure_provider(diags := Diagnostics(), {"endpoint": None, "api_key": None, "timeout_s": None})
    assert not diags.has_errors() and p.client is not None and p.client.endpoint == "http://example.invalid:1"


def test_password_is_kept_while_set_and_dropped_when_cleared(provider: OutboxRelayProvider) -> None:
    db = DatabaseResource(provider)
    diags = Diagnostics()
    state = db.create(
        CreateContext(diags, "outboxrelay_database"),
        planned_state(DatabaseResource, name="app", dsn="postgresql://app@127.0.0.1:5432/app", password="pw"),
    )
    assert not diags.has_errors(), diags
    assert state is not None and state["password"] == "pw" and state["password_set"] is True
    assert state["schema"] is None  # the default, not written
    read = db.read(ReadContext(diags, "outboxrelay_database"), state)
    assert read == state
    provider.client.put("/v1/databases/app", {"dsn": "postgresql://app@127.0.0.1:5432/app", "password": None})  # type: ignore[union-attr]
    read = db.read(ReadContext(diags, "outboxrelay_database"), state)
    assert read is not None and read["password"] is None and read["password_set"] is False

    # clearing it from the configuration sends null
    updated = db.update(
        UpdateContext(diags, "outboxrelay_database"), {**state, "password": "pw"}, {**state, "password": None}
    )
    assert updated is not None and updated["password_set"] is False


def test_create_refuses_to_adopt_and_import_needs_an_object(provider: OutboxRelayProvider) -> None:
    target = TargetResource(provider)
    planned = planned_state(TargetResource, name="t", kind="redis_streams", url="redis://127.0.0.1:6379/0")
    diags = Diagnostics()
    assert target.create(CreateContext(diags, "outboxrelay_target"), planned) is not None
    assert target.create(CreateContext(diags, "outboxrelay_target"), planned) is None
    assert "already exists" in diags.diagnostics[-1].summary

    diags = Diagnostics()
    assert target.import_(ImportContext(diags, "outboxrelay_target"), "nope") is None
    assert "does not exist" in diags.diagnostics[0].summary

    state = target.import_(ImportContext(Diagnostics(), "outboxrelay_target"), "t")
    assert state is not None and state["url"] == "redis://127.0.0.1:6379/0" and state["timeout_ms"] is None


def test_a_nats_target_lifecycle(provider: OutboxRelayProvider) -> None:
    """Create, read back, update, import and delete a NATS target; its password stays in the state
    (never read back from the API), a refused server URL is a diagnostic naming the field."""
    target = TargetResource(provider)
    diags = Diagnostics()
    planned = planned_state(
        TargetResource, name="js", kind="nats", servers=["nats://127.0.0.1:4222"], username="relay", password="pw"
    )
    state = target.create(CreateContext(diags, "outboxrelay_target"), planned)
    assert not diags.has_errors(), diags
    assert state is not None and state["password"] == "pw" and state["password_set"] is True
    assert state["servers"] == ["nats://127.0.0.1:4222"] and state["timeout_ms"] is None
    assert target.read(ReadContext(diags, "outboxrelay_target"), state) == state

    changed = {**state, "servers": ["nats://127.0.0.1:4222", "tls://localhost:4223"], "timeout_ms": 3000}
    updated = target.update(UpdateContext(diags, "outboxrelay_target"), state, changed)
    assert not diags.has_errors(), diags
    assert updated is not None and updated["servers"] == changed["servers"] and updated["timeout_ms"] == 3000
    assert updated["password"] == "pw" and updated["password_set"] is True
    api = provider.client.get("/v1/targets/js")  # type: ignore[union-attr]
    assert api["servers"] == changed["servers"] and "password" not in api

    imported = target.import_(ImportContext(Diagnostics(), "outboxrelay_target"), "js")
    assert imported is not None and imported["kind"] == "nats" and imported["username"] == "relay"
    assert imported["password"] is None and imported["password_set"] is True  # never read back

    diags = Diagnostics()
    bad = {**updated, "servers": ["nats://relay:pw@127.0.0.1:4222"]}
    assert target.update(UpdateContext(diags, "outboxrelay_target"), updated, bad) == updated  # the state stays
    assert diags.has_errors() and "(422)" in diags.diagnostics[-1].summary
    assert "servers[0]" in str(diags.diagnostics[-1].detail)

    target.delete(DeleteContext(Diagnostics(), "outboxrelay_target"), updated)
    assert target.read(ReadContext(Diagnostics(), "outboxrelay_target"), updated) is None


def test_api_refusals_become_diagnostics(provider: OutboxRelayProvider) -> None:
    db, relay = DatabaseResource(provider), RelayResource(provider)
    diags = Diagnostics()
    relay_state = relay.create(
        CreateContext(diags, "outboxrelay_relay"), planned_state(RelayResource, name="r", database="nope", target="x")
    )
    assert relay_state is None and "Could not create relay 'r' (422)" in diags.diagnostics[0].summary

    diags = Diagnostics()
    db_state = db.create(CreateContext(diags, "outboxrelay_database"),
                         planned_state(DatabaseResource, name="d", dsn="postgresql://a@127.0.0.1/d"))  # fmt: skip
    TargetResource(provider).create(
        CreateContext(diags, "outboxrelay_target"),
        planned_state(TargetResource, name="t", kind="redis_streams", url="redis://127.0.0.1:6379/0"),
    )
    relay.create(
        CreateContext(diags, "outboxrelay_relay"), planned_state(RelayResource, name="r", database="d", target="t")
    )
    assert not diags.has_errors(), diags
    assert db_state is not None
    db.delete(DeleteContext(diags, "outboxrelay_database"), db_state)
    assert diags.has_errors() and "(409)" in diags.diagnostics[-1].summary

    # gone behind Terraform's back: the read says so (Terraform then plans to create it)
    provider.client.delete("/v1/relays/r")  # type: ignore[union-attr]
    assert relay.read(ReadContext(Diagnostics(), "outboxrelay_relay"), {"name": "r"}) is None


def test_an_adopted_table_is_a_json_attribute_whose_filled_in_defaults_are_no_drift(
    provider: OutboxRelayProvider,
) -> None:
    assert isinstance(attrs(DatabaseResource)["table"].type, tft.String) and attrs(DatabaseResource)["table"].optional
    diags = Diagnostics()
    database = DatabaseResource(provider)
    written = '{"name":"outbox"}'  # jsonencode({ name = "outbox" }): the service fills in schema and columns
    planned = planned_state(DatabaseResource, name="adopting", dsn="postgresql://a@127.0.0.1/d", table=written)
    state = database.create(CreateContext(diags, "outboxrelay_database"), planned)
    assert not diags.has_errors(), diags
    assert state is not None and state["table"] == written
    assert database.read(ReadContext(diags, "outboxrelay_database"), state) == state
    # changed behind Terraform's back: the read says so
    doc = provider.client.get("/v1/databases/adopting")  # type: ignore[union-attr]
    doc["table"]["columns"]["key"] = None
    provider.client.put("/v1/databases/adopting", {"dsn": doc["dsn"], "table": doc["table"]})  # type: ignore[union-attr]
    changed = database.read(ReadContext(diags, "outboxrelay_database"), state)
    assert changed is not None and changed["table"] != written and '"key":null' in changed["table"]
    bad = planned_state(DatabaseResource, name="adopting2", dsn="postgresql://a@127.0.0.1/d", table='{"name": "A"}')
    assert database.create(CreateContext(diags, "outboxrelay_database"), bad) is None
    assert "table.name" in diags.diagnostics[-1].summary + (diags.diagnostics[-1].detail or "")


def test_a_relay_filter_round_trips_and_a_bad_one_is_a_diagnostic(provider: OutboxRelayProvider) -> None:
    diags = Diagnostics()
    DatabaseResource(provider).create(
        CreateContext(diags, "outboxrelay_database"),
        planned_state(DatabaseResource, name="d", dsn="postgresql://a@127.0.0.1/d"),
    )
    TargetResource(provider).create(
        CreateContext(diags, "outboxrelay_target"),
        planned_state(TargetResource, name="t", kind="redis_streams", url="redis://127.0.0.1:6379/0"),
    )
    relay = RelayResource(provider)
    written = '{"all":[{"topic":{"prefix":"orders."}},{"not":{"header":"x-test","exists":true}}]}'
    planned = planned_state(RelayResource, name="r", database="d", target="t", filter=written)
    state = relay.create(CreateContext(diags, "outboxrelay_relay"), planned)
    assert not diags.has_errors(), diags
    assert state is not None and state["filter"] == written
    assert relay.read(ReadContext(diags, "outboxrelay_relay"), state) == state
    bad = planned_state(RelayResource, name="r2", database="d", target="t", filter='{"topic": {}}')
    assert relay.create(CreateContext(diags, "outboxrelay_relay"), bad) is None
    assert "(422)" in diags.diagnostics[-1].summary
    assert "filter.topic" in diags.diagnostics[-1].summary + (diags.diagnostics[-1].detail or "")


def test_a_webhook_target_lifecycle_with_a_secret_rotation(provider: OutboxRelayProvider) -> None:
    """Create, read, rotate the signing secret (two at once), finish the rotation, import, delete: the
    secrets stay write-only (state keeps what the configuration says, the API never returns them) and
    a read after each step plans no change."""
    target = TargetResource(provider)
    old, new = "whsec_" + "A" * 43 + "=", "whsec_" + "B" * 43 + "="
    diags = Diagnostics()
    planned = planned_state(
        TargetResource, name="hook", kind="webhook", url="http://127.0.0.1:9/in", password=old,
        max_concurrent_requests=4,
    )  # fmt: skip
    state = target.create(CreateContext(diags, "outboxrelay_target"), planned)
    assert not diags.has_errors(), diags
    assert state is not None and state["password"] == old and state["password_set"] is True
    assert state["max_concurrent_requests"] == 4 and state["content_type"] is None  # the default, not written
    assert target.read(ReadContext(diags, "outboxrelay_target"), state) == state
    stored = provider.client.get("/v1/targets/hook")  # type: ignore[union-attr]
    assert old not in str(stored) and stored["password_set"] is True

    for password in (f"{new} {old}", new):  # the rotation: both secrets sign, then the new one alone
        updated = target.update(UpdateContext(diags, "outboxrelay_target"), state, {**state, "password": password})
        assert not diags.has_errors(), diags
        assert updated is not None and updated["password"] == password and updated["password_set"] is True
        assert target.read(ReadContext(diags, "outboxrelay_target"), updated) == updated
        state = updated

    bad = target.update(UpdateContext(diags, "outboxrelay_target"), state, {**state, "password": "whsec_short"})
    assert bad == state and "(422)" in diags.diagnostics[-1].summary  # refused: the state stays as it was
    assert "whsec_short" not in diags.diagnostics[-1].summary + (diags.diagnostics[-1].detail or "")

    imported = target.import_(ImportContext(Diagnostics(), "outboxrelay_target"), "hook")
    assert imported is not None and imported["kind"] == "webhook" and imported["url"] == "http://127.0.0.1:9/in"
    assert imported["password"] is None and imported["password_set"] is True
    diags = Diagnostics()
    target.delete(DeleteContext(diags, "outboxrelay_target"), state)
    assert target.read(ReadContext(diags, "outboxrelay_target"), state) is None
    assert not diags.has_errors(), [(d.summary, d.detail) for d in diags.diagnostics]


def test_an_alert_lifecycle(provider: OutboxRelayProvider) -> None:
    """Create, read, update, import and delete an alert channel: its signing secret write-only (kept from
    the configuration, never read back), its lists and bounds attributes, a refused URL a diagnostic."""
    alert = AlertResource(provider)
    schema = attrs(AlertResource)
    assert schema["password"].sensitive and {"url", "events", "relays", "stall_after_s", "period_s"} <= set(schema)
    secret = "whsec_" + "C" * 43 + "="
    diags = Diagnostics()
    planned = planned_state(
        AlertResource, name="ops", url="http://127.0.0.1:9/alerts", password=secret, events=["stall", "quota"],
        stall_after_s=60,
    )  # fmt: skip
    state = alert.create(CreateContext(diags, "outboxrelay_alert"), planned)
    assert not diags.has_errors(), diags
    assert state is not None and state["password"] == secret and state["password_set"] is True
    assert state["events"] == ["stall", "quota"] and state["stall_after_s"] == 60 and state["period_s"] is None
    assert alert.read(ReadContext(diags, "outboxrelay_alert"), state) == state
    stored = provider.client.get("/v1/alerts/ops")  # type: ignore[union-attr]
    assert secret not in str(stored) and stored["period_s"] == 900

    changed = {**state, "relays": ["orders"], "period_s": 60, "password": None}
    updated = alert.update(UpdateContext(diags, "outboxrelay_alert"), state, changed)
    assert not diags.has_errors(), diags
    assert updated is not None and updated["relays"] == ["orders"] and updated["period_s"] == 60
    assert updated["password"] is None and updated["password_set"] is False  # cleared: plain POSTs
    assert alert.read(ReadContext(diags, "outboxrelay_alert"), updated) == updated

    bad = alert.update(UpdateContext(diags, "outboxrelay_alert"), updated, {**updated, "url": "ftp://x/"})
    assert bad == updated and "(422)" in diags.diagnostics[-1].summary

    imported = alert.import_(ImportContext(Diagnostics(), "outboxrelay_alert"), "ops")
    assert imported is not None and imported["url"] == "http://127.0.0.1:9/alerts" and imported["relays"] == ["orders"]
    diags = Diagnostics()
    alert.delete(DeleteContext(diags, "outboxrelay_alert"), updated)
    assert alert.read(ReadContext(diags, "outboxrelay_alert"), updated) is None
    assert not diags.has_errors(), [(d.summary, d.detail) for d in diags.diagnostics]


def test_webhook_target_validation() -> None:
    diags = Diagnostics()
    full = {a: None for a in attrs(TargetResource)} | {"kind": "webhook", "url": "https://h/x", "exchange": "e"}
    TargetResource(None).validate(diags, "outboxrelay_target", full)
    assert any("exchange does not apply to webhook" in d.summary for d in diags.diagnostics), diags
    diags = Diagnostics()
    TargetResource(None).validate(
        diags, "outboxrelay_target", {a: None for a in attrs(TargetResource)} | {"kind": "webhook"}
    )
    assert any("webhook targets need url" in d.summary for d in diags.diagnostics), diags
