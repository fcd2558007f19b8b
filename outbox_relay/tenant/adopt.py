"""Adopting an existing outbox table (Debezium's layout by default) instead of installing the relay's own.

The relay's write-free read needs, per row, the writing transaction's id, a number that orders the
rows of one transaction, and an insert time; a Debezium outbox has none of them. Provision adds them
as three columns whose defaults fill them at insert, without rewriting the table or holding its lock
for more than an instant:

1. one short transaction (``lock_timeout``, given way to and retried: writers never queue behind it
   for long): a sequence in the relay's schema, the columns added **without** a default (catalog
   only: a volatile default in ``ADD COLUMN`` would rewrite the table under ACCESS EXCLUSIVE), then
   ``SET DEFAULT`` (catalog only, applies to new rows);
2. ``CREATE INDEX CONCURRENTLY`` of ``(txid, seq)`` over the rows that have a txid (outside a
   transaction: it never blocks writers);
3. another short transaction: the insert trigger that NOTIFYs the relay, and in the relay's schema a
   view ``outbox`` that shows the table in the relay's own outbox's columns, plus ``outbox_meta``.

Rows that were in the table before are never relayed: their new columns stay NULL (no backfill) and
the view leaves them out. That is exact, because ``ALTER TABLE`` waits for every transaction that
inserted before it: a row has a NULL txid if and only if its transaction committed before provision,
and every later row has a txid, so the ordinary horizon read of the view skips none of them.

The relay then reads ``<schema>.outbox`` as it reads its own outbox: the same statements, the same
index range scans (the view is flattened into them by the planner). Every identifier comes from the
tenant's validated mapping and is quoted; header names travel as quoted literals.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import asyncpg

from outbox_relay import specs
from outbox_relay.domain import OutboxTable
from outbox_relay.tenant.sql import notify_channel, quote_ident, quote_literal

TXID_COLUMN = "outbox_relay_txid"
SEQ_COLUMN = "outbox_relay_seq"
AT_COLUMN = "outbox_relay_at"
ADDED_COLUMNS = (TXID_COLUMN, SEQ_COLUMN, AT_COLUMN)
assert ADDED_COLUMNS == specs.ADDED_COLUMNS
TRIGGER = "outbox_relay_notify"
NOTIFY_FUNCTION = "adopted_outbox_notify"
PAYLOAD_TYPES = ("jsonb", "json", "text", "character varying", "bytea")
"""Column types a payload may have: published as the bytes of its text (UTF-8), or as they are (bytea)."""
ID_TYPE = "uuid"


SEQUENCE = "adopted_outbox_seq"
"""The sequence numbering the adopted table's rows, in the relay's schema (where the relay's role may
create objects; it need not have CREATE on the table's schema)."""


def index_name(table: OutboxTable) -> str:
    return f"{table.name[:43]}_outbox_relay_txid"


def _table(table: OutboxTable) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


def _sequence(schema: str) -> str:
    return f"{quote_ident(schema)}.{SEQUENCE}"


def _bucket(alias: str, table: OutboxTable) -> str:
    """The row's hash bucket, as the relay's own outbox computes it (keyless rows spread by number)."""
    key = table.columns.key
    keyed = f"{alias}.{quote_ident(key)}::text" if key else "NULL::text"
    return f"(hashtextextended(coalesce({keyed}, {alias}.{SEQ_COLUMN}::text), 0) & 4095)::smallint"


def view_sql(schema: str, table: OutboxTable, payload_type: str) -> str:
    """The view ``<schema>.outbox``: the adopted table in the relay's outbox columns and types, only
    the rows written since provision. Its columns never change with the mapping (so ``CREATE OR
    REPLACE`` takes a new mapping)."""
    cols = table.columns
    payload = f"t.{quote_ident(cols.payload)}"
    payload_bytes = payload if payload_type == "bytea" else f"convert_to({payload}::text, 'UTF8')"
    pairs = ", ".join(f"{quote_literal(name)}, t.{quote_ident(column)}::text" for name, column in cols.headers.items())
    headers = f"jsonb_strip_nulls(jsonb_build_object({pairs}))" if pairs else "'{}'::jsonb"
    key = f"t.{quote_ident(cols.key)}::text" if cols.key else "NULL::text"
    return (
        f"CREATE OR REPLACE VIEW {quote_ident(schema)}.outbox AS SELECT "
        f"t.{TXID_COLUMN} AS txid, t.{SEQ_COLUMN} AS id, t.{quote_ident(cols.topic)}::text AS topic, "
        f"{key} AS key, {_bucket('t', table)} AS bucket, coalesce({payload_bytes}, ''::bytea) AS payload, "
        f"{headers} AS headers, t.{AT_COLUMN} AS created_at, t.{quote_ident(cols.id)}::uuid AS message_id "
        f"FROM {_table(table)} AS t WHERE t.{TXID_COLUMN} IS NOT NULL"
    )


def notify_sql(schema: str, table: OutboxTable) -> list[str]:
    """The insert trigger: one NOTIFY per inserting statement naming the buckets it wrote, on the
    channel the relay's own outbox uses (so the relay's LISTEN is the same)."""
    function = f"{quote_ident(schema)}.{NOTIFY_FUNCTION}"
    body = (
        "DECLARE buckets text; BEGIN "
        "SELECT CASE WHEN count(*) > 64 THEN '' ELSE string_agg(bucket::text, ',') END INTO buckets "
        f"FROM (SELECT DISTINCT {_bucket('n', table)} AS bucket FROM new_rows AS n LIMIT 65) AS written; "
        f"PERFORM pg_notify({quote_literal(notify_channel(schema))}, coalesce(buckets, '')); "
        "RETURN NULL; END"
    )
    return [
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $adopt${body}$adopt$",
        f"DROP TRIGGER IF EXISTS {TRIGGER} ON {_table(table)}",
        f"CREATE TRIGGER {TRIGGER} AFTER INSERT ON {_table(table)} REFERENCING NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
    ]


def columns_sql(schema: str, table: OutboxTable) -> list[str]:
    """The columns, added without a default and then given one: both touch only the catalog.

    A default's ``nextval`` runs as the inserting role, so the table's owner (often the application's
    role) and every role granted INSERT on the table get ``USAGE`` on the sequence."""
    t = _table(table)
    seq_literal = quote_literal(_sequence(schema))
    inserters = (
        "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END "
        "AS grantee FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a "
        f"WHERE c.oid = {quote_literal(t)}::regclass AND a.privilege_type = 'INSERT' "
        "UNION SELECT quote_ident(pg_get_userbyid(c.relowner)) FROM pg_class AS c "
        f"WHERE c.oid = {quote_literal(t)}::regclass"
    )
    return [
        f"CREATE SEQUENCE IF NOT EXISTS {_sequence(schema)}",
        f"DO $grant$ DECLARE r record; BEGIN FOR r IN {inserters} LOOP "
        f"EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %s', {seq_literal}, r.grantee); END LOOP; END $grant$",
        f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {TXID_COLUMN} xid8, ADD COLUMN IF NOT EXISTS {SEQ_COLUMN} bigint, "
        f"ADD COLUMN IF NOT EXISTS {AT_COLUMN} timestamptz",
        f"ALTER TABLE {t} ALTER COLUMN {TXID_COLUMN} SET DEFAULT pg_current_xact_id(), "
        f"ALTER COLUMN {SEQ_COLUMN} SET DEFAULT nextval({seq_literal}::regclass), "
        f"ALTER COLUMN {AT_COLUMN} SET DEFAULT clock_timestamp()",
    ]


def meta_sql(schema: str) -> list[str]:
    """``outbox_meta`` as the relay's own outbox has it (version 2: the rows carry message ids)."""
    s = quote_ident(schema)
    return [
        f"CREATE TABLE IF NOT EXISTS {s}.outbox_meta (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), "
        "version integer NOT NULL, id_namespace uuid DEFAULT gen_random_uuid())",
        f"INSERT INTO {s}.outbox_meta (version) VALUES (2) ON CONFLICT (singleton) DO NOTHING",
    ]


def index_sql(table: OutboxTable) -> str:
    """The read's index, over the rows written since provision (the old rows are never read)."""
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote_ident(index_name(table))} ON {_table(table)} "
        f"({TXID_COLUMN}, {SEQ_COLUMN}) WHERE {TXID_COLUMN} IS NOT NULL"
    )


def columns_step_sql(schema: str, table: OutboxTable) -> list[str]:
    """Step 1, in one transaction: the relay's schema when it is missing, the sequence, the columns."""
    create_schema = (
        f"DO $schema$ BEGIN IF to_regnamespace({quote_literal(schema)}) IS NULL THEN "
        f"CREATE SCHEMA {quote_ident(schema)}; END IF; END $schema$"
    )
    return [create_schema, *columns_sql(schema, table)]


def relay_step_sql(schema: str, table: OutboxTable, payload_type: str) -> list[str]:
    """Step 3, in one transaction, once the index is there: the trigger, the view, ``outbox_meta``.
    Until the view exists no relay reads the table, so none reads it without the index; the rows
    written since step 1 have their txid and are in the view from the start."""
    return [*notify_sql(schema, table), view_sql(schema, table, payload_type), *meta_sql(schema)]


def script(schema: str, table: OutboxTable, payload_type: str = "jsonb") -> str:
    """What provision runs, as one script to apply by hand (``GET .../schema.sql``)."""
    payload_note = (
        "-- The view publishes the payload column's text as UTF-8 (jsonb, json, text); for a bytea payload,\n"
        "-- provision (which reads the column's type) publishes the bytes as they are.\n"
    )
    return (
        f"-- Outbox Relay: adopting {table.schema}.{table.name} (docs/delivery.md, 'Adopting an existing outbox').\n"
        "-- Steps 1 and 3 touch only the catalog: run them with a short lock_timeout, and again when they give way.\n"
        "-- A role granted INSERT on the table later also needs: GRANT USAGE ON SEQUENCE "
        f"{_sequence(schema)} TO <role>;\n"
        "-- Step 1:\n"
        "BEGIN;\nSET LOCAL lock_timeout = '2s';\n" + ";\n".join(columns_step_sql(schema, table)) + ";\nCOMMIT;\n"
        "-- Step 2, outside a transaction (it never blocks writers):\n"
        f"{index_sql(table)};\n"
        "-- Step 3:\n"
        + payload_note
        + "BEGIN;\nSET LOCAL lock_timeout = '2s';\n"
        + ";\n".join(relay_step_sql(schema, table, payload_type))
        + ";\nCOMMIT;\n"
    )


def removal_sql(schema: str, table: OutboxTable) -> str:
    """What takes the adoption back out (documented; the relay never runs it)."""
    t = _table(table)
    return (
        f"DROP TRIGGER IF EXISTS {TRIGGER} ON {t};\n"
        f"DROP VIEW IF EXISTS {quote_ident(schema)}.outbox;\n"
        f"DROP FUNCTION IF EXISTS {quote_ident(schema)}.{NOTIFY_FUNCTION}();\n"
        f"DROP TABLE IF EXISTS {quote_ident(schema)}.outbox_meta;\n"
        f"DROP INDEX CONCURRENTLY IF EXISTS {quote_ident(table.schema)}.{quote_ident(index_name(table))};\n"
        f"ALTER TABLE {t} DROP COLUMN IF EXISTS {TXID_COLUMN}, DROP COLUMN IF EXISTS {SEQ_COLUMN},\n"
        f"    DROP COLUMN IF EXISTS {AT_COLUMN};  -- catalog only, no rewrite\n"
        f"DROP SEQUENCE IF EXISTS {_sequence(schema)};\n"
    )


# --- checking the table, at provision --------------------------------------------------------------

_TABLE_SQL = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS name, quote_ident(n.nspname) AS schema,
       c.relkind::text AS relkind, pg_has_role(c.relowner, 'USAGE') AS owned,
       has_schema_privilege(n.oid, 'CREATE') AS schema_create, quote_ident(current_user) AS role,
       (SELECT jsonb_object_agg(a.attname, format_type(a.atttypid, a.atttypmod)) FROM pg_attribute AS a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""
_RELAY_OUTBOX_SQL = """
SELECT c.relkind::text FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = 'outbox'
"""
_INVALID_INDEX_SQL = """
SELECT NOT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2
"""


@dataclass(frozen=True, slots=True)
class TableCheck:
    """What provision found out about the table to adopt, before it changed anything: ``problems``
    (each a sentence for the tenant; empty: adoptable), and the payload column's type."""

    problems: list[str]
    payload_type: str
    missing: list[tuple[str, str, str]] = field(default_factory=list)
    """Privileges the connecting role lacks on the table: (privilege, object, the grant). Adding
    columns, an index and a trigger are the owner's (or a member's), and ``CREATE INDEX`` also wants
    CREATE on the table's schema."""


async def check_table(conn: asyncpg.Connection, schema: str, table: OutboxTable) -> TableCheck:
    """Read-only: whether ``table`` exists with the mapped columns, of usable types, and whether the
    relay's schema is free for the view (it must not hold the relay's own outbox)."""
    where = f"{table.schema}.{table.name}"
    row = await conn.fetchrow(_TABLE_SQL, table.schema, table.name)
    if row is None:
        return TableCheck([f"table {where} does not exist"], "")
    if row["relkind"] not in ("r", "p"):
        return TableCheck([f"{where} is not a table"], "")
    types: dict[str, str] = json.loads(row["columns"] or "{}")
    cols = table.columns
    problems: list[str] = []
    mapped = {"id": cols.id, "topic": cols.topic, "payload": cols.payload}
    if cols.key:
        mapped["key"] = cols.key
    mapped.update({f"headers[{name!r}]": column for name, column in cols.headers.items()})
    for mapping, column in mapped.items():
        if column not in types:
            problems.append(f"table.columns.{mapping}: table {where} has no column {column!r}")
    if cols.id in types and types[cols.id] != ID_TYPE:
        problems.append(f"table.columns.id: column {cols.id!r} is {types[cols.id]}, not uuid (the message id)")
    payload_type = types.get(cols.payload, "")
    if cols.payload in types and not payload_type.startswith(PAYLOAD_TYPES):
        problems.append(
            f"table.columns.payload: column {cols.payload!r} is {payload_type}, not one of {', '.join(PAYLOAD_TYPES)}"
        )
    for column in ADDED_COLUMNS:
        if column in mapped.values():
            problems.append(f"table.columns: {column!r} is a column provision adds; map the table's own columns")
    relkind = await conn.fetchval(_RELAY_OUTBOX_SQL, schema)
    if relkind is not None and relkind != "v":
        problems.append(
            f"schema {schema} holds the relay's own outbox table; adopt a table with another `schema` for the relay"
        )
    missing: list[tuple[str, str, str]] = []
    name, role = row["name"], row["role"]
    if not row["owned"]:
        missing.append(("OWNER", f"table {name}", f"ALTER TABLE {name} OWNER TO {role}"))
    if not row["schema_create"]:
        missing.append(("CREATE", f"schema {row['schema']}", f"GRANT CREATE ON SCHEMA {row['schema']} TO {role}"))
    return TableCheck(problems, "bytea" if payload_type == "bytea" else payload_type, missing)


INDEX_LOCK_TIMEOUT_MS = 10_000
"""How long the index build waits for its lock and for the transactions it must outlast: its lock
(SHARE UPDATE EXCLUSIVE) conflicts with no writer's, so writers do not queue behind it meanwhile."""


async def adopt(
    conn: asyncpg.Connection,
    schema: str,
    table: OutboxTable,
    payload_type: str,
    *,
    lock_timeout_ms: int,
    attempts: int,
    index_lock_timeout_ms: int = INDEX_LOCK_TIMEOUT_MS,
) -> None:
    """Steps 1 to 3 (:func:`script`); steps 1 and 3 wait at most ``lock_timeout_ms`` for the table's
    lock, then give way and try again, up to ``attempts`` times, as the index build does with
    ``index_lock_timeout_ms`` (``asyncpg.LockNotAvailableError`` after the last). Each step is done
    again harmlessly, so a provision that gave way resumes where it stopped."""

    async def in_transaction(statements: list[str]) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "outbox_relay.provision." + schema)
            await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
            for statement in statements:
                await conn.execute(statement)

    async def columns() -> None:
        await in_transaction(columns_step_sql(schema, table))

    async def index() -> None:
        # An earlier build that gave way leaves an invalid index behind: drop it and build again.
        if await conn.fetchval(_INVALID_INDEX_SQL, table.schema, index_name(table)):
            await conn.execute(
                f"DROP INDEX CONCURRENTLY IF EXISTS {quote_ident(table.schema)}.{quote_ident(index_name(table))}"
            )
        await conn.execute(f"SET lock_timeout = {int(index_lock_timeout_ms)}")
        await conn.execute("SET statement_timeout = 0")  # a big table's build may take long; it blocks no one
        try:
            await conn.execute(index_sql(table))
        finally:
            await conn.execute("RESET lock_timeout; RESET statement_timeout")

    async def relay() -> None:
        await in_transaction(relay_step_sql(schema, table, payload_type))

    for step in (columns, index, relay):
        for attempt in range(1, attempts + 1):
            try:
                await step()
                break
            except asyncpg.LockNotAvailableError:
                if attempt == attempts:
                    raise
                await asyncio.sleep(0.2 * attempt)
