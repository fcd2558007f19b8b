"""The Kafka adapter's partitioner puts every key where aiokafka's (and the Java client's) default
partitioner does: consumers and other producers of the topic rely on where a key's messages go."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from outbox_relay.brokers.kafka import KeyPartitioner


def test_keys_go_where_the_default_partitioner_puts_them() -> None:
    ours, theirs = KeyPartitioner(size=50), DefaultPartitioner()
    keys = [f"order-{n}".encode() for n in range(300)] + ["ключ".encode(), b"", b"\x00\xff"]
    for partitions in (1, 3, 16, 100):
        every = list(range(partitions))
        for _ in range(2):  # the second time from the remembered hashes (and past the bound of 50)
            assert [ours(key, every, every) for key in keys] == [theirs(key, every, every) for key in keys]


def test_a_message_without_a_key_goes_to_an_available_partition() -> None:
    ours = KeyPartitioner()
    assert {ours(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert {ours(None, [0, 1], []) for _ in range(50)} <= {0, 1}
