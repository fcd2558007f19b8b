"""Settings, read from the environment (``OUTBOX_RELAY_*``), one dataclass for the whole service.

Durations carry their unit in the name. ``Settings.from_env()`` validates up front so a bad
setting stops the process at start-up with a clear message rather than at the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from outbox_relay.errors import ConfigError

PREFIX = "OUTBOX_RELAY_"
QUOTAS = ("relays", "databases", "targets", "partitions", "api_keys")
"""The per-tenant quotas: each has a default here (``quota_<name>``) and a per-tenant override."""
TENANT_COMMAND_TIMEOUT_FLOOR_S = 30.0
"""The relay waits this long (or ``connect_timeout_s``, if longer) for any one statement on a tenant
database before it cancels it (asyncpg's ``command_timeout``)."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/outbox_relay"
    """The control DB."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """The workers' job queue (arq): replay jobs and the maintenance cron."""
    admin_api_key: str | None = None
    """Operator key (tenant management). No admin API when unset."""
    secret_keys: tuple[str, ...] = ()
    """Fernet keys (comma-separated in the environment); the first encrypts, all decrypt."""
    allow_private_networks: bool = False
    """Let tenants name hosts in private and loopback ranges (local runs, tests)."""
    denied_networks: tuple[str, ...] = ()
    """Extra CIDRs to deny beyond the built-in link-local and metadata ranges."""
    connect_timeout_s: float = 5.0
    """How long a connection to a tenant database or broker may take (each address), and the
    LISTEN connection's probe."""
    queue_name: str = "outbox-relay"
    """The arq queue (and cron job names): deployments sharing one Redis database need different ones."""
    slice_s: float = 15.0
    """How long ``RelayRunner.run_slice`` keeps a partition (the per-slice engine, kept for tests)."""
    lease_ttl_s: float = 10.0
    """A worker's ownership of its partitions lapses this long after its last heartbeat (it
    heartbeats every third of it); a SIGTERMed worker gives them back at once."""
    schedule_interval_s: float = 1.0
    """The per-slice scheduler's tick (``RelayRunner.run_slice``, kept for tests; the fleet data
    plane does not use it)."""
    worker_max_jobs: int = 500
    """arq jobs (replays, maintenance) one worker runs at once."""
    max_batches_in_flight: int = 64
    """Per worker: batches published at once, shared out among tenants in weighted round robin."""
    safety_poll_s: float = 300.0
    """How often a relay reads its outbox without being woken while LISTEN/NOTIFY is healthy (the
    LISTEN connection also probes the outbox's newest row every 15 s and wakes the relays when
    something was committed that no notification told of)."""
    maintenance_interval_s: float = 3600.0
    """How often each tenant outbox is maintained (daily partitions made a week ahead, passed ones
    dropped); the job runs every minute and takes the share of databases that fell due."""
    control_pool_size: int = 5
    """Connections a worker holds to the control DB: a pool of this size less one, plus one LISTEN."""
    tenant_pool_size: int = 2
    """Connections a worker holds per tenant server, database and credentials (plus one LISTEN)."""
    tenant_statement_timeout_s: float = 60.0
    """``statement_timeout`` of the relay's own sessions on tenant databases (pools, LISTEN, provision):
    the server ends a statement of the relay that runs longer, even when the worker that sent it is
    gone. At least 30 s and ``connect_timeout_s``: the relay itself gives up on a statement after that
    long, so the server never cuts one the relay still waits for."""
    tenant_idle_in_transaction_timeout_s: float = 15.0
    """``idle_in_transaction_session_timeout`` of the relay's own sessions on tenant databases: a
    transaction of the relay (provision, a partition drop under the outbox's exclusive lock) whose
    worker stopped answering is ended after this long, so it never holds the tenant's writers back
    for longer. The relay sends a transaction's statements back to back; at least 1 s."""
    host: str = "127.0.0.1"
    """The API's listen address (``outbox-relay serve``)."""
    port: int = 8080
    """The API's port."""
    metrics_port: int = 0
    """A worker's Prometheus scrape port (0: none; the API serves /metrics itself)."""
    metrics_host: str = "127.0.0.1"
    """The address a worker's scrape port listens on."""
    worker_id: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    """A worker's name in the membership table, logs and status (default: host name and pid)."""

    # --- what one tenant may cost the shared service (defaults; the operator overrides them per tenant)
    quota_relays: int = 50
    """Relays per tenant."""
    quota_databases: int = 20
    """Registered databases per tenant."""
    quota_targets: int = 20
    """Targets per tenant."""
    quota_partitions: int = 1024
    """Relay partitions per tenant, summed over its relays (each one a lease row the scheduler visits)."""
    quota_api_keys: int = 20
    """Live (unrevoked) API keys per tenant."""
    min_poll_interval_ms: int = 100
    """The shortest ``policy.poll_interval_ms`` a relay may ask for: every poll is a query on the tenant
    database and a scheduler visit."""
    max_relay_partitions: int = 256
    """The most partitions one relay may have (the API's hard bound is 1024)."""
    replay_max_rows: int = 100_000
    """The most outbox rows one replay from history (``POST /v1/relays/{name}/replays``) may cover: its
    range, counted when it is asked for (a filter narrows what is published, not what is read)."""
    replay_max_in_flight: int = 2
    """Replays from history one tenant may have queued or running at once (one idle for 10 minutes,
    its worker gone, no longer counts)."""

    # --- alerts (docs/delivery.md, "Alerts")
    alert_interval_s: float = 5.0
    """How often the fleet evaluates alerts (one worker at a time, under an advisory lock); an alert an
    endpoint did not take is sent again at the next evaluation."""
    alert_channels_per_tenant: int = 10
    """Alert channels (``/v1/alerts``) one tenant may have (409 ``quota-exceeded``, quota ``alerts``)."""
    alert_operator_url: str | None = None
    """An http(s) URL that receives every tenant's alerts (the tenant's name in each body). Unset: none."""
    alert_operator_secret: str | None = None
    """The operator URL's signing secret (``whsec_...``): its requests are signed the Standard Webhooks
    way. Unset: plain unsigned POSTs."""
    alert_operator_stall_after_s: float = 300.0
    """How long a relay's stall lasts before the operator URL hears of it."""
    alert_operator_period_s: float = 900.0
    """At most one alert per relay and event kind in this long to the operator URL."""
    alert_lease_lost_threshold: int = 3
    """A ``lease_lost`` alert goes out when a relay's partitions lost at least this many leases within
    ``alert_lease_lost_window_s``."""
    alert_lease_lost_window_s: float = 900.0
    """The window of ``alert_lease_lost_threshold``."""

    # --- authentication
    auth_failure_limit: int = 20
    """Failed authentications (a wrong, unknown or revoked key) one client address may make in
    ``auth_failure_window_s`` before it gets 429 for the rest of the window; 0 turns the limit off."""
    auth_failure_window_s: float = 60.0
    """The window of ``auth_failure_limit``."""
    ui_cookie_secure: bool = False
    """Always mark the dashboard's cookies ``Secure`` (behind a TLS-terminating proxy the app sees
    http); without it they are ``Secure`` when the request came over https."""

    def __post_init__(self) -> None:
        if self.slice_s <= 0 or self.lease_ttl_s <= 0 or self.schedule_interval_s <= 0:
            raise ConfigError("slice_s, lease_ttl_s and schedule_interval_s must be positive")
        if self.lease_ttl_s < 1:
            raise ConfigError("lease_ttl_s must be at least 1 second")
        if self.control_pool_size < 2 or self.tenant_pool_size < 1 or self.max_batches_in_flight < 1:
            raise ConfigError("control_pool_size must be at least 2, tenant_pool_size and max_batches_in_flight 1")
        if self.safety_poll_s <= 0:
            raise ConfigError("safety_poll_s must be positive")
        for name in QUOTAS:
            if getattr(self, f"quota_{name}") < 0:
                raise ConfigError(f"quota_{name} must not be negative")
        if not 10 <= self.min_poll_interval_ms <= 600_000:
            raise ConfigError("min_poll_interval_ms must be between 10 and 600000")
        if not 1 <= self.max_relay_partitions <= 1024:
            raise ConfigError("max_relay_partitions must be between 1 and 1024")
        if self.replay_max_rows < 1 or self.replay_max_in_flight < 1:
            raise ConfigError("replay_max_rows and replay_max_in_flight must be at least 1")
        statement_floor_s = max(TENANT_COMMAND_TIMEOUT_FLOOR_S, self.connect_timeout_s)
        if self.tenant_statement_timeout_s < statement_floor_s:
            raise ConfigError(
                f"tenant_statement_timeout_s must be at least {statement_floor_s:g} (30 s and connect_timeout_s: "
                "the relay's own bound on a statement)"
            )
        if self.tenant_idle_in_transaction_timeout_s < 1:
            raise ConfigError("tenant_idle_in_transaction_timeout_s must be at least 1")
        if self.alert_interval_s <= 0 or self.alert_operator_stall_after_s < 0 or self.alert_operator_period_s <= 0:
            raise ConfigError("alert_interval_s and alert_operator_period_s must be positive")
        if self.alert_channels_per_tenant < 0 or self.alert_lease_lost_threshold < 1:
            raise ConfigError("alert_channels_per_tenant must not be negative, alert_lease_lost_threshold at least 1")
        if self.alert_lease_lost_window_s <= 0:
            raise ConfigError("alert_lease_lost_window_s must be positive")
        self._check_operator_alerts()
        if self.auth_failure_limit < 0 or self.auth_failure_window_s <= 0:
            raise ConfigError("auth_failure_limit must not be negative and auth_failure_window_s must be positive")

    def _check_operator_alerts(self) -> None:
        """The operator's alert URL and secret, checked as a tenant's channel is (but for the address
        policy: the operator may name a private address), never echoing the secret."""
        from outbox_relay.errors import InvalidSpec
        from outbox_relay.specs import check_webhook_url, webhook_secrets  # specs needs domain, not config

        try:
            if self.alert_operator_url:
                check_webhook_url(self.alert_operator_url)
            if self.alert_operator_secret:
                webhook_secrets(self.alert_operator_secret)
        except InvalidSpec as exc:
            name = "ALERT_OPERATOR_URL" if exc.field == "url" else "ALERT_OPERATOR_SECRET"
            raise ConfigError(f"{PREFIX}{name}: {exc.reason}") from None
        if self.alert_operator_secret and not self.alert_operator_url:
            raise ConfigError(f"{PREFIX}ALERT_OPERATOR_SECRET is set without {PREFIX}ALERT_OPERATOR_URL")

    def quota_defaults(self) -> dict[str, int]:
        """The service-wide default of every per-tenant quota, by name."""
        return {name: int(getattr(self, f"quota_{name}")) for name in QUOTAS}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _parse(f.name, str(f.type), raw)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, type_name: str, raw: str) -> object:
    try:
        if type_name.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if type_name == "bool":
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{PREFIX}{name.upper()}: cannot read {raw!r} as {type_name}") from None
