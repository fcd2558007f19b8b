"""SQL for the tenant outbox: the schema to install and the write-free read.

Identifiers (the schema name) come from tenants: they are checked against
``IDENT_PATTERN`` and quoted; values always travel as placeholders.
"""

from __future__ import annotations

import re
from importlib import resources

from outbox_relay.domain import IDENT_PATTERN

SCHEMA_VERSION = 2
"""1: the outbox; 2: ``message_id`` (a UUID per row) and ``outbox_meta.id_namespace``."""
BUCKETS = 4096
_IDENT = re.compile(IDENT_PATTERN)


def quote_ident(name: str) -> str:
    """Quote a validated identifier; refuse anything outside ``IDENT_PATTERN``."""
    if not _IDENT.match(name):
        raise ValueError(f"invalid SQL identifier {name!r}: use lower-case letters, digits and '_'")
    return '"' + name + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel the insert trigger of ``schema``'s outbox signals."""
    quote_ident(schema)
    return f"outbox_relay_{schema}"


def schema_sql(schema: str = "outbox_relay") -> str:
    """The DDL that installs (or re-applies) the outbox into ``schema``."""
    template = resources.files("outbox_relay.tenant").joinpath("schema.sql").read_text()
    return template.format(
        schema=quote_ident(schema),
        schema_literal=quote_literal(schema),
        channel=quote_literal(notify_channel(schema)),
        outbox_literal=quote_literal(f"{quote_ident(schema)}.outbox"),
        meta_literal=quote_literal(f"{quote_ident(schema)}.outbox_meta"),
    )


def insert_sql(schema: str) -> str:
    return (
        f"INSERT INTO {quote_ident(schema)}.outbox (topic, key, payload, headers) "
        "VALUES ($1, $2, $3, $4::jsonb) RETURNING message_id"
    )


_COLUMNS = "o.txid::text::bigint AS txid, o.id, o.topic, o.key, o.payload, o.headers::text AS headers, o.created_at, "
_AFTER_CURSOR = "WHERE (o.txid, o.id) > ($1::bigint::text::xid8, $2::bigint) "
_MINE = "AND o.bucket % $3::int = $4::int "


def poll_sql(schema: str, version: int = SCHEMA_VERSION) -> str:
    """Committed rows of one relay partition after the cursor, below the xmin horizon.

    Below ``pg_snapshot_xmin`` every transaction has ended, so no row can appear later behind
    the cursor and rows of rolled-back transactions never show up. Parameters:
    $1 cursor txid, $2 cursor id, $3 partitions, $4 partition, $5 limit, and the restore fence
    $6 id, $7 created_at: rows with ``id <= $6 AND created_at <= $7`` are a restored backlog that
    was read (or skipped) on its own. They come back marked ``fenced`` and without their payload,
    so that the cursor moves over them (rather than each poll filtering them again and again) and
    nothing publishes them (``0`` and ``-infinity`` fence nothing).
    ``version`` is the outbox's schema version: 1 has no ``message_id`` column (NULL is read).
    """
    message_id = "o.message_id" if version >= 2 else "NULL::uuid AS message_id"
    fenced = "(o.id <= $6::bigint AND o.created_at <= $7::timestamptz)"
    return (
        # The table is aliased so that ORDER BY names its columns: the select list's
        # ``txid`` is a bigint expression, and ordering by it would skip the (txid, id)
        # index and sort (polls went from ~1 ms to 10-126 ms on a busy outbox).
        "SELECT o.txid::text::bigint AS txid, o.id, o.topic, o.key, "
        f"CASE WHEN {fenced} THEN ''::bytea ELSE o.payload END AS payload, "
        f"o.headers::text AS headers, o.created_at, {message_id}, {fenced} AS fenced "
        f"FROM {quote_ident(schema)}.outbox AS o "
        f"{_AFTER_CURSOR}"
        "AND o.txid < pg_snapshot_xmin(pg_current_snapshot()) "
        f"{_MINE}"
        "ORDER BY o.txid, o.id LIMIT $5"
    )


_IN_BACKLOG = "AND o.id <= $6::bigint AND o.created_at <= $7::timestamptz "


def backlog_poll_sql(schema: str, version: int = SCHEMA_VERSION) -> str:
    """The restored backlog of one partition after the cursor, in ``(txid, id)`` order.

    The backlog (``id <= $6 AND created_at <= $7``) is a closed set of rows that existed when the
    restore was detected. Rows whose txid is at or above the server's next transaction id at that
    moment ($8) cannot come from a transaction of this server: they are read at once, whatever the
    horizon. Rows below it are read under the horizon as usual, and until the horizon has passed $8
    (every transaction open at detection has ended) nothing at or above it is read, so the read
    stays a prefix in ``(txid, id)`` order and never skips a row. $1-$5 as in :func:`poll_sql`.
    """
    message_id = "o.message_id" if version >= 2 else "NULL::uuid AS message_id"
    return (
        f"SELECT {_COLUMNS}{message_id}, false AS fenced FROM {quote_ident(schema)}.outbox AS o "
        f"{_AFTER_CURSOR}{_IN_BACKLOG}{_MINE}"
        "AND (o.txid < pg_snapshot_xmin(pg_current_snapshot()) "
        "OR pg_snapshot_xmin(pg_current_snapshot()) >= $8::bigint::text::xid8) "
        "ORDER BY o.txid, o.id LIMIT $5"
    )


def backlog_done_sql(schema: str) -> str:
    """True when no backlog row is left after the cursor and the horizon has passed $8 (so none of
    the transactions open at detection can still add one). One statement, one snapshot.
    $1 cursor txid, $2 cursor id, $3 partitions, $4 partition, $5 id bound, $6 created_at bound,
    $7 the next transaction id at detection."""
    return (
        "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $7::bigint::text::xid8 AND NOT EXISTS ("
        f"SELECT 1 FROM {quote_ident(schema)}.outbox AS o {_AFTER_CURSOR}{_MINE}"
        "AND o.id <= $5::bigint AND o.created_at <= $6::timestamptz)"
    )


def restore_bounds_sql(schema: str) -> str:
    """At a detected restore, in one snapshot: the server's next transaction id, the highest id of
    the rows at or above it (restored rows: no transaction of this server has such a txid yet), and
    the latest insert time among them or now, whichever is later (the old cluster's clock may have
    run ahead). ``max_id`` is NULL when no row lies above the counter."""
    outbox = f"{quote_ident(schema)}.outbox"
    return (
        "WITH s AS (SELECT pg_snapshot_xmax(pg_current_snapshot()) AS next_xid) "
        "SELECT s.next_xid::text::bigint AS next_xid, "
        f"(SELECT max(o.id) FROM {outbox} AS o WHERE o.txid >= s.next_xid) AS max_id, "
        f"greatest(clock_timestamp(), (SELECT max(o.created_at) FROM {outbox} AS o WHERE o.txid >= s.next_xid)) "
        "AS max_created_at FROM s"
    )


def backlog_count_sql(schema: str) -> str:
    """How many backlog rows one partition has: $1 id bound, $2 created_at bound, $3 partitions, $4 partition."""
    return (
        f"SELECT count(*) FROM {quote_ident(schema)}.outbox AS o "
        "WHERE o.id <= $1::bigint AND o.created_at <= $2::timestamptz AND o.bucket % $3::int = $4::int"
    )


def meta_sql(schema: str) -> str:
    """The outbox's schema version and id namespace (``to_jsonb`` reads a version 1 table, which has
    no namespace column, with the same statement)."""
    return f"SELECT version, to_jsonb(m) ->> 'id_namespace' AS id_namespace FROM {quote_ident(schema)}.outbox_meta AS m"


HORIZON_SQL = (
    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, pg_current_snapshot()::text AS snapshot"
)


def scan_sql(schema: str, version: int = SCHEMA_VERSION) -> str:
    """Committed rows of a relay's partitions after a position, below the xmin horizon, in order,
    each with its partition: the fleet data plane reads once per relay and hands rows to lanes.

    Two index range scans instead of one row comparison ``(txid, id) > (t, i)``: the planner
    estimates that comparison at one row when many rows share a txid (one big transaction) and then
    sorts the whole backlog after the cursor for every poll. The rest of the cursor's transaction
    (``txid = t AND id > i``, ordered by id) and the transactions after it (``txid > t``, ordered by
    txid, id) each read their index in order and stop at the limit; only the at most 2 x limit rows
    they return are merged. Parameters: $1 txid, $2 id, $3 partitions, $4 the partitions wanted
    (int[], null: all), $5 limit. ``version`` as in :func:`poll_sql` (1: no ``message_id`` column).
    A restored backlog's fence is applied by the reader, per partition.
    """
    message_id = "o.message_id" if version >= 2 else "NULL::uuid AS message_id"
    columns = (
        "o.bucket % $3::int AS part, o.txid::text::bigint AS txid, o.id, o.topic, o.key, o.payload, "
        f"o.headers::text AS headers, o.created_at, {message_id}, false AS fenced"
    )
    table = f"{quote_ident(schema)}.outbox AS o"
    wanted = "($4::int[] IS NULL OR o.bucket % $3::int = ANY($4::int[]))"
    return (
        f"SELECT * FROM ((SELECT {columns} FROM {table} "
        f"WHERE o.txid = $1::bigint::text::xid8 AND o.id > $2::bigint AND {wanted} ORDER BY o.id LIMIT $5) "
        f"UNION ALL (SELECT {columns} FROM {table} "
        "WHERE o.txid > $1::bigint::text::xid8 AND o.txid < pg_snapshot_xmin(pg_current_snapshot()) "
        f"AND {wanted} ORDER BY o.txid, o.id LIMIT $5)) AS q ORDER BY q.txid, q.id LIMIT $5"
    )


def newest_sql(schema: str) -> str:
    """The position of the newest committed row (one backward index probe): what the LISTEN
    connection compares between two of its probes."""
    return (
        f"SELECT o.txid::text::bigint AS txid, o.id FROM {quote_ident(schema)}.outbox AS o "
        "ORDER BY o.txid DESC, o.id DESC LIMIT 1"
    )


def next_row_sql(schema: str) -> str:
    """The insert time of the first row after a position, committed or not yet below the horizon:
    one index probe, the lag of the partitions reading from there. $1 txid, $2 id."""
    table = f"{quote_ident(schema)}.outbox AS o"
    return (
        f"SELECT min(created_at) FROM ((SELECT o.created_at FROM {table} "
        "WHERE o.txid = $1::bigint::text::xid8 AND o.id > $2::bigint ORDER BY o.id LIMIT 1) "
        f"UNION ALL (SELECT o.created_at FROM {table} WHERE o.txid > $1::bigint::text::xid8 "
        "ORDER BY o.txid, o.id LIMIT 1)) AS q"
    )


# --- replay from history (outbox_relay.history) ---------------------------------------------------
# A replay reads a closed set: the rows of a range (insert time, or row id) whose transaction had
# committed in the snapshot taken when the replay was asked for ($3, a pg_snapshot). A transaction that
# snapshot does not see is left out even when it commits later, so the set can only shrink (maintenance
# dropping a passed day), never grow, and paging through it in (txid, id) order misses nothing. The
# snapshot, not the xmin horizon the relay reads below: a transaction left open anywhere on the server
# would hold the horizon back and hide every recent row. A time range is on the partition key, so only
# the days it covers are read.

RANGES = ("inserted_at", "ids")


def _history_range(by: str) -> str:
    """The range condition over alias ``o``: $1 and $2 the bounds, $3 the snapshot (text)."""
    if by == "inserted_at":
        bounds = "o.created_at >= $1::timestamptz AND o.created_at < $2::timestamptz"
    elif by == "ids":
        bounds = "o.id >= $1::bigint AND o.id <= $2::bigint"
    else:
        raise ValueError(f"unknown range {by!r}: one of {', '.join(RANGES)}")
    return (
        f"{bounds} AND o.txid < pg_snapshot_xmax($3::text::pg_snapshot) "
        "AND pg_visible_in_snapshot(o.txid, $3::text::pg_snapshot)"
    )


def history_count_sql(schema: str, by: str) -> str:
    """How many rows the range holds, counted up to $4 (the caller asks for one more than its limit)."""
    return (
        f"SELECT count(*) FROM (SELECT 1 FROM {quote_ident(schema)}.outbox AS o "
        f"WHERE {_history_range(by)} LIMIT $4) AS q"
    )


def history_page_sql(schema: str, by: str, version: int = SCHEMA_VERSION) -> str:
    """The next rows of the range after ($4 txid, $5 id), in (txid, id) order, at most $6. Each row comes
    with its payload's size and first $8 bytes; the payload itself only when $7 (a dry run of a filter
    without a payload leaf reads none)."""
    message_id = "o.message_id" if version >= 2 else "NULL::uuid AS message_id"
    return (
        "SELECT octet_length(o.payload) AS size, substring(o.payload FROM 1 FOR $8::int) AS head, "
        "o.txid::text::bigint AS txid, o.id, o.topic, o.key, "
        "CASE WHEN $7::boolean THEN o.payload ELSE ''::bytea END AS payload, "
        f"o.headers::text AS headers, o.created_at, {message_id}, false AS fenced "
        f"FROM {quote_ident(schema)}.outbox AS o WHERE {_history_range(by)} "
        "AND (o.txid, o.id) > ($4::bigint::text::xid8, $5::bigint) ORDER BY o.txid, o.id LIMIT $6"
    )


def oldest_row_sql(schema: str) -> str:
    """The retained row with the lowest id, and its insert time: where the retained history starts (one
    probe of each day's primary key index)."""
    return f"SELECT o.id, o.created_at FROM {quote_ident(schema)}.outbox AS o ORDER BY o.id LIMIT 1"
