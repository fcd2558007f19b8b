"""HTTP webhook adapter: one signed POST per message (Standard Webhooks, https://www.standardwebhooks.com).

Each request: ``POST <target url>``, the body the payload verbatim, and these headers:

========================  ========================================================================
``webhook-id``            the message id (``OutgoingMessage.dedupe_id``, a UUID): dedupe on it
``webhook-timestamp``     the time of signing, in whole seconds since the epoch
``webhook-signature``     ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``; two, space-separated,
                          while the target holds two secrets (a rotation): the receiver accepts either;
                          absent for a publisher without a secret (an alert channel without one,
                          ``outbox_relay/alerts.py``; a target always has one)
``content-type``          the target's ``content_type``, unless the message has a content-type header
``outbox-key``            the outbox key; absent when the message has none
``outbox-destination``    the destination the relay's topic mapping chose for the message
``<name>``                every header of the message (``outbox-id``, ``outbox-topic``, ``traceparent`` ...)
``ce-<attribute>``        a CloudEvent's attributes, when the relay publishes CloudEvents (the HTTP
                          binding, binary mode); ``content-type`` is then its ``datacontenttype``
========================  ========================================================================

HTTP cannot carry every name and value a message header may have (spaces, non-ASCII, control
characters), so names, values, the key and the destination are sent percent-encoded as UTF-8 where
HTTP needs it: in a name every byte outside HTTP's token characters, in a value every byte outside
visible ASCII (space included), and ``%`` itself in both, always; a receiver percent-decodes each
one (``urllib.parse.unquote``), which leaves an ordinary value such as a ``traceparent`` as it is.
HTTP header names are case-insensitive (receivers usually see them lower-cased). A message header
naming one the adapter or HTTP itself sets (``host``, ``content-length``, ``webhook-*``, hop-by-hop
headers ...) is refused: that message gets :class:`MessageRejected`.

The signature is the HMAC of the raw body bytes, as the specification defines it; it is computed
here rather than with the ``standardwebhooks`` package's ``Webhook.sign``, which takes the body as a
``str`` and so cannot sign a payload that is not UTF-8 (the relay carries payloads byte-exact). For
UTF-8 bodies the two agree (``tests/unit/test_webhook_signing.py``), and the tests verify what
arrives with that package's ``Webhook.verify``.

:meth:`WebhookPublisher.connect` (a worker's first use of the target, and after a spec change) sends
one unsigned ``OPTIONS <url>`` to learn that the endpoint answers at all; any status but an outage's
will do.

What an answer means, per request:

* 2xx: acknowledged.
* 408, 429, 5xx, a connection error or a timeout (``timeout_ms`` for the whole request, the connect
  within ``connect_timeout_ms``): an outage, :class:`TargetUnavailable`; a ``Retry-After`` (seconds
  or an HTTP date, bounded by :data:`MAX_RETRY_AFTER_S`) is the pause the relay then takes.
* any other status, a 3xx among them (redirects are never followed: a target names its endpoint):
  the receiver refused this message, :class:`MessageRejected`.

Order and concurrency: a batch's messages are grouped by key; each key's messages are sent one at a
time, in batch order (the next only once the previous one was acknowledged), and different keys in
parallel, at most ``max_concurrent_requests`` requests in flight for the publisher, shared by every
batch on it (HTTP/1.1, one request per connection at a time; a request waits for a connection
within its ``timeout_ms``). A keyless message is ordered with nothing. An
outage on any request cancels the rest of the batch and raises :class:`TargetUnavailable` (the
relay sends the batch again: at least once); a refusal stops only what comes after it in batch
order, and the result is the acknowledged prefix and the refusal, as :mod:`outbox_relay.brokers.base`
says.

Connections: the publisher's own (:class:`Connections`), on httpcore (httpx's HTTP core), at most
``max_concurrent_requests``, each kept alive for the next request. Every connection resolves the URL's
host through the :class:`~outbox_relay.netguard.AddressPolicy`, checks every address and dials a
checked IP literal (:class:`GuardedBackend`, httpcore's network backend); TLS verifies the certificate
for, and sends SNI of, the host *name*. There is no proxy (httpcore reads none from the environment),
so nothing but the checked addresses is ever dialled.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import math
import ssl
import time
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC
from typing import Self
from urllib.parse import quote, urlsplit

import httpcore

from outbox_relay.brokers.base import OutgoingMessage, PublishResult
from outbox_relay.domain import WebhookTarget
from outbox_relay.errors import AddressNotAllowed, InvalidSpec, MessageRejected, TargetUnavailable
from outbox_relay.netguard import AddressPolicy
from outbox_relay.specs import webhook_secrets

MAX_RETRY_AFTER_S = 300.0
"""A ``Retry-After`` longer than this is taken as this (a receiver cannot park a relay for a day)."""
MAX_ERROR_BODY = 512
"""Characters of a refusing answer's body kept in the refusal's message (and the dead letter)."""
KEEPALIVE_S = 30.0
"""An idle connection older than this is not reused (closed and opened anew)."""
MAX_READ_BYTES = 64 * 1024
"""An answer's body is read up to this much, for the connection's reuse; a longer one closes it."""

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
KEY_HEADER = "outbox-key"
DESTINATION_HEADER = "outbox-destination"

RESERVED_HEADERS = frozenset(
    {
        ID_HEADER,
        TIMESTAMP_HEADER,
        SIGNATURE_HEADER,
        KEY_HEADER,
        DESTINATION_HEADER,
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-authorization",
        "proxy-connection",
    }
)
"""Header names a message may not carry: the adapter's own, and those that steer HTTP itself."""

_NAME_SAFE = "!#$&'*+^`|"
"""HTTP token characters (RFC 9110) besides letters, digits and ``_.-~``, which ``quote`` keeps."""
_VALUE_SAFE = "!\"#$&'()*+,/:;<=>?@[\\]^`{|}"
"""Visible ASCII besides letters, digits, ``_.-~`` and ``%``."""
_OUTAGE_STATUSES = frozenset({408, 429})
_RETRYABLE_ERRORS = (httpcore.ReadError, httpcore.WriteError, httpcore.RemoteProtocolError)
"""A kept-alive connection the receiver closed as the request went out: sent again once on a new
connection (at least once allows the duplicate); timeouts and connect errors are not retried."""
_TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.TimeoutException,
    httpcore.ProtocolError,
    AddressNotAllowed,
    OSError,
)
"""What means the endpoint could not be reached or did not answer (TimeoutError is an OSError)."""


def header_name(name: str) -> str:
    """A message header's name as sent (see the module docstring)."""
    return quote(name, safe=_NAME_SAFE) or "%"  # an empty name cannot be sent: '%' decodes to itself


def header_value(value: str) -> str:
    """A header value, key or destination as sent (see the module docstring)."""
    return quote(value, safe=_VALUE_SAFE)


def sign(keys: Iterable[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>`` of ``id.timestamp.body`` under
    each key, space-separated."""
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    return " ".join("v1," + base64.b64encode(hmac.digest(key, signed, hashlib.sha256)).decode() for key in keys)


def retry_after_s(value: str | None, *, now: float | None = None) -> float | None:
    """A ``Retry-After`` as seconds from now, within [0, :data:`MAX_RETRY_AFTER_S`]; None when absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, dialling only addresses the address policy checked just now: each
    new connection resolves its host once, checks every address and connects to one of them by IP
    literal (TLS is started by httpcore afterwards with the host name, so the certificate is checked
    for the name)."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's signature
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        endpoints = await self.policy.resolve(host, port)  # AddressNotAllowed: raised through httpcore as it is
        error: Exception | None = None
        for endpoint in endpoints:
            if endpoint.address.startswith("/"):  # a unix socket is no webhook address
                raise AddressNotAllowed(f"host {host!r} is not a network address")
            try:
                return await self.inner.connect_tcp(
                    endpoint.address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as exc:
                error = exc
        assert error is not None  # resolve() answers at least one endpoint
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's signature
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressNotAllowed("unix sockets are not webhook addresses")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class Connections:
    """The publisher's connections to its endpoint, at most ``limit`` open: each request takes one
    (waiting, in order, while all are in use) and gives it back when its answer was read, so a
    connection carries one request at a time (HTTP/1.1, no pipelining) and is kept alive for the next.

    Its own rather than httpcore's connection pool: with 16 connections and the requests of many keys
    queued, the pool re-examines every connection for every queued request each time one finishes
    (``has_expired``, a ``getpeername`` each), over half of a relayed message's CPU; here a request
    takes the connection it is handed."""

    def __init__(self, *, origin: httpcore.Origin, limit: int, ssl_context: ssl.SSLContext, backend: GuardedBackend):
        self.origin, self.limit, self.ssl_context, self.backend = origin, limit, ssl_context, backend
        self._idle: list[httpcore.AsyncHTTPConnection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[httpcore.AsyncHTTPConnection | None]] = deque()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def _new(self) -> httpcore.AsyncHTTPConnection:
        return httpcore.AsyncHTTPConnection(
            self.origin, ssl_context=self.ssl_context, keepalive_expiry=KEEPALIVE_S, network_backend=self.backend
        )

    async def take(self) -> httpcore.AsyncHTTPConnection:
        """A connection no other request is using (connected at its first request)."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        while self._idle:
            conn = self._idle.pop()
            if conn.is_available() and not conn.has_expired():
                return conn
            await self._discard(conn, reopen=False)
        if self._open < self.limit:
            self._open += 1
            return self._new()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over as it was cancelled: pass it on
                self.give(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        return handed if handed is not None else self._new()  # None: its slot, to connect anew

    def give(self, conn: httpcore.AsyncHTTPConnection | None) -> None:
        """Back after a request whose answer was read whole (``None``: the connection was closed,
        its slot is free)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is None:
            self._open -= 1
        elif self._closed:  # a request that finished after close(): its connection is closed too
            self._open -= 1
            task = asyncio.get_running_loop().create_task(conn.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            self._idle.append(conn)

    async def _discard(self, conn: httpcore.AsyncHTTPConnection, *, reopen: bool = True) -> None:
        if reopen:  # the slot first: closing may be cut short by a cancellation
            self.give(None)
        else:
            self._open -= 1
        with contextlib.suppress(Exception):
            await conn.aclose()

    async def drop(self, conn: httpcore.AsyncHTTPConnection) -> None:
        """After a request that failed or was cancelled: close the connection, free its slot."""
        await self._discard(conn)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._discard(conn, reopen=False)
        for waiter in self._waiters:
            waiter.cancel()


class WebhookPublisher:
    """POSTs each message to one URL, signed; see the module docstring."""

    def __init__(
        self,
        *,
        url: str,
        secrets: Sequence[bytes],
        policy: AddressPolicy,
        content_type: str = "application/json",
        timeout_ms: int = 10_000,
        connect_timeout_ms: int = 5_000,
        max_concurrent_requests: int = 16,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``secrets`` are the signing keys (decoded, one or two; none for an alert channel without a
        secret, whose requests go unsigned); ``ssl_context`` the trust for https (the system's by
        default; a tenant cannot choose it, tests bring their CA). Nothing connects before
        :meth:`connect` or the first batch."""
        if not 0 <= len(secrets) <= 2:
            raise ValueError("a webhook publisher signs with one or two secrets, or none")
        if timeout_ms <= 0 or connect_timeout_ms <= 0 or max_concurrent_requests < 1:
            raise ValueError("timeouts and max_concurrent_requests must be positive")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise ValueError("url must be http:// or https://, with a host and no user")
        self._where = f"{parts.scheme}://{parts.netloc}"
        self._keys = list(secrets)
        self._policy = policy
        self._content_type = content_type
        self._timeout_s = timeout_ms / 1000
        connect_s = min(connect_timeout_ms, timeout_ms) / 1000
        # per operation (httpcore's); the whole request is bounded by timeout_ms besides (_deliver)
        self._timeouts = {"connect": connect_s, "read": self._timeout_s, "write": self._timeout_s, "pool": None}
        self._concurrency = max_concurrent_requests
        self._ssl = ssl_context or ssl.create_default_context()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        origin = httpcore.Origin(parts.scheme.encode(), parts.hostname.encode("idna"), port)
        self._connections = Connections(
            origin=origin, limit=max_concurrent_requests, ssl_context=self._ssl, backend=GuardedBackend(policy)
        )
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._request_url = httpcore.URL(scheme=origin.scheme, host=origin.host, port=port, target=target)
        self._fixed_headers = [(b"host", parts.netloc.encode("idna")), (b"user-agent", b"outbox-relay")]
        self._closed = False

    @classmethod
    def from_target(cls, target: WebhookTarget, *, password: str | None, policy: AddressPolicy) -> Self:
        """TargetUnavailable (the relay pauses, charging nothing) when the stored secret is missing
        or malformed: no message is to blame."""
        if not password:
            raise TargetUnavailable("the webhook target has no signing secret: PUT it with `password`")
        try:
            keys = webhook_secrets(password)
        except InvalidSpec as exc:
            raise TargetUnavailable(f"the webhook target's signing secret is refused ({exc.reason})") from None
        return cls(
            url=target.url,
            secrets=keys,
            policy=policy,
            content_type=target.content_type,
            timeout_ms=target.timeout_ms,
            connect_timeout_ms=target.connect_timeout_ms,
            max_concurrent_requests=target.max_concurrent_requests,
        )

    async def connect(self) -> None:
        """Check now that the endpoint answers HTTP: one ``OPTIONS <url>`` (unsigned, no body; RFC
        9110's way to ask a resource about itself), which a TCP or TLS connect alone would not show
        of an endpoint that accepts and then hangs. Any answer but an outage's (408, 429, 5xx)
        will do: 404 or 405 from a receiver that takes only POST is still a receiver.
        TargetUnavailable when it does not answer (the connection is kept for the first batch)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                status, reason, _, _ = await self._request(b"OPTIONS", b"", [])
        except _TRANSPORT_ERRORS as exc:
            raise self._outage(exc) from exc
        if status >= 500 or status in _OUTAGE_STATUSES:
            raise TargetUnavailable(f"webhook at {self._where} answered {status} {reason}")

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> PublishResult:
        if self._closed:
            raise RuntimeError("publisher is closed")
        if not messages:
            return PublishResult(acked=0)
        outcomes: list[MessageRejected | bool] = [False] * len(messages)
        """Per message: True acknowledged, a MessageRejected refused, False not sent."""
        first_refused = [len(messages)]
        lanes = deque(_lanes(messages))

        async def worker() -> None:
            while lanes:
                for index in lanes.popleft():
                    if index > first_refused[0]:  # after a refusal in batch order: not needed now
                        break
                    outcome = await self._deliver(messages[index])
                    outcomes[index] = True if outcome is None else outcome
                    if outcome is not None:
                        first_refused[0] = min(first_refused[0], index)
                        break

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self._concurrency, len(lanes))):
                    group.create_task(worker())
        except* TargetUnavailable as outages:  # the first one; the task group cancelled the rest
            first = outages.exceptions[0]
            assert isinstance(first, TargetUnavailable)
            raise first from None
        acked = next((i for i, outcome in enumerate(outcomes) if outcome is not True), len(messages))
        if acked == len(messages):
            return PublishResult(acked=acked)
        refusal = outcomes[acked]
        assert isinstance(refusal, MessageRejected)  # every message before the first refusal was sent
        refusal.index = acked
        return PublishResult(acked=acked, rejected=refusal)

    async def _deliver(self, message: OutgoingMessage) -> MessageRejected | None:
        """POST one message: None when acknowledged, else its refusal; TargetUnavailable raised."""
        try:
            headers = self._headers(message)
        except MessageRejected as exc:
            return exc
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self._timeout_s):  # the whole request, the wait for a connection too
                    return await self._post(message.payload, headers)
            except _RETRYABLE_ERRORS as exc:
                if attempt == 2:
                    raise self._outage(exc) from exc
            except _TRANSPORT_ERRORS as exc:
                raise self._outage(exc) from exc  # TimeoutError is an OSError
        raise AssertionError("unreachable")  # pragma: no cover

    def _outage(self, exc: BaseException) -> TargetUnavailable:
        reason = "timed out" if isinstance(exc, TimeoutError | httpcore.TimeoutException) else repr(exc)
        return TargetUnavailable(f"webhook at {self._where}: {reason}")

    async def _request(
        self, method: bytes, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, str, dict[bytes, bytes], str]:
        """One request on a connection of its own: (status, reason, headers lower-cased, the start of
        the body as text). The connection goes back for the next request once the answer was read
        whole, and is closed when anything went wrong (or the answer is longer than we read)."""
        conn = await self._connections.take()
        try:
            length = [(b"content-length", b"%d" % len(body))] if method == b"POST" else []
            request = httpcore.Request(
                method,
                self._request_url,
                headers=[*self._fixed_headers, *length, *headers],
                content=body or None,
                extensions={"timeout": self._timeouts},
            )
            response = await conn.handle_async_request(request)
            try:
                text, whole = await _read_some(response)
            finally:
                await response.aclose()
        except BaseException:
            await self._connections.drop(conn)
            raise
        if whole:
            self._connections.give(conn)
        else:
            await self._connections.drop(conn)
        reason = response.extensions.get("reason_phrase", b"")
        answer_headers = {name.lower(): value for name, value in response.headers}
        return response.status, reason.decode("latin-1") if isinstance(reason, bytes) else "", answer_headers, text

    async def _post(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> MessageRejected | None:
        status, reason, answer, text = await self._request(b"POST", body, headers)
        if 200 <= status < 300:
            return None
        if status >= 500 or status in _OUTAGE_STATUSES:
            error = TargetUnavailable(f"webhook at {self._where} answered {status} {reason}")
            error.retry_after_s = retry_after_s(answer.get(b"retry-after", b"").decode("latin-1"))
            raise error
        if 300 <= status < 400:
            where = answer.get(b"location", b"").decode("latin-1")[:MAX_ERROR_BODY]
            return MessageRejected(
                f"webhook at {self._where} answered {status} (a redirect to {where!r}); redirects are not followed: "
                "point the target at the final URL"
            )
        return MessageRejected(f"webhook at {self._where} answered {status} {reason}: {text}")

    def _headers(self, message: OutgoingMessage) -> list[tuple[bytes, bytes]]:
        """The request's headers (the module docstring); MessageRejected for a reserved header name."""
        message_id = message.dedupe_id
        timestamp = math.floor(time.time())
        headers = [
            (b"webhook-id", header_value(message_id).encode()),
            (b"webhook-timestamp", b"%d" % timestamp),
            (b"outbox-destination", header_value(message.destination).encode()),
        ]
        if self._keys:  # an unsigned alert channel has none
            headers.insert(2, (b"webhook-signature", sign(self._keys, message_id, timestamp, message.payload).encode()))
        if message.key is not None:
            headers.append((b"outbox-key", header_value(message.key).encode()))
        content_type = self._content_type
        for name, value in message.headers.items():
            lowered = name.lower()
            if lowered in RESERVED_HEADERS:
                raise MessageRejected(f"header {name!r} cannot be sent: the webhook adapter or HTTP sets it")
            if lowered == "content-type":
                content_type = value
                continue
            headers.append((header_name(name).encode(), header_value(value).encode()))
        event = message.cloudevent
        if event is not None:  # the CloudEvents HTTP binding, binary content mode
            headers += [(b"ce-" + name.encode(), header_value(value).encode()) for name, value in event.attributes()]
            content_type = event.datacontenttype
        headers.append((b"content-type", header_value(content_type).encode()))
        return headers

    async def close(self) -> None:
        """Close the connections; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._connections.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _lanes(messages: Sequence[OutgoingMessage]) -> list[list[int]]:
    """The batch's indexes per key, each key's in batch order, the keys by their first message; a
    keyless message a lane of its own."""
    by_key: dict[str, list[int]] = {}
    lanes: list[list[int]] = []
    for index, message in enumerate(messages):
        if message.key is None:
            lanes.append([index])
        elif (lane := by_key.get(message.key)) is not None:
            lane.append(index)
        else:
            by_key[message.key] = lane = [index]
            lanes.append(lane)
    return lanes


async def _read_some(response: httpcore.Response) -> tuple[str, bool]:
    """Up to :data:`MAX_READ_BYTES` of the body, as text for a refusal's message, and whether that
    was all of it (else the connection is closed rather than reused)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_stream():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_READ_BYTES:
            return b"".join(chunks)[:MAX_ERROR_BODY].decode("utf-8", "replace"), False
    return b"".join(chunks)[:MAX_ERROR_BODY].decode("utf-8", "replace"), True
