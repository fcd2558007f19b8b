"""Kafka adapter: aiokafka's ``AIOKafkaProducer``.

Topic = ``message.destination``; the Kafka message key is the outbox key (UTF-8; no key when the
message has none, so the producer spreads those over partitions); headers are the message's headers
as ``(name, UTF-8 bytes)`` pairs, plus ``outbox-id`` when the relay did not set it; a CloudEvent's
attributes as ``ce_<name>`` headers and its ``datacontenttype`` as ``content-type`` (the Kafka binding).

Ordering: the batch's messages are appended, in order, to one record batch per topic partition
(aiokafka's ``create_batch``/``send_batch``), handed to the producer, then the acks are awaited.
Concurrent batches hand theirs over one after another, in arrival order. aiokafka keeps at most one
produce request in flight per broker and mutes a partition while its batch is in flight; a retried
batch goes back to the head of its partition's queue. So messages of one key (one partition) are
written in batch order even across retries, without ``max.in.flight`` tuning. Keys are hashed as
aiokafka's default partitioner does (murmur2, as the Java client); keyless messages of one batch go
to one partition (chosen at random among the available ones) so they share a record batch.

Idempotence (``enable_idempotence``, on by default) needs a broker that grants ``InitProducerId``; on
one that does not, :meth:`KafkaPublisher.connect` times out with :class:`TargetUnavailable`.

Errors: a message the producer or the broker refuses on its own account (larger than
``max_request_size`` or the broker's limit, invalid or unauthorised topic, a topic that does not
exist while the cluster answers, a corrupt or invalid record) → :class:`MessageRejected` at its
index. A topic name Kafka does not allow (``[a-zA-Z0-9._-]``, at most 249, not ``.`` or ``..``) is
refused before anything is sent for it, without asking the cluster for its metadata. Everything else
(no broker reachable, request timed out, no leader, ...) → :class:`TargetUnavailable`.

After a failure the broker reported (refusal or outage) the producer is discarded at once, failing
whatever it still holds, and the next batch starts a new one: the failed batch's later messages must
not be delivered behind its retry. Concurrent batches (the worker shares one publisher between
partitions) share the producer, so a batch still in flight on a discarded producer fails as
:class:`TargetUnavailable` and is sent again; a failing batch only ever discards the producer it
used, never the one another batch has started since, and concurrent first batches start one
producer together.

Addresses: the producer's client is a :class:`GuardedKafkaClient`, so every broker it dials, the
bootstrap servers and every broker the cluster's metadata advertises, is resolved once by the
:class:`~outbox_relay.netguard.AddressPolicy`, checked, and dialled by a checked IP address (TLS
verifies the broker's name). A broker whose address the policy refuses is never dialled: aiokafka
sees it as a broker it cannot reach, and the batch fails as :class:`TargetUnavailable` naming the
refusal.

Batches: up to ``MAX_BATCH_BYTES`` of records per partition go in one record batch (aiokafka's
default is 16 KiB); a fuller batch of ours is handed over in several. One future per record batch,
not per message: per-message ``send()`` was most of the adapter's CPU per message (12 -> 6.7 us).
A broker whose ``message.max.bytes`` is below ``MAX_BATCH_BYTES`` refuses a whole record batch as too
large, so every message in it is refused; keep the broker's limit at or above it (Kafka's default is
1 MB).

Every wait is bounded by ``timeout_ms``: ``start()``, handing the batch over (metadata look-ups;
twice ``timeout_ms`` for all of them), each acknowledgement after the previous one, and ``stop()``
(aiokafka's ``stop()`` waits for pending batches forever when the brokers are gone:
aio-libs/aiokafka#1101).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self, cast

import aiokafka.errors as kafka_errors
from aiokafka import AIOKafkaProducer
from aiokafka.client import AIOKafkaClient, ConnectionGroup
from aiokafka.conn import AIOKafkaConnection, create_conn
from aiokafka.partitioner import murmur2
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.util import create_task

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import KafkaTarget
from outbox_relay.errors import AddressNotAllowed, MessageRejected, TargetUnavailable
from outbox_relay.netguard import AddressPolicy, Endpoint, NameBoundSSLContext

log = logging.getLogger(__name__)

ID_HEADER = "outbox-id"
CE_PREFIX = "ce_"
"""CloudEvents attributes as Kafka headers (the Kafka protocol binding, binary content mode)."""
CONTENT_TYPE_HEADER = "content-type"

_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

# Errors that blame the message (or its topic), not the cluster. aiokafka reports a produce error code
# it does not know (e.g. INVALID_RECORD: a keyless message to a compacted topic) as UnknownError.
_REFUSALS: tuple[type[Exception], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidTimestampError,
    kafka_errors.PolicyViolationError,
    kafka_errors.UnknownError,
)

MAX_BATCH_BYTES = 256 * 1024
"""Records per partition in one produce request (aiokafka's ``max_batch_size``), at most the
publisher's ``max_request_size``."""


def _producer_options(
    *,
    bootstrap_servers: Sequence[str],
    security_protocol: SecurityProtocol,
    sasl_mechanism: SaslMechanism | None,
    username: str | None,
    password: str | None,
    acks: Literal["all", 1],
    enable_idempotence: bool,
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None,
    max_request_size: int,
    timeout_ms: int,
    client_id: str,
) -> dict[str, Any]:
    """The aiokafka producer's keyword arguments from :class:`KafkaPublisher`'s; ValueError for a
    combination it cannot take."""
    if not bootstrap_servers:
        raise ValueError("bootstrap_servers must name at least one broker")
    if timeout_ms <= 0:
        raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
    if max_request_size <= 0:
        raise ValueError(f"max_request_size must be positive, got {max_request_size}")
    if enable_idempotence and acks != "all":
        raise ValueError(f"acks={acks!r} needs enable_idempotence=False (idempotence needs acks='all')")
    if security_protocol.startswith("SASL") and (sasl_mechanism is None or username is None):
        raise ValueError(f"security_protocol {security_protocol} needs sasl_mechanism and username")
    options: dict[str, Any] = {
        "bootstrap_servers": list(bootstrap_servers),
        "client_id": client_id,
        "acks": acks,
        "enable_idempotence": enable_idempotence,
        "compression_type": compression_type,
        "max_request_size": max_request_size,
        # per partition: aiokafka's 16 KiB default sends 1 KiB messages 15 to a produce request
        # (one request in flight per broker): the relay reached 0.55x a hand-written poller with
        # it, 1.07-1.14x with 256 KiB, in the same runs (bench/README.md)
        "max_batch_size": min(MAX_BATCH_BYTES, max_request_size),
        "request_timeout_ms": timeout_ms,
        "security_protocol": security_protocol,
        "partitioner": KeyPartitioner(),
    }
    if security_protocol in ("SSL", "SASL_SSL"):
        # aiokafka wants one; GuardedKafkaClient dials with a context bound to each broker's name
        options["ssl_context"] = _tls_context()
    if security_protocol.startswith("SASL"):
        options.update(sasl_mechanism=sasl_mechanism, sasl_plain_username=username, sasl_plain_password=password)
    return options


class KafkaPublisher:
    """Publishes batches through one aiokafka producer; see the module docstring."""

    def __init__(
        self,
        *,
        bootstrap_servers: Sequence[str],
        policy: AddressPolicy,
        security_protocol: SecurityProtocol = "PLAINTEXT",
        sasl_mechanism: SaslMechanism | None = None,
        username: str | None = None,
        password: str | None = None,
        acks: Literal["all", 1] = "all",
        enable_idempotence: bool = True,
        compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None,
        max_request_size: int = 1024 * 1024,
        timeout_ms: int = 10_000,
        client_id: str = "outbox-relay",
    ) -> None:
        """``policy`` checks every broker address before it is dialled (see the module docstring).
        Nothing connects before :meth:`connect` or the first batch."""
        self._options = _producer_options(
            bootstrap_servers=bootstrap_servers,
            security_protocol=security_protocol,
            sasl_mechanism=sasl_mechanism,
            username=username,
            password=password,
            acks=acks,
            enable_idempotence=enable_idempotence,
            compression_type=compression_type,
            max_request_size=max_request_size,
            timeout_ms=timeout_ms,
            client_id=client_id,
        )
        self._policy = policy
        self._timeout_s = timeout_ms / 1000
        self._where = ",".join(bootstrap_servers)
        self._producer: AIOKafkaProducer | None = None
        self._starting: asyncio.Future[AIOKafkaProducer] | None = None
        self._stopping: set[AIOKafkaProducer] = set()
        self._handing = asyncio.Lock()
        """Held while a batch hands its record batches over: aiokafka's ``send_batch`` waits until the
        partition's queued batch is taken into a request, and concurrent batches racing for that slot
        starved one past its timeout; in turn, they queue behind each other in arrival order."""
        self._closed = False

    @classmethod
    def from_target(cls, target: KafkaTarget, *, password: str | None, policy: AddressPolicy) -> Self:
        return cls(
            bootstrap_servers=target.bootstrap_servers,
            policy=policy,
            security_protocol=target.security_protocol,
            sasl_mechanism=target.sasl_mechanism,
            username=target.username,
            password=password,
            acks=target.acks,
            enable_idempotence=target.enable_idempotence,
            compression_type=target.compression_type,
            timeout_ms=target.timeout_ms,
        )

    async def connect(self) -> None:
        """Start the producer now; raise :class:`TargetUnavailable` when no broker answers."""
        await self._acquire()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        if not messages:
            return PublishResult(acked=0)
        sendable, refusal = len(messages), None
        for index, message in enumerate(messages):
            refusal = _invalid_topic(message.destination)
            if refusal is not None:
                sendable = index
                break
        if sendable:
            result = await self._publish(await self._acquire(), messages[:sendable])
            if refusal is None or result.acked < sendable:
                return result
        assert refusal is not None
        return PublishResult(acked=sendable, rejected=MessageRejected(refusal, index=sendable))

    async def close(self) -> None:
        """Stop the producer (bounded by ``timeout_ms``); safe to call more than once."""
        self._closed = True
        if self._producer is not None:
            await self._discard(self._producer)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- internals ---------------------------------------------------------------------------------

    async def _publish(self, producer: AIOKafkaProducer, messages: Sequence[OutgoingMessage]) -> PublishResult:
        built = _Built()
        send_error: BaseException | None = None
        try:
            try:
                # aiokafka gives up on metadata after request_timeout_ms; this is a backstop, one for
                # the batch (a timer armed and cancelled per message was a noticeable part of its cost)
                async with asyncio.timeout(2 * self._timeout_s), self._handing:
                    await self._build(producer, messages, built)
                send_error = built.stopped
            except (kafka_errors.KafkaError, TimeoutError) as exc:
                send_error = exc
            for index, builder in enumerate(built.owners):
                future = built.futures.get(id(builder))
                if future is None:  # the batch was built but not handed over: the send failed first
                    break
                if not future.done():  # acks come per produce request: most are in by now
                    done, _ = await asyncio.wait((future,), timeout=self._timeout_s)
                    if not done:
                        raise TargetUnavailable(
                            f"Kafka at {self._where}: no ack within {self._timeout_s:g}s{_refusal_note(producer)}"
                        )
                error = future.exception()
                if error is not None:
                    rejection = self._rejection_or_raise(error, index, producer)
                    await self._discard(producer)  # its sequence state after a failed batch is suspect
                    return PublishResult(acked=index, rejected=rejection)
            if send_error is None:
                return PublishResult(acked=len(messages))
            index = built.handed_over()
            if isinstance(send_error, kafka_errors.UnknownTopicOrPartitionError):
                return PublishResult(acked=index, rejected=await self._missing_topic(producer, messages[index], index))
            return PublishResult(acked=index, rejected=self._rejection_or_raise(send_error, index, producer))
        except TargetUnavailable:
            await self._discard(producer)
            raise
        finally:
            for future in built.futures.values():
                future.add_done_callback(_retrieve)  # the ones not awaited after a failure

    async def _build(self, producer: AIOKafkaProducer, messages: Sequence[OutgoingMessage], built: _Built) -> None:
        """Append the messages, in order, to one record batch per topic partition (aiokafka's
        ``create_batch``/``send_batch``: one future per batch, not one per message, which was most of
        the adapter's CPU per message), handing a batch to the producer when it is full and the rest
        at the end. Stops before the first message whose topic has no metadata or that is larger than
        a request may be (``built.stopped``); a failure to hand a batch over raises."""
        open_batches: dict[tuple[str, int], Any] = {}
        topics: dict[str, _TopicPartitions] = {}
        limit = self._options["max_request_size"]
        for message in messages:
            topic = message.destination
            partitions = topics.get(topic)
            key = None if message.key is None else message.key.encode()
            headers = _headers(message)
            try:
                if partitions is None:
                    await producer.partitions_for(topic)  # the topic's metadata, or why there is none
                    partitions = topics[topic] = _TopicPartitions.of(producer, topic)
                if DefaultRecordBatchBuilder.estimate_size_in_bytes(key, message.payload, headers) > limit:
                    raise kafka_errors.MessageSizeTooLargeError(
                        f"the message is larger than the maximum request size ({limit} bytes)"
                    )
            except (kafka_errors.KafkaError, TimeoutError) as exc:
                built.stopped = exc  # at this message: what is before it still goes
                break
            partition = partitions.sticky if key is None else producer._partitioner(key, partitions.all, None)
            builder = open_batches.get((topic, partition))
            if builder is None:
                builder = open_batches[(topic, partition)] = producer.create_batch()
            if builder.append(timestamp=None, key=key, value=message.payload, headers=headers) is None:
                await built.send(producer, builder, topic, partition)  # full: the message starts the next one
                builder = open_batches[(topic, partition)] = producer.create_batch()
                builder.append(timestamp=None, key=key, value=message.payload, headers=headers)
            built.owners.append(builder)
        for (topic, partition), builder in open_batches.items():
            await built.send(producer, builder, topic, partition)

    def _rejection_or_raise(self, error: BaseException, index: int, producer: AIOKafkaProducer) -> MessageRejected:
        if isinstance(error, _REFUSALS):
            return MessageRejected(f"Kafka refused the message: {error}", index=index)
        raise TargetUnavailable(f"Kafka at {self._where}: {error!r}{_refusal_note(producer)}") from error

    async def _missing_topic(self, producer: AIOKafkaProducer, message: OutgoingMessage, index: int) -> MessageRejected:
        """aiokafka raises UnknownTopicOrPartitionError both for a topic that does not exist and for
        a cluster it cannot reach; tell them apart with one fresh metadata request."""
        refreshed = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout_s):
                refreshed = bool(await producer.client.force_metadata_update())
        if not refreshed:
            raise TargetUnavailable(
                f"Kafka at {self._where}: no metadata for {message.destination!r}{_refusal_note(producer)}"
            )
        return MessageRejected(f"Kafka topic {message.destination!r} does not exist", index=index)

    async def _acquire(self) -> AIOKafkaProducer:
        """The current producer; concurrent callers wait for one start together (``timeout_ms``)."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        if self._producer is not None:
            return self._producer
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
            self._starting.add_done_callback(_retrieve)
        return await asyncio.shield(self._starting)

    async def _start(self) -> AIOKafkaProducer:
        try:
            producer = AIOKafkaProducer(**self._options)
            GuardedKafkaClient.adopt(producer.client, self._policy)
            try:
                # start() retries InitProducerId (idempotence) for ever; bound it.
                async with asyncio.timeout(self._timeout_s):
                    await producer.start()
            except (kafka_errors.KafkaError, TimeoutError, OSError) as exc:
                await _stop(producer, self._timeout_s)
                raise TargetUnavailable(
                    f"cannot start a Kafka producer on {self._where}: {exc!r}{_refusal_note(producer)}"
                ) from exc
            if self._closed:
                await _stop(producer, self._timeout_s)
                raise RuntimeError("publisher is closed")
            self._producer = producer
            return producer
        finally:
            self._starting = None

    async def _discard(self, producer: AIOKafkaProducer) -> None:
        """Stop ``producer``, failing what it still holds; the next batch starts a new one. Only
        this producer: another batch may have started the next one already."""
        if self._producer is producer:
            self._producer = None
        if producer not in self._stopping:
            self._stopping.add(producer)
            try:
                await _stop(producer, self._timeout_s)
            finally:
                self._stopping.discard(producer)


class GuardedKafkaClient(AIOKafkaClient):  # type: ignore[misc]  # aiokafka.client is untyped
    """aiokafka's client, dialling only broker addresses the address policy checked just now.

    aiokafka hands each broker's (host, port), from ``bootstrap_servers`` and from the cluster's
    metadata, to ``create_conn``, which resolves the host itself. This client overrides the two
    methods that dial (``bootstrap`` and ``_get_conn``, otherwise as in aiokafka 0.14) so that each
    dial resolves the host once through the policy and connects to a checked IP address, TLS bound
    to the host's name. A refused broker is not dialled at all: ``_get_conn`` answers None, as
    aiokafka's does for a broker it cannot reach, and :attr:`refusal` keeps why.

    ``AIOKafkaProducer`` builds its client itself, with no hook to choose the class, so
    :meth:`adopt` turns that client into this class right after the producer is made, before it
    has connected anywhere.
    """

    policy: AddressPolicy
    refusal: AddressNotAllowed | None
    """The last broker address the policy refused, for error messages."""
    _tls_contexts: dict[str, NameBoundSSLContext]
    _refused: set[tuple[str, int]]

    @classmethod
    def adopt(cls, client: AIOKafkaClient, policy: AddressPolicy) -> GuardedKafkaClient:
        client.__class__ = cls
        guarded = cast(GuardedKafkaClient, client)
        guarded.policy = policy
        guarded.refusal = None
        guarded._tls_contexts = {}
        guarded._refused = set()
        return guarded

    async def _dial(self, host: str, port: int, **options: Any) -> AIOKafkaConnection:
        """A connection to the broker ``host:port``, to one of the addresses the policy checked."""
        try:
            endpoints = await self.policy.resolve(host, port)
        except AddressNotAllowed as exc:
            self.refusal = exc
            if (host, port) not in self._refused:
                self._refused.add((host, port))
                log.warning("Kafka broker %s:%s is not dialled: %s", host, port, exc)
            raise
        error: BaseException | None = None
        for endpoint in endpoints:
            try:
                return await create_conn(
                    endpoint.address,
                    endpoint.port,
                    client_id=self._client_id,
                    request_timeout_ms=self._request_timeout_ms,
                    ssl_context=self._tls_context(endpoint),
                    security_protocol=self._security_protocol,
                    max_idle_ms=self._connections_max_idle_ms,
                    sasl_mechanism=self._sasl_mechanism,
                    sasl_plain_username=self._sasl_plain_username,
                    sasl_plain_password=self._sasl_plain_password,
                    sasl_kerberos_service_name=self._sasl_kerberos_service_name,
                    sasl_kerberos_domain_name=self._sasl_kerberos_domain_name,
                    sasl_oauth_token_provider=self._sasl_oauth_token_provider,
                    **options,
                )
            except (OSError, kafka_errors.KafkaError, TimeoutError) as exc:
                error = exc
        assert error is not None  # resolve() answers at least one endpoint
        raise error

    def _tls_context(self, endpoint: Endpoint) -> NameBoundSSLContext | None:
        """One context per broker name (brokers behind one SNI-routing address keep their names)."""
        if self._ssl_context is None:
            return None
        context = self._tls_contexts.get(endpoint.server_name)
        if context is None:
            context = self._tls_contexts[endpoint.server_name] = _tls_context()
        context.bind(endpoint)
        return context

    async def bootstrap(self) -> None:
        """As aiokafka's, each bootstrap server dialled through :meth:`_dial`."""
        for host, port, _ in self.hosts:
            try:
                bootstrap_conn = await self._dial(host, port)
            except AddressNotAllowed:
                continue
            except (OSError, kafka_errors.KafkaError, TimeoutError) as err:
                log.error('Unable connect to "%s:%s": %s', host, port, err)
                continue
            try:
                metadata = await bootstrap_conn.send(MetadataRequest([]))
            except (kafka_errors.KafkaError, TimeoutError) as err:
                log.warning('Unable to request metadata from "%s:%s": %s', host, port, err)
                bootstrap_conn.close()
                continue
            self.cluster.update_metadata(metadata)
            # a cluster with no topics can answer no brokers: keep this connection until it does
            if not len(self.cluster.brokers()):
                self._conns[("bootstrap", ConnectionGroup.DEFAULT)] = bootstrap_conn
            else:
                bootstrap_conn.close()
            break
        else:
            refused = f" ({self.refusal})" if self.refusal is not None else ""
            raise kafka_errors.KafkaConnectionError(f"Unable to bootstrap from {self.hosts}{refused}")
        if self._sync_task is None:  # type: ignore[has-type]
            self._sync_task = create_task(self._md_synchronizer())

    async def _get_conn(
        self, node_id: Any, *, group: Any = ConnectionGroup.DEFAULT, no_hint: bool = False
    ) -> AIOKafkaConnection | None:
        """As aiokafka's, the broker dialled through :meth:`_dial`; None when it cannot be."""
        conn_id = (node_id, group)
        if conn_id in self._conns:
            conn = self._conns[conn_id]
            if conn.connected():
                return cast(AIOKafkaConnection, conn)
            del self._conns[conn_id]
        broker = self.cluster.broker_metadata(node_id)
        if broker is None:
            log.error("Unable connect to node with id %s: not in current metadata", node_id)
            self.force_metadata_update()
            return None
        try:
            async with self._get_conn_lock:
                if conn_id in self._conns:
                    return cast(AIOKafkaConnection, self._conns[conn_id])
                self._conns[conn_id] = await self._dial(broker.host, broker.port, on_close=self._on_connection_closed)
        except AddressNotAllowed:
            return None  # not a stale-metadata symptom: asking the cluster again changes nothing
        except (OSError, TimeoutError, kafka_errors.KafkaError) as err:
            log.error("Unable connect to node with id %s: %s", node_id, err)
            self.force_metadata_update()
            return None
        return cast(AIOKafkaConnection, self._conns[conn_id])


@dataclass(slots=True)
class _Built:
    """The record batches of one ``publish_batch``: which batch holds each message, in order, and
    the producer's future of each batch handed over."""

    owners: list[Any] = field(default_factory=list)
    futures: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    stopped: BaseException | None = None
    """Why building stopped before the message after the last owner (None: it did not)."""

    async def send(self, producer: AIOKafkaProducer, builder: Any, topic: str, partition: int) -> None:
        self.futures[id(builder)] = await producer.send_batch(builder, topic, partition=partition)

    def handed_over(self) -> int:
        """How many messages, from the start, are in batches handed to the producer."""
        for index, builder in enumerate(self.owners):
            if id(builder) not in self.futures:
                return index
        return len(self.owners)


@dataclass(frozen=True, slots=True)
class _TopicPartitions:
    all: list[int]
    """The topic's partitions, sorted, as aiokafka's partitioner takes them."""
    sticky: int
    """Where this batch's keyless messages go (one partition, so they share a record batch; the
    default partitioner picks one at random per message)."""

    @classmethod
    def of(cls, producer: AIOKafkaProducer, topic: str) -> _TopicPartitions:
        metadata = producer.client.cluster
        every = sorted(metadata.partitions_for_topic(topic) or ())
        available = list(metadata.available_partitions_for_topic(topic) or ()) or every
        return cls(all=every, sticky=random.choice(available))


class KeyPartitioner:
    """aiokafka's ``DefaultPartitioner`` (murmur2 of the key, as the Java client) with each key's
    hash remembered: aiokafka's murmur2 is pure Python, and an outbox's keys (aggregate ids) repeat."""

    def __init__(self, size: int = 65_536) -> None:
        self._hashes: dict[bytes, int] = {}
        self._size = size

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int] | None) -> int:
        if key is None:
            return int(random.choice(available or all_partitions))
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._size:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[hashed % len(all_partitions)]


def _tls_context() -> NameBoundSSLContext:
    """What aiokafka's ``create_ssl_context()`` makes (system trust store, host name checked),
    bound to broker names."""
    context = NameBoundSSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_default_certs()
    return context


def _refusal_note(producer: AIOKafkaProducer) -> str:
    """``' (broker address refused: ...)'`` when the producer's client refused one, else ''."""
    refusal = getattr(producer.client, "refusal", None)
    return f" (broker address refused: {refusal})" if refusal is not None else ""


def _headers(message: OutgoingMessage) -> list[tuple[str, bytes]]:
    headers = [(name, value.encode()) for name, value in message.headers.items()]
    if ID_HEADER not in message.headers:
        headers.append((ID_HEADER, message.dedupe_id.encode()))
    event = message.cloudevent
    if event is not None:  # the CloudEvents Kafka binding, binary content mode
        headers += [(CE_PREFIX + name, value.encode()) for name, value in event.attributes()]
        headers.append((CONTENT_TYPE_HEADER, event.datacontenttype.encode()))
    return headers


def _invalid_topic(topic: str) -> str | None:
    """Why Kafka would not accept ``topic`` as a name, or None."""
    if _LEGAL_TOPIC.fullmatch(topic) is None or topic in (".", ".."):
        return f"{topic[:60]!r} is not a legal Kafka topic name ([a-zA-Z0-9._-], 1-249 characters)"
    return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a send's outcome as seen: sends after a failure are not awaited."""
    if not future.cancelled():
        future.exception()


async def _stop(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop a producer without waiting for ever on batches no broker will take."""
    # Fail what is still queued first, so stop()'s flush has nothing to wait for (aiokafka#1101).
    accumulator = getattr(producer, "_message_accumulator", None)
    if accumulator is not None:
        with contextlib.suppress(Exception):
            queued = [batch for batches in accumulator._batches.values() for batch in batches]
            accumulator.fail_all(kafka_errors.KafkaTimeoutError("producer discarded"))
            for batch in queued:  # with the batch API aiokafka leaves these for the caller to consume
                for future in (batch.future, batch._drain_waiter):
                    if future.done():
                        _retrieve(future)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout_s):
            await producer.stop()
