"""Every request's input, checked once before a handler sees it: bad input is a 4xx, never a 500.

* JSON bodies are decoded by msgspec **strictly** (``"batch_size": "5"`` is a wrong type, not 5)
  straight into the handler's ``data`` type. litestar would decode the body untyped first (where
  100,000 nested arrays exhaust the recursion limit) and then convert it laxly.
* No text may contain NUL (``\\u0000``): PostgreSQL cannot store it in ``text`` or ``jsonb``, so
  it would fail the write with a 500. One walk over the decoded body refuses it in any string,
  dictionary key included (422 naming the field); the query string is checked the same way (400).
* Bodies are capped at :data:`MAX_BODY_BYTES` (413); the largest legitimate one is a few KiB.

PostgreSQL's ``text`` takes every other character JSON can carry (msgspec already refuses lone
UTF-16 surrogates while decoding).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request
from litestar.exceptions import ClientException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.types import Empty

from service.problems import Problem

MAX_BODY_BYTES = 1024 * 1024
_AT_RE = re.compile(r"`\$\.(.+)`$")
NUL = "\x00"


def nul_at(value: Any, where: str = "") -> str | None:
    """Where in a decoded body the first string with a NUL character is (``policy.x``,
    ``topic_mapping['a']``, ``topic_mapping (a key)``), or None."""
    if isinstance(value, str):
        return (where or "body") if NUL in value else None
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            found = nul_at(getattr(value, name), f"{where}.{name}" if where else name)
            if found:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and NUL in key:
                return f"{where or 'body'} (a key)"
            found = nul_at(item, f"{where}[{key!r}]")
            if found:
                return found
    elif isinstance(value, list | tuple | set | frozenset):
        for i, item in enumerate(value):
            found = nul_at(item, f"{where}[{i}]")
            if found:
                return found
    return None


def decode_body(body: bytes, target: Any) -> Any:
    """``body`` as ``target``, strictly; the API's 4xx when it is not one."""
    try:
        value = msgspec.json.decode(body, type=target, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _AT_RE.search(text)
        error = {"message": text.split(" - ", maxsplit=1)[0], "key": match.group(1) if match else "data"}
        raise ValidationException(detail="invalid request body", extra=[{**error, "source": "body"}]) from None
    except msgspec.DecodeError as exc:
        raise ClientException(str(exc)) from None
    except RecursionError:
        raise ClientException("the request body nests too deeply") from None
    where = nul_at(value)
    if where is not None:
        raise Problem(
            422,
            f"invalid {where}: text must not contain the NUL character (\\u0000)",
            slug="invalid-text",
            errors=[{"message": "contains the NUL character", "key": where, "source": "body"}],
        )
    return value


class ApiRequest(Request[Any, Any, Any]):
    """litestar's request, with the JSON body decoded by :func:`decode_body` into the type of the
    handler's ``data`` parameter (a struct that litestar's own conversion then passes through)."""

    async def body(self) -> bytes:
        try:
            return await super().body()
        except RequestEntityTooLarge:
            raise Problem(
                413, f"the request body is over {MAX_BODY_BYTES} bytes (1 MiB)", slug="body-too-large"
            ) from None

    async def json(self) -> Any:
        if self._json is not Empty:
            return self._json
        if (cached := self._connection_state.json) is not Empty:
            self._json = cached
            return cached
        data = self.route_handler.parsed_fn_signature.parameters.get("data")
        target = data.annotation if data is not None else Any
        self._json = self._connection_state.json = decode_body(await self.body() or b"null", target)
        return self._json


def refuse_nul_in_query(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: a NUL character in a query parameter is a 400 naming it."""
    for key, value in request.query_params.multi_items():
        if NUL in key or NUL in value:
            name = key if NUL not in key else "query string"
            raise Problem(
                400,
                f"invalid {name}: text must not contain the NUL character (\\u0000)",
                slug="invalid-request",
                errors=[{"message": "contains the NUL character", "key": name, "source": "query"}],
            )
