"""The project's exception tree.

OutboxRelayError
├── ConfigError            settings that cannot work (raised at start-up)
├── AddressNotAllowed      a tenant-named host resolves into a denied network
├── InvalidSpec            a resource spec the relay must not use (a DSN parameter outside the
│                          allow-list, a port out of range ...; also a ValueError)
├── PublishError           raised by broker adapters (outbox_relay.brokers)
│   ├── TargetUnavailable  the broker cannot be reached: pause, charge no attempt
│   └── MessageRejected    the broker refused this message: charge an attempt
├── TenantDatabaseError    the tenant database cannot be reached or queried
├── ProvisionFailed        the outbox could not be installed into a tenant database
│   └── MissingPrivileges  the connecting role lacks privileges (all of them listed)
├── InUse                  a resource a relay still uses cannot be deleted
├── QuotaExceeded          creating this would take a tenant past one of its quotas
├── OutOfBounds            a setting beyond what the service allows (the operator's bounds)
└── ClientError            bad input to the client library, refused before any SQL
                           (outbox_relay.client; also a ValueError)
"""

from __future__ import annotations


class OutboxRelayError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(OutboxRelayError):
    """Settings that cannot work."""


class AddressNotAllowed(OutboxRelayError):
    """A host named by a tenant resolves to an address in a denied network."""


class InvalidSpec(OutboxRelayError, ValueError):
    """A tenant resource spec that the relay refuses to use, whoever wrote it and when.

    ``field`` names the spec's field at fault (``dsn``, ``url``, ``bootstrap_servers[3]`` ...);
    ``reason`` says what is wrong with it, for the tenant. Raised when the API writes a spec (422)
    and again before a worker hands a stored spec to a driver (one written before a check existed).
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid {field}: {reason}")
        self.field = field
        self.reason = reason


class PublishError(OutboxRelayError):
    """A broker adapter could not publish."""


class TargetUnavailable(PublishError):
    """The broker is unreachable or timed out; no message is to blame.

    The relay pauses the partition with backoff and charges no attempt to any message.
    """


class MessageRejected(PublishError):
    """The broker refused one message (unroutable, too large, not authorised...).

    ``index`` is the position in the batch of the refused message.
    """

    def __init__(self, message: str, *, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class TenantDatabaseError(OutboxRelayError):
    """The tenant's database refused the connection or the query."""


class ProvisionFailed(OutboxRelayError):
    """Installing the outbox into a tenant database failed; the message says why, for the tenant."""


class MissingPrivileges(ProvisionFailed):
    """The tenant's database role lacks privileges the relay needs; found before anything changed.
    ``missing`` has one entry per privilege: ``privilege``, ``object`` and ``grant`` (the SQL to run)."""

    def __init__(self, message: str, *, missing: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.missing = missing


class InUse(OutboxRelayError):
    """A database or target cannot be deleted while a relay still refers to it."""


class QuotaExceeded(OutboxRelayError):
    """Creating a resource would take the tenant past a quota: ``quota`` names it (``relays``,
    ``databases``, ``targets``, ``partitions``, ``api_keys``), ``limit`` is the tenant's limit, ``used``
    what it uses now and ``requested`` what the refused request would have added."""

    def __init__(self, *, quota: str, limit: int, used: int, requested: int = 1) -> None:
        super().__init__(
            f"quota exceeded: this tenant may have {limit} {quota.replace('_', ' ')} and has {used}; "
            f"this request needs {requested} more (delete some, or ask the operator for a higher quota)"
        )
        self.quota, self.limit, self.used, self.requested = quota, limit, used, requested


class OutOfBounds(OutboxRelayError):
    """A field's value is beyond the bound the operator set for the service (``field`` as a JSON path
    inside the resource, e.g. ``policy.poll_interval_ms``; ``limit`` the bound)."""

    def __init__(self, message: str, *, field: str, limit: int) -> None:
        super().__init__(message)
        self.field, self.limit = field, limit
