"""What a maintainer relies on without reading it: the version is written once (``pyproject.toml``),
and the pre-commit hooks are ``make lint``, so a commit that passes them passes CI's lint too.

The built artefacts themselves (sdist, wheel, installing them) are tested in tests/e2e/test_packaging.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

import outbox_relay

ROOT = Path(__file__).resolve().parents[2]


def test_the_version_is_the_one_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert outbox_relay.__version__ == project["version"], "stale install: run `make install`"
    written = [
        str(path.relative_to(ROOT))
        for package in ("outbox_relay", "service", "workers")
        for path in sorted((ROOT / package).rglob("*.py"))
        if re.search(r"^__version__\s*=", path.read_text(), re.MULTILINE)
    ]
    assert written == [], "the version is read from the package metadata, not written again"


def lint_recipe() -> list[str]:
    """The commands of the Makefile's ``lint`` target, with ``$(BIN)`` as the default ``.venv/bin``."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("lint:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().replace("$(BIN)", ".venv/bin"))
    return recipe


def test_the_pre_commit_hooks_are_make_lint() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    assert [hook["entry"] for hook in hooks] == lint_recipe()
    # like make lint: the whole tree (mypy's packages from pyproject.toml), not just the staged files
    assert all(hook["pass_filenames"] is False and hook["language"] == "system" for hook in hooks)
