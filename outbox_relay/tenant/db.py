"""Connections to tenants' own databases: connect (address policy + timeouts), provision, read.

Every connection is opened by :func:`dial`: the DSN's hosts are resolved once by the address policy
and asyncpg dials the checked IP addresses (TLS still verifies the host's name): see
:mod:`outbox_relay.netguard`.

The relay only ever reads here: it never updates or deletes outbox rows.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qs, urlsplit

import asyncpg
import msgspec

from outbox_relay.config import TENANT_COMMAND_TIMEOUT_FLOOR_S, Settings
from outbox_relay.domain import Database, OutboxTable
from outbox_relay.errors import AddressNotAllowed, MissingPrivileges, ProvisionFailed, TenantDatabaseError
from outbox_relay.netguard import AddressPolicy, Endpoint, NameBoundSSLContext, hosts_of
from outbox_relay.tenant import adopt, sql

APPLICATION_NAME = "outbox-relay"

Pool: TypeAlias = asyncpg.Pool
"""A pool of connections to a tenant database (the engine keeps one per server and credentials)."""
Connection: TypeAlias = asyncpg.Connection
DRIVER_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
"""What talking to a tenant database raises when it cannot be reached or queried: callers outside this
package catch these (and tell them as :class:`TenantDatabaseError`) without importing the driver."""
LockNotAvailable = asyncpg.LockNotAvailableError
"""A ``lock_timeout`` or ``NOWAIT`` lock the server would not grant."""


class OutboxRow(msgspec.Struct, frozen=True):
    """One outbox row as the relay reads it (a Struct: built per row read, it costs a tenth of a
    frozen dataclass's keyword ``__init__``)."""

    txid: int
    id: int
    topic: str
    key: str | None
    payload: bytes
    headers: str
    created_at: datetime
    message_id: str = ""
    """The id consumers dedupe on (``outbox-id``): the row's ``message_id``, or for a row written
    before the outbox had one, the UUID the relay derives from it (:func:`derived_message_id`).
    Empty only for an outbox of schema version 1, whose messages carry the row id."""
    fenced: bool = False
    """Part of a restored backlog that was resent or skipped on its own: never published by the
    ordinary read, which only moves its cursor over it (its payload is not even read)."""

    @property
    def outgoing_id(self) -> str:
        """The id the message is published with."""
        return self.message_id or str(self.id)


@dataclass(frozen=True, slots=True)
class OutboxLayout:
    """What the relay needs to know of an outbox's schema: its version and id namespace."""

    version: int
    namespace: uuid.UUID | None

    @property
    def has_message_ids(self) -> bool:
        return self.version >= 2 and self.namespace is not None


@dataclass(frozen=True, slots=True)
class RestoreFence:
    """The restored backlog of a detected restore: rows with ``id <= max_id`` and
    ``created_at <= max_created_at``; ``next_xid`` was the server's next transaction id then."""

    max_id: int
    max_created_at: datetime
    next_xid: int


@dataclass(frozen=True, slots=True)
class RestoreBounds:
    next_xid: int
    max_id: int | None
    """None: no row lay above the server's transaction counter (nothing would be held back)."""
    max_created_at: datetime


def derived_message_id(namespace: uuid.UUID, txid: int, row_id: int) -> str:
    """The message id of a row written before its outbox had message ids (schema version 1):
    UUID v5 of ``"txid:id"`` in the outbox's own namespace. ``(txid, id)`` is unique within one
    database's history and the namespace is stored in the database (``outbox_meta``), so a dump, a
    restore or a replica derive the same id and another outbox never does."""
    return str(uuid.uuid5(namespace, f"{txid}:{row_id}"))


async def check_address(dsn: str, policy: AddressPolicy) -> None:
    """Check every address the DSN's hosts have (AddressNotAllowed); informs only, see :func:`connect`."""
    await policy.resolve_all(hosts_of(urlsplit(dsn).netloc, 5432))


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def dsn_params(dsn: str) -> dict[str, str]:
    """The DSN's query parameters (the last value of each, as asyncpg reads them)."""
    return {key: values[-1] for key, values in parse_qs(urlsplit(dsn).query).items()}


def tls_attempts(dsn: str, endpoints: Sequence[Endpoint]) -> list[ssl.SSLContext | Literal[False]]:
    """The TLS settings to connect with, in the order to try them, from the DSN's ``sslmode``.

    asyncpg verifies (and sends SNI for) whatever host it dials, and it dials the checked IP address
    here, so the TLS context is built here instead of by asyncpg from the DSN: a
    :class:`NameBoundSSLContext` that verifies the certificate against the host's *name*. It follows
    libpq's modes: ``disable``; ``allow`` (plain, then TLS); ``prefer``, the default (TLS without
    verification, then plain); ``require`` (TLS; the certificate is verified only with an
    ``sslrootcert``); ``verify-ca`` (certificate chain); ``verify-full`` (chain and host name). The
    trust store is ``sslrootcert`` when given, else the system's (asyncpg would demand
    ``~/.postgresql/root.crt`` of the worker); ``sslcert``/``sslkey``/``sslpassword`` present a client
    certificate. The worker's own ``PGSSL*`` environment plays no part in a tenant's connection.
    """
    params = dsn_params(dsn)
    mode = params.get("sslmode", "prefer")
    if mode not in SSL_MODES:
        raise TenantDatabaseError(f"sslmode {mode[:40]!r} is not one of {', '.join(SSL_MODES)}")
    if mode == "disable":
        return [False]
    context = NameBoundSSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for endpoint in endpoints:
        context.bind(endpoint)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["postgresql"])  # what asyncpg sets (needed for sslnegotiation=direct)
    rootcert = params.get("sslrootcert")
    if mode in ("verify-ca", "verify-full") or (mode == "require" and rootcert):
        if rootcert and rootcert != "system":
            context.load_verify_locations(cafile=rootcert)
        else:
            context.load_default_certs()
        context.check_hostname = mode == "verify-full"
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if params.get("sslcert"):
        context.load_cert_chain(params["sslcert"], keyfile=params.get("sslkey"), password=params.get("sslpassword"))
    if mode == "prefer":
        return [context, False]
    if mode == "allow":
        return [False, context]
    return [context]


def _try_next_mode(exc: BaseException) -> bool:
    """Whether a failed attempt lets ``allow``/``prefer`` try the other mode: the server refused
    TLS or the TLS handshake failed, or pg_hba.conf has no entry for this kind of connection."""
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, TimeoutError)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Server-side bounds on the relay's own sessions on a tenant database, sent as startup
    parameters of every connection :func:`dial` opens (so they also win over an ``ALTER ROLE`` or
    ``ALTER DATABASE ... SET`` of the tenant's). The defaults are the settings' defaults."""

    statement_timeout_ms: int = 60_000
    idle_in_transaction_timeout_ms: int = 15_000

    @classmethod
    def of(cls, settings: Settings) -> SessionLimits:
        return cls(
            statement_timeout_ms=round(settings.tenant_statement_timeout_s * 1000),
            idle_in_transaction_timeout_ms=round(settings.tenant_idle_in_transaction_timeout_s * 1000),
        )

    def server_settings(self) -> dict[str, str]:
        return {
            "application_name": APPLICATION_NAME,
            "statement_timeout": str(self.statement_timeout_ms),
            "idle_in_transaction_session_timeout": str(self.idle_in_transaction_timeout_ms),
        }


DEFAULT_SESSION = SessionLimits()


async def dial(
    dsn: str,
    password: str | None,
    *,
    policy: AddressPolicy,
    timeout_s: float,
    connection_class: type[asyncpg.Connection] = asyncpg.Connection,
    record_class: type[asyncpg.Record] = asyncpg.Record,
    session: SessionLimits = DEFAULT_SESSION,
) -> asyncpg.Connection:
    """One connection to the DSN's database, to an address the policy checked when it resolved the
    DSN's hosts just now; asyncpg is given only those IP addresses, so it resolves no name itself.

    ``timeout_s`` bounds the whole connect, the second ``allow``/``prefer`` attempt included (name
    resolution has the policy's own bound). Every statement has the client-side bound
    ``max(timeout_s, 30 s)`` and the server-side ``session`` bounds. Raises AddressNotAllowed, or
    what asyncpg raises.
    """
    endpoints = await policy.resolve_all(hosts_of(urlsplit(dsn).netloc, 5432))
    attempts = tls_attempts(dsn, endpoints)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for number, tls in enumerate(attempts, start=1):
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"no connection within {timeout_s:g}s")
        try:
            # host/port/ssl given here win over the DSN's netloc, ?host=, ?port=, ?service=, ?sslmode=
            # and the PG* environment.
            return await asyncpg.connect(
                dsn,
                host=[e.address for e in endpoints],
                port=[e.port for e in endpoints],
                password=password,
                ssl=tls,
                timeout=remaining,
                command_timeout=max(timeout_s, TENANT_COMMAND_TIMEOUT_FLOOR_S),
                server_settings=session.server_settings(),
                connection_class=connection_class,
                record_class=record_class,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            if number == len(attempts) or not _try_next_mode(exc):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


async def connect(
    db: Database,
    password: str | None,
    *,
    policy: AddressPolicy,
    timeout_s: float,
    session: SessionLimits = DEFAULT_SESSION,
) -> asyncpg.Connection:
    """One connection to the tenant DB (see :func:`dial`); TenantDatabaseError when that fails."""
    try:
        return await dial(db.dsn, password, policy=policy, timeout_s=timeout_s, session=session)
    except AddressNotAllowed:
        raise
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise TenantDatabaseError(f"cannot connect to the database: {describe(exc)}") from None


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """No server round trip when a pooled tenant connection is returned: the relay changes no
    session state (reads, ``SET LOCAL`` inside transactions, an advisory lock its holder releases),
    and asyncpg's default reset (``RESET ALL``, ``UNLISTEN *``, ...) doubled the queries of an idle
    fleet. A connection that broke is discarded by the pool either way."""


async def create_pool(
    db: Database,
    password: str | None,
    *,
    policy: AddressPolicy,
    timeout_s: float,
    max_size: int = 4,
    session: SessionLimits = DEFAULT_SESSION,
) -> asyncpg.Pool:
    """A pool whose every connection is opened by :func:`dial`: a DNS answer that changes later is
    checked again when the pool opens its next connection, and cannot steer it past the policy."""
    await check_address(db.dsn, policy)  # refuse at once rather than at the first acquire

    async def open_connection(*_dsn: object, **options: Any) -> asyncpg.Connection:
        # asyncpg's pool passes loop, connection_class and record_class (and its dsn, None here)
        return await dial(
            db.dsn,
            password,
            policy=policy,
            timeout_s=timeout_s,
            connection_class=options.get("connection_class", asyncpg.Connection),
            record_class=options.get("record_class", asyncpg.Record),
            session=session,
        )

    pool = asyncpg.create_pool(min_size=0, max_size=max_size, connect=open_connection, reset=_keep_session)
    await pool
    return pool


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a connection or query failure."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True, slots=True)
class MissingGrant:
    """A privilege the connecting role lacks: ``privilege`` on ``target`` (``database shop``, ``table
    outbox_relay.outbox`` ...), and ``grant``, the statement that gives it (run by the object's owner
    or a superuser). ``OWNER`` means the relay's own objects belong to another role."""

    privilege: str
    target: str
    grant: str


@dataclass(frozen=True, slots=True)
class RoleWarning:
    code: Literal["superuser", "owns-unrelated-objects"]
    message: str


@dataclass(frozen=True, slots=True)
class RoleCheck:
    """What :func:`check_role` found out about the connecting role, before anything was changed."""

    role: str
    database: str
    missing: list[MissingGrant]
    warnings: list[RoleWarning]


RELAY_FUNCTIONS = (
    "pg_catalog.pg_advisory_xact_lock(bigint)",  # provision
    "pg_catalog.pg_try_advisory_lock(bigint)",  # maintenance
    "pg_catalog.pg_advisory_unlock(bigint)",
    "pg_catalog.hashtext(text)",  # the advisory lock keys
    "pg_catalog.gen_random_uuid()",  # the outbox's id namespace
    "pg_catalog.to_regnamespace(text)",  # whether the schema is there
    "pg_catalog.to_regclass(text)",  # the version 2 upgrade, partitions made ahead
    "pg_catalog.pg_current_snapshot()",  # every read: the transaction horizon
    "pg_catalog.pg_snapshot_xmin(pg_snapshot)",
    "pg_catalog.pg_snapshot_xmax(pg_snapshot)",  # a detected restore, a replay from history
    "pg_catalog.pg_visible_in_snapshot(xid8, pg_snapshot)",  # a replay from history
    "pg_catalog.clock_timestamp()",
    "pg_catalog.to_jsonb(anyelement)",  # reading outbox_meta
)
"""The built-in functions the relay's own statements call (provision, reads, maintenance). EXECUTE on
them belongs to PUBLIC unless someone revoked it; the functions the outbox's defaults and trigger call
(``pg_notify``, ``pg_current_xact_id`` ...) run as the writer, not as the relay."""

_ROLE_SQL = """
SELECT quote_ident(current_user) AS role, quote_ident(current_database()) AS database, quote_ident($1) AS schema,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
       n.oid IS NOT NULL OR has_database_privilege(current_database(), 'CREATE') AS database_create,
       has_language_privilege('plpgsql', 'USAGE') AS plpgsql_usage,
       n.oid IS NOT NULL AS schema_exists,
       n.oid IS NULL OR has_schema_privilege(n.oid, 'CREATE') AS schema_create,
       n.oid IS NULL OR has_schema_privilege(n.oid, 'USAGE') AS schema_usage
FROM (SELECT 1) AS one LEFT JOIN pg_namespace AS n ON n.nspname = $1
"""

_RELAY_OBJECTS_SQL = """
SELECT 'TABLE' AS kind, quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS name, c.relname AS bare,
       pg_has_role(c.relowner, 'USAGE') AS owned,
       has_table_privilege(c.oid, 'SELECT') AS can_select,
       has_table_privilege(c.oid, 'INSERT') AS can_insert,
       has_table_privilege(c.oid, 'UPDATE') AS can_update
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
  AND (c.relname IN ('outbox', 'outbox_default', 'outbox_meta') OR c.relname ~ '^outbox_[0-9]{8}$')
UNION ALL
SELECT 'FUNCTION', quote_ident(n.nspname) || '.' || quote_ident(p.proname) || '('
       || pg_get_function_identity_arguments(p.oid) || ')', p.proname,
       pg_has_role(p.proowner, 'USAGE'), true, true, true
FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = $1 AND p.proname IN ('outbox_notify', 'outbox_ensure_partitions')
ORDER BY 1, 2
"""

_FUNCTIONS_SQL = "SELECT f FROM unnest($1::text[]) AS f WHERE NOT has_function_privilege(f, 'EXECUTE')"

UNRELATED_SHOWN = 5
_UNRELATED_SQL = f"""
SELECT count(*) OVER () AS total, quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS name
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition AND n.nspname <> $1
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_)'
  AND pg_has_role(c.relowner, 'USAGE')
ORDER BY 2 LIMIT {UNRELATED_SHOWN}
"""


async def check_role(conn: asyncpg.Connection, schema: str) -> RoleCheck:
    """Read-only: which privileges the connecting role lacks to provision ``schema``'s outbox and to
    relay from it (every one, not only the first), and whether it reaches more than the relay needs.

    Provisioning creates the schema when it is missing (CREATE on the database), creates tables and
    plpgsql functions in it (CREATE on the schema) and
    re-applies itself to what exists (which only the owner may: the relay's tables, partitions and
    functions must belong to the role, or to a role it inherits from). Relaying reads the outbox and
    ``outbox_meta`` (USAGE on the schema, SELECT), calls :data:`RELAY_FUNCTIONS`, and LISTENs (which
    needs no privilege); maintenance makes and drops partitions (ownership again).
    """
    sql.quote_ident(schema)  # refuses a name outside IDENT_PATTERN
    head = await conn.fetchrow(_ROLE_SQL, schema)
    assert head is not None
    role, database = head["role"], head["database"]
    missing = _missing_grants(head)
    if head["schema_exists"]:
        missing += await _missing_on_relay_objects(conn, schema, role)
    for function in await conn.fetch(_FUNCTIONS_SQL, list(RELAY_FUNCTIONS)):
        name = function["f"]
        missing.append(MissingGrant("EXECUTE", f"function {name}", f"GRANT EXECUTE ON FUNCTION {name} TO {role}"))
    warnings = await _role_warnings(conn, schema, head)
    return RoleCheck(role=role, database=database, missing=missing, warnings=warnings)


def _missing_grants(head: asyncpg.Record) -> list[MissingGrant]:
    """What the role lacks on the database, the language plpgsql and the schema."""
    role, database, quoted = head["role"], head["database"], head["schema"]
    missing: list[MissingGrant] = []
    if not head["database_create"]:
        missing.append(MissingGrant("CREATE", f"database {database}", f"GRANT CREATE ON DATABASE {database} TO {role}"))
    if not head["plpgsql_usage"]:
        missing.append(MissingGrant("USAGE", "language plpgsql", f"GRANT USAGE ON LANGUAGE plpgsql TO {role}"))
    for privilege in ("USAGE", "CREATE"):
        if not head[f"schema_{privilege.lower()}"]:
            missing.append(
                MissingGrant(privilege, f"schema {quoted}", f"GRANT {privilege} ON SCHEMA {quoted} TO {role}")
            )
    return missing


async def _missing_on_relay_objects(conn: asyncpg.Connection, schema: str, role: str) -> list[MissingGrant]:
    """The relay's tables, partitions and functions in ``schema`` the role does not own, and the
    privileges it lacks on the tables it owns."""
    missing: list[MissingGrant] = []
    for obj in await conn.fetch(_RELAY_OBJECTS_SQL, schema):
        kind, name = obj["kind"], obj["name"]
        if not obj["owned"]:  # the new owner gets the old owner's privileges with it
            missing.append(MissingGrant("OWNER", f"{kind.lower()} {name}", f"ALTER {kind} {name} OWNER TO {role}"))
            continue
        wanted = {"outbox": ("SELECT",), "outbox_meta": ("SELECT", "INSERT", "UPDATE")}.get(obj["bare"], ())
        if kind == "TABLE":  # an owner may have revoked its own privileges
            for privilege in wanted:
                if not obj[f"can_{privilege.lower()}"]:
                    missing.append(
                        MissingGrant(privilege, f"table {name}", f"GRANT {privilege} ON TABLE {name} TO {role}")
                    )
    return missing


async def _role_warnings(conn: asyncpg.Connection, schema: str, head: asyncpg.Record) -> list[RoleWarning]:
    """The role reaches more than the relay needs: it is a superuser, or owns tables or views outside
    ``schema``."""
    role, quoted = head["role"], head["schema"]
    if head["superuser"]:
        return [
            RoleWarning(
                "superuser",
                f"role {role} is a superuser: a leaked relay credential reaches every database of the server; "
                "give the relay a role of its own with only the privileges it needs",
            )
        ]
    unrelated = await conn.fetch(_UNRELATED_SQL, schema)
    if not unrelated:
        return []
    total = int(unrelated[0]["total"])
    names = ", ".join(r["name"] for r in unrelated) + (", ..." if total > len(unrelated) else "")
    return [
        RoleWarning(
            "owns-unrelated-objects",
            f"role {role} owns {total} table(s) or view(s) outside schema {quoted} ({names}): a leaked "
            "relay credential reaches them; give the relay a role of its own that owns only the outbox",
        )
    ]


PROVISION_LOCK_TIMEOUT_MS = 2000
PROVISION_ATTEMPTS = 5


async def provision(
    conn: asyncpg.Connection,
    schema: str,
    *,
    lock_timeout_ms: int = PROVISION_LOCK_TIMEOUT_MS,
    attempts: int = PROVISION_ATTEMPTS,
) -> int:
    """Install, re-apply or upgrade the outbox schema; returns the schema version.

    The DDL takes the outbox's table lock for an instant (the trigger, and once the version 2
    upgrade's catalog-only ``ALTER TABLE``). While it waits for that lock, writers queue behind it,
    so it waits at most ``lock_timeout_ms`` and then gives way and tries again, up to ``attempts``
    times; a writer is never held up for longer than that. Raises ``asyncpg.LockNotAvailableError``
    when a long transaction kept the table busy throughout.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "outbox_relay.provision." + schema)
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
                await conn.execute(sql.schema_sql(schema))
            return sql.SCHEMA_VERSION
        except asyncpg.LockNotAvailableError:
            if attempt == attempts:
                raise
            await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class Provisioned:
    version: int
    warnings: list[RoleWarning]


async def provision_for_tenant(conn: asyncpg.Connection, schema: str, table: OutboxTable | None = None) -> Provisioned:
    """:func:`check_role`, then :func:`provision` (or, with ``table``, :func:`adopt.adopt` after
    :func:`adopt.check_table`). Its failures are told as :class:`ProvisionFailed` for the tenant (the
    API's 422 ``provision-failed``) rather than as the driver's errors; a role lacking privileges gets
    :class:`MissingPrivileges` naming every one, and nothing is changed."""
    try:
        check = await check_role(conn, schema)
        table_check = await adopt.check_table(conn, schema, table) if table is not None else None
    except asyncpg.PostgresError as exc:
        raise ProvisionFailed(f"reading the role's privileges failed: {describe(exc)}") from None
    if table_check is not None:
        if table_check.problems:
            raise ProvisionFailed("cannot adopt the table (nothing was changed): " + "; ".join(table_check.problems))
        check.missing.extend(MissingGrant(*lacking) for lacking in table_check.missing)
    if check.missing:
        raise MissingPrivileges(
            f"role {check.role} lacks what the relay needs to provision and read the outbox (nothing was changed): "
            + "; ".join(f"{m.privilege} on {m.target}" for m in check.missing)
            + ". Run as the owner or a superuser: "
            + " ".join(f"{m.grant};" for m in check.missing),
            missing=[{"privilege": m.privilege, "object": m.target, "grant": m.grant} for m in check.missing],
        )
    try:
        if table is not None and table_check is not None:
            await adopt.adopt(
                conn,
                schema,
                table,
                table_check.payload_type,
                lock_timeout_ms=PROVISION_LOCK_TIMEOUT_MS,
                attempts=PROVISION_ATTEMPTS,
            )
            version = sql.SCHEMA_VERSION
        else:
            version = await provision(conn, schema)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ProvisionFailed(f"the database user may not create the outbox: {exc}") from None
    except asyncpg.LockNotAvailableError:
        tries = f"{PROVISION_ATTEMPTS} tries of {PROVISION_LOCK_TIMEOUT_MS / 1000:g} s"
        raise ProvisionFailed(
            f"other transactions held the outbox table throughout ({tries}: provision gives way rather than "
            "keep writers waiting); "
            + ("the steps done stay done, try again" if table is not None else "nothing was changed, try again")
        ) from None
    except asyncpg.PostgresError as exc:
        raise ProvisionFailed(f"provisioning failed: {describe(exc)}") from None
    return Provisioned(version=version, warnings=check.warnings)


async def read_layout(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> OutboxLayout:
    """The outbox's schema version and id namespace (version 1 when ``outbox_meta`` is missing)."""
    try:
        row = await conn.fetchrow(sql.meta_sql(schema))
    except asyncpg.UndefinedTableError:
        return OutboxLayout(version=1, namespace=None)
    if row is None:
        return OutboxLayout(version=1, namespace=None)
    namespace = row["id_namespace"]
    return OutboxLayout(version=int(row["version"]), namespace=uuid.UUID(namespace) if namespace else None)


_ROW_COLUMNS = ("txid", "id", "topic", "key", "payload", "headers", "created_at", "message_id", "fenced")
"""The columns of every outbox read, in this order (after the ones a read puts first, ``first``)."""


def _rows(records: list[asyncpg.Record], layout: OutboxLayout | None, *, first: int = 0) -> list[OutboxRow]:
    """Rows from an outbox read's records: unpacked by position (checked once per read against
    ``_ROW_COLUMNS``), a row read per microsecond or so less than nine lookups by name."""
    if not records:
        return []
    names = tuple(records[0].keys())[first:]
    if names != _ROW_COLUMNS:
        raise RuntimeError(f"an outbox read returned the columns {names}, not {_ROW_COLUMNS}")
    namespace = layout.namespace if layout is not None and layout.has_message_ids else None
    out: list[OutboxRow] = []
    append = out.append
    for record in records:
        txid, row_id, topic, key, payload, headers, created_at, message_id, fenced = record[first:]
        if message_id is not None:
            text = str(message_id)
        elif namespace is not None:
            text = derived_message_id(namespace, txid, row_id)
        else:
            text = ""
        append(OutboxRow(txid, row_id, topic, key, payload, headers, created_at, text, fenced))
    return out


NO_FENCE_ID = 0
NO_FENCE_AT = datetime.min.replace(tzinfo=UTC)


async def poll(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    cursor: tuple[int, int],
    partitions: int,
    partition: int,
    limit: int,
    layout: OutboxLayout | None = None,
    fence: RestoreFence | None = None,
) -> list[OutboxRow]:
    """The ordinary read (:func:`~outbox_relay.tenant.sql.poll_sql`); rows of ``fence`` come back ``fenced``.

    ``layout`` (the outbox's :func:`read_layout`; None: the current version) decides whether the
    rows carry message ids."""
    version = layout.version if layout is not None else sql.SCHEMA_VERSION
    rows = await conn.fetch(
        sql.poll_sql(schema, version),
        cursor[0],
        cursor[1],
        partitions,
        partition,
        limit,
        fence.max_id if fence else NO_FENCE_ID,
        fence.max_created_at if fence else NO_FENCE_AT,
    )
    return _rows(rows, layout)


async def poll_backlog(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    cursor: tuple[int, int],
    partitions: int,
    partition: int,
    limit: int,
    layout: OutboxLayout | None,
    fence: RestoreFence,
) -> list[OutboxRow]:
    """The next rows of a restored backlog (:func:`~outbox_relay.tenant.sql.backlog_poll_sql`)."""
    version = layout.version if layout is not None else sql.SCHEMA_VERSION
    rows = await conn.fetch(
        sql.backlog_poll_sql(schema, version),
        cursor[0],
        cursor[1],
        partitions,
        partition,
        limit,
        fence.max_id,
        fence.max_created_at,
        fence.next_xid,
    )
    return _rows(rows, layout)


async def backlog_done(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    cursor: tuple[int, int],
    partitions: int,
    partition: int,
    fence: RestoreFence,
) -> bool:
    return bool(
        await conn.fetchval(
            sql.backlog_done_sql(schema),
            cursor[0],
            cursor[1],
            partitions,
            partition,
            fence.max_id,
            fence.max_created_at,
            fence.next_xid,
        )
    )


async def restore_bounds(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> RestoreBounds:
    row = await conn.fetchrow(sql.restore_bounds_sql(schema))
    assert row is not None
    return RestoreBounds(next_xid=row["next_xid"], max_id=row["max_id"], max_created_at=row["max_created_at"])


async def backlog_count(
    conn: asyncpg.Connection | asyncpg.Pool, schema: str, *, fence: RestoreFence, partitions: int, partition: int
) -> int:
    return int(
        await conn.fetchval(sql.backlog_count_sql(schema), fence.max_id, fence.max_created_at, partitions, partition)
    )


async def scan(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    *,
    after: tuple[int, int],
    partitions: int,
    wanted: list[int] | None,
    limit: int,
    layout: OutboxLayout | None = None,
) -> list[tuple[int, OutboxRow]]:
    """Rows of the ``wanted`` partitions (None: all) after ``after``, in order, with their partition
    (:func:`~outbox_relay.tenant.sql.scan_sql`); ``layout`` as in :func:`poll`. TenantDatabaseError
    when the database cannot be read."""
    version = layout.version if layout is not None else sql.SCHEMA_VERSION
    try:
        records = await conn.fetch(sql.scan_sql(schema, version), after[0], after[1], partitions, wanted, limit)
    except DRIVER_ERRORS as exc:
        raise TenantDatabaseError(f"reading the outbox failed: {describe(exc)}") from None
    return list(zip((r[0] for r in records), _rows(records, layout, first=1), strict=True))


async def next_row_at(conn: asyncpg.Connection | asyncpg.Pool, schema: str, after: tuple[int, int]) -> datetime | None:
    try:
        value: datetime | None = await conn.fetchval(sql.next_row_sql(schema), after[0], after[1])
    except DRIVER_ERRORS as exc:
        raise TenantDatabaseError(f"reading the outbox failed: {describe(exc)}") from None
    return value


# --- replay from history -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One retained outbox row a replay read: the row (its payload empty when not asked for), with its
    payload's size and first bytes."""

    row: OutboxRow
    size: int
    head: bytes


async def snapshot(conn: asyncpg.Connection) -> str:
    """The database's snapshot now (``pg_current_snapshot()`` as text): which transactions had committed."""
    try:
        return str(await conn.fetchval("SELECT pg_current_snapshot()::text"))
    except DRIVER_ERRORS as exc:
        raise TenantDatabaseError(f"reading the outbox failed: {describe(exc)}") from None


async def history_count(
    conn: asyncpg.Connection, schema: str, by: str, low: Any, high: Any, *, seen: str, cap: int
) -> int:
    """Rows of the range ``by`` (``inserted_at`` or ``ids``, ``low``/``high`` its bounds) that the
    snapshot ``seen`` saw committed, counted up to ``cap``."""
    try:
        return int(await conn.fetchval(sql.history_count_sql(schema, by), low, high, seen, cap))
    except DRIVER_ERRORS as exc:
        raise TenantDatabaseError(f"reading the outbox failed: {describe(exc)}") from None


async def history_page(
    conn: asyncpg.Connection,
    schema: str,
    by: str,
    low: Any,
    high: Any,
    *,
    seen: str,
    after: tuple[int, int],
    limit: int,
    payloads: bool,
    head_bytes: int,
    layout: OutboxLayout | None,
) -> list[HistoryRow]:
    """The next ``limit`` rows of the range after ``after`` (:func:`~outbox_relay.tenant.sql.history_page_sql`)."""
    version = layout.version if layout is not None else sql.SCHEMA_VERSION
    try:
        records = await conn.fetch(
            sql.history_page_sql(schema, by, version), low, high, seen, after[0], after[1], limit, payloads, head_bytes
        )
    except DRIVER_ERRORS as exc:
        raise TenantDatabaseError(f"reading the outbox failed: {describe(exc)}") from None
    rows = _rows(records, layout, first=2)
    return [HistoryRow(row, r[0], bytes(r[1])) for r, row in zip(records, rows, strict=True)]


async def oldest_row(conn: asyncpg.Connection, schema: str) -> tuple[int, datetime] | None:
    """The id and insert time of the oldest retained row (lowest id); None for an empty outbox."""
    try:
        record = await conn.fetchrow(sql.oldest_row_sql(schema))
    except DRIVER_ERRORS as exc:
        raise TenantDatabaseError(f"reading the outbox failed: {describe(exc)}") from None
    return (int(record["id"]), record["created_at"]) if record else None
