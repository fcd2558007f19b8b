"""The dashboard's sign-in: a server-side session per browser, a CSRF token on every form, signed flashes.

Signing in stores a session row in the control DB (``ui_sessions``): the SHA-256 of a random token, the
hash of the API key that signed in, a CSRF token and an expiry. The browser's HTTP-only cookie holds only
the token. Every request looks the row up and checks the key again, so signing out (which deletes the
row) ends the session wherever its cookie was copied to, and revoking the key ends every session it
opened. Sessions last ``SESSION_S``.

The sign-in form has a CSRF token too, before there is a session: a random token sealed (Fernet:
authenticated) into a short-lived cookie and repeated in the form; the POST must bring both, and a
cross-site form can bring neither. Flash messages across a redirect are sealed the same way, so an
altered or forged flash cookie is ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.datastructures import Cookie

from outbox_relay.config import Settings
from outbox_relay.crypto import SecretBox
from outbox_relay.errors import OutboxRelayError
from outbox_relay.store.control import ControlStore, hash_key

SESSION_COOKIE = "orly_ui"
FLASH_COOKIE = "orly_ui_flash"
LOGIN_COOKIE = "orly_ui_login"
COOKIE_PATH = "/ui"
SESSION_S = 8 * 3600
LOGIN_FORM_S = 3600
"""How long a sign-in form stays valid."""
FLASH_S = 120


@dataclass(frozen=True, slots=True)
class Session:
    token_hash: bytes
    key_hash: bytes
    """The hash of the API key that signed in (``api_keys.key_hash``; the admin key's likewise)."""
    csrf: str

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def secure(request: Request[Any, Any, Any], settings: Settings) -> bool:
    """Whether cookies get the ``Secure`` flag: always with ``OUTBOX_RELAY_UI_COOKIE_SECURE``, else
    when the request came over https."""
    return settings.ui_cookie_secure or request.url.scheme == "https"


def _cookie(request: Request[Any, Any, Any], settings: Settings, name: str, value: str, max_age: int) -> Cookie:
    return Cookie(
        key=name,
        value=value,
        path=COOKIE_PATH,
        max_age=max_age,
        httponly=True,
        samesite="lax",
        secure=secure(request, settings),
    )


def cleared(request: Request[Any, Any, Any], settings: Settings, name: str = SESSION_COOKIE) -> Cookie:
    cookie = _cookie(request, settings, name, "", 0)
    cookie.expires = 0
    return cookie


# --- sessions --------------------------------------------------------------------------------------


async def start_session(store: ControlStore, key: str) -> tuple[str, Session]:
    """A new session for a key already checked: (the cookie's token, the session)."""
    token = secrets.token_urlsafe(32)
    session = Session(token_hash=_token_hash(token), key_hash=hash_key(key), csrf=secrets.token_urlsafe(24))
    await store.create_ui_session(session.token_hash, session.key_hash, session.csrf, SESSION_S)
    return token, session


def session_cookie(request: Request[Any, Any, Any], settings: Settings, token: str) -> Cookie:
    return _cookie(request, settings, SESSION_COOKIE, token, SESSION_S)


async def read_session(request: Request[Any, Any, Any], store: ControlStore) -> Session | None:
    """The live session of the request's cookie: one that was signed in, not out, and has not expired."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 256:
        return None
    row = await store.ui_session(_token_hash(token))
    if row is None:
        return None
    return Session(token_hash=_token_hash(token), key_hash=row.key_hash, csrf=row.csrf)


async def end_session(store: ControlStore, session: Session) -> None:
    await store.delete_ui_session(session.token_hash)


# --- the sign-in form's CSRF token -----------------------------------------------------------------


def _unseal(box: SecretBox, value: str | None, max_age_s: float) -> dict[str, Any] | None:
    if not value or len(value) > 8192:
        return None
    try:
        data = json.loads(box.decrypt(value.encode()))
        if not isinstance(data, dict) or time.time() - float(data["t"]) > max_age_s:
            return None
    except (OutboxRelayError, ValueError, KeyError, TypeError):
        return None
    return data


def login_token(request: Request[Any, Any, Any], box: SecretBox) -> tuple[str, str | None]:
    """The sign-in form's CSRF token: (token, sealed cookie value to set, or None to keep the cookie the
    browser has, which still holds a valid token)."""
    data = _unseal(box, request.cookies.get(LOGIN_COOKIE), LOGIN_FORM_S / 2)
    if data is not None and isinstance(data.get("c"), str):
        return data["c"], None
    token = secrets.token_urlsafe(24)
    return token, box.encrypt(json.dumps({"c": token, "t": time.time()})).decode()


def login_cookie(request: Request[Any, Any, Any], settings: Settings, sealed: str) -> Cookie:
    return _cookie(request, settings, LOGIN_COOKIE, sealed, LOGIN_FORM_S)


def login_csrf_ok(request: Request[Any, Any, Any], box: SecretBox, posted: str | None) -> bool:
    """The posted token is the one sealed in this browser's sign-in cookie."""
    data = _unseal(box, request.cookies.get(LOGIN_COOKIE), LOGIN_FORM_S)
    if data is None or not posted or not isinstance(data.get("c"), str):
        return False
    return hmac.compare_digest(str(data["c"]).encode(), str(posted).encode())


# --- one-shot messages across a redirect -----------------------------------------------------------


def flash_cookie(request: Request[Any, Any, Any], settings: Settings, box: SecretBox, kind: str, text: str) -> Cookie:
    sealed = box.encrypt(json.dumps({"kind": kind, "text": text[:2000], "t": time.time()})).decode()
    return _cookie(request, settings, FLASH_COOKIE, sealed, FLASH_S)


def read_flash(request: Request[Any, Any, Any], box: SecretBox) -> dict[str, str] | None:
    """The flash this service sealed, or None (absent, expired, altered or forged)."""
    data = _unseal(box, request.cookies.get(FLASH_COOKIE), FLASH_S)
    if data is None or not isinstance(data.get("text"), str):
        return None
    kind = data.get("kind") if data.get("kind") in ("notice", "error") else "notice"
    return {"kind": str(kind), "text": data["text"]}
