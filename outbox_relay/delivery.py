"""The delivery policy: what a broker's answer to a batch means, and what becomes of a message the
broker refused. Pure: no I/O, no clock of its own (the caller passes ``now``), so it is unit-tested
with plain values; the relay (:mod:`outbox_relay.engine`, :mod:`outbox_relay.fleet`) and the
dead-letter replay (:mod:`outbox_relay.replay`) apply what it answers.

- :func:`settle` reads a :class:`~outbox_relay.brokers.base.PublishResult` against the rows of a
  batch: how many messages the broker took, the last row the cursor passes (rows the topic mapping
  does not route are passed with the messages around them), and the message it refused, if any.
  What follows a refusal is neither charged nor passed: it is sent again (at least once).
- :meth:`DeliveryPolicy.decide` charges a refusal: retry after a backoff with full jitter, or, once
  the relay's ``max_attempts`` are used, dead-letter with every attempt's error.
- :meth:`DeliveryPolicy.cut_oversize` ends a batch before a payload over ``max_payload_bytes``:
  that one is dead-lettered without an attempt once everything before it is acknowledged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import RelayPolicy
from outbox_relay.store.control import RetryState

R = TypeVar("R")
M = TypeVar("M")

MAX_ERRORS_KEPT = 50
"""A retried message keeps the errors of its last this many attempts (the dead letter shows them)."""


def backoff_s(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30))))


@dataclass(frozen=True, slots=True)
class Settled(Generic[R, M]):
    """What one batch's answer settles (:func:`settle`)."""

    sent: int
    """Messages the broker acknowledged."""
    skipped: int
    """Rows without a message (not routed) that the cursor passes."""
    last: R | None
    """The last row the cursor moves over; None: it stays where it was."""
    refused: tuple[R, M] | None
    """The row and message the broker refused (charged an attempt); None when it refused nothing."""


def settle(rows: Sequence[R], messages: Sequence[M | None], answer: PublishResult) -> Settled[R, M]:
    """Walk a batch's rows (with their messages, None for an unrouted row) against the broker's
    answer: the first ``answer.acked`` messages and the unrouted rows among them are passed; the
    next message is the refused one when the answer names a refusal, otherwise unanswered (sent
    again, not charged)."""
    sent = skipped = 0
    last: R | None = None
    refused: tuple[R, M] | None = None
    for row, message in zip(rows, messages, strict=True):
        if message is not None:
            if sent >= answer.acked:
                refused = (row, message) if answer.rejected is not None else None
                break
            sent += 1
        else:
            skipped += 1
        last = row
    return Settled(sent=sent, skipped=skipped, last=last, refused=refused)


@dataclass(frozen=True, slots=True)
class RetryLater:
    """A refused message is sent again at ``state.next_at`` (alone, so nothing overtakes it)."""

    state: RetryState
    reason: str
    """For the partition's status: which message, which attempt of how many, and why."""


@dataclass(frozen=True, slots=True)
class DeadLetterNow:
    """A refused message used its budget: dead-letter it with every attempt's error."""

    attempts: list[dict[str, Any]]


class DeliveryPolicy:
    """A relay's retry budget and size limit (its :class:`~outbox_relay.domain.RelayPolicy`)."""

    __slots__ = ("policy",)

    def __init__(self, policy: RelayPolicy) -> None:
        self.policy = policy

    def decide(self, prior: RetryState | None, outbox_id: int, error: str, now: datetime) -> RetryLater | DeadLetterNow:
        """Charge one attempt to the refused message ``outbox_id``; ``prior`` is the partition's
        retry state (its attempts count only when it is about the same message)."""
        policy = self.policy
        prior = prior if prior is not None and prior.outbox_id == outbox_id else None
        attempts = (prior.attempts if prior else 0) + 1
        errors = [*(prior.errors if prior else []), {"at": now.isoformat(), "error": error}][-MAX_ERRORS_KEPT:]
        if attempts >= policy.max_attempts:
            return DeadLetterNow(errors)
        delay = backoff_s(attempts, base_s=policy.backoff_base_ms / 1000, cap_s=policy.backoff_max_ms / 1000)
        state = RetryState(
            outbox_id=outbox_id, attempts=attempts, errors=errors, next_at=now + timedelta(seconds=delay)
        )
        reason = f"outbox message {outbox_id} refused (attempt {attempts} of {policy.max_attempts}): {error}"
        return RetryLater(state, reason)

    def oversize_error(self, payload_bytes: int) -> str:
        """The dead letter's error for a payload over ``max_payload_bytes``."""
        return f"payload is {payload_bytes} bytes, over the relay's max_payload_bytes ({self.policy.max_payload_bytes})"

    def cut_oversize(self, messages: Sequence[OutgoingMessage | None]) -> int | None:
        """The index of the first message whose payload is over ``max_payload_bytes`` (the batch
        ends before it), or None."""
        limit = self.policy.max_payload_bytes
        for index, message in enumerate(messages):
            if message is not None and len(message.payload) > limit:
                return index
        return None
