"""NATS JetStream adapter: nats-py's client; each message a core-NATS publish with a reply inbox of
the adapter's, the stream's ack (a JetStream ``PubAck``) paired with its publish by the inbox token.

Subject = ``message.destination`` (a stream must capture it). Each message's NATS headers:

======================  ==========================================================================
``Nats-Msg-Id``         the message id (``OutgoingMessage.message_id``, a UUID): JetStream drops a
                        re-send within the stream's duplicate window (2 minutes by default), so an
                        at-least-once re-send after an outage is stored once. Not set for an outbox
                        of schema version 1, whose ids are row ids: two databases, or one restored,
                        can hand out the same one, and JetStream would drop a *different* message
                        as its duplicate.
``outbox-id``           the message id (``dedupe_id``), when the relay's headers lack it
``outbox-key``          the outbox key; absent when the message has none
``<name>``              each of the message's headers, its value as is (UTF-8)
``ce-<attribute>``      a CloudEvent's attributes, and ``content-type`` its ``datacontenttype``,
                        when the relay publishes CloudEvents (the NATS binding, binary mode)
======================  ==========================================================================

A header name is an HTTP token in NATS; one that is not (``ünï code``), or holds ``%``, is sent
percent-encoded (UTF-8 bytes, like a URL), and so is the ``N`` of a name starting with ``Nats-`` (any
case): a tenant's header never steers JetStream (``Nats-Rollup`` purges a subject,
``Nats-Expected-*`` fail publishes). Consumers read names with ``urllib.parse.unquote``; the usual
names (``outbox-id``, ``traceparent``) are unchanged by it.

Ordering: a batch's publishes are written in batch order on one connection, then their acks are
awaited together (up to a whole batch in flight, not one round trip per message). A NATS server
takes one connection's messages in the order written and a stream stores them in that order, so the
messages of one key reach a stream in batch order. Concurrent batches (the worker shares one
publisher between partitions) share the connection; each has its own acks.

How the answers map onto the seam's contract (``outbox_relay/brokers/base.py``):

* a ``PubAck`` (also one marked ``duplicate``) → acknowledged;
* no responders (status 503: no stream captures the subject) → :class:`MessageRejected`;
* a ``PubAck`` error about the message or its stream (``message size exceeds maximum allowed``, a full
  stream that discards new messages: ``maximum messages exceeded``, ...) → :class:`MessageRejected`;
  one about the server (503: JetStream temporarily unavailable, insufficient resources) →
  :class:`TargetUnavailable`;
* the server refusing the publish by permissions (``-ERR 'Permissions Violation for Publish'``, the
  connection stays open) → :class:`MessageRejected` at the first message in flight to that subject;
* refused before anything is sent for it, as :class:`MessageRejected`: a subject NATS cannot publish
  to (empty, whitespace, an empty token, a wildcard token ``*`` or ``>``, over
  :data:`MAX_SUBJECT_BYTES`), a header value NATS headers cannot carry as it is (CR, LF, leading or
  trailing white space: nats-py would change it), and headers plus payload over the server's
  ``max_payload`` (the server would close the connection: every batch would fail for ever);
* anything else (connect refused or timed out, authentication, the connection lost, a write that
  stands still or no ack at all for ``timeout_ms`` while acks are due, a server address the policy
  refuses) →
  :class:`TargetUnavailable`; the connection is dropped (failing every batch still in flight on it)
  and the next batch dials anew.

Addresses: nats-py's own reconnect is off (``allow_reconnect=False``): it would dial its server pool by
name, and add the servers a cluster advertises (``connect_urls``) to it, neither checked. Instead each
connection, the first and every later one, resolves the target's servers once through the
:class:`~outbox_relay.netguard.AddressPolicy`, checks every address and dials a checked IP literal,
TLS (``tls://``) verified for the server's *name* (``tls_hostname``); servers are tried in the
target's order, each address in the resolver's.

This relies on two internals of nats-py 2.16 (pinned by the lock file): the transport's writer, to
abort a connection whose close would wait on a stalled socket, and nothing else private.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Sequence
from typing import Any, Self

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import NatsTarget
from outbox_relay.errors import AddressNotAllowed, MessageRejected, TargetUnavailable
from outbox_relay.netguard import AddressPolicy, Endpoint, nats_endpoint

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
ID_HEADER = "outbox-id"
KEY_HEADER = "outbox-key"
CE_PREFIX = "ce-"
"""CloudEvents attributes as NATS headers (the NATS binding's binary content mode)."""
CONTENT_TYPE_HEADER = "content-type"

MAX_SUBJECT_BYTES = 3968
"""The ``HPUB subject reply sizes`` line must fit the server's ``max_control_line`` (4 KiB by
default; a longer line closes the connection): this leaves room for the reply inbox and the sizes."""

_TOKEN = re.compile(r"[!#$&'*+\-.^_`|~0-9A-Za-z]+")
"""HTTP token characters but ``%`` (which starts an escape)."""
_TOKEN_BYTES = frozenset(b"!#$&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HDR_LINE = len(b"NATS/1.0\r\n")
_BAD_VALUE = re.compile(r"[\r\n]|^\s|\s$")
_STORE_FAILED = 10077
"""JetStream's ``JSStreamStoreFailedF``: a full stream (``maximum ... exceeded``) or a storage failure."""

PENDING, ACKED, REFUSED, UNAVAILABLE = 0, 1, 2, 3


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


def header_name(name: str) -> str:
    """``name`` as it is sent (see the module docstring): a token as is, anything else percent-encoded."""
    if _TOKEN.fullmatch(name) and not name[:5].lower() == "nats-":
        return name
    encoded = "".join(chr(b) if b in _TOKEN_BYTES else f"%{b:02X}" for b in name.encode())
    if encoded[:5].lower() == "nats-":
        encoded = f"%{ord(encoded[0]):02X}{encoded[1:]}"
    return encoded


def nats_headers(message: OutgoingMessage) -> tuple[dict[str, str], int] | str:
    """The NATS headers of ``message`` and their size on the wire, or why NATS cannot carry them."""
    headers: dict[str, str] = {}
    for name, value in message.headers.items():
        if not name:
            return "a header with an empty name (NATS headers have none)"
        if _BAD_VALUE.search(value):
            return f"header {name[:40]!r}: a NATS header value cannot hold CR, LF or leading or trailing white space"
        headers[header_name(name)] = value
    if ID_HEADER not in message.headers:
        headers[ID_HEADER] = message.dedupe_id
    if message.key is not None:
        if _BAD_VALUE.search(message.key):
            return "the key cannot be a NATS header value (CR, LF or leading or trailing white space)"
        headers[KEY_HEADER] = message.key
    if message.message_id:
        headers[MSG_ID_HEADER] = message.message_id
    event = message.cloudevent
    if event is not None:  # the CloudEvents NATS binding, binary content mode
        for name, value in event.attributes():
            if _BAD_VALUE.search(value):
                return f"CloudEvents attribute {name!r} cannot be a NATS header value (CR, LF or edge white space)"
            headers[CE_PREFIX + name] = value
        headers[CONTENT_TYPE_HEADER] = event.datacontenttype
    size = _HDR_LINE + 2 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
    return headers, size


def invalid_subject(subject: str) -> str | None:
    """Why NATS cannot publish to ``subject``, or None."""
    if len(subject.encode()) > MAX_SUBJECT_BYTES:
        return f"subject longer than {MAX_SUBJECT_BYTES} bytes (UTF-8)"
    if not subject or any(c.isspace() for c in subject):
        return f"{subject[:60]!r} is not a NATS subject (empty, or white space in it)"
    for token in subject.split("."):
        if token in ("", "*", ">"):
            return f"{subject[:60]!r} is not a NATS subject to publish to (an empty or wildcard token)"
    return None


class _Batch:
    """The publishes of one batch on a link, tokens ``first`` on, and what the server answered."""

    __slots__ = ("done", "first", "messages", "reasons", "remaining", "states")

    def __init__(self, messages: Sequence[OutgoingMessage], first: int) -> None:
        self.messages = messages
        self.first = first
        self.states = bytearray(len(messages))
        self.reasons: dict[int, str] = {}
        self.remaining = len(messages)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(self, offset: int, state: int, reason: str = "") -> None:
        if self.states[offset] != PENDING:
            return
        self.states[offset] = state
        if reason:
            self.reasons[offset] = reason
        self.remaining -= 1
        if not self.remaining and not self.done.done():
            self.done.set_result(None)

    def outcome(self) -> tuple[int, int, str]:
        """The first message not acknowledged, its state and why (``len`` and ACKED when all were)."""
        index = len(self.states) - len(self.states.lstrip(b"\x01"))
        if index == len(self.states):
            return index, ACKED, ""
        return index, self.states[index], self.reasons.get(index, "")


class _Link:
    """One NATS connection, its reply subscription, and the publishes in flight on it."""

    def __init__(self, client: Client, endpoint: Endpoint) -> None:
        self.client = client
        self.endpoint = endpoint
        self.prefix = ""
        self._cut = 0
        self.pending: dict[int, _Batch] = {}
        """Token → its batch, for each publish registered and not answered yet."""
        self.last = 0
        self.progress = 0
        """Counts the answers received (a wait gives up only while it stands still)."""
        self.lost: str | None = None

    async def start(self) -> None:
        self.prefix = self.client.new_inbox()
        self._cut = len(self.prefix) + 1
        await self.client.subscribe(self.prefix + ".*", cb=self._on_reply)

    @property
    def usable(self) -> bool:
        return self.lost is None and self.client.is_connected

    def register(self, messages: Sequence[OutgoingMessage]) -> _Batch:
        batch = _Batch(messages, self.last + 1)
        self.last += len(messages)
        self.pending.update(dict.fromkeys(range(batch.first, self.last + 1), batch))
        return batch

    def forget(self, batch: _Batch) -> None:
        for token in range(batch.first, batch.first + len(batch.messages)):
            if self.pending.get(token) is batch:
                del self.pending[token]

    async def _on_reply(self, msg: Msg) -> None:
        self.progress += 1
        try:
            token = int(msg.subject[self._cut :])
        except ValueError:
            return
        batch = self.pending.pop(token, None)
        if batch is None:
            return
        offset = token - batch.first
        status = msg.headers.get("Status") if msg.headers else None
        if status == "503":
            subject = batch.messages[offset].destination
            batch.settle(offset, REFUSED, f"no JetStream stream captures subject {subject[:200]!r} (no responders)")
            return
        if status is not None:
            description = msg.headers.get("Description", "") if msg.headers else ""
            batch.settle(offset, UNAVAILABLE, f"status {status} {description}".strip())
            return
        try:
            ack = _decode_ack(msg.data)
        except msgspec.DecodeError:
            batch.settle(offset, UNAVAILABLE, f"not a JetStream ack: {msg.data[:100]!r}")
            return
        error = ack.error
        if error is None:
            batch.settle(offset, ACKED)
        elif error.code == 503 and not (error.err_code == _STORE_FAILED and "exceeded" in error.description):
            batch.settle(offset, UNAVAILABLE, f"JetStream: {error.description} ({error.code}/{error.err_code})")
        else:
            batch.settle(offset, REFUSED, f"JetStream refused the message: {error.description} ({error.err_code})")

    def on_permission_error(self, subject: str) -> None:
        """The server dropped a publish to ``subject`` (no permission): refuse the first one in flight."""
        for token, batch in self.pending.items():  # in token order: the server answers in order
            offset = token - batch.first
            if batch.messages[offset].destination == subject:
                del self.pending[token]
                self.progress += 1
                batch.settle(offset, REFUSED, f"no permission to publish to subject {subject[:200]!r}")
                return

    def fail(self, reason: str) -> None:
        """The connection is gone: every publish still unanswered on it fails with ``reason``."""
        if self.lost is None:
            self.lost = reason
        for batch in set(self.pending.values()):
            if not batch.done.done():
                batch.done.set_result(None)
        self.pending.clear()


_PERMISSION = re.compile(r'Permissions Violation for Publish to "(.*)"', re.IGNORECASE)
"""The server's ``-ERR`` for a publish it dropped; greedy, as a subject may hold a quote."""


class NatsPublisher:
    """Publishes batches to NATS JetStream over one connection; see the module docstring."""

    def __init__(
        self,
        *,
        servers: Sequence[str],
        policy: AddressPolicy,
        username: str | None = None,
        password: str | None = None,
        timeout_ms: int = 10_000,
        name: str = "outbox-relay",
    ) -> None:
        """``servers`` are ``nats://`` or ``tls://`` URLs without credentials; ``password`` is the
        password with ``username``, else a token; ``policy`` checks every address at each connect.
        Nothing connects before :meth:`connect` or the first batch."""
        if not servers:
            raise ValueError("servers must name at least one server")
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        self._servers = [(url.partition("://")[0], *nats_endpoint(url)) for url in servers]
        self._policy = policy
        self._auth: dict[str, Any] = {}
        if username is not None:
            self._auth = {"user": username, "password": password or ""}
        elif password is not None:
            self._auth = {"token": password}
        self._timeout_s = timeout_ms / 1000
        self._name = name
        self._where = ",".join(servers)
        self._link: _Link | None = None
        self._starting: asyncio.Future[_Link] | None = None
        self._closed = False

    @classmethod
    def from_target(cls, target: NatsTarget, *, password: str | None, policy: AddressPolicy) -> Self:
        return cls(
            servers=target.servers,
            policy=policy,
            username=target.username,
            password=password,
            timeout_ms=target.timeout_ms,
        )

    async def connect(self) -> None:
        """Connect now; raise :class:`TargetUnavailable` when no server can be reached."""
        await self._acquire()

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        if not messages:
            return PublishResult(acked=0)
        link = await self._acquire()
        sendable, refusal, headers = _sendable_prefix(messages, link.client.max_payload)
        if sendable:
            result = await self._send(link, messages[:sendable], headers)
            if refusal is None or result.acked < sendable:
                return result
        assert refusal is not None
        return PublishResult(acked=sendable, rejected=MessageRejected(refusal, index=sendable))

    async def close(self) -> None:
        """Close the connection (bounded by ``timeout_ms``); safe to call more than once."""
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            await self._close_link(link, graceful=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- internals ---------------------------------------------------------------------------------

    async def _send(
        self, link: _Link, messages: Sequence[OutgoingMessage], headers: Sequence[dict[str, str]]
    ) -> PublishResult:
        batch = link.register(messages)
        publish, prefix, first = link.client.publish, link.prefix, batch.first
        try:
            try:
                loop = asyncio.get_running_loop()
                # nats-py waits for the socket once its 2 MiB buffer is full: the deadline is for a
                # write that stands still, moved on every 64 messages (not one timer per message)
                async with asyncio.timeout(self._timeout_s) as deadline:
                    for offset, message in enumerate(messages):
                        if not offset & 63:
                            deadline.reschedule(loop.time() + self._timeout_s)
                        reply = f"{prefix}.{first + offset}"
                        await publish(message.destination, message.payload, reply, headers[offset])
            except (nats.errors.Error, OSError) as exc:  # TimeoutError is an OSError
                await self._drop(link, f"publish failed: {exc!r}")
            while not batch.done.done():
                progress = link.progress
                await asyncio.wait((batch.done,), timeout=self._timeout_s)
                if not batch.done.done() and link.progress == progress:
                    await self._drop(link, f"no JetStream ack within {self._timeout_s:g}s")
        finally:
            link.forget(batch)
        index, state, reason = batch.outcome()
        if state == ACKED:
            return PublishResult(acked=index)
        if state == REFUSED:
            return PublishResult(acked=index, rejected=MessageRejected(reason, index=index))
        raise TargetUnavailable(f"NATS at {link.endpoint.name}:{link.endpoint.port}: {reason or link.lost}")

    async def _acquire(self) -> _Link:
        """The current connection; concurrent callers wait for one dial together."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        while (link := self._link) is not None and not link.usable:
            await self._drop(link, link.lost or "the connection closed")  # then look again: it awaited
        if link is not None:
            return link
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._dial())
            self._starting.add_done_callback(_retrieve)
        return await asyncio.shield(self._starting)

    async def _dial(self) -> _Link:
        """Connect to the first server (in order) and checked address that answers."""
        try:
            errors: list[str] = []
            async with asyncio.timeout(2 * self._timeout_s):
                for scheme, host, port in self._servers:
                    try:
                        endpoints = await self._policy.resolve(host, port)
                    except AddressNotAllowed as exc:
                        errors.append(f"{host}:{port} not dialled: {exc}")
                        continue
                    for endpoint in endpoints:
                        try:
                            link = await self._connect(scheme, endpoint)
                        except (nats.errors.Error, OSError) as exc:
                            errors.append(f"{endpoint.address}:{port}: {exc!r}")
                            continue
                        if self._closed:
                            await self._close_link(link, graceful=True)
                            raise RuntimeError("publisher is closed")
                        self._link = link
                        return link
        except TimeoutError:
            errors.append(f"gave up after {2 * self._timeout_s:g}s")
        finally:
            self._starting = None
        raise TargetUnavailable(f"cannot connect to NATS at {self._where}: {'; '.join(errors)}")

    async def _connect(self, scheme: str, endpoint: Endpoint) -> _Link:
        client = Client()
        link = _Link(client, endpoint)
        address = f"[{endpoint.address}]" if ":" in endpoint.address else endpoint.address
        options: dict[str, Any] = {}
        if scheme == "tls":
            options.update(tls=ssl.create_default_context(), tls_hostname=endpoint.server_name)

        async def on_error(exc: Exception) -> None:
            match = _PERMISSION.search(str(exc))
            if match is not None:
                link.on_permission_error(match.group(1))
            else:
                log.debug("NATS at %s: %r", endpoint.name, exc)

        async def on_closed() -> None:
            link.fail(f"the connection closed ({client.last_error!r})")

        try:
            async with asyncio.timeout(self._timeout_s):
                await client.connect(
                    servers=[f"{scheme}://{address}:{endpoint.port}"],
                    name=self._name,
                    allow_reconnect=False,
                    connect_timeout=self._timeout_s,  # type: ignore[arg-type]  # nats-py types it int
                    dont_randomize=True,
                    skip_subject_validation=True,  # checked by invalid_subject, the inbox is ours
                    error_cb=on_error,
                    closed_cb=on_closed,
                    disconnected_cb=on_closed,
                    **self._auth,
                    **options,
                )
                await link.start()
        except BaseException:
            await self._close_link(link, graceful=False)
            raise
        return link

    async def _drop(self, link: _Link, reason: str) -> None:
        """Drop ``link`` (failing what is in flight on it); the next batch dials anew. Only this
        link: another batch may have dialled the next one already."""
        if self._link is link:
            self._link = None
        link.fail(reason)
        await self._close_link(link, graceful=False)

    async def _close_link(self, link: _Link, *, graceful: bool) -> None:
        """Close ``link``'s connection within ``timeout_ms``; a close that waits on a stalled socket,
        or a drop (``graceful=False``), aborts it."""
        if not graceful:
            _abort(link.client)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout_s):
                await link.client.close()
        _abort(link.client)
        link.fail("closed")


def _sendable_prefix(
    messages: Sequence[OutgoingMessage], max_payload: int
) -> tuple[int, str | None, list[dict[str, str]]]:
    """How many messages from the start NATS can carry, why the next one cannot, and the headers of
    each that can."""
    out: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        reason = invalid_subject(message.destination)
        if reason is None:
            encoded = nats_headers(message)
            if isinstance(encoded, str):
                reason = encoded
            else:
                headers, size = encoded
                if max_payload and size + len(message.payload) > max_payload:
                    reason = (
                        f"headers and payload take {size + len(message.payload)} bytes, over the server's "
                        f"max_payload ({max_payload})"
                    )
                else:
                    out.append(headers)
                    continue
        return index, reason, out
    return len(messages), None, out


def _abort(client: Client) -> None:
    """Abort the client's socket (nats-py 2.16's TcpTransport keeps its writer in ``_io_writer``)."""
    writer = getattr(getattr(client, "_transport", None), "_io_writer", None)
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.transport.abort()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
