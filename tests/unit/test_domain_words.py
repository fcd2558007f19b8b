"""The domain's words (``outbox_relay.domain``): one type each, the wire values unchanged, and no module
spelling the distinctive ones as bare strings."""

from __future__ import annotations

import ast
from enum import StrEnum
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from outbox_relay import domain
from outbox_relay.domain import (
    CauseKind,
    CauseKindName,
    ErrorClass,
    JobStatus,
    JobStatusName,
    LetterStatus,
    LetterStatusName,
    PartitionErrorClass,
    SliceOutcome,
)
from outbox_relay.store.dead_letters import STATUSES

ROOT = Path(__file__).resolve().parents[2]

WIRE = {
    # stored in the control DB or shown by the API: these strings never change
    ErrorClass: ["refused", "too_large", "unavailable", "unroutable", "not_allowed"],
    PartitionErrorClass: ["target_unavailable", "database_unavailable", "refused", "error"],
    CauseKind: [
        "target_unreachable",
        "database_unreachable",
        "poison_message",
        "long_running_transaction",
        "lease_lost",
    ],
    SliceOutcome: ["ran", "busy", "gone", "lost", "changed"],
    LetterStatus: ["dead", "replaying", "replayed", "discarded"],
    JobStatus: ["queued", "running", "done", "failed"],
}


@pytest.mark.parametrize("enum", list(WIRE), ids=lambda e: e.__name__)
def test_the_wire_values_are_the_ones_stored_and_shown(enum: type[StrEnum]) -> None:
    assert [member.value for member in enum] == WIRE[enum]
    assert all(str(member) == member.value and f"{member}" == member.value for member in enum)


@pytest.mark.parametrize(
    ("literal", "enum"),
    [(CauseKindName, CauseKind), (LetterStatusName, LetterStatus), (JobStatusName, JobStatus)],
    ids=["CauseKind", "LetterStatus", "JobStatus"],
)
def test_each_schema_literal_lists_exactly_its_enums_values(literal: Any, enum: type[StrEnum]) -> None:
    assert sorted(get_args(literal)) == sorted(member.value for member in enum)


def test_the_schemas_use_the_domains_literals() -> None:
    from service.dead_letters import schemas
    from service.relays.status import Cause

    assert schemas.Status is LetterStatusName and schemas.JobStatus is JobStatusName
    assert Cause.__annotations__["kind"] == "CauseKindName"
    assert STATUSES == tuple(LetterStatus)


def test_a_member_encodes_and_a_stored_string_decodes_as_the_same_value() -> None:
    class Row(msgspec.Struct):
        status: LetterStatus
        error_class: str

    encoded = msgspec.json.encode(Row(status=LetterStatus.REPLAYING, error_class=ErrorClass.TOO_LARGE))
    assert encoded == b'{"status":"replaying","error_class":"too_large"}'
    assert msgspec.json.decode(encoded, type=Row) == Row(status=LetterStatus.REPLAYING, error_class="too_large")
    assert ErrorClass("unavailable") is ErrorClass.UNAVAILABLE


def test_the_synonyms_are_documented_where_they_are_defined() -> None:
    source = (ROOT / "outbox_relay/domain.py").read_text()
    for line in (
        '#   PartitionErrorClass.TARGET_UNAVAILABLE  "target_unavailable"',
        '#   CauseKind.TARGET_UNREACHABLE            "target_unreachable"',
        '#   ErrorClass.UNAVAILABLE                  "unavailable"',
    ):
        assert line in source


# the words no other value shares: outside domain.py a bare string of one is a synonym in the making
DISTINCTIVE = {
    m.value
    for m in (*PartitionErrorClass, *CauseKind, ErrorClass.TOO_LARGE, ErrorClass.UNROUTABLE, ErrorClass.NOT_ALLOWED)
    if m.value not in ("refused", "error")
}


def bare_words(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(root)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in DISTINCTIVE
    ]


def test_no_module_spells_a_domain_word_as_a_bare_string() -> None:
    found = []
    for package in ("outbox_relay", "service", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != Path(domain.__file__):
                found += bare_words(path)
    assert found == []


def test_the_check_finds_a_bare_word(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text('kind = "target_unreachable"\nother = "target unreachable"\n')
    assert bare_words(source, tmp_path) == ["x.py:1: 'target_unreachable'"]
