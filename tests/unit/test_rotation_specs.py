"""What a rotation may change along with the password: the user it logs in as, nothing else."""

from __future__ import annotations

import msgspec

from outbox_relay.domain import Database, KafkaTarget, RabbitMQTarget, RedisStreamsTarget
from service.resources import without_user


def test_the_user_of_a_dsn_or_url_and_kafkas_username_may_change() -> None:
    assert without_user(Database(dsn="postgresql://app@db:5432/shop")) == without_user(
        Database(dsn="postgresql://app_b@db:5432/shop")
    )
    assert without_user(RabbitMQTarget(url="amqp://relay@mq:5672/v")) == without_user(
        RabbitMQTarget(url="amqp://relay_b@mq:5672/v")
    )
    assert without_user(RedisStreamsTarget(url="redis://127.0.0.1:6379/0")) == without_user(
        RedisStreamsTarget(url="redis://relay@127.0.0.1:6379/0")
    )
    kafka = KafkaTarget(bootstrap_servers=["k:9092"], security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512")
    a, b = (msgspec.structs.replace(kafka, username=u) for u in ("relay", "relay_b"))
    assert without_user(a) == without_user(b)


def test_anything_else_is_a_reconfiguration() -> None:
    base = without_user(Database(dsn="postgresql://app@db:5432/shop"))
    assert base != without_user(Database(dsn="postgresql://app@db2:5432/shop"))
    assert base != without_user(Database(dsn="postgresql://app@db:5433/shop"))
    assert base != without_user(Database(dsn="postgresql://app@db:5432/shop2"))
    assert base != without_user(Database(dsn="postgresql://app@db:5432/shop", schema="other"))
    assert base != without_user(Database(dsn="postgresql://app@db:5432/shop?sslmode=require"))
