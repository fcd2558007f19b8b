"""A relay's status, as the API shows it: computed in the core (:mod:`outbox_relay.status`), where the
workers' alert evaluation reads the same stall cause (the layering keeps ``workers`` from ``service``)."""

from __future__ import annotations

from outbox_relay.status import (
    LEASE_GRACE as LEASE_GRACE,
)
from outbox_relay.status import (
    RECENT as RECENT,
)
from outbox_relay.status import (
    Cause as Cause,
)
from outbox_relay.status import (
    PartitionStatus as PartitionStatus,
)
from outbox_relay.status import (
    RelayOverview as RelayOverview,
)
from outbox_relay.status import (
    RelayStatus as RelayStatus,
)
from outbox_relay.status import (
    RestoreStatus as RestoreStatus,
)
from outbox_relay.status import (
    RetryingMessage as RetryingMessage,
)
from outbox_relay.status import (
    State as State,
)
from outbox_relay.status import (
    TenantOverview as TenantOverview,
)
from outbox_relay.status import (
    partition_cause as partition_cause,
)
from outbox_relay.status import (
    partition_restore as partition_restore,
)
from outbox_relay.status import (
    partition_status as partition_status,
)
from outbox_relay.status import (
    relay_restore as relay_restore,
)
from outbox_relay.status import (
    relay_status as relay_status,
)
