"""Terraform 1.0.3 drives the provider against the live API, with the example configuration.

The tenant's cycle: plan -> apply -> a plan with no changes -> an attribute changed in place ->
drift made through the API shows up in the next plan and is undone -> a forced replacement is
planned -> an existing object is imported with no diff -> destroy -> the API shows it all gone.
The operator's cycle: a tenant and an API key that works, no diff, destroy.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox_relay.cli_api import ApiClient
from tests.conftest import DatabaseFactory, LiveServer, pg_dsn
from tests.e2e.terraform.harness import EXAMPLE, Toolchain, Workspace
from tests.helpers import ADMIN_KEY

pytestmark = pytest.mark.e2e

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def toolchain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Toolchain:
    return Toolchain(request.config, tmp_path_factory.mktemp("terraform"))


@pytest.fixture
def admin(live_api: LiveServer) -> ApiClient:
    return ApiClient(endpoint=live_api.url, api_key=ADMIN_KEY)


@pytest.fixture
def tenant_key(admin: ApiClient) -> Iterator[str]:
    name = f"tf-{secrets.token_hex(4)}"
    admin.put(f"/v1/tenants/{name}", {"display_name": "terraform test"})
    yield admin.post(f"/v1/tenants/{name}/api-keys", {"description": "terraform"})["key"]
    admin.delete(f"/v1/tenants/{name}")


@pytest.fixture
async def shop_dsn(databases: DatabaseFactory) -> str:
    return pg_dsn(await databases.create("tf_shop"))


def test_tenant_config_cycle(toolchain: Toolchain, live_api: LiveServer, tenant_key: str, shop_dsn: str) -> None:
    api = ApiClient(endpoint=live_api.url, api_key=tenant_key)
    tf = toolchain.workspace(
        "tenant",
        EXAMPLE,
        {
            "OUTBOX_RELAY_ENDPOINT": live_api.url,
            "OUTBOX_RELAY_API_KEY": tenant_key,
            "TF_VAR_shop_dsn": shop_dsn,
            "TF_VAR_shop_password": "s3cret-pw",
            "TF_VAR_redis_url": REDIS_URL,
        },
    )
    tf.run("init")

    # plan -> apply
    out = tf.plan("-out=tfplan", changes=True)
    assert "Plan: 3 to add, 0 to change, 0 to destroy." in out
    assert "s3cret-pw" not in out and "(sensitive value)" in out
    tf.run("apply", "tfplan")
    relay = api.get("/v1/relays/shop")
    assert relay["database"] == "shop" and relay["target"] == "shop-events"
    assert relay["topic_mapping"] == {"*": "shop:{topic}"}
    assert relay["policy"]["batch_size"] == 100 and relay["policy"]["max_attempts"] == 5
    database = api.get("/v1/databases/shop")
    assert database["password_set"] is True and "password" not in database
    assert api.get("/v1/targets/shop-events")["maxlen"] == 100000
    status = api.request("GET", "/v1/relays/shop/status")
    assert status["relay"] == "shop"

    # the write-only password, the defaults and the read-only fields plan no changes
    no_changes = tf.plan(changes=False)
    assert "No changes. Your infrastructure matches the configuration." in no_changes
    (tf.log_dir / "no-changes-plan.txt").write_text(no_changes)

    # an attribute changed in place
    out = tf.plan(changes=True, TF_VAR_batch_size="250")
    assert re.search(r"~ batch_size\s+= 100 -> 250", out), out
    assert "Plan: 0 to add, 1 to change, 0 to destroy." in out
    tf.run("apply", "-auto-approve", TF_VAR_batch_size="250")
    updated = api.get("/v1/relays/shop")
    assert updated["policy"]["batch_size"] == 250
    assert updated["created_at"] == relay["created_at"], "updated in place, not replaced"
    tf.env["TF_VAR_batch_size"] = "250"
    tf.plan(changes=False)

    # drift behind Terraform's back: a target changed, a password cleared, a default overridden
    api.put("/v1/targets/shop-events", {"kind": "redis_streams", "url": REDIS_URL, "maxlen": 5})
    api.put("/v1/databases/shop", {"dsn": shop_dsn, "password": None})
    api.put("/v1/relays/shop", {**_spec(updated), "policy": {**updated["policy"], "poll_interval_ms": 50}})
    out = tf.plan(changes=True)
    assert "Objects have changed outside of Terraform" in out
    assert re.search(r"~ maxlen\s+= 5 -> 100000", out), out
    assert re.search(r"~ password_set\s+= false -> true", out), out
    assert re.search(r"- poll_interval_ms\s+= 50 -> null", out), out
    assert "Plan: 0 to add, 3 to change, 0 to destroy." in out
    tf.run("apply", "-auto-approve")
    assert api.get("/v1/targets/shop-events")["maxlen"] == 100000
    assert api.get("/v1/databases/shop")["password_set"] is True
    assert api.get("/v1/relays/shop")["policy"]["poll_interval_ms"] == 1000
    tf.plan(changes=False)

    # a filter written with jsonencode: sent as JSON, read back without drift, removed to clear it
    tf.write("filter_override.tf", FILTER_OVERRIDE)
    out = tf.plan(changes=True)
    assert re.search(r"\+ filter\s+= jsonencode\(", out), out
    tf.run("apply", "-auto-approve")
    assert api.get("/v1/relays/shop")["filter"] == {
        "all": [{"topic": {"prefix": "orders."}}, {"not": {"header": "x-test", "exists": True}}]
    }
    tf.plan(changes=False)
    tf.remove("filter_override.tf")
    tf.run("apply", "-auto-approve")
    assert api.get("/v1/relays/shop")["filter"] is None
    tf.plan(changes=False)

    # an immutable attribute plans a replacement
    tf.write("replace_override.tf", 'resource "outboxrelay_relay" "shop" {\n  partitions = 8\n}\n')
    out = tf.plan(changes=True)
    assert "# outboxrelay_relay.shop must be replaced" in out
    assert re.search(r"~ partitions\s+= 16 -> 8 # forces replacement", out), out
    tf.remove("replace_override.tf")

    # import an object made through the API: no diff afterwards
    api.put(
        "/v1/targets/legacy",
        {"kind": "kafka", "bootstrap_servers": ["127.0.0.1:9092"], "acks": 1, "compression_type": "zstd"},
    )
    tf.write("import.tf", LEGACY_TARGET)
    out = tf.run("import", "outboxrelay_target.legacy", "legacy")
    assert "Import successful!" in out
    tf.plan(changes=False)

    # destroy: the API shows them gone
    out = tf.run("destroy", "-auto-approve")
    assert "Destroy complete! Resources: 4 destroyed." in out
    for kind in ("relays", "targets", "databases"):
        assert list(api.list(f"/v1/{kind}/")) == []


FILTER_OVERRIDE = """\
resource "outboxrelay_relay" "shop" {
  filter = jsonencode({
    all = [{ topic = { prefix = "orders." } }, { "not" = { header = "x-test", exists = true } }]
  })
}
"""

LEGACY_TARGET = """\
resource "outboxrelay_target" "legacy" {
  name              = "legacy"
  kind              = "kafka"
  bootstrap_servers = ["127.0.0.1:9092"]
  acks              = "1"
  compression_type  = "zstd"
}
"""


def _spec(doc: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in doc.items() if k not in ("name", "created_at", "updated_at")}


def test_operator_config_cycle(toolchain: Toolchain, live_api: LiveServer, admin: ApiClient) -> None:
    tenant = f"tf-op-{secrets.token_hex(4)}"
    tf: Workspace = toolchain.workspace(
        "operator",
        EXAMPLE / "operator",
        {"OUTBOX_RELAY_ENDPOINT": live_api.url, "OUTBOX_RELAY_API_KEY": ADMIN_KEY, "TF_VAR_tenant": tenant},
    )
    tf.run("init")
    out = tf.run("apply", "-auto-approve")
    assert "Apply complete! Resources: 2 added" in out
    assert admin.get(f"/v1/tenants/{tenant}")["display_name"] == "Globex Corporation"
    key = tf.run("output", "-raw", "api_key").strip()
    as_tenant = ApiClient(endpoint=live_api.url, api_key=key)
    assert list(as_tenant.list("/v1/relays/")) == []  # the key works
    tf.plan(changes=False)

    out = tf.run("destroy", "-auto-approve")
    assert "Destroy complete! Resources: 2 destroyed." in out
    assert admin.get(f"/v1/tenants/{tenant}") is None


def test_example_is_formatted(toolchain: Toolchain, tmp_path: Path) -> None:
    for source in (EXAMPLE, EXAMPLE / "operator"):
        tf = toolchain.workspace(f"fmt-{source.name}", source, {})
        tf.run("fmt", "-check", "-diff", expect=0)
