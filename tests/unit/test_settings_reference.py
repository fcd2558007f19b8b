"""docs/configuration.md is written from Settings: a field added without a line there, or a changed
default or docstring, fails here (``make docs`` rewrites it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from outbox_relay.config import PREFIX, Settings
from outbox_relay.settings_reference import field_docs, reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_committed_reference_is_the_generated_one() -> None:
    assert DOC.read_text() == reference(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_has_a_line_and_a_description() -> None:
    text = DOC.read_text()
    docs = field_docs()
    for f in dataclasses.fields(Settings):
        assert f"`{PREFIX}{f.name.upper()}`" in text, f.name
        assert docs.get(f.name), f"Settings.{f.name} has no docstring"
    for name in ("LOG_LEVEL", "MIGRATIONS_DIR"):
        assert f"`{PREFIX}{name}`" in text
