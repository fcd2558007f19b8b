"""One harness per adapter: how to build its target, make destinations, read back what was published,
provoke a refusal and take the broker away. The contract tests only talk to :class:`Harness`.

Each reader decodes the broker's encoding exactly as the adapter's module docstring documents it
(and fails on anything else), so the tests compare :class:`Received` values across adapters.

What an adapter does not promise is not tested: ``refusals`` and ``outages`` list what applies, and
``ordered_destination`` says whether a whole destination (queue, stream) keeps batch order, which
Kafka promises per key (partition) only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import unquote

import aio_pika
import msgspec
import nats
import nats.aio.client
import nats.js
import nats.js.api
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis
from yarl import URL

from outbox_relay.brokers.base import OutgoingMessage
from outbox_relay.domain import KafkaTarget, NatsTarget, RabbitMQTarget, RedisStreamsTarget, Target, WebhookTarget
from tests.contract.proxy import TcpProxy
from tests.harness.brokers import (
    NATS_ADDRESS,
    NatsServer,
    RabbitMQAccount,
    RedisAccount,
    TansuBroker,
    free_port,
    listening,
    rabbitmqctl,
    tansu_command,
)
from tests.harness.webhooks import Answer, WebhookReceiver, new_secret

# Short enough to keep the outage tests quick, long enough for a loaded CI machine.
TIMEOUT_MS = 2000
OUTAGE_TIMEOUT_MS = 600
READ_DEADLINE_S = 15.0


@dataclass(frozen=True)
class Received:
    """One message as a consumer sees it, decoded per the adapter's documented encoding."""

    id: int
    """The id the broker carried, as a number (the cases publish decimal ids); -1 for a UUID."""
    key: str | None
    headers: dict[str, str]
    payload: bytes
    message_id: str = field(default="", compare=False)
    """The id exactly as the broker carried it (AMQP message_id, stream field or Kafka header ``outbox-id``)."""


def received(raw_id: str, *, key: str | None, headers: dict[str, str], payload: bytes) -> Received:
    return Received(
        id=int(raw_id) if raw_id.isdecimal() else -1, key=key, headers=headers, payload=payload, message_id=raw_id
    )


@dataclass(frozen=True)
class Refusal:
    """How to make the broker refuse a message for good."""

    bad: Callable[[OutgoingMessage], OutgoingMessage]
    """Turns a good message into one the broker refuses."""
    target: dict[str, Any] = field(default_factory=dict)
    """Target overrides; a refusal of the whole target (``whole_target``) refuses every message."""
    whole_target: bool = False


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


class Harness:
    name: ClassVar[str]
    refusals: ClassVar[tuple[str, ...]]
    outages: ClassVar[tuple[str, ...]] = ("down", "stall", "dropped")
    ordered_destination: ClassVar[bool] = True
    parallel_keys: ClassVar[bool] = False
    """Different keys are delivered in parallel: a destination's arrival order holds per key only."""
    password: str | None = None

    proxied_modes: ClassVar[tuple[str, ...]] = ()
    """Outage modes the publisher must see through :meth:`proxy` (``target(via_proxy=True)``)."""

    async def proxy(self) -> TcpProxy:
        raise NotImplementedError

    def target(self, *, timeout_ms: int = TIMEOUT_MS, via_proxy: bool = False, **overrides: Any) -> Target:
        raise NotImplementedError

    def closed_port_target(self, *, timeout_ms: int) -> Target:
        raise NotImplementedError

    async def destination(self, label: str) -> str:
        """A new, empty destination that accepts messages."""
        raise NotImplementedError

    async def read(self, destination: str) -> list[Received]:
        """Everything in ``destination``, in the broker's order (Kafka: partition by partition)."""
        raise NotImplementedError

    def expected_headers(self, message: OutgoingMessage) -> dict[str, str]:
        return dict(message.headers)

    async def refusal(self, kind: str) -> Refusal:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def outage(self, mode: str) -> AsyncIterator[None]:
        """The broker is away inside the block (``dropped``: it closed our connections and is back)."""
        raise NotImplementedError
        yield

    async def aclose(self) -> None:
        pass


class _ProxiedHarness(Harness):
    """Takes the broker away from the publisher with a :class:`TcpProxy` (``down``, ``stall``, and
    ``dropped`` unless :meth:`drop_connections` asks the broker itself to close them)."""

    upstream: tuple[str, int]
    proxied_modes: ClassVar[tuple[str, ...]] = ("down", "stall", "dropped")

    def __init__(self) -> None:
        self._proxy: TcpProxy | None = None

    async def proxy(self) -> TcpProxy:
        if self._proxy is None:
            self._proxy = TcpProxy(self.upstream)
            await self._proxy.up()
        return self._proxy

    async def drop_connections(self) -> None:
        await (await self.proxy()).drop()

    @contextlib.asynccontextmanager
    async def outage(self, mode: str) -> AsyncIterator[None]:
        if mode == "dropped":
            await self.drop_connections()
            yield
            return
        proxy = await self.proxy()
        if mode == "down":
            await proxy.down()
        elif mode == "stall":
            proxy.stall()
        else:
            raise ValueError(mode)
        try:
            yield
        finally:
            await proxy.up()

    async def aclose(self) -> None:
        if self._proxy is not None:
            await self._proxy.close()


# --- RabbitMQ ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RabbitMQEnv:
    """The session's RabbitMQ set-up: a topic exchange on which the test user may only publish
    routing keys starting with ``q.`` (topic permissions), so a publish can be refused by a channel
    close for one routing key."""

    account: RabbitMQAccount
    topic_exchange: str


class RabbitMQHarness(_ProxiedHarness):
    """Default exchange: destination = queue name. ``amqp`` headers carry the message's headers plus
    ``outbox-key``; ``message_id`` is the outbox id; delivery mode 2."""

    name = "rabbitmq"
    refusals: ClassVar[tuple[str, ...]] = (
        "unroutable",
        "nacked",
        "header_too_large",
        "header_name_too_long",
        "routing_key_too_long",
        "missing_exchange",
    )
    exchange = ""
    proxied_modes: ClassVar[tuple[str, ...]] = ("down", "stall")  # dropped: rabbitmqctl close_all_connections

    def __init__(self, env: RabbitMQEnv) -> None:
        super().__init__()
        self.env = env
        self.password = env.account.password
        url = URL(env.account.url)
        assert url.host is not None and url.port is not None
        self.upstream = (url.host, url.port)

    def target(self, *, timeout_ms: int = TIMEOUT_MS, via_proxy: bool = False, **overrides: Any) -> Target:
        url = URL(self.env.account.url)
        if via_proxy:
            assert self._proxy is not None, "call proxy() first"
            url = url.with_port(self._proxy.port)
        options: dict[str, Any] = {"url": str(url), "exchange": self.exchange, "timeout_ms": timeout_ms}
        options.update(overrides)
        return RabbitMQTarget(**options)

    def closed_port_target(self, *, timeout_ms: int) -> Target:
        return self.target(url=str(URL(self.env.account.url).with_port(free_port())), timeout_ms=timeout_ms)

    @contextlib.asynccontextmanager
    async def _admin(self) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
        connection = await aio_pika.connect(self.env.account.admin_url, timeout=5)
        try:
            yield await connection.channel()
        finally:
            await connection.close()

    def _routing_key(self, label: str) -> str:
        return f"q.{unique(label)}"

    async def _declare(self, routing_key: str, arguments: dict[str, Any] | None = None) -> None:
        async with self._admin() as channel:
            queue = await channel.declare_queue(routing_key, arguments=arguments)
            if self.exchange:
                await queue.bind(self.exchange, routing_key)

    async def destination(self, label: str) -> str:
        routing_key = self._routing_key(label)
        await self._declare(routing_key)
        return routing_key

    async def read(self, destination: str) -> list[Received]:
        out: list[Received] = []
        async with self._admin() as channel:
            queue = await channel.declare_queue(destination, passive=True)
            while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
                assert message.routing_key == destination
                assert message.exchange == self.exchange
                assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                assert message.message_id is not None
                headers: dict[str, str] = {}
                for name, value in (message.headers or {}).items():
                    assert isinstance(value, str | bytes), (name, value)
                    headers[name] = value.decode() if isinstance(value, bytes) else value
                key = headers.pop("outbox-key", None)
                out.append(received(message.message_id, key=key, headers=headers, payload=message.body))
        return out

    async def refusal(self, kind: str) -> Refusal:
        if kind == "unroutable":  # mandatory publish, no queue bound for the routing key
            routing_key = self._routing_key("unbound")
            return Refusal(lambda m: msgspec.structs.replace(m, destination=routing_key))
        if kind == "nacked":  # the queue is full and rejects publishes: basic.nack
            routing_key = self._routing_key("full")
            await self._declare(routing_key, {"x-max-length": 0, "x-overflow": "reject-publish"})
            return Refusal(lambda m: msgspec.structs.replace(m, destination=routing_key))
        if kind == "header_too_large":  # the content header frame would exceed frame_max
            return Refusal(lambda m: msgspec.structs.replace(m, headers={**m.headers, "big": "v" * 200_000}))
        if kind == "header_name_too_long":  # AMQP field names are at most 128 bytes
            return Refusal(lambda m: msgspec.structs.replace(m, headers={**m.headers, "h" * 129: "v"}))
        if kind == "routing_key_too_long":  # at most 255 bytes; 'é' is two
            return Refusal(lambda m: msgspec.structs.replace(m, destination="q." + "é" * 127))
        if kind == "missing_exchange":
            return Refusal(lambda m: m, target={"exchange": unique("missing")}, whole_target=True)
        if kind == "forbidden_routing_key":  # topic permissions: the broker closes the channel (403)
            return Refusal(lambda m: msgspec.structs.replace(m, destination=f"x.{unique('forbidden')}"))
        raise ValueError(kind)

    async def drop_connections(self) -> None:
        await asyncio.to_thread(self.env.account.close_connections)


class RabbitMQTopicHarness(RabbitMQHarness):
    """A named topic exchange with topic permissions: also refusals that close the channel."""

    name = "rabbitmq-topic"
    refusals = ("unroutable", "forbidden_routing_key")
    outages = ("dropped",)

    def __init__(self, env: RabbitMQEnv) -> None:
        super().__init__(env)
        self.exchange = env.topic_exchange


async def rabbitmq_env(account: RabbitMQAccount, run_id: str) -> RabbitMQEnv:
    exchange = f"contract-{run_id}"
    connection = await aio_pika.connect(account.admin_url, timeout=5)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC)
    finally:
        await connection.close()
    await asyncio.to_thread(
        rabbitmqctl, "set_topic_permissions", "-p", account.vhost, account.user, exchange, r"^q\.", ".*"
    )
    return RabbitMQEnv(account=account, topic_exchange=exchange)


# --- Redis Streams -----------------------------------------------------------------------------------


class RedisStreamsHarness(_ProxiedHarness):
    """Stream entries: ``payload``, ``outbox-id``, ``key`` (absent without one), ``h:<name>``."""

    name = "redis_streams"
    refusals = ("wrongtype", "noperm")
    proxied_modes = ("down", "stall")  # dropped: CLIENT KILL USER

    def __init__(self, account: RedisAccount) -> None:
        super().__init__()
        self.account = account
        self.password = account.password
        url = URL(account.url)
        assert url.host is not None and url.port is not None
        self.upstream = (url.host, url.port)
        self._admin = Redis.from_url(account.admin_url)

    def target(self, *, timeout_ms: int = TIMEOUT_MS, via_proxy: bool = False, **overrides: Any) -> Target:
        url = URL(self.account.url)
        if via_proxy:
            assert self._proxy is not None, "call proxy() first"
            url = url.with_port(self._proxy.port)
        options: dict[str, Any] = {"url": str(url), "timeout_ms": timeout_ms}
        options.update(overrides)
        return RedisStreamsTarget(**options)

    def closed_port_target(self, *, timeout_ms: int) -> Target:
        return self.target(url=str(URL(self.account.url).with_port(free_port())), timeout_ms=timeout_ms)

    async def destination(self, label: str) -> str:
        return f"{self.account.prefix}{unique(label)}"

    async def read(self, destination: str) -> list[Received]:
        out: list[Received] = []
        for _, fields in await self._admin.xrange(destination):
            fields = dict(fields)
            payload = fields.pop(b"payload")
            outbox_id = fields.pop(b"outbox-id").decode()
            key = fields.pop(b"key", None)
            headers: dict[str, str] = {}
            for name, value in fields.items():
                assert name.startswith(b"h:"), f"unexpected stream field {name!r}"
                headers[name[2:].decode()] = value.decode()
            out.append(received(outbox_id, key=None if key is None else key.decode(), headers=headers, payload=payload))
        return out

    async def refusal(self, kind: str) -> Refusal:
        if kind == "wrongtype":  # the key holds a string: XADD answers WRONGTYPE
            key = await self.destination("string")
            await self._admin.set(key, b"not a stream")
            return Refusal(lambda m: msgspec.structs.replace(m, destination=key))
        if kind == "noperm":  # outside the ACL user's key prefix: NOPERM
            key = f"outside-{self.account.prefix}{unique('noperm')}"
            return Refusal(lambda m: msgspec.structs.replace(m, destination=key))
        raise ValueError(kind)

    async def drop_connections(self) -> None:
        await self._admin.execute_command("CLIENT", "KILL", "USER", self.account.user)

    async def aclose(self) -> None:
        await super().aclose()
        await self._admin.aclose()


# --- Kafka (Tansu) -----------------------------------------------------------------------------------


class KafkaHarness(_ProxiedHarness):
    """Message key = outbox key (UTF-8), headers = message headers (+ ``outbox-id``), value = payload.

    Tansu refuses InitProducerId, so the targets turn idempotence off (the default stays on).

    Outages use a private Tansu behind the proxy, advertising the proxy's address (a Kafka client
    connects to what the metadata advertises, so a proxy in front of the session's broker would be
    bypassed after bootstrap); restarting a Tansu instead loses its in-memory topics, and its first
    produce to a topic recreated that way fails with UNKNOWN_SERVER_ERROR. Once :meth:`proxy` was
    called the harness's destinations and reads are on the private broker."""

    name = "kafka"
    refusals = ("too_large", "invalid_topic")
    ordered_destination = False  # keyless messages spread over partitions

    def __init__(self, broker: TansuBroker) -> None:
        super().__init__()
        self.broker = broker
        self._private: asyncio.subprocess.Process | None = None

    async def proxy(self) -> TcpProxy:
        if self._proxy is None:
            self.upstream = ("127.0.0.1", free_port())
            proxy = TcpProxy(self.upstream)
            await proxy.up()
            self._proxy = proxy
            self._private = await asyncio.create_subprocess_exec(
                *tansu_command(self.upstream[1], advertised_port=proxy.port),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while not listening(self.upstream):
                assert self._private.returncode is None, f"tansu exited with {self._private.returncode}"
                assert time.monotonic() < deadline, "tansu did not listen"
                await asyncio.sleep(0.01)
        return self._proxy

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap if self._proxy is None else f"127.0.0.1:{self._proxy.port}"

    def target(self, *, timeout_ms: int = TIMEOUT_MS, via_proxy: bool = False, **overrides: Any) -> Target:
        assert via_proxy == (self._proxy is not None), "the private broker is for outage tests only"
        options: dict[str, Any] = {
            "bootstrap_servers": [self.bootstrap],
            "enable_idempotence": False,
            "timeout_ms": timeout_ms,
        }
        options.update(overrides)
        return KafkaTarget(**options)

    def closed_port_target(self, *, timeout_ms: int) -> Target:
        return self.target(bootstrap_servers=[f"127.0.0.1:{free_port()}"], timeout_ms=timeout_ms)

    async def destination(self, label: str) -> str:
        return unique(label)

    def expected_headers(self, message: OutgoingMessage) -> dict[str, str]:
        return {"outbox-id": message.dedupe_id, **message.headers}

    async def read(self, destination: str) -> list[Received]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + READ_DEADLINE_S
            while not (partitions := consumer.partitions_for_topic(destination)):
                assert time.monotonic() < deadline, f"no metadata for topic {destination}"
                await consumer.topics()  # refreshes the metadata
                await asyncio.sleep(0.05)
            tps = [TopicPartition(destination, p) for p in sorted(partitions)]
            consumer.assign(tps)  # no group: joins are slow on Tansu
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            records: dict[TopicPartition, list[Received]] = {tp: [] for tp in tps}
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                assert time.monotonic() < deadline, f"could not read {destination} up to {ends}"
                for tp, batch in (await consumer.getmany(*tps, timeout_ms=200)).items():
                    for record in batch:
                        names = [name for name, _ in record.headers]
                        assert len(names) == len(set(names)), f"duplicate headers {names}"
                        headers = {name: value.decode() for name, value in record.headers}
                        assert record.value is not None
                        records[tp].append(
                            received(
                                headers["outbox-id"],
                                key=None if record.key is None else record.key.decode(),
                                headers=headers,
                                payload=record.value,
                            )
                        )
        finally:
            await consumer.stop()
        return [r for tp in tps for r in records[tp]]

    async def refusal(self, kind: str) -> Refusal:
        if kind == "too_large":  # over max_request_size (1 MiB by default)
            return Refusal(lambda m: msgspec.structs.replace(m, payload=b"x" * (1024 * 1024 + 1)))
        if kind == "invalid_topic":
            return Refusal(lambda m: msgspec.structs.replace(m, destination="not a topic!"))
        raise ValueError(kind)

    async def aclose(self) -> None:
        await super().aclose()
        process, self._private = self._private, None
        if process is not None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()


# --- NATS JetStream ----------------------------------------------------------------------------------


class NatsHarness(_ProxiedHarness):
    """Subject = destination, one stream per destination. NATS headers: the message's headers (names
    percent-decoded) + ``outbox-id`` when missing, ``outbox-key`` for the key, ``Nats-Msg-Id`` = the
    message id when it is a UUID. Outages through the proxy in front of the shared server."""

    name = "nats"
    refusals = ("no_stream", "stream_max_msg_size", "stream_full", "invalid_subject", "too_large", "header_value")

    def __init__(self, server: NatsServer) -> None:
        super().__init__()
        self.server = server
        self.upstream = NATS_ADDRESS
        self._admin: nats.aio.client.Client | None = None
        self._streams: list[str] = []

    async def _js(self) -> nats.js.JetStreamContext:
        if self._admin is None:
            self._admin = await nats.connect(self.server.url, connect_timeout=5, allow_reconnect=False)
        return self._admin.jetstream(timeout=10)

    def target(self, *, timeout_ms: int = TIMEOUT_MS, via_proxy: bool = False, **overrides: Any) -> Target:
        url = self.server.url
        if via_proxy:
            assert self._proxy is not None, "call proxy() first"
            url = f"nats://127.0.0.1:{self._proxy.port}"
        options: dict[str, Any] = {"servers": [url], "timeout_ms": timeout_ms}
        options.update(overrides)
        return NatsTarget(**options)

    def closed_port_target(self, *, timeout_ms: int) -> Target:
        return self.target(servers=[f"nats://127.0.0.1:{free_port()}"], timeout_ms=timeout_ms)

    async def _stream(self, label: str, **config: Any) -> str:
        """A new stream capturing one new subject; returns the subject."""
        name = unique(f"{self.server.prefix}-{label}")
        subject = name.replace("-", ".")
        js = await self._js()
        await js.add_stream(nats.js.api.StreamConfig(name=name, subjects=[subject], **config))
        self._streams.append(name)
        return subject

    async def destination(self, label: str) -> str:
        return await self._stream(label)

    def expected_headers(self, message: OutgoingMessage) -> dict[str, str]:
        return {"outbox-id": message.dedupe_id, **message.headers}

    async def read(self, destination: str) -> list[Received]:
        js = await self._js()
        name = await js.find_stream_name_by_subject(destination)
        info = await js.stream_info(name)
        out: list[Received] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
            raw = await js.get_msg(name, seq)
            assert raw.subject == destination
            headers = _nats_header_block(raw.hdrs)
            key = headers.pop("outbox-key", None)
            msg_id = headers.pop("Nats-Msg-Id", None)
            outbox_id = headers["outbox-id"]
            assert msg_id is None or msg_id == outbox_id, (msg_id, outbox_id)
            out.append(received(outbox_id, key=key, headers=headers, payload=raw.data or b""))
        return out

    async def refusal(self, kind: str) -> Refusal:
        if kind == "no_stream":  # no stream captures the subject: no responders
            subject = f"{self.server.prefix.replace('-', '.')}.nostream.{uuid.uuid4().hex[:10]}"
            return Refusal(lambda m: msgspec.structs.replace(m, destination=subject))
        if kind == "stream_max_msg_size":  # the stream's own limit: a PubAck error
            subject = await self._stream("small", max_msg_size=64)
            return Refusal(lambda m: msgspec.structs.replace(m, destination=subject, payload=b"x" * 100))
        if kind == "stream_full":  # discard new: "maximum messages exceeded"
            subject = await self._stream("full", max_msgs=1, discard=nats.js.api.DiscardPolicy.NEW)
            await (await self._js()).publish(subject, b"filler")
            return Refusal(lambda m: msgspec.structs.replace(m, destination=subject))
        if kind == "invalid_subject":  # a wildcard token: refused before it is sent
            return Refusal(lambda m: msgspec.structs.replace(m, destination=m.destination + ".*"))
        if kind == "too_large":  # over the server's max_payload (1 MiB): refused before it is sent
            return Refusal(lambda m: msgspec.structs.replace(m, payload=b"x" * (1024 * 1024)))
        if kind == "header_value":  # NATS headers cannot carry a line break
            return Refusal(lambda m: msgspec.structs.replace(m, headers={**m.headers, "x": "two\r\nlines"}))
        raise ValueError(kind)

    async def aclose(self) -> None:
        await super().aclose()
        if self._admin is not None:
            js = await self._js()
            for name in self._streams:
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
            await self._admin.close()


def _nats_header_block(encoded: bytes | None) -> dict[str, str]:
    """The headers of a stored message (base64 of ``NATS/1.0`` and ``Name: value`` lines), names
    percent-decoded; strict, where nats-py's own ``get_msg`` reads non-ASCII values as email headers."""
    if not encoded:
        return {}
    first, *lines = base64.b64decode(encoded).split(b"\r\n")
    assert first == b"NATS/1.0", first
    assert lines[-2:] == [b"", b""], lines
    headers: dict[str, str] = {}
    for line in lines[:-2]:
        name, sep, value = line.partition(b": ")
        assert sep and name.isascii(), line
        assert unquote(name.decode()) not in headers, f"duplicate header {name!r}"
        headers[unquote(name.decode())] = value.decode()
    return headers


# --- webhooks ----------------------------------------------------------------------------------------


class WebhookHarness(_ProxiedHarness):
    """One signed POST per message to a local receiver (:class:`tests.harness.webhooks.WebhookReceiver`), which
    verifies every signature with the ``standardwebhooks`` package; the target holds two secrets (a
    rotation under way), so every request carries, and must verify under, both. Destination, key and
    headers travel percent-encoded in HTTP headers; different keys are delivered in parallel.

    Refusals: statuses the receiver answers for a destination (400, 422, a redirect) and a message
    header the adapter may not send. Outages: the proxy's, and the receiver answering 503 or 429."""

    name = "webhook"
    refusals = ("bad_request", "unprocessable", "redirect", "reserved_header")
    outages = ("down", "stall", "dropped", "http_503", "http_429")
    ordered_destination = False
    parallel_keys = True

    def __init__(self, receiver: WebhookReceiver) -> None:
        super().__init__()
        self.receiver = receiver
        self.password = " ".join(receiver.secrets)
        self.upstream = ("127.0.0.1", receiver.port)

    def target(self, *, timeout_ms: int = TIMEOUT_MS, via_proxy: bool = False, **overrides: Any) -> Target:
        url = URL(self.receiver.url)
        if via_proxy:
            assert self._proxy is not None, "call proxy() first"
            url = url.with_port(self._proxy.port)
        options: dict[str, Any] = {"url": str(url), "timeout_ms": timeout_ms}
        options.update(overrides)
        return WebhookTarget(**options)

    def closed_port_target(self, *, timeout_ms: int) -> Target:
        return self.target(url=str(URL(self.receiver.url).with_port(free_port())), timeout_ms=timeout_ms)

    async def destination(self, label: str) -> str:
        return unique(label)

    async def read(self, destination: str) -> list[Received]:
        assert self.receiver.bad_signatures == 0, "a request did not verify"
        out: list[Received] = []
        for delivery in self.receiver.deliveries[destination]:
            assert delivery.signatures == len(self.receiver.secrets), delivery
            assert delivery.content_type == "application/json"
            headers, payload = delivery.headers, delivery.payload
            out.append(received(delivery.webhook_id, key=delivery.key, headers=headers, payload=payload))
        return out

    async def refusal(self, kind: str) -> Refusal:
        statuses = {"bad_request": Answer(400, body=b"no such order"), "unprocessable": Answer(422)}
        if kind in statuses:
            destination = unique(kind)
            self.receiver.answers[destination] = statuses[kind]
            return Refusal(lambda m: msgspec.structs.replace(m, destination=destination))
        if kind == "redirect":  # never followed, whatever the target of the redirect
            destination = unique(kind)
            self.receiver.answers[destination] = Answer(307, [("location", self.receiver.url)])
            return Refusal(lambda m: msgspec.structs.replace(m, destination=destination))
        if kind == "reserved_header":  # a header HTTP itself sets: refused before anything is sent
            return Refusal(lambda m: msgspec.structs.replace(m, headers={**m.headers, "Content-Length": "0"}))
        raise ValueError(kind)

    @contextlib.asynccontextmanager
    async def outage(self, mode: str) -> AsyncIterator[None]:
        statuses = {"http_503": 503, "http_429": 429}
        if mode not in statuses:
            async with super().outage(mode):
                yield
            return
        self.receiver.outage = Answer(statuses[mode], [("retry-after", "1")])
        try:
            yield
        finally:
            self.receiver.outage = None

    async def aclose(self) -> None:
        await super().aclose()
        await self.receiver.close()


async def webhook_harness() -> WebhookHarness:
    receiver = WebhookReceiver([new_secret(1), new_secret(2)])
    await receiver.start()
    return WebhookHarness(receiver)


HARNESSES: dict[str, type[Harness]] = {
    cls.name: cls
    for cls in (
        RabbitMQHarness,
        RabbitMQTopicHarness,
        RedisStreamsHarness,
        KafkaHarness,
        NatsHarness,
        WebhookHarness,
    )
}
