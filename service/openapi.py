"""The OpenAPI document of the app, as committed in ``openapi/openapi.json``.

    python -m service.openapi > openapi/openapi.json     (or: make openapi)

``tests/api/test_openapi.py`` fails when the committed file and the running app disagree.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import msgspec

from outbox_relay.config import Settings
from outbox_relay.crypto import generate_key


def spec() -> dict[str, Any]:
    from service.app import create_app

    app = create_app(Settings(secret_keys=(generate_key(),), admin_api_key="unused"))
    document: dict[str, Any] = app.openapi_schema.to_schema()
    return document


PROSE_KEYS = frozenset({"description", "summary"})


def normalized(node: Any) -> Any:
    """The document with its prose in one form: every ``description`` and ``summary`` dedented
    (``inspect.cleandoc``), so a library that strips a docstring's indentation differently (msgspec
    0.23 does) changes no byte of the committed file and no comparison of the drift test."""
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v) if k in PROSE_KEYS and isinstance(v, str) else normalized(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [normalized(v) for v in node]
    return node


def render() -> bytes:
    """Stable text: prose normalized, sorted keys, two-space indent, trailing newline."""
    return msgspec.json.format(msgspec.json.encode(normalized(spec()), order="sorted"), indent=2) + b"\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(render())
