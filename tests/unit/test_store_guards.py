"""The control store's run-time guard on table names it interpolates into SQL."""

from __future__ import annotations

import pytest

from outbox_relay.store.control import RESOURCE_TABLES, _table


def test_resource_tables_pass_the_guard() -> None:
    assert RESOURCE_TABLES == {"databases", "targets", "relays", "alerts"}
    for table in RESOURCE_TABLES:
        assert _table(table) == table


@pytest.mark.parametrize("name", ["tenants", "api_keys", "relays; DROP TABLE tenants", "", "Relays"])
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a resource table"):
        _table(name)
