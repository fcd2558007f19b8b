"""``terraform-provider-outboxrelay``: the plugin Terraform starts, plus an ``install`` helper.

usage:
  terraform-provider-outboxrelay install DIR [--cli-config FILE] [--executable PATH]
      put the provider into a filesystem mirror at DIR, runnable with this Python; with --cli-config
      also write a Terraform CLI configuration that sends Terraform to DIR for this provider (use it
      as TF_CLI_CONFIG_FILE=FILE)
  terraform-provider-outboxrelay --help
      this text
  terraform-provider-outboxrelay
      serve the plugin: only Terraform does that (it sets TF_PLUGIN_MAGIC_COOKIE), after
      `terraform init` found the provider in the mirror

The CLI configuration that --cli-config writes::

    provider_installation {
      filesystem_mirror { path = "DIR"  include = ["registry.terraform.io/outbox-relay/outboxrelay"] }
      direct { exclude = ["registry.terraform.io/outbox-relay/outboxrelay"] }
    }
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import terraform_provider_outboxrelay
from terraform_provider_outboxrelay import ADDRESS, EXECUTABLE, HOSTNAME, NAMESPACE, TYPE, VERSION

MAGIC_COOKIE_KEY = "TF_PLUGIN_MAGIC_COOKIE"
MAGIC_COOKIE_VALUE = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2"
"""go-plugin's handshake: Terraform sets this variable in every plugin it starts. ``tf``'s
``run_provider`` does not look at it and serves forever, so run by hand (``--help`` included) the
plugin would print its handshake line and hang; without the cookie we say what the command is for."""

NOT_BY_HAND = (
    "This is a Terraform plugin: Terraform starts it (it found no TF_PLUGIN_MAGIC_COOKIE, so Terraform did not).\n"
    f"Put it into a filesystem mirror with `{EXECUTABLE} install DIR --cli-config FILE`, then run\n"
    "`TF_CLI_CONFIG_FILE=FILE terraform init` where your configuration requires outbox-relay/outboxrelay.\n"
)

CLI_CONFIG = """\
provider_installation {{
  filesystem_mirror {{
    path    = "{mirror}"
    include = ["{provider}"]
  }}
  direct {{
    exclude = ["{provider}"]
  }}
}}
"""


def install(plugin_dir: Path, executable: Path) -> None:
    """Install ``executable`` (named ``terraform-provider-outboxrelay``) into a filesystem mirror."""
    from tf.runner import install_provider

    if executable.name != EXECUTABLE:
        raise ValueError(f"the executable must be named {EXECUTABLE}, not {executable.name}")
    install_provider(HOSTNAME, NAMESPACE, TYPE, VERSION, plugin_dir, executable)


def launcher() -> str:
    """A shell script running this provider with this interpreter, whichever environment that is and
    whether or not it is on PATH. The package's directory goes on PYTHONPATH when it is not installed
    (run from a checkout, as ``make terraform`` does), so a venv with an editable ``outbox-relay``
    needs nothing installed into it."""
    package_parent = Path(terraform_provider_outboxrelay.__file__).resolve().parent.parent
    installed = {Path(sysconfig.get_path(k)).resolve() for k in ("purelib", "platlib")}
    pythonpath = "" if package_parent in installed else f'PYTHONPATH="{package_parent}${{PYTHONPATH:+:$PYTHONPATH}}" '
    return f'#!/bin/sh\n{pythonpath}exec "{sys.executable}" -m terraform_provider_outboxrelay "$@"\n'


def write_cli_config(path: Path, mirror: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CLI_CONFIG.format(mirror=mirror.absolute(), provider=ADDRESS))


def _install_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{EXECUTABLE} install", description="Fill a filesystem mirror.")
    parser.add_argument("plugin_dir", type=Path, help="the mirror directory (created if missing)")
    parser.add_argument("--cli-config", type=Path, help="also write a Terraform CLI configuration using the mirror")
    parser.add_argument(
        "--executable", type=Path, help=f"the file to install, named {EXECUTABLE} (default: a launcher for this Python)"
    )
    args = parser.parse_args(argv)
    mirror: Path = args.plugin_dir.absolute()
    if args.executable is not None:
        install(mirror, args.executable.absolute())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / EXECUTABLE
            script.write_text(launcher())
            script.chmod(0o755)
            install(mirror, script)
    print(f"installed {ADDRESS} {VERSION} into {mirror}")
    if args.cli_config is not None:
        write_cli_config(args.cli_config, mirror)
        print(f"wrote the CLI configuration {args.cli_config.absolute()}; use it with")
        print(f"  export TF_CLI_CONFIG_FILE={args.cli_config.absolute()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    args = argv[1:]
    if args[:1] == ["install"]:
        return _install_command(args[1:])
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if "--dev" not in args and os.environ.get(MAGIC_COOKIE_KEY) != MAGIC_COOKIE_VALUE:
        # --dev is tf's debug mode: it prints TF_REATTACH_PROVIDERS for a Terraform run by hand
        print(NOT_BY_HAND + "\n" + __doc__.strip(), file=sys.stderr)
        return 1

    from tf.runner import run_provider

    from terraform_provider_outboxrelay.provider import OutboxRelayProvider

    run_provider(OutboxRelayProvider(), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
