"""The broker seam: every target (RabbitMQ, Redis Streams, Kafka, NATS JetStream, webhooks) implements
:class:`Publisher`.

Contract (checked for every adapter by ``tests/contract``):

* ``publish_batch(messages)`` sends the messages **in the given order** and returns only once the
  broker has acknowledged each of them (publisher confirms, stream ids, Kafka acks, 2xx answers). Messages that
  share a key therefore reach the broker in batch order.
* Every published message carries its message id, key and relay name in its headers (the relay puts
  them in ``OutgoingMessage.headers``, the id as ``outbox-id``; adapters copy headers verbatim), the
  message id where the broker has a place for one (AMQP ``message_id``; a stream field
  ``outbox-id``; a Kafka header ``outbox-id`` when the headers lack it; NATS headers ``outbox-id`` and
  ``Nats-Msg-Id``; a webhook's ``webhook-id``) and the key where the broker has one (Kafka message key;
  AMQP header ``outbox-key``; a stream field ``key``; a NATS or webhook ``outbox-key`` header).
* It returns a :class:`PublishResult`: the first ``acked`` messages are acknowledged. When the broker
  refused message number ``acked`` the result carries a :class:`MessageRejected`; the messages after
  it may or may not have been delivered (they will be sent again, which at-least-once allows).
* It raises :class:`TargetUnavailable` when the broker cannot be reached or does not answer within
  the adapter's timeout. Nothing is known about any message then; the caller sends the batch again.
* ``close()`` releases connections; adapters are also async context managers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self

import msgspec

from outbox_relay.errors import MessageRejected


class CloudEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The CloudEvents attributes of a message published in binary content mode; each adapter puts
    them where its broker's binding says (see ``outbox_relay.domain.CloudEventsOptions``)."""

    id: str
    source: str
    type: str
    time: str
    """RFC 3339."""
    datacontenttype: str
    specversion: str = "1.0"

    def attributes(self) -> tuple[tuple[str, str], ...]:
        """The attributes that go into headers (all but ``datacontenttype``, which every binding
        carries as the content type), in the binding's order."""
        return (
            ("id", self.id),
            ("source", self.source),
            ("specversion", self.specversion),
            ("type", self.type),
            ("time", self.time),
        )


class OutgoingMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message on its way to a broker."""

    id: int
    """The outbox row id: unique only within one database's history (a restore can reuse it), so
    no consumer should dedupe on it; for logs, traces and dead letters."""
    message_id: str = ""
    """The id consumers dedupe on, unique across restores, failovers and clusters (a UUID; see
    ``outbox_relay.tenant.db.OutboxRow.message_id``); also in ``headers['outbox-id']``. Empty: the
    row id in decimal (an outbox of schema version 1)."""
    destination: str
    """Exchange routing key, stream name, Kafka topic or NATS subject, after the relay's topic mapping."""
    key: str | None
    payload: bytes
    headers: dict[str, str]
    cloudevent: CloudEvent | None = None
    """Set when the relay publishes CloudEvents (binary content mode)."""

    @property
    def dedupe_id(self) -> str:
        """The id the message is published with: ``message_id``, or the row id for an old outbox."""
        return self.message_id or str(self.id)


@dataclass(frozen=True, slots=True)
class PublishResult:
    acked: int
    """How many messages, from the start of the batch, the broker acknowledged."""
    rejected: MessageRejected | None = None
    """Why message number ``acked`` was refused, when it was."""


class Publisher(Protocol):
    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...
