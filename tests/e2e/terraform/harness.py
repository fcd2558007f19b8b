"""A real Terraform CLI driving the provider from this checkout, offline.

The provider is installed into a filesystem mirror the way ``make terraform`` does it
(``python -m terraform_provider_outboxrelay install MIRROR --cli-config FILE``: a launcher that runs
the provider with this interpreter from this checkout), and that CLI configuration
(``TF_CLI_CONFIG_FILE``) sends Terraform to the mirror, so ``terraform init`` installs it as it would
a published provider while no registry is reachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.tools import TERRAFORM, fetch

REPO = Path(__file__).resolve().parents[3]
PROVIDER_SRC = REPO / "deploy" / "terraform" / "provider"
EXAMPLE = REPO / "deploy" / "terraform" / "example"
OUTPUT_DIR = Path(os.environ.get("OUTBOX_RELAY_TEST_OUTPUT", "test-output")) / "terraform"
COMMAND_TIMEOUT_S = 120
FLAGS = {
    **{c: ("-no-color", "-input=false") for c in ("init", "plan", "apply", "destroy", "import")},
    "fmt": ("-no-color",),
    "output": ("-no-color",),
}


class Toolchain:
    """Terraform plus a mirror holding the provider, in one scratch directory."""

    def __init__(self, config: pytest.Config, root: Path) -> None:
        self.binary = fetch(TERRAFORM, config)
        self.root = root
        self.home = root / "home"  # the provider caches its TLS certificate under ~/.cache
        self.home.mkdir()
        self.cli_config = root / "terraform.tfrc"
        subprocess.run(
            [sys.executable, "-m", "terraform_provider_outboxrelay", "install", str(root / "mirror"),
             "--cli-config", str(self.cli_config)],
            env={**os.environ, "PYTHONPATH": str(PROVIDER_SRC)},
            check=True,
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
        )  # fmt: skip

    def workspace(self, name: str, source: Path, env: dict[str, str]) -> Workspace:
        workdir = self.root / name
        shutil.copytree(source, workdir, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*", "operator"))
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "TF_CLI_CONFIG_FILE": str(self.cli_config),
            "CHECKPOINT_DISABLE": "1",
            "TF_IN_AUTOMATION": "1",
        }
        return Workspace(self.binary, workdir, {**base, **env}, OUTPUT_DIR / name)


class Workspace:
    """One Terraform working directory; every command's output is kept under ``test-output/``."""

    def __init__(self, binary: Path, workdir: Path, env: dict[str, str], log_dir: Path) -> None:
        self.binary, self.workdir, self.env, self.log_dir = binary, workdir, env, log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def run(self, *args: str, expect: int | tuple[int, ...] = 0, **env: str) -> str:
        """Run ``terraform ARGS``; its combined output. Fails the test on another exit code."""
        self._n += 1
        cmd = [str(self.binary), *args[:1], *FLAGS.get(args[0], ()), *args[1:]]
        proc = subprocess.run(
            cmd,
            cwd=self.workdir,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        (self.log_dir / f"{self._n:02d}-{args[0]}.txt").write_text(f"$ terraform {' '.join(args)}\n{proc.stdout}")
        codes = (expect,) if isinstance(expect, int) else expect
        assert proc.returncode in codes, f"terraform {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}"
        return proc.stdout

    def plan(self, *args: str, changes: bool, **env: str) -> str:
        """``terraform plan -detailed-exitcode``: exit 0 means no changes, 2 means changes."""
        return self.run("plan", "-detailed-exitcode", *args, expect=2 if changes else 0, **env)

    def write(self, name: str, text: str) -> None:
        (self.workdir / name).write_text(text)

    def remove(self, name: str) -> None:
        (self.workdir / name).unlink()
