"""The dashboard's sign-in: the API key, encrypted into an HTTP-only cookie, plus a CSRF token.

Nothing is stored server-side: the cookie carries the key sealed with the service's secret keys
(Fernet: authenticated, so it cannot be forged or altered), the time it was issued and a random
CSRF token that every form posts back. The key is checked again on every request, so revoking
it signs the browser out at once. Sessions last ``SESSION_S``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.datastructures import Cookie

from outbox_relay.crypto import SecretBox
from outbox_relay.errors import OutboxRelayError

SESSION_COOKIE = "orly_ui"
FLASH_COOKIE = "orly_ui_flash"
COOKIE_PATH = "/ui"
SESSION_S = 8 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    key: str
    csrf: str
    issued_at: float

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


def _secure(request: Request[Any, Any, Any]) -> bool:
    return request.url.scheme == "https"


def new_session(key: str) -> Session:
    return Session(key=key, csrf=secrets.token_urlsafe(24), issued_at=time.time())


def session_cookie(request: Request[Any, Any, Any], box: SecretBox, session: Session) -> Cookie:
    sealed = box.encrypt(json.dumps({"k": session.key, "c": session.csrf, "t": session.issued_at})).decode()
    return Cookie(
        key=SESSION_COOKIE,
        value=sealed,
        path=COOKIE_PATH,
        max_age=SESSION_S,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )


def read_session(request: Request[Any, Any, Any], box: SecretBox) -> Session | None:
    sealed = request.cookies.get(SESSION_COOKIE)
    if not sealed:
        return None
    try:
        data = json.loads(box.decrypt(sealed.encode()))
        session = Session(key=str(data["k"]), csrf=str(data["c"]), issued_at=float(data["t"]))
    except (OutboxRelayError, ValueError, KeyError, TypeError):
        return None
    if time.time() - session.issued_at > SESSION_S:
        return None
    return session


def cleared(name: str = SESSION_COOKIE) -> Cookie:
    return Cookie(key=name, value="", path=COOKIE_PATH, max_age=0, expires=0, httponly=True, samesite="lax")


# --- one-shot messages across a redirect ---------------------------------------------------------


def flash_cookie(request: Request[Any, Any, Any], kind: str, text: str) -> Cookie:
    raw = json.dumps({"kind": kind, "text": text[:2000]}).encode()
    return Cookie(
        key=FLASH_COOKIE,
        value=base64.urlsafe_b64encode(raw).decode(),
        path=COOKIE_PATH,
        max_age=120,
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )


def read_flash(request: Request[Any, Any, Any]) -> dict[str, str] | None:
    value = request.cookies.get(FLASH_COOKIE)
    if not value:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(value.encode()))
        kind = data["kind"] if data["kind"] in ("notice", "error") else "notice"
        return {"kind": kind, "text": str(data["text"])}
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
