"""The provider's command line as a person runs it, not Terraform (issue 17: ``--help`` printed a
plugin handshake line and hung; ``install`` failed unless the venv was on PATH).

Each command runs with a PATH that has no venv on it and a bounded timeout, so a command that
serves instead of answering fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.e2e.terraform.harness import PROVIDER_SRC

TIMEOUT_S = 30
BARE_PATH = "/usr/bin:/bin"
MODULE_DIR = Path("registry.terraform.io/outbox-relay/outboxrelay")


def provider(*args: str, home: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m terraform_provider_outboxrelay ARGS`` from this checkout, as ``make terraform`` runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "VIRTUAL_ENV"))}
    env.update(PATH=BARE_PATH, HOME=str(home), PYTHONPATH=str(PROVIDER_SRC))
    return subprocess.run(
        [sys.executable, "-m", "terraform_provider_outboxrelay", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def test_help_prints_usage_and_exits(tmp_path: Path) -> None:
    for flag in ("--help", "-h"):
        proc = provider(flag, home=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("``terraform-provider-outboxrelay``")
        assert "usage:" in proc.stdout and "install DIR [--cli-config FILE]" in proc.stdout
        assert "|grpc|" not in proc.stdout  # no plugin handshake


def test_run_by_hand_says_what_it_is_instead_of_serving(tmp_path: Path) -> None:
    proc = provider(home=tmp_path)
    assert proc.returncode == 1
    assert "This is a Terraform plugin: Terraform starts it" in proc.stderr
    assert "install DIR --cli-config FILE" in proc.stderr
    assert proc.stdout == ""  # no handshake line: nothing listens


def test_install_needs_nothing_on_path_and_writes_the_cli_config(tmp_path: Path) -> None:
    mirror, rc = tmp_path / "mirror", tmp_path / "conf" / "terraformrc"
    proc = provider("install", "mirror", "--cli-config", "conf/terraformrc", home=tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"installed registry.terraform.io/outbox-relay/outboxrelay 0.1.0 into {mirror}" in proc.stdout
    assert f"export TF_CLI_CONFIG_FILE={rc}" in proc.stdout
    config = rc.read_text()
    assert f'path    = "{mirror}"' in config  # absolute, whatever the working directory was
    assert 'include = ["registry.terraform.io/outbox-relay/outboxrelay"]' in config

    # what Terraform would unpack and start: a launcher that runs with a bare PATH
    archive = mirror / MODULE_DIR / "terraform-provider-outboxrelay_0.1.0_linux_amd64.zip"
    with zipfile.ZipFile(archive) as zf:
        (name,) = zf.namelist()
        assert name == "terraform-provider-outboxrelay_v0.1.0"
        launcher = Path(zf.extract(name, tmp_path / "unpacked"))
    launcher.chmod(0o755)
    proc = subprocess.run(
        [str(launcher), "--help"],
        env={"PATH": BARE_PATH, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
