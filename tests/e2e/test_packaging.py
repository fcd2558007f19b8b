"""The package as users get it: an sdist and a wheel built with a standard PEP 517 front end, installed
into empty virtual environments, far from this checkout.

* The client: the wheel without extras installs into an empty venv with msgspec as its only
  dependency (plus asyncpg, the tenant's own driver), runs ``examples/write_asyncpg.py`` against a
  scratch database, and type-checks (``py.typed``).
* The server: the wheel with the ``server`` extra migrates a scratch control DB with
  ``outbox-relay migrate`` and nothing else (the migrations are package data, no
  ``OUTBOX_RELAY_MIGRATIONS_DIR``).

The tools: ``uv build`` (what ``make dist`` runs) builds the sdist, then the wheel from the unpacked
sdist, so a file the sdist lacks is missing from the wheel too; ``uv venv`` makes a venv with nothing in
it (not even pip), ``uv pip install`` installs into it. uv is pinned by the lock and already here. The
installs are constrained to the lock's versions (``uv export``) and tried offline first, from uv's cache
that ``make install`` filled; only what is not cached comes from PyPI.
"""

from __future__ import annotations

import email
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from outbox_relay.store.migrate import MIGRATIONS, discover
from tests.conftest import RUN_ID, DatabaseFactory, LiveServer, pg_dsn
from tests.helpers import ADMIN_KEY

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def run(cmd: Sequence[str | Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False, **kw)


def uv(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """uv offline first (its cache has the lock's packages and the build backend), then online: a
    machine that ran ``make install`` needs no network, a cold cache fetches from PyPI."""
    for offline in (["--offline"], []):
        proc = run([UV, *args, *offline], cwd=ROOT)
        if proc.returncode == 0:
            return proc
    raise AssertionError(f"uv {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing that would lead Python or uv back to this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "UV_", "OUTBOX_RELAY_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return {**env, **extra}


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path
    constraints: Path
    """The lock's versions of the server's dependencies (msgspec, asyncpg and the rest)."""


@dataclass(frozen=True)
class Venv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def install(self, *requirements: str, constraints: Path) -> None:
        uv("pip", "install", "--python", self.python, "-c", constraints, *requirements)

    def distributions(self) -> set[str]:
        """What is installed in the venv, by normalized project name."""
        code = (
            "import importlib.metadata as m, json; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
        )
        proc = run([self.python, "-I", "-c", code], env=clean_env())
        assert proc.returncode == 0, proc.stderr
        return {re.sub(r"[-_.]+", "-", name).lower() for name in json.loads(proc.stdout)}


@functools.cache
def source_files() -> list[str]:
    """The checkout's files as a clone of it would have them (uncommitted edits too): those git tracks or
    would track, none it ignores."""
    proc = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return sorted(name for name in proc.stdout.split("\0") if name and (ROOT / name).is_file())


def packaged() -> set[str]:
    """Every file of the three packages: code, SQL, templates, static assets, ``py.typed``."""
    return {name for name in source_files() if name.split("/")[0] in ("outbox_relay", "service", "workers")}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """Built from a copy of the source files, as from a fresh clone: the checkout's own
    ``outbox_relay.egg-info`` (from the editable install) would lend the sdist files the configuration
    does not name, and hide their absence."""
    tree, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in source_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    uv("build", "--python", sys.executable, "--out-dir", out, tree)
    constraints = out / "constraints.txt"
    uv("export", "--frozen", "--no-hashes", "--no-emit-project", "--extra", "server", "-o", constraints)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dist(sdist, wheel, constraints)


def make_venv(path: Path) -> Venv:
    uv("venv", "--python", sys.executable, path)
    return Venv(path)


def wheel_requirement(dist: Dist, extra: str | None = None) -> str:
    """A direct reference to the built wheel (PEP 508), as pip takes it too."""
    return f"outbox-relay{f'[{extra}]' if extra else ''} @ {dist.wheel.as_uri()}"


@pytest.fixture(scope="module")
def client_venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    venv = make_venv(tmp_path_factory.mktemp("client") / "venv")
    # asyncpg is the tenant's driver for the example, not a dependency of the client
    venv.install(wheel_requirement(dist), "asyncpg", constraints=dist.constraints)
    return venv


def test_the_sdist_and_the_wheel_carry_what_an_install_needs(dist: Dist) -> None:
    assert dist.sdist.name == f"outbox_relay-{VERSION}.tar.gz"
    assert dist.wheel.name == f"outbox_relay-{VERSION}-py3-none-any.whl"
    migrations = [str(path.relative_to(ROOT)) for _, _, path in discover(MIGRATIONS)]
    assert migrations and set(migrations) <= packaged()
    assert {"outbox_relay/py.typed", "outbox_relay/tenant/schema.sql"} <= packaged()
    with tarfile.open(dist.sdist) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert not {"LICENSE", "pyproject.toml", "README.md", *packaged()} - in_sdist
    with zipfile.ZipFile(dist.wheel) as wheel:
        in_wheel = set(wheel.namelist())
        metadata = email.message_from_bytes(wheel.read(f"outbox_relay-{VERSION}.dist-info/METADATA"))
    # every file of the packages, the data too (migrations, schema.sql, templates, py.typed), and no other
    assert {name for name in in_wheel if ".dist-info/" not in name} == packaged()
    assert f"outbox_relay-{VERSION}.dist-info/licenses/LICENSE" in in_wheel
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Version"] == VERSION
    # without extras the package is the client: msgspec is its one unconditional dependency
    unconditional = [r for r in metadata.get_all("Requires-Dist", []) if "extra ==" not in r]
    assert [re.split(r"[ <>=;\[]", r)[0] for r in unconditional] == ["msgspec"], unconditional
    assert "server" in metadata.get_all("Provides-Extra", [])


async def test_the_client_wheel_alone_runs_the_asyncpg_example(
    client_venv: Venv, databases: DatabaseFactory, tmp_path: Path
) -> None:
    assert client_venv.distributions() == {"outbox-relay", "msgspec", "asyncpg"}
    env = clean_env()
    where = run(
        [client_venv.python, "-I", "-c", "import outbox_relay.client as c; print(c.__file__); import litestar"],
        env=env,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(client_venv.root)), where.stdout + where.stderr
    assert "No module named 'litestar'" in where.stderr  # the service's dependencies are not there

    dsn = pg_dsn(await databases.create("client_wheel"))
    code = "from outbox_relay.client import schema_sql; print(schema_sql())"
    schema = run([client_venv.python, "-I", "-c", code], env=env, cwd=tmp_path)
    assert schema.returncode == 0, schema.stderr
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(schema.stdout)  # the installed package's own schema.sql
    finally:
        await conn.close()

    example = run(
        [client_venv.python, ROOT / "examples" / "write_asyncpg.py"], env=clean_env(DATABASE_URL=dsn), cwd=tmp_path
    )
    assert example.returncode == 0, example.stderr
    match = re.fullmatch(r"order (\d+): outbox messages ([0-9a-f-]{36}(?:, [0-9a-f-]{36})*)\n", example.stdout)
    assert match, example.stdout
    message_ids = [uuid.UUID(i) for i in match[2].split(", ")]
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT message_id, topic, key, payload FROM outbox_relay.outbox WHERE message_id = ANY($1::uuid[]) "
            "ORDER BY id",
            message_ids,
        )
    finally:
        await conn.close()
    assert [row["message_id"] for row in rows] == message_ids
    assert [row["topic"] for row in rows] == ["orders", "invoices", "emails"]
    assert msgspec.json.decode(rows[0]["payload"]) == {"id": int(match[1]), "state": "paid"}


def test_the_client_wheel_drives_the_api_and_names_the_server_extra(
    client_venv: Venv, live_api: LiveServer, tmp_path: Path
) -> None:
    """``outbox-relay api`` is standard library only, so it works where the client is installed alone;
    the server's commands say which extra they need instead of a traceback."""
    command = client_venv.root / "bin" / "outbox-relay"
    env = clean_env(OUTBOX_RELAY_ENDPOINT=live_api.url, OUTBOX_RELAY_API_KEY=ADMIN_KEY)
    name = f"wheel-{RUN_ID}"
    put = run([command, "api", "tenants", "put", name, "--display-name", "From the wheel"], env=env, cwd=tmp_path)
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["display_name"] == "From the wheel"
    assert run([command, "api", "tenants", "delete", name], env=env, cwd=tmp_path).returncode == 0
    # (not migrate: it needs only asyncpg, which this venv has as the example's driver)
    for server_command in ("serve", "worker", "generate-key"):
        proc = run([command, server_command], env=env, cwd=tmp_path)
        assert proc.returncode == 2 and "pip install 'outbox-relay[server]'" in proc.stderr, proc.stderr


def test_tenants_type_check_against_the_installed_client(client_venv: Venv, tmp_path: Path) -> None:
    """With ``py.typed`` mypy reads the installed client's annotations: a wrong use is an error of the
    tenant's code, not "missing library stubs or py.typed marker"."""
    tenant = tmp_path / "tenant.py"
    tenant.write_text(
        "from outbox_relay.client import Message, encode_payload\n"
        "\n"
        'message = Message("orders", "order-1", {"id": 1})\n'
        "body: bytes = encode_payload(message.payload)\n"
        "topic: int = message.topic\n"
    )
    mypy = Path(sys.executable).parent / "mypy"
    proc = run(
        [mypy, "--strict", "--no-incremental", "--python-executable", client_venv.python, tenant.name],
        cwd=tmp_path,
        env=clean_env(),
    )
    assert "py.typed" not in proc.stdout, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("tenant.py:5:"), proc.stdout
    assert 'has type "str", variable has type "int"' in errors[0]


async def test_the_server_wheel_migrates_a_scratch_control_db(
    dist: Dist, databases: DatabaseFactory, tmp_path: Path
) -> None:
    venv = make_venv(tmp_path / "venv")
    venv.install(wheel_requirement(dist, "server"), constraints=dist.constraints)
    dsn = pg_dsn(await databases.create("server_wheel"))
    env = clean_env(OUTBOX_RELAY_DATABASE_URL=dsn)  # and no OUTBOX_RELAY_MIGRATIONS_DIR
    command = [venv.root / "bin" / "outbox-relay", "migrate"]

    first = run(command, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    conn = await asyncpg.connect(dsn)
    try:
        applied = [(r["version"], r["name"]) for r in await conn.fetch("SELECT version, name FROM schema_migrations")]
        assert sorted(applied) == [(version, name) for version, name, _ in discover(MIGRATIONS)]
        second = run(command, env=env, cwd=tmp_path)
        assert second.returncode == 0 and "none pending" in second.stderr, second.stderr
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(applied)
    finally:
        await conn.close()
