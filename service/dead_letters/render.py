"""Safe renderings of a stored payload for people: JSON indented, text with its control characters
made visible, anything else as a hex dump. The bytes as stored are always available beside them
(``base64`` in the API, a download in the dashboard); these renderings are for reading only."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

import msgspec

DISPLAY_LIMIT = 256 * 1024
"""Render at most this many bytes of a payload; the rest is cut (and says so)."""
PREVIEW_CHARS = 120
_KEEP = {"\n", "\t"}

PayloadKind = Literal["json", "text", "binary"]


@dataclass(frozen=True, slots=True)
class Rendered:
    kind: PayloadKind
    size: int
    text: str | None
    """The payload as UTF-8 text, exactly, when it is valid UTF-8."""
    display: str
    truncated: bool


def visible(text: str) -> str:
    """Control, format (bidi overrides, zero-width) and other unprintable characters as ``\\u....``
    escapes, so what is shown is what is there; newlines and tabs stay."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in _KEEP else f"\\u{ord(c):04x}" for c in text)


def kind_of(payload: bytes) -> PayloadKind:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    try:
        msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return "binary" if "\x00" in text else "text"
    return "json"


def hexdump(data: bytes) -> str:
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in row)
        chars = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{offset:08x}  {hexes:<47}  |{chars}|")
    return "\n".join(lines)


def render(payload: bytes) -> Rendered:
    kind = kind_of(payload)
    head = payload[:DISPLAY_LIMIT]
    truncated = len(payload) > DISPLAY_LIMIT
    text = payload.decode("utf-8") if kind != "binary" else None
    if kind == "json" and not truncated:
        display = visible(msgspec.json.format(payload, indent=2).decode())
    elif kind == "binary":
        display = hexdump(head)
    else:
        display = visible(head.decode("utf-8", "replace"))
    return Rendered(kind=kind, size=len(payload), text=text, display=display, truncated=truncated)


def preview(head: bytes, size: int) -> str:
    """One line for a list: the start of the text (JSON compacted), or what the bytes are."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the head
            return f"binary, {size:,} bytes"
        text = head[: exc.start].decode("utf-8")
    if "\x00" in text:
        return f"binary, {size:,} bytes"
    line = " ".join(text.split())
    if len(line) > PREVIEW_CHARS:
        line = line[: PREVIEW_CHARS - 1] + "…"
    elif size > len(head):
        line += "…"
    return visible(line) if line else "(empty)"


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()
