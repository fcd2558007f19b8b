"""Property-based tests from the committed OpenAPI document against the live API (schemathesis).

Every generated request, valid or not, must get an answer the document describes, and never a 5xx:
as a tenant and as the operator (admin key), in every phase. Per operation: the examples, the
coverage phase (boundary and wrong-type values for every parameter and field) and fuzzing; then
the stateful phase: sequences of calls along the links schemathesis infers between operations
(PUT a resource, then GET, PUT again, DELETE it, use it from a relay ...), with its checks that
a created resource can be read and a deleted one cannot.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from schemathesis.engine import events

from tests.helpers import ADMIN_KEY, LiveServer

ROLES = ("tenant", "admin")
# Not checked: a schema-valid body may still be refused with 422 (a host that does not resolve, a
# relay naming a database that does not exist), and litestar's query decoding is lax (it ignores
# unknown query parameters and takes 0/1 for booleans). Unknown body fields, wrong types and
# out-of-range values are refused: tests/api/test_resources.py, tests/api/test_input_validation.py.
EXCLUDED_CHECKS = [positive_data_acceptance, negative_data_rejection]


@pytest.fixture(scope="session")
def tenant_key(live_api: LiveServer) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.put(f"{live_api.url}/v1/tenants/fuzz", json={"display_name": "fuzz"}, headers=admin)
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{live_api.url}/v1/tenants/fuzz/api-keys", json={"description": "fuzz"}, headers=admin)
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


@pytest.fixture(params=ROLES)
def api_key(request: pytest.FixtureRequest, tenant_key: str) -> str:
    """The key every request of the test carries: a tenant's, or the admin key."""
    return tenant_key if request.param == "tenant" else ADMIN_KEY


# The committed document (equal to the served one: test_openapi.py). Not from_fixture: schemathesis
# 4.32's from_fixture breaks under pytest 9 ('Function' object has no attribute '_nodeid').
SPEC = Path(__file__).parents[2] / "openapi" / "openapi.json"
schema = schemathesis.openapi.from_path(SPEC)
schema.config.phases.update(phases=["examples", "coverage", "fuzzing", "stateful"])


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms(case: Any, live_api: LiveServer, api_key: str) -> None:
    case.call_and_validate(
        base_url=live_api.url, headers={"Authorization": f"Bearer {api_key}"}, excluded_checks=EXCLUDED_CHECKS
    )


def run_stateful_phase(base_url: str, key: str, *, max_examples: int) -> tuple[list[str], Counter[str]]:
    """The stateful phase as ``schemathesis run --phases=stateful`` runs it: the failures, and the
    responses by operation and status (``PUT /v1/targets/{name} 201``).

    Through the engine rather than a hypothesis state machine in the test: the API keeps state
    between scenarios (a name PUT once answers 200, not 201, the next time), which the engine
    tolerates as flakiness of the generator while a bare state machine run stops on it.
    """
    stateful = schemathesis.openapi.from_path(SPEC)
    stateful.config.update(base_url=base_url, headers={"Authorization": f"Bearer {key}"})
    stateful.config.phases.update(phases=["stateful"])
    stateful.config.checks.update(excluded_check_names=[check.__name__ for check in EXCLUDED_CHECKS])
    stateful.config.generation.update(max_examples=max_examples)
    failures: list[str] = []
    answered: Counter[str] = Counter()
    for event in schemathesis.engine.from_schema(stateful).execute():
        if isinstance(event, events.ScenarioFinished):
            for case_id, interaction in event.recorder.interactions.items():
                if interaction.response is not None:
                    label = event.recorder.cases[case_id].value.operation.label
                    answered[f"{label} {interaction.response.status_code}"] += 1
            for checks in event.recorder.checks.values():
                failures += [
                    f"{check.name}: {check.failure_info.failure.title}\n{check.failure_info.code_sample}"
                    for check in checks
                    if check.failure_info is not None
                ]
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"{type(event).__name__}: {getattr(event, 'value', getattr(event, 'exception', event))!r}")
    return failures, answered


@pytest.mark.slow
def test_stateful_workflows_conform(live_api: LiveServer, api_key: str) -> None:
    """Sequences of calls chained by the inferred links; about a minute per role on 2 cores."""
    failures, answered = run_stateful_phase(live_api.url, api_key, max_examples=80)
    # the scenarios reached the API with the role's key, and chained calls that succeeded
    assert sum(n for label, n in answered.items() if label.endswith((" 200", " 201", " 204"))) > 20, answered
    assert not failures, "\n\n".join(dict.fromkeys(failures))
