"""Every relative link in the repository's Markdown leads to a file of the repository (and, into a
Markdown file, to one of its headings): nothing points outside the checkout (``../shared/...``) or at a
file that moved. Links with a scheme (``https:``, ``mailto:``) are not followed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {"test-output", "node_modules", "build", "dist", "__pycache__"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+[\"'(][^)]*)?\)")
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def markdown_files() -> list[Path]:
    """The repository's Markdown: what git tracks or would track (not what .gitignore hides, such as
    .venv), or, outside a git checkout, every file below the root but hidden and build directories."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.md"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return sorted({ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()})
    except (OSError, subprocess.CalledProcessError):
        return sorted(
            path
            for path in ROOT.rglob("*.md")
            if not any(part.startswith(".") or part in SKIPPED_DIRS for part in path.relative_to(ROOT).parts[:-1])
        )


def prose_lines(text: str, *, blank_code: bool = True) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their numbers, inline code spans blanked (unless not
    ``blank_code``)."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match[1]
        elif fence is not None and match and match[1][0] == fence[0] and len(match[1]) >= len(fence):
            fence = None
        elif fence is None:
            lines.append((number, CODE_SPAN.sub("", line) if blank_code else line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(), blank_code=False):
        match = HEADING.match(line)
        if match:
            base = slug(match[1].replace("`", ""))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    found.update(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", path.read_text()))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for number, line in prose_lines(path.read_text()):
        for pattern in (INLINE, DEFINITION, HTML):
            for target in pattern.findall(line):
                found.append((number, target.strip("<>")))
    return found


def broken_links(path: Path) -> list[str]:
    problems: list[str] = []
    where = path.relative_to(ROOT)
    for number, target in links(path):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        if not file_part:
            resolved = path
        elif file_part.startswith("/"):
            resolved = (ROOT / file_part.lstrip("/")).resolve()
        else:
            resolved = (path.parent / file_part).resolve()
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{where}:{number}: {target} points outside the repository")
        elif not resolved.exists():
            problems.append(f"{where}:{number}: {target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
            problems.append(f"{where}:{number}: {target}: {resolved.relative_to(ROOT)} has no heading #{anchor}")
    return problems


def test_the_checker_finds_links_and_anchors() -> None:
    sample = ROOT / "README.md"
    assert any(target.startswith("docs/") for _, target in links(sample))
    assert "quick-start-your-first-relayed-message" in anchors(sample)
    assert "sqlalchemy-session" in anchors(ROOT / "docs" / "client.md")
    assert prose_lines("a\n```sh\n[x](nowhere.md)\n```\n`[y](nowhere.md)` b") == [(1, "a"), (5, " b")]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_lead_into_the_repository(path: Path) -> None:
    assert not broken_links(path)


def test_nothing_refers_to_the_old_shared_directory() -> None:
    for path in markdown_files():
        assert "../shared/" not in path.read_text(), f"{path.relative_to(ROOT)} refers to ../shared/"
