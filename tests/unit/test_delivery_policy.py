"""The delivery policy (outbox_relay.delivery) with plain values: how a broker's answer settles a
batch, when a refusal is retried or dead-lettered, where an over-size payload cuts a batch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.delivery import MAX_ERRORS_KEPT, DeadLetterNow, DeliveryPolicy, RetryLater, settle
from outbox_relay.domain import RelayPolicy
from outbox_relay.errors import MessageRejected
from outbox_relay.store.control import RetryState

NOW = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def message(row_id: int, payload: bytes = b"x") -> OutgoingMessage:
    return OutgoingMessage(id=row_id, destination="d", key=None, payload=payload, headers={})


def test_an_answer_that_acks_everything_passes_every_row_unrouted_ones_included() -> None:
    rows = [1, 2, 3, 4]
    messages = [message(1), None, message(3), None]
    outcome = settle(rows, messages, PublishResult(acked=2))
    assert (outcome.sent, outcome.skipped, outcome.last, outcome.refused) == (2, 2, 4, None)


def test_a_refusal_passes_the_acked_prefix_and_names_the_refused_message() -> None:
    rows = [1, 2, 3, 4, 5]
    messages = [message(1), None, message(3), None, message(5)]
    answer = PublishResult(acked=1, rejected=MessageRejected("no route", index=1))
    outcome = settle(rows, messages, answer)
    assert (outcome.sent, outcome.skipped, outcome.last) == (1, 1, 2)
    assert outcome.refused == (3, messages[2])  # the unrouted row after it waits with the rest


def test_an_unanswered_message_is_neither_passed_nor_charged() -> None:
    outcome = settle([1, 2, 3], [message(1), message(2), message(3)], PublishResult(acked=1))
    assert (outcome.sent, outcome.last, outcome.refused) == (1, 1, None)


def test_a_batch_refused_at_its_first_message_leaves_the_cursor() -> None:
    answer = PublishResult(acked=0, rejected=MessageRejected("too big", index=0))
    outcome = settle([7, 8], [message(7), message(8)], answer)
    assert (outcome.sent, outcome.last) == (0, None)
    assert outcome.refused is not None and outcome.refused[0] == 7


def test_a_first_refusal_is_retried_later_within_the_backoff() -> None:
    policy = DeliveryPolicy(RelayPolicy(max_attempts=3, backoff_base_ms=1000, backoff_max_ms=60_000))
    decision = policy.decide(None, 42, "no route", NOW)
    assert isinstance(decision, RetryLater)
    assert (decision.state.outbox_id, decision.state.attempts) == (42, 1)
    assert decision.state.errors == [{"at": NOW.isoformat(), "error": "no route"}]
    assert decision.state.next_at is not None
    assert NOW <= decision.state.next_at <= NOW + timedelta(seconds=2)  # full jitter up to base * 2**1
    assert "attempt 1 of 3" in decision.reason and "42" in decision.reason


def test_attempts_add_up_for_the_same_message_and_start_over_for_another() -> None:
    policy = DeliveryPolicy(RelayPolicy(max_attempts=5))
    prior = RetryState(outbox_id=42, attempts=2, errors=[{"at": "t", "error": "e"}], next_at=NOW)
    same = policy.decide(prior, 42, "again", NOW)
    other = policy.decide(prior, 43, "first", NOW)
    assert isinstance(same, RetryLater) and same.state.attempts == 3 and len(same.state.errors) == 2
    assert isinstance(other, RetryLater) and other.state.attempts == 1 and len(other.state.errors) == 1


def test_the_last_attempt_dead_letters_with_every_error() -> None:
    policy = DeliveryPolicy(RelayPolicy(max_attempts=3))
    prior = RetryState(
        outbox_id=9, attempts=2, errors=[{"at": "a", "error": "1"}, {"at": "b", "error": "2"}], next_at=None
    )
    decision = policy.decide(prior, 9, "3", NOW)
    assert isinstance(decision, DeadLetterNow)
    assert [e["error"] for e in decision.attempts] == ["1", "2", "3"]


def test_one_attempt_allowed_dead_letters_at_the_first_refusal() -> None:
    assert isinstance(DeliveryPolicy(RelayPolicy(max_attempts=1)).decide(None, 1, "no", NOW), DeadLetterNow)


def test_a_long_retried_message_keeps_only_its_last_errors() -> None:
    policy = DeliveryPolicy(RelayPolicy(max_attempts=1000))
    errors = [{"at": str(i), "error": str(i)} for i in range(MAX_ERRORS_KEPT)]
    prior = RetryState(outbox_id=1, attempts=MAX_ERRORS_KEPT, errors=errors, next_at=None)
    decision = policy.decide(prior, 1, "newest", NOW)
    assert isinstance(decision, RetryLater)
    assert len(decision.state.errors) == MAX_ERRORS_KEPT
    assert decision.state.errors[0]["error"] == "1" and decision.state.errors[-1]["error"] == "newest"


def test_an_oversize_payload_cuts_the_batch_before_it() -> None:
    policy = DeliveryPolicy(RelayPolicy(max_payload_bytes=4))
    assert policy.cut_oversize([message(1, b"1234"), None, message(3, b"12345"), message(4)]) == 2
    assert policy.cut_oversize([message(1, b"1234"), None]) is None
    assert "5 bytes" in policy.oversize_error(5) and "(4)" in policy.oversize_error(5)
