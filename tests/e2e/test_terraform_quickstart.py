"""deploy/README.md's three commands from a clone to ``terraform apply``, run as written (issue 17).

The lines of the block after the README's ``<!-- quickstart: ... -->`` comment run in one bash, in
a copy of the checkout's tracked files (what a clone has, with this working tree's changes), so the
test runs ``make terraform`` (and the ``make install`` it needs) from nothing. The one line it does
not run is ``make run``: the API is the tests' live server, as in ``test_terraform.py``, on a control
database of its own and with ``make run``'s admin key; the provider finds it through
``OUTBOX_RELAY_ENDPOINT``, as the README says for an API that is not on 8080. How long each command
took goes to ``test-output/terraform/quickstart/``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from outbox_relay.cli_api import ApiClient
from outbox_relay.config import PREFIX, Settings
from outbox_relay.store.migrate import migrate
from service.cli import DEV_ADMIN_KEY
from tests.conftest import DatabaseFactory, LiveServer, pg_dsn
from tests.deploy.tools import supported
from tests.e2e.terraform.harness import OUTPUT_DIR, REPO

pytestmark = pytest.mark.e2e

README = REPO / "deploy" / "README.md"
MARKER = "<!-- quickstart:"
SCRIPT_TIMEOUT_S = 900
STEP = "@@quickstart-step"


def quickstart() -> list[str]:
    """The command lines of the README's quickstart block."""
    text = README.read_text()
    block = text[text.index(MARKER) :]
    block = block[block.index("```sh\n") + len("```sh\n") :]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


@pytest.fixture
async def quickstart_api(databases: DatabaseFactory, settings: Settings) -> AsyncIterator[LiveServer]:
    """The API ``make run`` would serve: its admin key, a control database nobody else writes."""
    dsn = pg_dsn(await databases.create("quickstart"))
    await migrate(dsn)
    server = LiveServer(dataclasses.replace(settings, database_url=dsn, admin_api_key=DEV_ADMIN_KEY))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Path]:
    """The tracked files of this checkout, as they are in the working tree."""
    if not supported():
        pytest.skip("make terraform takes a Linux x86-64 Terraform")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60)
    root = tmp_path / "clone"
    for name in listed.stdout.decode().split("\0"):
        source = REPO / name
        if name and source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    yield root


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without this test run's venv, Terraform or Outbox Relay settings: a new shell."""
    venv_bin = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin")
    # VENV, PYTHON: `make test VENV=.venv-ci` (CI) exports its command-line variables to every recipe
    drop = ("TF_", PREFIX, "VIRTUAL_ENV", "VENV", "PYTHON", "MAKE", "MFLAGS", "UV_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if p and Path(p) != Path(venv_bin)]
    path = [p for p in path if not p.startswith(str(REPO))]
    env["PATH"] = ":".join(path)
    env["CHECKPOINT_DISABLE"] = "1"  # Terraform's update check
    return {**env, **extra}


def test_the_documented_commands_reach_terraform_apply(clone: Path, quickstart_api: LiveServer) -> None:
    commands = quickstart()
    assert len(commands) == 3, commands
    assert commands[0].startswith("make run ")  # served here by quickstart_api
    steps = []
    for n, line in enumerate(commands[1:], start=2):
        steps += [f'echo "{STEP} {n} $(date +%s.%N)"', line]
    script = "set -euo pipefail\n" + "\n".join(steps) + f'\necho "{STEP} end $(date +%s.%N)"\n'
    script += 'echo "TF_CLI_CONFIG_FILE=$TF_CLI_CONFIG_FILE"\n'

    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=clone,
        env=clean_env(OUTBOX_RELAY_ENDPOINT=quickstart_api.url),
        input="yes\n",  # terraform apply's "Enter a value:"
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    elapsed = time.monotonic() - started
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)  # the README's commands leave Terraform's colours on
    log_dir = OUTPUT_DIR / "quickstart"
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "output.txt").write_text(out)
    marks = [(m[1], float(m[2])) for m in re.finditer(rf"^{STEP} (\S+) (\S+)$", out, re.M)]
    times = [f"{b - a:7.1f} s  {commands[int(n) - 1]}" for (n, a), (_, b) in itertools.pairwise(marks)]
    (log_dir / "times.txt").write_text("\n".join([*times, f"{elapsed:7.1f} s  in all"]) + "\n")
    assert proc.returncode == 0, out

    assert "Apply complete! Resources: 2 added, 0 changed, 0 destroyed." in out, out
    assert "Warning:" not in out, out  # no lock-file or dev_overrides warning, from init or apply
    cli_config = clone / ".venv" / "terraform" / "terraformrc"
    assert f"CLI config: {cli_config}" in out  # make terraform prints where it is
    assert f"TF_CLI_CONFIG_FILE={cli_config}" in out
    assert f'path    = "{clone / ".venv" / "terraform" / "mirror"}"' in cli_config.read_text()
    assert (clone / "deploy/terraform/example/operator/.terraform.lock.hcl").exists()

    admin = ApiClient(endpoint=quickstart_api.url, api_key=DEV_ADMIN_KEY)
    assert admin.get("/v1/tenants/globex")["display_name"] == "Globex Corporation"
    assert [k["description"] for k in admin.get("/v1/tenants/globex/api-keys")] == ["terraform"]
