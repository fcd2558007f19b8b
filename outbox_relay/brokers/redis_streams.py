"""Redis Streams adapter: one pipelined write of ``XADD`` per batch (packed by hiredis, written on a
pooled redis-py asyncio connection, the replies read in order).

Stream key = ``message.destination``. Each entry's fields, all values bytes on the wire:

======================  ==========================================================================
``payload``             the message body, verbatim
``outbox-id``           the message id (``OutgoingMessage.dedupe_id``, a UUID)
``key``                 the outbox key; absent when the message has none
``h:<name>``            one field per header, e.g. ``h:traceparent``, ``h:outbox-relay``
``h:ce-<attribute>``    a CloudEvent's attributes (``h:ce-id``, ``h:ce-type`` ...) and
                        ``h:content-type``, when the relay publishes CloudEvents (Redis has no
                        CloudEvents binding: these are the HTTP binding's names, as header fields)
======================  ==========================================================================

With ``maxlen`` every ``XADD`` carries ``MAXLEN ~ maxlen`` (approximate trimming, cheap for Redis).

Redis runs a pipeline's commands in order on one connection, so entries land in batch order. A
command-level error answers only its own command: ``WRONGTYPE`` (the key holds something that is
not a stream), ``NOPERM`` and other refusals → :class:`MessageRejected` at that index, while errors
that describe the server rather than the message (``OOM``, ``READONLY`` replica, ``BUSY``,
``LOADING``, ``MASTERDOWN``, ``CLUSTERDOWN``, ``TRYAGAIN``) and connection errors or timeouts
(``timeout_ms`` for the whole batch), or anything else that fails the whole pipeline (e.g. the
connection's ``AUTH``) → :class:`TargetUnavailable`. The connection pool reconnects by itself on a
later batch.

Concurrent batches (the worker shares one publisher between partitions) each run their pipeline on
a connection of their own from the pool, so they neither interleave nor see each other's errors.

Every connection the pool opens resolves the URL's host once through the
:class:`~outbox_relay.netguard.AddressPolicy`, checks every address and dials a checked IP address
(redis-py would resolve the name again itself); a refused address → :class:`TargetUnavailable`.
For ``rediss://`` the certificate is verified for the host *name*, and unlike redis-py's default the
name is checked too (``ssl_check_hostname`` on unless the URL says otherwise or turns verification off
with ``ssl_cert_reqs=none``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Self

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection, SSLConnection, parse_url

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import RedisStreamsTarget
from outbox_relay.errors import MessageRejected, TargetUnavailable
from outbox_relay.netguard import AddressPolicy, Endpoint

PAYLOAD_FIELD = "payload"
ID_FIELD = "outbox-id"
KEY_FIELD = "key"
HEADER_PREFIX = "h:"
CE_FIELD_PREFIX = HEADER_PREFIX + "ce-"
CONTENT_TYPE_FIELD = HEADER_PREFIX + "content-type"

_SERVER_STATE_ERRORS = (redis_errors.OutOfMemoryError, redis_errors.ReadOnlyError)
_SERVER_STATE_PREFIXES = ("BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN")


def entry_fields(message: OutgoingMessage) -> list[str | bytes]:
    """The field/value pairs of the stream entry written for ``message`` (the layout in the module
    docstring), flat as XADD takes them."""
    fields: list[str | bytes] = [PAYLOAD_FIELD, message.payload, ID_FIELD, message.dedupe_id]
    if message.key is not None:
        fields += (KEY_FIELD, message.key)
    for name, value in message.headers.items():
        fields += (HEADER_PREFIX + name, value)
    event = message.cloudevent
    if event is not None:  # Redis has no CloudEvents binding: the HTTP one's names, as header fields
        for name, value in event.attributes():
            fields += (CE_FIELD_PREFIX + name, value)
        fields += (CONTENT_TYPE_FIELD, event.datacontenttype)
    return fields


class GuardedConnection(Connection):
    """redis-py's TCP connection, dialling only addresses the address policy checked just now."""

    def __init__(self, *, policy: AddressPolicy, **kwargs: Any) -> None:
        self.policy = policy
        self._dialling: Endpoint | None = None
        super().__init__(**kwargs)

    async def _connect(self) -> None:
        # redis-py turns what this raises into ConnectionError (AddressNotAllowed as its cause) and
        # does not retry it. The socket connect timeout bounds the look-up and every address together,
        # as it bounded asyncio's own connect to each address of the name.
        async with asyncio.timeout(self.socket_connect_timeout):
            endpoints = await self.policy.resolve(self.host, self.port)
            error: OSError | None = None
            for endpoint in endpoints:
                self._dialling = endpoint
                try:
                    await super()._connect()  # type: ignore[no-untyped-call]
                    return
                except OSError as exc:
                    error = exc
                finally:
                    self._dialling = None
            assert error is not None  # resolve() answers at least one endpoint
            raise error

    def pack_command(self, *args: Any) -> list[bytes]:
        """hiredis's C packer (redis-py's asyncio connection packs in Python: ~15 field encodes and
        joins per XADD, the largest single cost of a relayed message); redis-py's for what hiredis
        does not take (a command name with a space, a type it does not encode)."""
        if not (isinstance(args[0], str) and " " in args[0]):
            with contextlib.suppress(TypeError):
                return [hiredis.pack_command(args)]
        return super().pack_command(*args)

    def _connection_arguments(self) -> Mapping[str, Any]:
        arguments = dict(super()._connection_arguments())
        if self._dialling is not None:
            arguments["host"] = self._dialling.address
            if arguments.get("ssl") is not None:
                arguments["server_hostname"] = self._dialling.server_name
        return arguments


class GuardedSSLConnection(GuardedConnection, SSLConnection):
    """:class:`GuardedConnection` over TLS: verifies the certificate for the host name."""


class RedisStreamsPublisher:
    """Appends batches to Redis streams; see the module docstring for the entry layout."""

    def __init__(
        self,
        *,
        url: str,
        policy: AddressPolicy,
        password: str | None = None,
        maxlen: int | None = None,
        timeout_ms: int = 10_000,
    ) -> None:
        """``url`` is ``redis[s]://[user@]host:port/db`` without the password; ``password`` is
        passed to the connection as is (it wins over one in the URL); ``policy`` checks every address
        the host has, at each connect. Nothing connects before :meth:`connect` or the first batch."""
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, got {maxlen}")
        options: dict[str, Any] = dict(parse_url(url))
        plain = options.get("connection_class", Connection)
        if plain is SSLConnection:
            options["connection_class"] = GuardedSSLConnection
            if options.get("ssl_cert_reqs") not in ("none", ssl.CERT_NONE):
                options.setdefault("ssl_check_hostname", True)
        elif plain is Connection:
            options["connection_class"] = GuardedConnection
        else:
            raise ValueError("url must be redis:// or rediss:// (a unix socket is not a target)")
        options["policy"] = policy
        if password is not None:
            options["password"] = password
        # one deadline per call (a pipeline of any length), not redis-py's per reply: with a socket
        # timeout it arms a timer for every reply it reads and runs every send in a task of its own
        # (asyncio.wait_for), a fifth of a trickle's cost per message. A cancelled read disconnects
        # (redis-py closes the connection on any BaseException mid-reply), so nothing stale is read.
        self._timeout_s = timeout_ms / 1000
        options.update(socket_timeout=None, socket_connect_timeout=self._timeout_s)
        self._pool = ConnectionPool(**options)
        self._redis = Redis.from_pool(self._pool)
        self._maxlen = maxlen
        self._where = f"{options.get('host', options.get('path', '?'))}:{options.get('port', '')}"
        self._closed = False

    @classmethod
    def from_target(cls, target: RedisStreamsTarget, *, password: str | None, policy: AddressPolicy) -> Self:
        return cls(url=target.url, policy=policy, password=password, maxlen=target.maxlen, timeout_ms=target.timeout_ms)

    async def connect(self) -> None:
        """Check now that the server answers; raise :class:`TargetUnavailable` when it does not."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.ping()
        except (redis_errors.RedisError, OSError) as exc:  # TimeoutError is an OSError
            raise TargetUnavailable(f"cannot reach Redis at {self._where}: {exc!r}") from exc

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        if self._closed:
            raise RuntimeError("publisher is closed")
        if not messages:
            return PublishResult(acked=0)
        # XADDs packed by hiredis and written at once, their replies read in order: what redis-py's
        # pipeline does, without its per-command stack, argument checks, option dicts and response
        # callbacks (a sixth of a relayed message's CPU in a drain's profile)
        trim: tuple[str, ...] = ("MAXLEN", "~", str(self._maxlen)) if self._maxlen is not None else ()
        pack = hiredis.pack_command
        packed = [pack(("XADD", m.destination, *trim, "*", *entry_fields(m))) for m in messages]  # type: ignore[arg-type]  # the stub types a 1-tuple
        try:
            async with asyncio.timeout(self._timeout_s):
                replies = await self._send(packed)
        except (redis_errors.RedisError, OSError) as exc:  # TimeoutError is an OSError
            # per-command refusals come back as replies; what is raised failed the whole batch
            # (connection, timeout, or the connection's own set-up such as AUTH or SELECT)
            raise TargetUnavailable(f"Redis at {self._where}: {exc!r}") from exc
        for index, reply in enumerate(replies):
            if isinstance(reply, redis_errors.ResponseError):
                if isinstance(reply, _SERVER_STATE_ERRORS) or str(reply).startswith(_SERVER_STATE_PREFIXES):
                    raise TargetUnavailable(f"Redis at {self._where}: {reply}") from reply
                return PublishResult(acked=index, rejected=MessageRejected(f"XADD refused: {reply}", index=index))
            if isinstance(reply, Exception):  # not an answer to this command: nothing is known
                raise TargetUnavailable(f"Redis at {self._where}: {reply!r}") from reply
        return PublishResult(acked=len(messages))

    async def _send(self, packed: list[bytes]) -> list[Any]:
        """Write the packed commands on one pooled connection and read one reply each (a refusal
        as its ResponseError). Anything else raised leaves the connection closed: no reply of this
        batch is read by the next."""
        pool = self._pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            for _ in packed:
                try:
                    replies.append(await conn.read_response())
                except redis_errors.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        """Close the connections; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
