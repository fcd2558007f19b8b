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
    (
        "ENDPOINT",
        "`http://127.0.0.1:8080`",
        "The API that `outbox-relay api` talks to (or `--endpoint`); not read by the service.",
    ),
    (
        "API_KEY",
        "unset",
        "The key `outbox-relay api` sends, a tenant's or the admin key (or `--api-key`); not read by the service.",
    ),
)
"""Variables read by the process entry points (``service/cli.py``, ``outbox_relay/store/migrate.py``,
``outbox_relay/cli_api.py``) rather than :class:`Settings`; ``tests/unit/test_settings_reference.py``
finds every ``OUTBOX_RELAY_*`` name the code reads and fails when one is missing here."""

HEADER = """# Configuration

Every setting is an environment variable, read once at start-up (`Settings.from_env`,
`outbox_relay/config.py`); a value that cannot be read stops the process with a message naming the
variable. Lists are comma-separated; booleans are `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`.
Durations carry their unit in the name. This page is written from `Settings` itself
(`make docs`); a test fails when the two differ.

The ones a deployment sets: `DATABASE_URL` (control DB), `REDIS_URL`, `ADMIN_API_KEY`,
`SECRET_KEYS` (comma-separated Fernet keys; the first encrypts, all decrypt: rotate by prepending;
`outbox-relay generate-key` makes one), and the per-tenant quota defaults `QUOTA_*`.

## Every variable
"""

FOOTER = """
`LOG_LEVEL`, `MIGRATIONS_DIR`, `ENDPOINT` and `API_KEY` are read by the process entry points rather
than `Settings`: the log level by `service/cli.py`, the migrations directory by
`outbox_relay/store/migrate.py`, the endpoint and the key by the `outbox-relay api` commands
(`outbox_relay/cli_api.py`).

## Outbound addresses

Every connection to a tenant's database or broker, and to every broker a Kafka cluster advertises
(`outbox_relay/netguard.py`), resolves the host once, checks every address (link-local,
metadata and unspecified addresses always refused; private and loopback ones unless
`ALLOW_PRIVATE_NETWORKS`; `DENIED_NETWORKS` always; IPv6 forms carrying an IPv4 address by that address)
and dials a checked IP, so a DNS answer that changes cannot steer it (a NATS target's reconnects too: the
relay dials them itself, not nats-py, which would also dial the servers a cluster advertises). TLS still
verifies the host name:
a DSN's `sslmode=verify-full` checks it against `sslrootcert` or the system trust store, and `rediss://`
checks it unless the URL says `ssl_check_hostname=false`.

## The commands

```sh
outbox-relay migrate   # apply control DB migrations
outbox-relay serve     # the API
outbox-relay worker    # one worker; run as many as you like
outbox-relay dev       # both, on local defaults (what `make run` runs)
```
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
    return "\n".join(lines) + "\n" + FOOTER


if __name__ == "__main__":
    print(reference(), end="")
