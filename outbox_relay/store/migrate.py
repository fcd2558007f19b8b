"""Apply ``migrations/NNNN_*.sql`` to the control DB in order, once each, under an advisory lock.

Plain versioned SQL rather than a migration framework: the control DB has one owner (this
service), migrations only go forward, and every file runs in its own transaction.

The files are package data (``outbox_relay/store/migrations/``), so an installed wheel migrates as
the checkout does; ``OUTBOX_RELAY_MIGRATIONS_DIR`` points elsewhere (a test's own set, a hotfix).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

LOCK_KEY = 0x6F75_7462_6F78  # "outbox"
_FILE_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
"""The migrations shipped with this package (next to this module in a checkout and in a wheel)."""


def migrations_dir() -> Path:
    override = os.environ.get("OUTBOX_RELAY_MIGRATIONS_DIR")
    if override:
        return Path(override)
    return MIGRATIONS


def discover(directory: Path | None = None) -> list[tuple[int, str, Path]]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.iterdir()):
        m = _FILE_RE.match(path.name)
        if m:
            found.append((int(m.group(1)), path.name, path))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {directory}")
    if not found:
        raise RuntimeError(f"no migrations found in {directory}")
    return found


async def migrate(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the names applied. Safe to run from many processes."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, name text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, name, path in discover(directory):
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
                applied.append(name)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await conn.close()


async def ensure_database(dsn: str) -> bool:
    """Create the control database named in ``dsn`` if it does not exist (local runs, tests)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    name = urlsplit(dsn).path.lstrip("/")
    if not re.match(r"^[A-Za-z0-9_]+$", name):
        raise RuntimeError(f"refusing to create a database named {name!r}")
    admin = await asyncpg.connect(dsn, database="postgres", timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    return True
