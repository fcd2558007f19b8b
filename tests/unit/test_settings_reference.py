"""docs/configuration.md is written from Settings: a field added without a line there, or a changed
default or docstring, fails here (``make docs`` rewrites it). Variables the entry points read
themselves (``OUTBOX_RELAY_LOG_LEVEL`` in ``service/cli.py``, ...) are found in the code and must be
listed too."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from outbox_relay.config import PREFIX, Settings
from outbox_relay.settings_reference import PROCESS_VARIABLES, field_docs, reference

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
CODE = ("outbox_relay", "service", "workers")
LISTED = re.compile(rf"^\| `({PREFIX}[A-Z0-9_]+)` \|", re.MULTILINE)


def variables_in_code() -> dict[str, str]:
    """Every ``OUTBOX_RELAY_*`` name the code spells out as a string (``os.environ.get(...)``, a
    constant), with the file it is in; docstrings and messages that merely mention one do not count."""
    found: dict[str, str] = {}
    for package in CODE:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if re.fullmatch(rf"{PREFIX}[A-Z0-9_]+", node.value):
                        found.setdefault(node.value, str(path.relative_to(ROOT)))
    return found


def test_the_committed_reference_is_the_generated_one() -> None:
    assert DOC.read_text() == reference(), "docs/configuration.md is stale: run `make docs`"


def test_every_setting_has_a_line_and_a_description() -> None:
    listed = LISTED.findall(DOC.read_text())
    docs = field_docs()
    for f in dataclasses.fields(Settings):
        assert f"{PREFIX}{f.name.upper()}" in listed, f.name
        assert docs.get(f.name), f"Settings.{f.name} has no docstring"
    for name in ("CONNECT_TIMEOUT_S", "SCHEDULE_INTERVAL_S", "WORKER_MAX_JOBS", "METRICS_HOST", "WORKER_ID"):
        assert f"{PREFIX}{name}" in listed  # the ones the README used to leave out


def test_every_variable_the_code_reads_is_listed() -> None:
    found = variables_in_code()
    assert f"{PREFIX}LOG_LEVEL" in found  # service/cli.py reads it itself, not through Settings
    listed = LISTED.findall(DOC.read_text())
    missing = {name: path for name, path in found.items() if name not in listed}
    assert not missing, f"read by the code but not in docs/configuration.md (PROCESS_VARIABLES): {missing}"


def test_every_listed_variable_is_read_somewhere() -> None:
    settings = {f"{PREFIX}{f.name.upper()}" for f in dataclasses.fields(Settings)}
    found = variables_in_code()
    for name in LISTED.findall(DOC.read_text()):
        assert name in settings or name in found, f"{name} is documented but nothing reads it"
    assert len(PROCESS_VARIABLES) == len({name for name, _, _ in PROCESS_VARIABLES})
