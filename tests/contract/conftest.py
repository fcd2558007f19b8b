"""Fixtures of the publisher contract suite: ``harness`` is parametrised by adapter name (indirectly)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.contract.harness import (
    Harness,
    KafkaHarness,
    NatsHarness,
    RabbitMQEnv,
    RabbitMQHarness,
    RabbitMQTopicHarness,
    RedisStreamsHarness,
    WebhookHarness,
    rabbitmq_env,
    webhook_harness,
)
from tests.harness.brokers import RabbitMQAccount

_rabbitmq_envs: dict[str, RabbitMQEnv] = {}


async def _rabbitmq_env(request: pytest.FixtureRequest) -> RabbitMQEnv:
    """Set up once per run (the session fixtures it needs are synchronous)."""
    account: RabbitMQAccount = request.getfixturevalue("rabbitmq")
    if account.vhost not in _rabbitmq_envs:
        _rabbitmq_envs[account.vhost] = await rabbitmq_env(account, request.getfixturevalue("run_id"))
    return _rabbitmq_envs[account.vhost]


@pytest.fixture
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """The adapter under test; only the broker it needs is started."""
    name = request.param
    h: Harness
    if name == RabbitMQHarness.name:
        h = RabbitMQHarness(await _rabbitmq_env(request))
    elif name == RabbitMQTopicHarness.name:
        h = RabbitMQTopicHarness(await _rabbitmq_env(request))
    elif name == RedisStreamsHarness.name:
        h = RedisStreamsHarness(request.getfixturevalue("redis_account"))
    elif name == KafkaHarness.name:
        h = KafkaHarness(request.getfixturevalue("tansu"))
    elif name == NatsHarness.name:
        h = NatsHarness(request.getfixturevalue("nats_server"))
    elif name == WebhookHarness.name:
        h = await webhook_harness()
    else:
        raise ValueError(name)
    try:
        yield h
    finally:
        await h.aclose()
