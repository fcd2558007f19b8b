"""Build the :class:`~outbox_relay.brokers.base.Publisher` for a target spec.

Usage: ``open_publisher`` is an async factory that connects before it returns (so an unreachable
broker or bad credentials surface here, as :class:`~outbox_relay.errors.TargetUnavailable`), and
the publisher it returns is an async context manager that closes it::

    async with await open_publisher(target, password=secret, policy=policy) as publisher:
        result = await publisher.publish_batch(messages)

``policy`` is required: every connection an adapter opens, the first and each reconnect (and, for
Kafka, each broker the cluster advertises), dials only addresses it checked when it resolved the
host just then (:mod:`outbox_relay.netguard`); a refused address surfaces as TargetUnavailable.

Adapters reconnect by themselves on a later batch after the broker went away, so a publisher can be
kept for as long as its target spec does not change.

Each adapter module is imported only when a target of its kind is opened, so a process needs only
the client library of the brokers it actually talks to.

A spec that :mod:`outbox_relay.specs` refuses (one stored before a check existed: a URL parameter
outside the allow-list, a ``maxlen`` over what XADD takes ...) never reaches a driver: it is
:class:`~outbox_relay.errors.TargetUnavailable`, so the relay pauses and charges no message.
"""

from __future__ import annotations

from typing import Protocol

from outbox_relay.brokers.base import Publisher
from outbox_relay.domain import KafkaTarget, NatsTarget, RabbitMQTarget, RedisStreamsTarget, Target, WebhookTarget
from outbox_relay.netguard import AddressPolicy
from outbox_relay.specs import usable_target


class _Adapter(Publisher, Protocol):
    async def connect(self) -> None: ...


async def open_publisher(target: Target, *, password: str | None, policy: AddressPolicy) -> Publisher:
    """Connect a publisher for ``target``; ``password`` is the decrypted secret (None when unset),
    ``policy`` the address policy every connection of the publisher is checked against."""
    usable_target(target)
    publisher: _Adapter
    if isinstance(target, RabbitMQTarget):
        from outbox_relay.brokers.rabbitmq import RabbitMQPublisher

        publisher = RabbitMQPublisher.from_target(target, password=password, policy=policy)
    elif isinstance(target, RedisStreamsTarget):
        from outbox_relay.brokers.redis_streams import RedisStreamsPublisher

        publisher = RedisStreamsPublisher.from_target(target, password=password, policy=policy)
    elif isinstance(target, KafkaTarget):
        from outbox_relay.brokers.kafka import KafkaPublisher

        publisher = KafkaPublisher.from_target(target, password=password, policy=policy)
    elif isinstance(target, NatsTarget):
        from outbox_relay.brokers.nats import NatsPublisher

        publisher = NatsPublisher.from_target(target, password=password, policy=policy)
    elif isinstance(target, WebhookTarget):
        from outbox_relay.brokers.webhook import WebhookPublisher

        publisher = WebhookPublisher.from_target(target, password=password, policy=policy)
    else:
        raise TypeError(f"not a target spec: {type(target).__name__}")
    try:
        await publisher.connect()
    except BaseException:
        await publisher.close()
        raise
    return publisher
