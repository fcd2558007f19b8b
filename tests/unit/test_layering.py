"""The package layers: ``outbox_relay`` (the core: engine, stores, brokers, client) imports neither
``service`` (the API and dashboard) nor ``workers`` (arq); ``workers`` does not import ``service``.
Only the process entry point (``service.cli``) puts the API and a worker together.

Read from the source (every ``import``, also inside functions), so a lazy import cannot hide."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "outbox_relay": {"service", "workers"},
    "workers": {"service"},
}
ENTRY_POINTS = {Path("service/cli.py")}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative in ENTRY_POINTS:
            continue
        bad = imported_packages(path) & FORBIDDEN[package]
        if bad:
            found.append(f"{relative} imports {', '.join(sorted(bad))}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(package: str) -> None:
    assert violations(package) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text("def run():\n    from service.app import create_app\n    import workers.settings\n")
    assert imported_packages(source) >= {"service", "workers"}


HARNESS = "tests.harness"
"""What ``bench/`` may import from ``tests``: the shared harness (brokers, the live server, the webhook
receiver), never a test module or the tests' own helpers."""


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "tests" and node.level == 0:
            out.update(f"tests.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def outside_the_harness(path: Path) -> set[str]:
    return {
        name
        for name in imported_modules(path)
        if name.split(".")[0] == "tests" and name != HARNESS and not name.startswith(HARNESS + ".")
    }


def test_the_benches_import_from_tests_only_the_harness() -> None:
    found = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        bad = outside_the_harness(path)
        if bad:
            found.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(bad))}")
    assert found == []


def test_the_bench_check_sees_a_test_module(tmp_path: Path) -> None:
    source = tmp_path / "bench.py"
    source.write_text(
        "from tests.harness.brokers import free_port\n"
        "def run():\n    from tests.helpers import wait_for\n    import tests.servers\n"
        "from tests import harness, webhooks\n"
    )
    assert outside_the_harness(source) == {"tests.helpers", "tests.servers", "tests.webhooks"}


def test_the_console_script_is_the_entry_point_outside_the_core() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'outbox-relay = "service.cli:main"' in text


def test_every_end_to_end_module_carries_the_e2e_marker() -> None:
    """``make test-fast`` deselects ``e2e``: a module under tests/e2e without it runs there."""
    unmarked = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "tests" / "e2e").glob("test_*.py"))
        if "pytest.mark.e2e" not in path.read_text()
    ]
    assert unmarked == []


ASYNCPG_HOMES = ("outbox_relay/store/", "outbox_relay/tenant/", "outbox_relay/client/")
"""Where asyncpg may be imported: the control DB's stores, the tenant database's access and the
tenant-side client library (which drives the tenant's own asyncpg connection)."""


def test_only_the_store_and_tenant_modules_import_asyncpg() -> None:
    found = []
    for package in ("outbox_relay", "service", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative.as_posix().startswith(ASYNCPG_HOMES):
                continue
            if "asyncpg" in imported_packages(path):
                found.append(str(relative))
    assert found == []


MAX_FUNCTION_LINES = 60
"""A function a newcomer can read at once: none in the packages is longer (docstring included)."""


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_packages_is_over_60_lines() -> None:
    long = [
        f"{package}/{where}"
        for package in ("outbox_relay", "service", "workers")
        for where in long_functions(ROOT / package)
    ]
    assert not long, long


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long() -> None:\n{body}\n")
    assert long_functions(tmp_path) == ["long.py:1 long (61 lines)"]
