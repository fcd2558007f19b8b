"""The project's exception tree: every exception class the project defines is in it.

OutboxRelayError
├── ConfigError            settings that cannot work (raised at start-up)
├── AddressNotAllowed      a tenant-named host resolves into a denied network
├── InvalidSpec            a resource spec the relay must not use (a DSN parameter outside the
│   │                      allow-list, a port out of range ...; also a ValueError)
│   ├── InvalidDatabaseSpec  a database's (outbox_relay.specs.check_database)
│   └── InvalidTargetSpec    a target's (outbox_relay.specs.check_target)
├── InvalidFilter          a relay filter that breaks a rule; says which and where (also a ValueError)
├── InvalidRequest         input the schema could not check (a pagination cursor the service did
│                          not issue ...; also a ValueError)
├── PublishError           raised by broker adapters (outbox_relay.brokers)
│   ├── TargetUnavailable  the broker cannot be reached: pause, charge no attempt
│   └── MessageRejected    the broker refused this message: charge an attempt
├── TenantDatabaseError    the tenant database cannot be reached or queried
├── ProvisionFailed        the outbox could not be installed into a tenant database
│   └── MissingPrivileges  the connecting role lacks privileges (all of them listed)
├── InUse                  a resource a relay still uses cannot be deleted
├── QuotaExceeded          creating this would take a tenant past one of its quotas
├── OutOfBounds            a setting beyond what the service allows (the operator's bounds)
├── UnknownReference       a relay names a database or target the tenant does not have (also a
│                          LookupError)
├── ImmutableField         a change to a relay field fixed at creation (also a ValueError)
├── RelayChanged           a relay written back after a read changed or went meanwhile (nothing written)
├── LeaseLost              the partition's lease was taken over mid-slice (internal to the engine)
├── NotFound               no such dead letter or replay job for this caller (also a LookupError)
├── NotAllowed             a tenant key asked for another tenant's dead letters
├── Conflict               the dead letter is not in a state the action applies to
├── TooMany                a bulk action over more letters (or a replay over more rows) than one job takes
├── ReplaysInFlight        a tenant already has as many replays from history in flight as it may
├── QueueUnavailable       the job could not be queued (Redis)
├── ReplayError            a dead letter could not be replayed (outbox_relay.replay)
│   ├── ReplayRefused      nothing attempted: nowhere valid to go (``error_class`` says why)
│   └── ReplayConflict     the letter is not dead (any more)
├── ClientError            bad input to the client library, refused before any SQL
│                          (outbox_relay.client; also a ValueError)
├── ApiError               the API answered the CLI with an error status (outbox_relay.cli_api)
├── ApiUnreachable         the CLI got no HTTP answer at all (outbox_relay.cli_api)
│
│   Defined in service/, because they need litestar (this module imports only outbox_relay.domain):
├── Problem                an HTTP error with a problem type, raised by handlers (service.problems;
│                          also litestar's HTTPException)
└── SignInRequired         the dashboard has no valid session: redirect to sign-in (service.ui.auth)

How the API answers each one (status, problem type, title) is one table, ``service.problems.PROBLEMS``;
how the dashboard shows them, ``service.ui.responses.UI_REFUSALS``. The old homes re-export the classes
that moved here (``outbox_relay.replay``, ``outbox_relay.client``, ``outbox_relay.cli_api``,
``outbox_relay.engine``, ``service.dead_letters.service``).
"""

from __future__ import annotations

from outbox_relay.domain import ErrorClass


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


class InvalidDatabaseSpec(InvalidSpec):
    """A database spec the relay refuses (the API's ``invalid-dsn``)."""


class InvalidTargetSpec(InvalidSpec):
    """A target spec the relay refuses (the API's ``invalid-target``)."""


class InvalidRequest(OutboxRelayError, ValueError):
    """Bad input that the request's schema could not catch (a pagination cursor this service did not
    issue, an unknown dead-letter status)."""


class PublishError(OutboxRelayError):
    """A broker adapter could not publish."""


class TargetUnavailable(PublishError):
    """The broker is unreachable or timed out; no message is to blame.

    The relay pauses the partition with backoff and charges no attempt to any message.
    ``retry_after_s``, when the target said how long to stay away (an HTTP ``Retry-After``, bounded
    by the adapter), is that pause instead (:meth:`pause_s`).
    """

    retry_after_s: float | None = None

    def pause_s(self, backoff_s: float, *, floor_s: float) -> float:
        """The pause before the next try: the target's ``retry_after_s`` (at least ``floor_s``, so a
        ``Retry-After: 0`` loops no faster than the relay's first backoff) when it gave one, else
        ``backoff_s``."""
        return backoff_s if self.retry_after_s is None else max(self.retry_after_s, floor_s)


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


class UnknownReference(OutboxRelayError, LookupError):
    """A relay names a database or target that the tenant does not have."""


class ImmutableField(OutboxRelayError, ValueError):
    """A change to a relay field that is fixed at creation (``partitions``, ``database``)."""


class LeaseLost(OutboxRelayError):
    """The partition's lease was taken over mid-slice; the engine drops the slice (never seen outside it)."""


# --- dead letters and replay (raised by service.dead_letters.service and outbox_relay.replay) ------


class InvalidFilter(OutboxRelayError, ValueError):
    """A relay filter that breaks a rule (:mod:`outbox_relay.filters`); the message says which and
    where (``filter.any[1].not``)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where


class RelayChanged(OutboxRelayError):
    """A relay written back after a read (``put_relay(expect_updated_at=...)``, the dashboard's pause
    and resume) was changed or deleted in between: nothing was written."""


class NotFound(OutboxRelayError, LookupError):
    """No such dead letter or replay job for this caller (another tenant's reads as missing); also the
    caller's own tenant, deleted while its request ran."""


class NotAllowed(OutboxRelayError):
    """A tenant key asked for another tenant's letters."""


class Conflict(OutboxRelayError):
    """The letter is not in a state the action applies to."""


class TooMany(OutboxRelayError):
    """A bulk action over more letters than one job takes."""


class ReplaysInFlight(OutboxRelayError):
    """The tenant already has ``limit`` replays from history queued or running (``in_flight``)."""

    def __init__(self, *, limit: int, in_flight: int) -> None:
        super().__init__(
            f"this tenant has {in_flight} replays in flight and may have {limit} at once; "
            "wait for one to finish (GET /v1/dead-letters/replay-jobs lists them)"
        )
        self.limit, self.in_flight = limit, in_flight


class QueueUnavailable(OutboxRelayError):
    """The job could not be queued (Redis)."""


class ReplayError(OutboxRelayError):
    """A dead letter could not be replayed."""


class ReplayRefused(ReplayError):
    """Nothing was attempted: the replay has nowhere valid to go (``error_class`` says why:
    ``unroutable``, ``too_large`` or ``not_allowed``; the API's problem type is ``replay-<error class>``)."""

    def __init__(self, message: str, *, error_class: ErrorClass = ErrorClass.UNROUTABLE) -> None:
        super().__init__(message)
        self.error_class = error_class


class ReplayConflict(ReplayError):
    """The letter is not dead (any more): being replayed, replayed or discarded."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


# --- the client library and the CLI -------------------------------------------------------------------


class ClientError(OutboxRelayError, ValueError):
    """Bad input, refused before touching the database (or a connection the client cannot use)."""


class ApiError(OutboxRelayError):
    """The API answered with an error status; ``detail`` is the problem's detail when it sent one."""

    def __init__(self, status: int, detail: str, *, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {detail}".strip())
        self.status, self.detail, self.method, self.path = status, detail, method, path


class ApiUnreachable(OutboxRelayError):
    """No HTTP answer at all (connection refused, timeout, bad endpoint)."""
