"""What the control store raises for a tenant or a reference that is not there: the tree's classes,
which the API answers from its table (a plain LookupError was a 500 on every route but one)."""

from __future__ import annotations

import uuid

import pytest

from outbox_relay.config import Settings
from outbox_relay.errors import NotFound, UnknownReference
from outbox_relay.store.control import ControlStore

QUOTAS = Settings().quota_defaults()


async def test_creating_for_a_tenant_that_is_gone_raises_not_found(store: ControlStore) -> None:
    gone = uuid.uuid4()
    with pytest.raises(NotFound, match="the tenant does not exist"):
        await store.put_target(gone, "t", "rabbitmq", b"{}", None, quotas=QUOTAS)
    with pytest.raises(NotFound, match="the tenant does not exist"):
        await store.put_database(gone, "d", b"{}", None, quotas=QUOTAS)
    with pytest.raises(NotFound, match="the tenant does not exist"):
        await store.create_api_key(gone, "k", quotas=QUOTAS)


async def test_a_relay_naming_a_missing_database_raises_unknown_reference(store: ControlStore) -> None:
    tenant, _ = await store.put_tenant(f"store-errors-{uuid.uuid4().hex[:8]}", "store errors")
    with pytest.raises(UnknownReference, match="database 'nope' does not exist"):
        await store.put_relay(
            tenant.id, "r", b"{}", database="nope", target="nope", partitions=1, enabled=False, quotas=QUOTAS
        )
