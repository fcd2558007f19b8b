"""The settings reference (``docs/configuration.md``), written from :class:`~outbox_relay.config.Settings`
itself: every field, its environment variable, default and docstring, so the document cannot miss one
(``tests/unit/test_settings_reference.py`` compares the committed file with this).

``python -m outbox_relay.settings_reference > docs/configuration.md`` (``make docs``) writes it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from outbox_relay import config
from outbox_relay.config import PREFIX, Settings

PROCESS_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("LOG_LEVEL", "INFO", "The log level of `outbox-relay serve`, `worker` and `dev` (Python's level names)."),
    (
        "MIGRATIONS_DIR",
        "the package's own",
        "Where `outbox-relay migrate` finds the control DB's migrations; unset, the ones shipped in the package "
        "(`outbox_relay/store/migrations/`).",
    ),
)
"""Variables read by the process entry points rather than :class:`Settings`."""

HEADER = """# Configuration

Every setting is an environment variable, read once at start-up (`Settings.from_env`,
`outbox_relay/config.py`); a value that cannot be read stops the process with a message naming the
variable. Lists are comma-separated; booleans are `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`.
Durations carry their unit in the name. This page is written from `Settings` itself
(`make docs`); a test fails when the two differ.
"""


def field_docs() -> dict[str, str]:
    """Each Settings field's docstring (the string literal right after it in the class body)."""
    tree = ast.parse(inspect.getsource(config))
    docs: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == Settings.__name__:
            body = node.body
            for here, after in zip(body, [*body[1:], None], strict=True):
                if (
                    isinstance(here, ast.AnnAssign)
                    and isinstance(here.target, ast.Name)
                    and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                ):
                    docs[here.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _default(f: dataclasses.Field[object]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
        if value is None or value == ():
            return "unset"
        if isinstance(value, bool):
            return "true" if value else "false"
        return f"`{value}`"
    return "per process (see text)"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def reference() -> str:
    docs = field_docs()
    lines = [HEADER, "| variable | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        lines.append(f"| `{PREFIX}{f.name.upper()}` | {_default(f)} | {_one_line(docs.get(f.name, ''))} |")
    for name, default, text in PROCESS_VARIABLES:
        lines.append(f"| `{PREFIX}{name}` | {default} | {_one_line(text)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
