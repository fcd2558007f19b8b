"""Pure logic: settings, address policy, routing, backoff, client validation, message building."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from outbox_relay.client import ClientError, check_message, encode_payload
from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox, generate_key
from outbox_relay.delivery import backoff_s
from outbox_relay.domain import KafkaTarget, RabbitMQTarget, Relay, route
from outbox_relay.engine import build_messages
from outbox_relay.errors import AddressNotAllowed, ConfigError, OutboxRelayError
from outbox_relay.netguard import AddressPolicy, hosts_of, target_endpoints
from outbox_relay.tenant.db import OutboxRow
from outbox_relay.tenant.sql import quote_ident
from service.deps import decode_cursor, encode_cursor


def test_settings_from_env_parses_types_and_refuses_nonsense() -> None:
    s = Settings.from_env(
        {
            "OUTBOX_RELAY_SLICE_S": "2.5",
            "OUTBOX_RELAY_ALLOW_PRIVATE_NETWORKS": "yes",
            "OUTBOX_RELAY_SECRET_KEYS": "a, b,",
            "OUTBOX_RELAY_PORT": "9000",
        }
    )
    assert (s.slice_s, s.allow_private_networks, s.secret_keys, s.port) == (2.5, True, ("a", "b"), 9000)
    with pytest.raises(ConfigError, match="OUTBOX_RELAY_PORT"):
        Settings.from_env({"OUTBOX_RELAY_PORT": "eighty"})
    with pytest.raises(ConfigError, match="ALLOW_PRIVATE"):
        Settings.from_env({"OUTBOX_RELAY_ALLOW_PRIVATE_NETWORKS": "maybe"})
    with pytest.raises(ConfigError):
        Settings(lease_ttl_s=0.5)


def test_address_policy() -> None:
    strict = AddressPolicy(allow_private=False)
    lax = AddressPolicy(allow_private=True, extra_denied=["10.9.0.0/16"])
    strict.check_ip("example.com", "93.184.216.34")
    for ip in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "::1"):
        with pytest.raises(AddressNotAllowed, match="private"):
            strict.check_ip("h", ip)
        lax.check_ip("h", ip)
    for ip in ("169.254.169.254", "::ffff:169.254.169.254", "fe80::1", "10.9.3.4"):
        with pytest.raises(AddressNotAllowed, match="denied"):
            lax.check_ip("h", ip)


async def test_address_policy_resolves_names() -> None:
    with pytest.raises(AddressNotAllowed, match="private"):
        await AddressPolicy(allow_private=False).check_host("localhost", 5432)
    with pytest.raises(AddressNotAllowed, match="cannot be resolved"):
        await AddressPolicy(allow_private=True).check_host("no-such-host.invalid", 5432)


def test_endpoints_of_targets() -> None:
    assert hosts_of("u@h1:1,h2,[::1]:3", 9) == [("h1", 1), ("h2", 9), ("::1", 3)]
    assert target_endpoints(RabbitMQTarget(url="amqp://u@rabbit/vh")) == [("rabbit", 5672)]
    assert target_endpoints(KafkaTarget(bootstrap_servers=["k1:9093", "k2"])) == [("k1", 9093), ("k2", 9092)]
    with pytest.raises(ValueError, match="password"):
        target_endpoints(RabbitMQTarget(url="amqp://u:secret@rabbit/"))
    with pytest.raises(ValueError, match="amqp://"):
        target_endpoints(RabbitMQTarget(url="http://rabbit/"))
    with pytest.raises(ValueError, match="host:port"):
        target_endpoints(KafkaTarget(bootstrap_servers=["user@k1:9092"]))


def test_topic_routing() -> None:
    assert route({"*": "{topic}"}, "orders") == "orders"
    assert route({"orders": "o-events", "*": "all.{topic}"}, "orders") == "o-events"
    assert route({"orders": "o-events", "*": "all.{topic}"}, "users") == "all.users"
    assert route({"orders": "o-events"}, "users") is None


def test_backoff_is_jittered_and_capped() -> None:
    values = [backoff_s(a, base_s=0.5, cap_s=10) for a in range(40) for _ in range(20)]
    assert all(0 <= v <= 10 for v in values)
    assert max(backoff_s(1, base_s=0.5, cap_s=10) for _ in range(200)) <= 1.0
    assert len({round(v, 6) for v in values}) > 100  # jitter, not a fixed schedule


def test_client_validates_before_touching_the_database() -> None:
    assert check_message("orders", "k", {"a": "b"}) == '{"a":"b"}'
    with pytest.raises(ClientError, match="non-empty"):
        check_message("", None, None)
    with pytest.raises(ClientError, match="longer"):
        check_message("x" * 250, None, None)
    with pytest.raises(ClientError, match="headers"):
        check_message("t", None, {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ClientError, match="key"):
        check_message("t", 5, None)  # type: ignore[arg-type]
    assert encode_payload(b"\x00\xff") == b"\x00\xff"
    assert encode_payload("hé") == "hé".encode()
    assert encode_payload({"a": [1, 2]}) == b'{"a":[1,2]}'
    with pytest.raises(ClientError, match="JSON"):
        encode_payload(object())


def test_client_imports_without_service_dependencies() -> None:
    code = (
        "import sys\n"
        "for name in ('asyncpg', 'litestar', 'arq', 'aio_pika', 'aiokafka', 'redis', 'cryptography'):\n"
        "    sys.modules[name] = None\n"
        "import outbox_relay.client\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr


def test_build_messages_maps_topics_and_adds_headers() -> None:
    relay = Relay(database="d", target="t", topic_mapping={"orders": "o-events"})
    now = datetime.now(UTC)
    rows = [
        OutboxRow(txid=5, id=1, topic="orders", key="k", payload=b"p", headers='{"trace": "x"}', created_at=now),
        OutboxRow(txid=5, id=2, topic="users", key=None, payload=b"", headers="{}", created_at=now),
        OutboxRow(txid=6, id=3, topic="orders", key=None, payload=b"q", headers='{"n": 7}', created_at=now),
    ]
    first, skipped, third = build_messages(relay, "r1", rows)
    assert skipped is None
    assert first is not None and third is not None
    assert (first.destination, first.key, first.payload) == ("o-events", "k", b"p")
    assert first.headers == {"trace": "x", "outbox-id": "1", "outbox-topic": "orders", "outbox-relay": "r1"}
    assert third.headers["n"] == "7"  # a non-string header written by hand is carried as JSON text


def test_secret_box_rotation() -> None:
    old, new = generate_key(), generate_key()
    token = SecretBox((old,)).encrypt("pw")
    assert SecretBox((new, old)).decrypt(token) == "pw"
    with pytest.raises(OutboxRelayError, match="cannot be decrypted"):
        SecretBox((new,)).decrypt(token)
    with pytest.raises(ConfigError, match="no secret key"):
        SecretBox(())


def test_identifiers_and_cursors() -> None:
    assert quote_ident("outbox_relay") == '"outbox_relay"'
    for bad in ('x"; drop', "Upper", "1abc", ""):
        with pytest.raises(ValueError):
            quote_ident(bad)
    assert decode_cursor(encode_cursor("relay-9")) == "relay-9"
    assert decode_cursor(None) is None


def test_cron_job_ids_are_per_queue() -> None:
    """arq names a cron run's job id after the cron alone, and job ids are global to a Redis DB.

    Two deployments sharing one Redis on different queues must not take each other's ticks.
    """
    from workers.settings import worker_settings

    names = []
    for queue in ("arq:relay-a", "arq:relay-b"):
        base = Settings.from_env({"OUTBOX_RELAY_QUEUE_NAME": queue})
        crons = worker_settings(base)["cron_jobs"]
        names.append({c.name for c in crons})
        assert {c.name for c in crons} == {f"maintain_outboxes:{queue}"}
    assert not names[0] & names[1]
