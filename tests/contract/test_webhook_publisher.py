"""What the webhook adapter promises beyond the shared contract, against the local receiver: the
concurrency cap and one request per key in flight, both secrets of a rotation on every request,
what each kind of answer becomes (Retry-After carried to the relay, a redirect never followed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.brokers.factory import open_publisher
from outbox_relay.domain import WebhookTarget
from outbox_relay.errors import TargetUnavailable
from tests.harness.webhooks import Answer, WebhookReceiver, new_secret
from tests.helpers import LOCAL

SECRETS = [new_secret(21), new_secret(22)]
BOTH = " ".join(SECRETS)  # a rotation under way: the receiver checks both signatures


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(SECRETS, hold_s=0.01) as r:  # each request held: overlaps would be seen
        yield r


def message(n: int, key: str | None, destination: str = "d") -> OutgoingMessage:
    return OutgoingMessage(id=n, destination=destination, key=key, payload=b'{"n": %d}' % n, headers={})


async def test_at_most_max_concurrent_requests_and_one_per_key(receiver: WebhookReceiver) -> None:
    target = WebhookTarget(url=receiver.url, max_concurrent_requests=4)
    batch = [message(n, f"k{n % 10}") for n in range(200)] + [message(1000 + n, None) for n in range(20)]
    async with await open_publisher(target, password=BOTH, policy=LOCAL) as publisher:
        assert await publisher.publish_batch(batch) == PublishResult(acked=len(batch))
    assert receiver.max_in_flight == 4, receiver.max_in_flight  # the cap, and reached: keys went in parallel
    assert receiver.overlaps == 0
    for k in range(10):
        assert [d.webhook_id for d in receiver.all if d.key == f"k{k}"] == [str(n) for n in range(k, 200, 10)]
    assert {d.signatures for d in receiver.all} == {2} and receiver.bad_signatures == 0


@pytest.mark.parametrize(("status", "retry_after", "pause"), [(503, "7", 7.0), (429, None, None), (408, "x", None)])
async def test_outage_answers_carry_the_retry_after(
    receiver: WebhookReceiver, status: int, retry_after: str | None, pause: float | None
) -> None:
    receiver.outage = Answer(status, [("retry-after", retry_after)] if retry_after else [])
    target = WebhookTarget(url=receiver.url)
    async with await open_publisher(target, password=BOTH, policy=LOCAL) as publisher:
        with pytest.raises(TargetUnavailable, match=str(status)) as failed:
            await publisher.publish_batch([message(1, "a"), message(2, "b")])
        assert failed.value.retry_after_s == pause
        receiver.outage = None
        assert await publisher.publish_batch([message(3, "a")]) == PublishResult(acked=1)


async def test_a_redirect_is_a_refusal_that_says_so(receiver: WebhookReceiver) -> None:
    receiver.answers["moved"] = Answer(301, [("location", "https://elsewhere.example/in")])
    target = WebhookTarget(url=receiver.url)
    async with await open_publisher(target, password=BOTH, policy=LOCAL) as publisher:
        result = await publisher.publish_batch([message(1, "a"), message(2, "a", "moved"), message(3, "a")])
    assert result.acked == 1 and result.rejected is not None and result.rejected.index == 1
    assert "301" in str(result.rejected) and "not followed" in str(result.rejected)
    assert "https://elsewhere.example/in" in str(result.rejected)
    assert [d.webhook_id for d in receiver.all] == ["1"]  # the refused message's key stopped behind it


async def test_open_fails_on_an_outage_answer_and_takes_a_405(receiver: WebhookReceiver) -> None:
    receiver.options_answer = Answer(503)
    target = WebhookTarget(url=receiver.url)
    with pytest.raises(TargetUnavailable, match="503"):
        await open_publisher(target, password=BOTH, policy=LOCAL)
    receiver.options_answer = Answer(405)
    async with await open_publisher(target, password=BOTH, policy=LOCAL) as publisher:
        assert await publisher.publish_batch([message(1, "a")]) == PublishResult(acked=1)


async def test_a_missing_or_malformed_stored_secret_pauses_the_relay(receiver: WebhookReceiver) -> None:
    target = WebhookTarget(url=receiver.url)
    for password in (None, "whsec_tooshort"):
        with pytest.raises(TargetUnavailable, match="signing secret") as failed:
            await open_publisher(target, password=password, policy=LOCAL)
        assert "tooshort" not in str(failed.value)


async def test_a_request_cancelled_while_waiting_for_a_connection_gives_nothing_away() -> None:
    """One connection: a batch waiting for it is cancelled (its caller went away), another times
    out waiting; neither leaks the connection's slot, and the next batches still go through."""
    async with WebhookReceiver(SECRETS, hold_s=0.6) as receiver:
        target = WebhookTarget(url=receiver.url, max_concurrent_requests=1, timeout_ms=1000)
        async with await open_publisher(target, password=BOTH, policy=LOCAL) as publisher:
            holding = asyncio.ensure_future(publisher.publish_batch([message(1, "a")]))
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(publisher.publish_batch([message(3, "b")]))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(TargetUnavailable, match="timed out"):  # waits ~0.5 s, then held 0.6 s: over 1 s
                await publisher.publish_batch([message(4, "c")])
            assert await holding == PublishResult(acked=1)
            receiver.hold_s = 0
            results = await asyncio.gather(*(publisher.publish_batch([message(n, f"k{n}")]) for n in range(5, 10)))
            assert results == [PublishResult(acked=1)] * 5
        got = {int(d.webhook_id) for d in receiver.all}
        assert got >= {1, 5, 6, 7, 8, 9} and 3 not in got, got
