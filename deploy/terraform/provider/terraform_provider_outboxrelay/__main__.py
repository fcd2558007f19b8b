"""``terraform-provider-outboxrelay``: the plugin Terraform starts, plus an ``install`` helper.

    terraform-provider-outboxrelay                      serve the plugin (Terraform runs this)
    terraform-provider-outboxrelay install DIR          put it into a filesystem mirror at DIR
        [--executable PATH]                             (default: this command, as found on PATH)

A mirror lets ``terraform init`` install ``outbox-relay/outboxrelay`` as if it were published;
point Terraform at it with a CLI configuration (``TF_CLI_CONFIG_FILE``)::

    provider_installation {
      filesystem_mirror { path = "DIR"  include = ["registry.terraform.io/outbox-relay/outboxrelay"] }
      direct { exclude = ["registry.terraform.io/outbox-relay/outboxrelay"] }
    }
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from terraform_provider_outboxrelay import EXECUTABLE, HOSTNAME, NAMESPACE, TYPE, VERSION


def install(plugin_dir: Path, executable: Path) -> None:
    """Install ``executable`` (named ``terraform-provider-outboxrelay``) into a filesystem mirror."""
    from tf.runner import install_provider

    if executable.name != EXECUTABLE:
        raise ValueError(f"the executable must be named {EXECUTABLE}, not {executable.name}")
    install_provider(HOSTNAME, NAMESPACE, TYPE, VERSION, plugin_dir, executable)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and argv[1] == "install":
        parser = argparse.ArgumentParser(prog=f"{EXECUTABLE} install", description="Fill a filesystem mirror.")
        parser.add_argument("plugin_dir", type=Path)
        parser.add_argument("--executable", type=Path, default=None)
        args = parser.parse_args(argv[2:])
        found = args.executable or shutil.which(EXECUTABLE)
        if not found:
            print(f"{EXECUTABLE} is not on PATH; pass --executable", file=sys.stderr)
            return 2
        install(args.plugin_dir, Path(found).absolute())
        print(f"installed {HOSTNAME}/{NAMESPACE}/{TYPE} {VERSION} into {args.plugin_dir}")
        return 0

    from tf.runner import run_provider

    from terraform_provider_outboxrelay.provider import OutboxRelayProvider

    run_provider(OutboxRelayProvider(), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
