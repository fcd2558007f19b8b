"""Control DB access: tenants, API keys, tenant resources, relay partitions (cursor + lease).

Every tenant-scoped query carries ``tenant_id`` in its WHERE clause: there is no method that
reads a tenant resource by name alone. Cursor writes are fenced by the lease epoch.
"""

from __future__ import annotations

from outbox_relay.store.alerts import AlertsStore
from outbox_relay.store.partitions import PartitionsStore
from outbox_relay.store.resources import ResourcesStore
from outbox_relay.store.rotations import RotationsStore
from outbox_relay.store.rows import (
    HELD_BY_LEASE as HELD_BY_LEASE,
)
from outbox_relay.store.rows import (
    KEEP as KEEP,
)
from outbox_relay.store.rows import (
    KEY_PREFIX as KEY_PREFIX,
)
from outbox_relay.store.rows import (
    RESOURCE_TABLES as RESOURCE_TABLES,
)
from outbox_relay.store.rows import (
    ApiKeyRow as ApiKeyRow,
)
from outbox_relay.store.rows import (
    KeyOwner as KeyOwner,
)
from outbox_relay.store.rows import (
    Lease as Lease,
)
from outbox_relay.store.rows import (
    PartitionState as PartitionState,
)
from outbox_relay.store.rows import (
    RelayPlan as RelayPlan,
)
from outbox_relay.store.rows import (
    ResourceRow as ResourceRow,
)
from outbox_relay.store.rows import (
    ResourceTable as ResourceTable,
)
from outbox_relay.store.rows import (
    RestorePhase as RestorePhase,
)
from outbox_relay.store.rows import (
    RestorePolicy as RestorePolicy,
)
from outbox_relay.store.rows import (
    RestoreState as RestoreState,
)
from outbox_relay.store.rows import (
    RetryState as RetryState,
)
from outbox_relay.store.rows import (
    TenantQuotas as TenantQuotas,
)
from outbox_relay.store.rows import (
    TenantRow as TenantRow,
)
from outbox_relay.store.rows import (
    UISession as UISession,
)
from outbox_relay.store.rows import (
    Unchanged as Unchanged,
)
from outbox_relay.store.rows import (
    _resource as _resource,
)
from outbox_relay.store.rows import (
    _select as _select,
)
from outbox_relay.store.rows import (
    _table as _table,
)
from outbox_relay.store.rows import (
    _tenant as _tenant,
)
from outbox_relay.store.rows import (
    control_unavailable as control_unavailable,
)
from outbox_relay.store.rows import (
    hash_key as hash_key,
)
from outbox_relay.store.rows import (
    lease_of as lease_of,
)
from outbox_relay.store.tenants import TenantsStore


class ControlStore(TenantsStore, ResourcesStore, PartitionsStore, RotationsStore, AlertsStore):
    """Every store of the control DB over one pool: tenants and keys (:class:`TenantsStore`), resources
    (:class:`ResourcesStore`), the data plane's partitions and leases (:class:`PartitionsStore`), credential
    rotations (:class:`RotationsStore`), alert channels and quota refusals (:class:`AlertsStore`); the dead
    letters are :class:`~outbox_relay.store.dead_letters.DeadLetterStore`."""
