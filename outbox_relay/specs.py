"""What a tenant may write into a resource beyond what its type says: connection strings, caps.

The drivers read more from a connection string than its host, user and database. asyncpg takes
``passfile``, ``service`` and ``sslrootcert`` from a DSN's query (files on the *relay's* host: a
``passfile`` entry's password would go to a server of the tenant's choosing) and sends every
parameter it does not know to the server as a setting; redis-py turns every URL query parameter
into a keyword argument of its connection (``?path=`` and ``?connection_class=`` fail each
connect with ``TypeError``); aiormq reads ``certfile``/``keyfile`` (the relay host's client
certificate) and ``auth=external`` from an AMQP URL. So each scheme has an explicit allow-list
of query parameters, each with the values it may take, and everything else is refused by name.
A NATS server URL takes none, and no user, password or token either (nats-py would send those
found in a URL; the target's secret is its write-only ``password``).

The checks run where a spec is written (``PUT`` answers 422 naming the field and parameter) and
again before a worker hands a stored spec to a driver (specs stored before a check existed), so
no refused parameter ever reaches a driver. The caps that are not part of the types
(``maxlen``, the number of bootstrap servers) live here for the same reason: a stored spec over
a cap still decodes, reads back and can be fixed with ``PUT``; it is just not used.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from outbox_relay.domain import (
    ADOPTED_MAX_HEADERS,
    MAX_BOOTSTRAP_SERVERS,
    MAX_NATS_SERVERS,
    MAX_STREAM_MAXLEN,
    Database,
    KafkaTarget,
    NatsTarget,
    OutboxTable,
    RabbitMQTarget,
    RedisStreamsTarget,
    Target,
    WebhookTarget,
)
from outbox_relay.errors import (
    InvalidDatabaseSpec,
    InvalidSpec,
    InvalidTargetSpec,
    TargetUnavailable,
    TenantDatabaseError,
)

MAX_AMQP_SHORTSTR_BYTES = 255
"""AMQP names (the exchange) are short strings: at most 255 bytes of UTF-8."""

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
"""A DNS name or an IPv4 literal (letters, digits, '-' and '_' for container names)."""
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _one_of(*values: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in values else f"must be one of {', '.join(values)}"

    return check


def _printable(max_chars: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if len(value) > max_chars or not value.isascii() or not value.isprintable():
            return f"must be at most {max_chars} printable ASCII characters"
        return None

    return check


def _integer(low: int, high: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if not value.isascii() or not value.isdigit() or not low <= int(value) <= high:
            return f"must be an integer from {low} to {high}"
        return None

    return check


# Each allowed parameter, with why it is safe: it only chooses how the tenant's own connection
# behaves, names no file, credential or address, and takes only the values listed.
DSN_PARAMS: dict[str, Callable[[str], str | None]] = {
    # TLS or not and how strictly. verify-ca/verify-full check against the root certificate the
    # *operator* configured on the relay host (~/.postgresql/root.crt or PGSSLROOTCERT), never a
    # file the tenant names (sslrootcert is refused).
    "sslmode": _one_of("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    # PostgreSQL 17 direct TLS negotiation.
    "sslnegotiation": _one_of("postgres", "direct"),
    "ssl_min_protocol_version": _one_of("TLSv1.2", "TLSv1.3"),
    # Which host of a multi-host DSN to use; only values that find a primary: the relay provisions
    # the outbox and reads the live transaction horizon, which a standby does not have.
    "target_session_attrs": _one_of("any", "primary", "read-write"),
    # Taken so that a DSN copied from elsewhere works; the relay names its connections
    # ``outbox-relay`` regardless (its own server setting wins).
    "application_name": _printable(63),
}
REDIS_TLS_PARAMS: dict[str, Callable[[str], str | None]] = {
    # rediss:// only (plain connections take no TLS arguments): how the broker's certificate is checked.
    "ssl_cert_reqs": _one_of("none", "optional", "required"),
    "ssl_check_hostname": _one_of("true", "false"),
}
AMQP_PARAMS: dict[str, Callable[[str], str | None]] = {
    # Seconds between heartbeats the client proposes (0: the broker's choice); AMQP's is 16 bits.
    "heartbeat": _integer(0, 65534),
}
AMQPS_PARAMS: dict[str, Callable[[str], str | None]] = {
    **AMQP_PARAMS,
    # amqps:// only: skip verifying the broker's certificate (the tenant's own connection).
    "no_verify_ssl": _one_of("0", "1"),
}
_DSN_REFUSALS = {
    "connect_timeout": "the relay applies its own connect timeout (asyncpg would send this one to the "
    "server as an unknown setting, and the connection would fail)",
}
_URL_REFUSALS = {
    "timeout": "the relay applies its own (`timeout_ms`)",
    "socket_timeout": "the relay applies its own (`timeout_ms`)",
    "socket_connect_timeout": "the relay applies its own (`timeout_ms`)",
}


def check_spec(spec: Database | Target) -> None:
    """Refuse a spec the relay must not use; raises :class:`InvalidSpec` naming the field."""
    if isinstance(spec, Database):
        check_database(spec)
    else:
        check_target(spec)


def check_database(db: Database) -> None:
    """InvalidDatabaseSpec naming the field at fault; InvalidSpec for an adopted ``table`` that
    cannot work whatever the database holds (whether it does is checked at provision)."""
    try:
        check_dsn(db.dsn)
    except InvalidSpec as exc:
        raise InvalidDatabaseSpec(exc.field, exc.reason) from None
    if db.table is not None:
        _check_table(db.schema, db.table)


ADDED_COLUMNS = ("outbox_relay_txid", "outbox_relay_seq", "outbox_relay_at")
"""The columns provision adds to an adopted table (``outbox_relay.tenant.adopt``)."""


def _check_table(schema: str, table: OutboxTable) -> None:
    if table.schema == schema:
        raise InvalidSpec(
            "table.schema", f"the relay's schema ({schema}) gets a view named outbox: adopt a table of another schema"
        )
    cols = table.columns
    if len(cols.headers) > ADOPTED_MAX_HEADERS:
        raise InvalidSpec("table.columns.headers", f"at most {ADOPTED_MAX_HEADERS} headers")
    mapped = {"id": cols.id, "topic": cols.topic, "key": cols.key, "payload": cols.payload}
    for field, column in [*mapped.items(), *((f"headers[{n!r}]", c) for n, c in cols.headers.items())]:
        if column in ADDED_COLUMNS:
            raise InvalidSpec(f"table.columns.{field}", f"{column} is a column provision adds; map the table's own")
    if cols.id in (cols.topic, cols.key, cols.payload):
        raise InvalidSpec("table.columns.id", "the message id column must be a column of its own")


def usable_database(db: Database) -> None:
    """:func:`check_database` as a worker needs it: a stored spec it refuses is
    :class:`TenantDatabaseError`, so the relay pauses (the cause in its status) and charges nothing."""
    try:
        check_database(db)
    except InvalidSpec as exc:
        raise TenantDatabaseError(f"the stored database spec is refused ({exc}); PUT the database again") from None


def usable_target(target: Target) -> None:
    """:func:`check_target` as a worker needs it: a stored spec it refuses is
    :class:`TargetUnavailable`, so the relay pauses (the cause in its status) and charges nothing;
    checked before anything resolves the spec's hosts (10,000 bootstrap servers)."""
    try:
        check_target(target)
    except InvalidSpec as exc:
        raise TargetUnavailable(f"the stored target spec is refused ({exc}); PUT the target again") from None


def check_target(target: Target) -> None:
    """InvalidTargetSpec naming the field at fault."""
    try:
        _check_target(target)
    except InvalidSpec as exc:
        raise InvalidTargetSpec(exc.field, exc.reason) from None


def _check_target(target: Target) -> None:
    if isinstance(target, RabbitMQTarget):
        check_amqp_url(target.url)
        if len(target.exchange.encode()) > MAX_AMQP_SHORTSTR_BYTES:
            raise InvalidSpec("exchange", f"must be at most {MAX_AMQP_SHORTSTR_BYTES} bytes of UTF-8")
    elif isinstance(target, RedisStreamsTarget):
        check_redis_url(target.url)
        if target.maxlen is not None and not 1 <= target.maxlen <= MAX_STREAM_MAXLEN:
            raise InvalidSpec("maxlen", f"must be from 1 to {MAX_STREAM_MAXLEN} (what XADD MAXLEN takes)")
    elif isinstance(target, KafkaTarget):
        check_bootstrap_servers(target.bootstrap_servers)
    elif isinstance(target, NatsTarget):
        check_nats_servers(target.servers)
        if target.username is not None and _printable(256)(target.username) is not None:
            raise InvalidSpec("username", "must be at most 256 printable ASCII characters")
    elif isinstance(target, WebhookTarget):
        check_webhook_url(target.url)
        _no_controls("content_type", target.content_type)
        if isinstance(target.password, str):  # what a PUT sends (a stored spec has none: it is encrypted apart)
            webhook_secrets(target.password)
        elif target.password is None:
            raise InvalidSpec("password", "a webhook target signs every request: it needs a signing secret")
    else:  # pragma: no cover - the union is closed
        raise TypeError(f"not a target spec: {type(target).__name__}")


def check_dsn(dsn: str) -> None:
    """``postgresql://user@host[:port][,host[:port]...]/dbname[?allowed parameters]``, no password."""
    parts = _split("dsn", dsn, ("postgresql", "postgres"))
    userinfo, hosts = _userinfo_and_hosts("dsn", parts, many=True)
    if userinfo is None or not unquote(userinfo):
        raise InvalidSpec("dsn", "must name a user (postgresql://user@host:5432/dbname)")
    for item in hosts.split(","):
        _host_port("dsn", item)
    database = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if not database:
        raise InvalidSpec("dsn", "must name a database (postgresql://user@host:5432/dbname)")
    _no_controls("dsn", unquote(userinfo), database)
    _check_query("dsn", parts.query, DSN_PARAMS, _DSN_REFUSALS)


def check_redis_url(url: str) -> None:
    """``redis[s]://[user@]host[:port][/db][?TLS parameters]``, no password."""
    parts = _split("url", url, ("redis", "rediss"))
    userinfo, hosts = _userinfo_and_hosts("url", parts)
    _host_port("url", hosts)
    if userinfo is not None:
        _no_controls("url", unquote(userinfo))
    if not re.fullmatch(r"(/([0-9]{1,10})?)?", parts.path) or int(parts.path[1:] or 0) > 2**31 - 1:
        raise InvalidSpec("url", "the path must be empty or /<database number>, e.g. redis://host:6379/0")
    _check_query("url", parts.query, REDIS_TLS_PARAMS if parts.scheme == "rediss" else {}, _URL_REFUSALS)


def check_amqp_url(url: str) -> None:
    """``amqp[s]://user@host[:port][/vhost][?heartbeat=...]``, no password."""
    parts = _split("url", url, ("amqp", "amqps"))
    userinfo, hosts = _userinfo_and_hosts("url", parts)
    _host_port("url", hosts)
    _no_controls("url", unquote(userinfo or ""), unquote(parts.path))
    _check_query("url", parts.query, AMQPS_PARAMS if parts.scheme == "amqps" else AMQP_PARAMS, _URL_REFUSALS)


def check_webhook_url(url: str) -> None:
    """``http[s]://host[:port][/path][?query]``: no user or password (the relay would send them to
    every address the name resolves to), no fragment."""
    parts = _split("url", url, ("http", "https"))
    userinfo, hosts = _userinfo_and_hosts("url", parts)
    if userinfo is not None:
        raise InvalidSpec("url", "must not contain a user or password: webhooks authenticate by their signature")
    _host_port("url", hosts)
    _no_controls("url", unquote(parts.path), unquote(parts.query))
    if any(c.isspace() for c in url):
        raise InvalidSpec("url", "must not contain spaces (percent-encode them as %20)")


WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_MAX_SECRETS = 2
WEBHOOK_SECRET_BYTES = (24, 64)
"""Standard Webhooks recommends secrets of 24 to 64 random bytes."""


def webhook_secrets(password: str) -> list[bytes]:
    """The signing keys of a webhook target's ``password``: one ``whsec_<base64>`` secret, or two
    separated by a space while a rotation is under way (both sign). InvalidSpec naming ``password``
    (without echoing the secret) when it is malformed."""
    secrets = password.split(" ")
    if not 1 <= len(secrets) <= WEBHOOK_MAX_SECRETS:
        raise InvalidSpec("password", "must be one signing secret, or two separated by one space during a rotation")
    keys: list[bytes] = []
    low, high = WEBHOOK_SECRET_BYTES
    for n, secret in enumerate(secrets, 1):
        if not secret.startswith(WEBHOOK_SECRET_PREFIX):
            raise InvalidSpec("password", f"secret {n} must start with {WEBHOOK_SECRET_PREFIX!r} (whsec_<base64>)")
        try:
            key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidSpec("password", f"secret {n} is not whsec_ followed by standard base64") from None
        if not low <= len(key) <= high:
            raise InvalidSpec("password", f"secret {n} must decode to {low} to {high} bytes, not {len(key)}")
        keys.append(key)
    if len(set(keys)) != len(keys):
        raise InvalidSpec("password", "the two secrets of a rotation must differ")
    return keys


def check_bootstrap_servers(servers: list[str]) -> None:
    """1 to :data:`MAX_BOOTSTRAP_SERVERS` entries of ``host[:port]`` or ``[IPv6][:port]``."""
    if not servers:
        raise InvalidSpec("bootstrap_servers", "must name at least one broker")
    if len(servers) > MAX_BOOTSTRAP_SERVERS:
        raise InvalidSpec("bootstrap_servers", f"must name at most {MAX_BOOTSTRAP_SERVERS} brokers")
    for i, server in enumerate(servers):
        _host_port(f"bootstrap_servers[{i}]", server, what="host:port")


def check_nats_servers(servers: list[str]) -> None:
    """1 to :data:`MAX_NATS_SERVERS` URLs ``nats://host[:port]`` or ``tls://host[:port]``: no user,
    password or token (nats-py would send one found in a URL; the secret is the write-only
    ``password``), no path, no query (nats-py reads none, so nothing there could mean anything)."""
    if not servers:
        raise InvalidSpec("servers", "must name at least one server")
    if len(servers) > MAX_NATS_SERVERS:
        raise InvalidSpec("servers", f"must name at most {MAX_NATS_SERVERS} servers")
    for i, url in enumerate(servers):
        field = f"servers[{i}]"
        parts = _split(field, url, ("nats", "tls"))
        if "@" in parts.netloc:
            raise InvalidSpec(
                field,
                "must not carry a user, password or token: put the user in `username` and the password or "
                "token in the write-only `password` field",
            )
        if "," in parts.netloc:
            raise InvalidSpec(field, "must name exactly one host (list each server on its own)")
        if not parts.netloc:
            raise InvalidSpec(field, "must name a host")
        _host_port(field, parts.netloc)
        if parts.path not in ("", "/") or parts.query:
            raise InvalidSpec(field, "must be nats://host:port or tls://host:port, with no path or query")


# --- parts -----------------------------------------------------------------------------------------


def _split(field: str, url: str, schemes: tuple[str, str]) -> SplitResult:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidSpec(field, f"is not a URL ({exc})") from None
    if parts.scheme not in schemes:
        raise InvalidSpec(field, f"must start with {schemes[0]}:// or {schemes[1]}://")
    if "#" in url:
        raise InvalidSpec(field, "must not have a #fragment")
    if parts.netloc.count("@") > 1:
        raise InvalidSpec(field, "has more than one '@': percent-encode '@' in the user name as %40")
    return parts


def _userinfo_and_hosts(field: str, parts: SplitResult, *, many: bool = False) -> tuple[str | None, str]:
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        raise InvalidSpec(field, "must not contain a password: send it in the write-only `password` field")
    if not hosts:
        raise InvalidSpec(field, "must name a host")
    if "," in hosts and not many:
        raise InvalidSpec(field, "must name exactly one host")
    return (userinfo if at else None), hosts


def _host_port(field: str, item: str, *, what: str = "a host") -> None:
    """``host[:port]`` or ``[IPv6][:port]``: a DNS name or IP literal, a port from 1 to 65535."""
    if item.startswith("["):
        literal, close, rest = item[1:].partition("]")
        try:
            valid = bool(close) and isinstance(ipaddress.ip_address(literal), ipaddress.IPv6Address)
        except ValueError:
            valid = False
        if not valid or (rest and not rest.startswith(":")):
            raise InvalidSpec(field, f"{item!r} is not {what}: an IPv6 address goes in brackets, [::1]:port")
        port = rest[1:] if rest else None
    else:
        host, colon, port_text = item.partition(":")
        if ":" in port_text:
            raise InvalidSpec(field, f"{item!r} is not {what}: an IPv6 address goes in brackets, [::1]:port")
        if not _HOSTNAME_RE.match(host):
            raise InvalidSpec(field, f"{item!r} is not {what}: {host!r} is not a host name or IP address")
        port = port_text if colon else None
    if port is not None and (not _PORT_RE.match(port) or not 1 <= int(port) <= 65535):
        raise InvalidSpec(field, f"{item!r} has an invalid port: a port is a number from 1 to 65535")


def _no_controls(field: str, *values: str) -> None:
    if any(_CONTROL_RE.search(v) for v in values):
        raise InvalidSpec(field, "must not contain control characters (percent-encoded or not)")


def _check_query(
    field: str, query: str, allowed: dict[str, Callable[[str], str | None]], refusals: dict[str, str]
) -> None:
    """Every parameter in ``allowed`` with a value its check accepts, each at most once."""
    if not query:
        return
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidSpec(field, "has a malformed query string (name=value pairs joined by '&')") from None
    seen: set[str] = set()
    raw_keys = [pair.partition("=")[0] for pair in query.split("&")]
    for (key, value), raw in zip(pairs, raw_keys, strict=True):
        if "password" in key.lower():
            raise InvalidSpec(
                field,
                f"must not carry a password (query parameter {key!r}): send it in the write-only `password` field",
            )
        if key not in allowed or not _KEY_RE.match(raw):
            why = refusals.get(key)
            allowed_text = ", ".join(sorted(allowed)) if allowed else "none"
            raise InvalidSpec(
                field,
                f"query parameter {key!r} is not allowed" + (f": {why}" if why else "") + f" (allowed: {allowed_text})",
            )
        if key in seen:
            raise InvalidSpec(field, f"query parameter {key!r} is given more than once")
        seen.add(key)
        problem = allowed[key](value)
        if problem:
            raise InvalidSpec(field, f"query parameter {key!r} {problem}")
