"""The OpenAPI document of the app, as committed in ``openapi/openapi.json``.

    python -m service.openapi > openapi/openapi.json     (or: make openapi)

``tests/api/test_openapi.py`` fails when the committed file and the running app disagree.
"""

from __future__ import annotations

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


def render() -> bytes:
    """Stable text: sorted keys, two-space indent, trailing newline."""
    return msgspec.json.format(msgspec.json.encode(spec(), order="sorted"), indent=2) + b"\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(render())
