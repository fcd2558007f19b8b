"""``outbox-relay api ...`` against the live API: what a script sees on stdout, stderr and in the exit code."""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from outbox_relay.cli_api import ApiClient, ApiError
from service import cli
from tests.conftest import LiveServer
from tests.helpers import ADMIN_KEY


class Cli:
    """Runs ``outbox-relay`` in-process with the endpoint and key in the environment, as a script would."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str) -> None:
        self.capsys, self.monkeypatch = capsys, monkeypatch
        monkeypatch.setenv("OUTBOX_RELAY_ENDPOINT", url)
        monkeypatch.setenv("OUTBOX_RELAY_API_KEY", ADMIN_KEY)

    def key(self, key: str) -> None:
        self.monkeypatch.setenv("OUTBOX_RELAY_API_KEY", key)

    def __call__(self, *args: str, code: int = 0, stdin: str | None = None) -> str:
        self.capsys.readouterr()
        if stdin is not None:
            self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        assert cli.main(["api", *args]) == code, self.capsys.readouterr()
        out, err = self.capsys.readouterr()
        self.err = err
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self(*args))


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, live_api: LiveServer) -> Cli:
    return Cli(capsys, monkeypatch, live_api.url)


def test_operator_then_tenant_workflow(run: Cli, tmp_path: Path) -> None:
    tenant = f"cli-{secrets.token_hex(4)}"
    created = run.json("tenants", "put", tenant, "--display-name", "Acme")
    assert created["name"] == tenant and created["display_name"] == "Acme"
    # put without --display-name keeps it
    assert run.json("tenants", "put", tenant)["display_name"] == "Acme"
    assert tenant in run("tenants", "list", "--names").split()
    key = run("tenants", "keys", "create", tenant, "--key-only", "--description", "ci").strip()
    assert key and "\n" not in key
    keys = run.json("tenants", "keys", "list", tenant)
    assert [k["description"] for k in keys] == ["ci"] and "key" not in keys[0]

    run.key(key)
    db = run.json("databases", "put", "shop", "-d", '{"dsn": "postgresql://app@127.0.0.1:5432/shop", "password": "pw"}')
    assert db["password_set"] is True and "password" not in db
    run("targets", "put", "events", "-f", "-", stdin='{"kind": "redis_streams", "url": "redis://127.0.0.1:6379/0"}')
    relay_file = tmp_path / "relay.json"
    relay_file.write_text(json.dumps({"database": "shop", "target": "events", "policy": {"batch_size": 7}}))
    relay = run.json("relays", "put", "orders", "-f", str(relay_file))
    assert relay["policy"]["batch_size"] == 7 and relay["partitions"] == 16
    assert run.json("relays", "get", "orders") == relay
    assert [r["name"] for r in run.json("relays", "list")] == ["orders"]
    assert run.json("relays", "status", "orders")["relay"] == "orders"
    assert "CREATE" in run("databases", "schema-sql", "shop").upper()

    # a refusal: exit 1 and the problem's detail on stderr
    run("databases", "delete", "shop", code=1)
    assert "409" in run.err and "used by relays" in run.err
    run("relays", "delete", "orders")
    run("relays", "delete", "orders")  # idempotent
    run("relays", "get", "orders", code=1)
    assert "not found" in run.err
    assert run("relays", "list", "--names") == "\n"

    run.key(ADMIN_KEY)
    key_id = keys[0]["id"]
    run("tenants", "keys", "revoke", tenant, key_id)
    assert run.json("tenants", "keys", "list", tenant) == []
    run("tenants", "delete", tenant)
    run("tenants", "get", tenant, code=1)


def test_usage_errors_exit_2(run: Cli) -> None:
    run("databases", "put", "x", "-d", "{not json", code=2)
    assert "not JSON" in run.err
    run("databases", "put", "x", "-d", "[1]", code=2)
    run("databases", "put", "x", "-f", "/nonexistent.json", code=2)
    run("--endpoint", "ftp://x", "relays", "list", code=2)
    run("--endpoint", "http://127.0.0.1:9", "relays", "list", code=2)
    assert "cannot reach the API" in run.err
    with pytest.raises(SystemExit):
        run("relays", "frobnicate")


def test_wrong_key_exits_1(run: Cli) -> None:
    run.key("not-a-key")
    run("relays", "list", code=1)
    assert "401" in run.err


def test_client_follows_pages(live_api: LiveServer) -> None:
    admin = ApiClient(endpoint=live_api.url, api_key=ADMIN_KEY)
    tenant = f"cli-{secrets.token_hex(4)}"
    admin.put(f"/v1/tenants/{tenant}", {})
    api = ApiClient(endpoint=live_api.url, api_key=admin.post(f"/v1/tenants/{tenant}/api-keys", {})["key"])
    for i in range(5):
        api.put(f"/v1/targets/t{i}", {"kind": "redis_streams", "url": "redis://127.0.0.1:6379/0"})
    assert [t["name"] for t in api.list("/v1/targets/", page_size=2)] == [f"t{i}" for i in range(5)]
    assert api.get("/v1/targets/missing") is None
    api.delete("/v1/targets/missing")
    with pytest.raises(ApiError) as info:
        api.put("/v1/targets/bad", {"kind": "nope"})
    assert info.value.status == 400
    admin.delete(f"/v1/tenants/{tenant}")


def test_console_script(live_api: LiveServer) -> None:
    """The installed ``outbox-relay`` entry point has the ``api`` command."""
    script = Path(sys.executable).parent / "outbox-relay"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    proc = subprocess.run(
        [*command, "api", "--endpoint", live_api.url, "--api-key", ADMIN_KEY, "tenants", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)
