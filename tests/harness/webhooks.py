"""A webhook receiver for the tests and the bench: a small HTTP/1.1 server (asyncio streams)
that verifies every request's signature with the ``standardwebhooks`` package and records what
arrived, per destination, decoded as ``outbox_relay.brokers.webhook`` documents it.

A request whose signature does not verify under *each* of the receiver's secrets (a rotation signs
with both) is answered 401 and counted in ``bad_signatures``; a body that is not UTF-8 (which the
package's ``verify`` cannot take: it decodes the body as text) is checked with the package's own
``hmac_data`` over the raw bytes. ``answers`` makes one destination answer a fixed status (a refusal,
a redirect); ``outage`` answers every POST so (503 with a Retry-After ...). ``hold_s`` keeps each
request in flight a while, so that overlapping requests of one key would be seen (``overlaps``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ssl
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError, hmac_data

ADAPTER_HEADERS = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "outbox-key",
        "outbox-destination",
        "content-type",
        "host",
        "content-length",
        "user-agent",
        "accept",
        "accept-encoding",
        "connection",
    }
)
"""What the adapter and HTTP add to a request besides the message's own headers."""


def new_secret(seed: int) -> str:
    """A ``whsec_`` secret of 32 bytes (deterministic: the tests need not keep it)."""
    return "whsec_" + base64.b64encode(bytes((seed + n) % 256 for n in range(32))).decode()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True)
class Delivery:
    """One POST as the receiver decoded it."""

    webhook_id: str
    key: str | None
    destination: str
    headers: dict[str, str]
    """The message's headers (the adapter's and HTTP's own removed), percent-decoded."""
    payload: bytes
    content_type: str
    signatures: int


class WebhookReceiver:
    def __init__(self, secrets: list[str], *, path: str = "/hooks", hold_s: float = 0.0) -> None:
        """No ``secrets``: a receiver of unsigned requests (an alert channel without a secret), which
        refuses a signed one."""
        self.secrets = secrets
        self.hooks = [Webhook(s) for s in secrets]
        self.keys = [base64.b64decode(s.removeprefix("whsec_")) for s in secrets]
        self.path = path
        self.hold_s = hold_s
        self.port = 0
        self.scheme = "http"
        self.deliveries: dict[str, list[Delivery]] = defaultdict(list)
        self.all: list[Delivery] = []
        self.answers: dict[str, Answer] = {}
        self.outage: Answer | None = None
        self.options_answer = Answer(204, [("allow", "POST, OPTIONS")])
        """What an OPTIONS request (the adapter's connect) is answered."""
        self.bad_signatures = 0
        self.options = 0
        self.refused: Counter[int] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._keys_in_flight: Counter[str] = Counter()
        self.overlaps = 0
        """Requests that arrived while another of the same key was in flight (must stay 0)."""
        self.listeners: list[Callable[[Delivery], None]] = []
        """Called with each delivery as it is recorded (the bench's latency consumer)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{self.path}"

    async def start(self, *, tls: ssl.SSLContext | None = None) -> None:
        """Listen on 127.0.0.1 (https with ``tls``, a server context)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=tls)
        self.scheme = "https" if tls is not None else "http"
        self.port = self._server.sockets[0].getsockname()[1]

    def drop(self) -> None:
        """Close every connection now (the receiver stays up): clients must connect again."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- HTTP ------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/1.1 with keep-alive, requests framed by content-length (what httpx sends); anything
        else closes the connection."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers: list[tuple[str, str]] = []
                for line in lines:
                    name, _, value = line.partition(":")
                    headers.append((name.strip().lower(), value.strip()))
                length = int(dict(headers).get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                answer = await self._answer(method, target, headers, body)
                reason = HTTPStatus(answer.status).phrase
                out = [f"HTTP/1.1 {answer.status} {reason}"]
                out += [f"{name}: {value}" for name, value in answer.headers]
                if answer.status not in (204, 304):
                    out.append(f"content-length: {len(answer.body)}")
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + answer.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    async def _answer(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> Answer:
        if method == "OPTIONS":
            self.options += 1
            return self.options_answer
        if method != "POST" or target.split("?")[0] != self.path:
            return Answer(404)
        raw = dict(headers)
        assert len(raw) == len(headers), f"a header came twice: {headers}"
        signatures = self._verified(raw, body)
        if signatures is None:
            self.bad_signatures += 1
            return Answer(401, body=b"bad signature")
        delivery = Delivery(
            webhook_id=unquote(raw["webhook-id"]),
            key=unquote(raw["outbox-key"]) if "outbox-key" in raw else None,
            destination=unquote(raw["outbox-destination"]),
            headers={unquote(n): unquote(v) for n, v in raw.items() if n not in ADAPTER_HEADERS},
            payload=body,
            content_type=unquote(raw.get("content-type", "")),
            signatures=signatures,
        )
        key = delivery.key
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if key is not None:
            self.overlaps += self._keys_in_flight[key] > 0
            self._keys_in_flight[key] += 1
        try:
            if self.hold_s:
                await asyncio.sleep(self.hold_s)
            answer = self.outage or self.answers.get(delivery.destination)
            if answer is not None:
                self.refused[answer.status] += 1
                return answer
            self.deliveries[delivery.destination].append(delivery)
            self.all.append(delivery)
            for listener in self.listeners:
                listener(delivery)
            return Answer(204)
        finally:
            self.in_flight -= 1
            if key is not None:
                self._keys_in_flight[key] -= 1

    def _verified(self, headers: dict[str, str], body: bytes) -> int | None:
        """How many signatures the request carries when it verifies under every secret; else None."""
        if not self.secrets:
            return None if "webhook-signature" in headers else 0
        signature = headers.get("webhook-signature", "")
        for hook, key in zip(self.hooks, self.keys, strict=True):
            try:
                hook.verify(body.decode(), headers, json_parse=False)
            except UnicodeDecodeError:  # not UTF-8: the package's verify cannot take it
                signed = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
                expected = base64.b64encode(hmac_data(key, signed)).decode()
                if not any(hmac.compare_digest(f"v1,{expected}", s) for s in signature.split(" ")):
                    return None
            except (WebhookVerificationError, ValueError, KeyError):
                return None
        return len(signature.split(" "))


@contextlib.contextmanager
def receiver_thread(secrets: list[str], *, hold_s: float = 0.0) -> Iterator[WebhookReceiver]:
    """A receiver on an event loop of its own thread: for tests whose own loop blocks on a call that
    needs the receiver to answer meanwhile (the in-process API client runs a replay while the test
    waits for it). Its counters and lists are read from the test's thread (whole values: the GIL)."""
    loop = asyncio.new_event_loop()
    receiver = WebhookReceiver(secrets, hold_s=hold_s)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(receiver.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(receiver.close())
        loop.close()

    thread = threading.Thread(target=run, name="webhook-receiver", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the receiver thread did not start")
    try:
        yield receiver
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
