"""The exception tree (``outbox_relay.errors``): every exception class the project defines is in it
and drawn in its docstring; the API answers each one from one table (``service.problems.PROBLEMS``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

import outbox_relay
import service
import workers
from outbox_relay import errors
from outbox_relay.errors import (
    NotFound,
    OutboxRelayError,
    ReplayConflict,
    ReplayRefused,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (outbox_relay, service, workers)


def all_modules() -> list[ModuleType]:
    modules = []
    for package in PACKAGES:
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            modules.append(importlib.import_module(info.name))
    return modules


def tree(root: type[BaseException]) -> set[type[BaseException]]:
    out = {root}
    for sub in root.__subclasses__():
        out |= tree(sub)
    return out


def project_classes(root: type[BaseException]) -> set[type[BaseException]]:
    """The tree's classes defined in the project (a test's own subclasses do not count)."""
    names = tuple(p.__name__ for p in PACKAGES)
    return {cls for cls in tree(root) if cls.__module__.split(".")[0] in names}


def drawn(doc: str) -> set[str]:
    """The class names drawn in a docstring's tree: the word after a branch, and the root (a line of one word)."""
    found = re.findall(r"^(?:[│ ]*[├└]── ([A-Z]\w+)|([A-Z]\w+)[ \t]*$)", doc, flags=re.MULTILINE)
    return {branch or root for branch, root in found}


def foreign_exceptions(modules: list[ModuleType]) -> list[str]:
    """Exception classes a module defines (at any depth, read from the source) outside the tree."""
    found = []
    for module in modules:
        if module.__file__ is None:
            continue
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                if not issubclass(obj, OutboxRelayError):
                    found.append(f"{module.__name__}.{name}")
    return found


def test_every_class_of_the_tree_is_drawn_in_the_docstring() -> None:
    all_modules()  # every subclass is defined once its module is imported
    classes = project_classes(OutboxRelayError)
    assert len(classes) > 20
    missing = sorted(cls.__name__ for cls in classes if cls.__name__ not in drawn(errors.__doc__ or ""))
    assert missing == []


def test_the_docstring_draws_no_class_that_does_not_exist() -> None:
    all_modules()
    names = {cls.__name__ for cls in project_classes(OutboxRelayError)}
    assert drawn(errors.__doc__ or "") - names == set()


def test_no_module_defines_an_exception_outside_the_tree() -> None:
    assert foreign_exceptions(all_modules()) == []


def test_the_checks_see_a_class_outside_the_tree_and_one_not_drawn() -> None:
    class Stray(LookupError):
        pass

    Stray.__module__ = "outbox_relay.stray"
    stray = ModuleType("outbox_relay.stray")
    stray.__file__ = "stray.py"
    stray.Stray = Stray  # type: ignore[attr-defined]
    assert foreign_exceptions([stray]) == ["outbox_relay.stray.Stray"]
    assert "Stray" not in drawn(errors.__doc__ or "")
    assert drawn("Root\n├── Child    text\n│   └── Grandchild   more\nProse here.\n") == {"Root", "Child", "Grandchild"}


def test_moved_classes_are_the_same_objects_at_their_old_homes() -> None:
    from outbox_relay import cli_api, client, engine, replay
    from service.dead_letters import service as ops

    assert replay.ReplayRefused is ReplayRefused and replay.ReplayConflict is ReplayConflict
    assert client.ClientError is errors.ClientError and cli_api.ApiError is errors.ApiError
    assert engine.LeaseLost is errors.LeaseLost
    assert (ops.NotAllowed, ops.Conflict, ops.TooMany, ops.QueueUnavailable) == (
        errors.NotAllowed,
        errors.Conflict,
        errors.TooMany,
        errors.QueueUnavailable,
    )


def test_not_found_is_still_a_lookup_error_with_its_message_as_str() -> None:
    exc = NotFound("dead letter x not found")
    assert isinstance(exc, LookupError)
    assert str(exc) == "dead letter x not found"  # a KeyError would quote it


# --- the API's table ----------------------------------------------------------------------------------


def body(exc: Exception) -> tuple[int, dict[str, Any]]:
    from service.problems import problem_type

    entry = problem_type(exc)
    assert entry is not None
    response = entry.response(exc)
    return response.status_code, msgspec.json.decode(msgspec.json.encode(response.content))


def test_the_table_answers_each_dead_letter_error_as_the_handlers_did() -> None:
    from outbox_relay.errors import Conflict, NotAllowed, QueueUnavailable, TooMany

    expected = {
        NotFound("dead letter 1 not found"): (404, "not-found"),
        Conflict("dead letter 1 is replayed"): (409, "conflict"),
        ReplayConflict("dead letter 1 is replaying, not dead", status="replaying"): (409, "conflict"),
        NotAllowed("a tenant API key sees only its own tenant's dead letters"): (403, "forbidden"),
        TooMany("too many"): (422, "too-many"),
        QueueUnavailable("the job queue (Redis) is unavailable"): (503, "queue-unavailable"),
    }
    for exc, (status, slug) in expected.items():
        code, problem = body(exc)
        assert (code, problem["type"], problem["status"]) == (status, f"urn:outbox-relay:problem:{slug}", status)
        assert problem["detail"] == str(exc)
    assert body(NotFound("x"))[1]["title"] == "Not Found"


@pytest.mark.parametrize(
    ("error_class", "slug"),
    [("unroutable", "replay-unroutable"), ("too_large", "replay-too-large"), ("not_allowed", "replay-not-allowed")],
)
def test_a_refused_replay_takes_its_problem_type_from_its_error_class(error_class: str, slug: str) -> None:
    status, problem = body(ReplayRefused("no", error_class=error_class))
    assert (status, problem["type"]) == (422, f"urn:outbox-relay:problem:{slug}")


def test_a_subclass_answers_as_its_nearest_listed_ancestor() -> None:
    from service.problems import problem_type

    class Special(NotFound):
        pass

    assert problem_type(Special("x")) is problem_type(NotFound("x"))
    assert problem_type(OutboxRelayError("x")) is None


def test_every_table_class_has_a_handler_on_the_app_and_on_the_dashboard() -> None:
    from service.problems import EXCEPTION_HANDLERS, PROBLEMS, problem_handler
    from service.ui.controller import UIController
    from service.ui.responses import refusal

    assert len(PROBLEMS) > 10
    for cls in PROBLEMS:
        assert EXCEPTION_HANDLERS[cls] is problem_handler
        assert UIController.exception_handlers[cls] is refusal
