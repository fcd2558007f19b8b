"""The webhook adapter's pure parts: its signature equals the ``standardwebhooks`` package's for
every UTF-8 body (and is the spec's HMAC over raw bytes for the others), header encoding round-trips,
Retry-After is read and bounded, the signing secrets are checked, and the port an address is checked
at follows the scheme."""

from __future__ import annotations

import base64
import email.utils
import random
import time
import urllib.parse
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import hmac_data

from outbox_relay.brokers.webhook import MAX_RETRY_AFTER_S, header_name, header_value, retry_after_s, sign
from outbox_relay.domain import WebhookTarget
from outbox_relay.errors import InvalidSpec, TargetUnavailable
from outbox_relay.netguard import target_endpoints
from outbox_relay.specs import check_target, webhook_secrets
from tests.harness.webhooks import new_secret

OLD, NEW = new_secret(1), new_secret(2)


@pytest.mark.parametrize("body", [b"", b'{"id": 1}', "ünïcode ✓ \r\n".encode(), b"x" * 100_000])
def test_the_signature_is_the_packages_for_utf8_bodies(body: bytes) -> None:
    now = int(time.time())
    keys = webhook_secrets(f"{NEW} {OLD}")
    ours = sign(keys, "msg_1", now, body)
    theirs = [Webhook(s).sign("msg_1", datetime.fromtimestamp(now, UTC), body.decode()) for s in (NEW, OLD)]
    assert ours == " ".join(theirs)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": ours}
    for secret in (OLD, NEW):  # a receiver that knows either secret accepts the request
        Webhook(secret).verify(body.decode(), headers, json_parse=False)


def test_a_body_that_is_not_utf8_is_signed_as_bytes() -> None:
    body = b"\xff\xfe not utf-8 \xc3\x28"
    [key] = webhook_secrets(OLD)
    expected = base64.b64encode(hmac_data(key, b"m.7." + body)).decode()
    assert sign([key], "m", 7, body) == f"v1,{expected}"


def test_header_encoding_round_trips_and_leaves_ordinary_values_alone() -> None:
    assert header_value("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") == (
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )
    assert header_name("outbox-id") == "outbox-id" and header_name("X-Foo_bar.1") == "X-Foo_bar.1"
    rng = random.Random(5)
    samples = ["", " lead", "trail ", "50%", "välue ✓", "a\r\nb", "tab\there", "\x00", "ключ ✓/#?"]
    samples += ["".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(20)) for _ in range(50)]
    token = set("!#$&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ%")
    for text in samples:
        value, name = header_value(text), header_name(text)
        assert all(0x21 <= ord(c) <= 0x7E for c in value), value  # visible ASCII only
        assert name and set(name) <= token, name  # an HTTP token
        assert urllib.parse.unquote(value) == text and urllib.parse.unquote(name) == (text or "%")


def test_retry_after_is_read_and_bounded() -> None:
    assert retry_after_s(None) is None and retry_after_s("") is None and retry_after_s("soon") is None
    assert retry_after_s("3") == 3.0 and retry_after_s(" 0 ") == 0.0
    assert retry_after_s("86400") == MAX_RETRY_AFTER_S
    now = 1_700_000_000.0
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_the_pause_is_the_targets_retry_after_at_least_the_first_backoff() -> None:
    exc = TargetUnavailable("503")
    assert exc.pause_s(8.0, floor_s=0.5) == 8.0  # none given: the relay's own backoff
    exc.retry_after_s = 2.0
    assert exc.pause_s(8.0, floor_s=0.5) == 2.0
    exc.retry_after_s = 0.0
    assert exc.pause_s(8.0, floor_s=0.5) == 0.5


@pytest.mark.parametrize(
    ("password", "words"),
    [
        ("whsec_", "24 to 64 bytes"),
        ("secret", "whsec_"),
        ("whsec_abc$", "base64"),
        (f"{OLD}  {NEW}", "two separated by one space"),  # two spaces: an empty secret between
        (f"{OLD} {NEW} {new_secret(3)}", "two"),
        (f"{OLD} {OLD}", "differ"),
        ("whsec_" + base64.b64encode(b"k" * 65).decode(), "24 to 64 bytes"),
    ],
)
def test_malformed_secrets_are_refused_without_echoing_them(password: str, words: str) -> None:
    with pytest.raises(InvalidSpec, match=words) as info:
        webhook_secrets(password)
    assert info.value.field == "password"
    for secret in password.split(" "):
        assert len(secret) <= len("whsec_") or secret[6:] not in str(info.value), info.value


def test_a_webhook_spec_is_checked_with_its_secret() -> None:
    check_target(WebhookTarget(url="https://h.example/x?a=1", password=OLD))
    check_target(WebhookTarget(url="http://h.example:8080/"))  # a stored spec: the secret is kept apart
    with pytest.raises(InvalidSpec, match="signing secret"):
        check_target(WebhookTarget(url="https://h.example/x", password=None))
    for url in ("https://u@h/x", "ws://h/x", "https://h/x#f", "https:///x", "https://h:0/x"):
        with pytest.raises(InvalidSpec):
            check_target(WebhookTarget(url=url, password=OLD))


def test_the_address_checked_follows_the_scheme() -> None:
    assert target_endpoints(WebhookTarget(url="https://h.example/x")) == [("h.example", 443)]
    assert target_endpoints(WebhookTarget(url="http://h.example/x")) == [("h.example", 80)]
    assert target_endpoints(WebhookTarget(url="http://[::1]:8080/x")) == [("::1", 8080)]
