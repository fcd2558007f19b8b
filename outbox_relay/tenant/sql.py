"""SQL for the tenant outbox: the schema to install and the write-free read.

Identifiers (the schema name) come from tenants: they are checked against
``IDENT_PATTERN`` and quoted; values always travel as placeholders.
"""

from __future__ import annotations

import re
from importlib import resources

from outbox_relay.domain import IDENT_PATTERN

SCHEMA_VERSION = 1
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
    )


def insert_sql(schema: str) -> str:
    return (
        f"INSERT INTO {quote_ident(schema)}.outbox (topic, key, payload, headers) "
        "VALUES ($1, $2, $3, $4::jsonb) RETURNING id"
    )


def poll_sql(schema: str) -> str:
    """Committed rows of one relay partition after the cursor, below the xmin horizon.

    Below ``pg_snapshot_xmin`` every transaction has ended, so no row can appear later behind
    the cursor and rows of rolled-back transactions never show up. Parameters:
    $1 cursor txid, $2 cursor id, $3 partitions, $4 partition, $5 limit.
    """
    return (
        # The table is aliased so that ORDER BY names its columns: the select list's
        # ``txid`` is a bigint expression, and ordering by it would skip the (txid, id)
        # index and sort (polls went from ~1 ms to 10-126 ms on a busy outbox).
        f"SELECT o.txid::text::bigint AS txid, o.id, o.topic, o.key, o.payload, o.headers::text AS headers, "
        f"o.created_at FROM {quote_ident(schema)}.outbox AS o "
        "WHERE (o.txid, o.id) > ($1::bigint::text::xid8, $2::bigint) "
        "AND o.txid < pg_snapshot_xmin(pg_current_snapshot()) "
        "AND o.bucket % $3::int = $4::int "
        "ORDER BY o.txid, o.id LIMIT $5"
    )


HORIZON_SQL = (
    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, pg_current_snapshot()::text AS snapshot"
)


def scan_sql(schema: str) -> str:
    """Committed rows of a relay's partitions after a position, below the xmin horizon, in order,
    each with its partition: the fleet data plane reads once per relay and hands rows to lanes.

    Two index range scans instead of one row comparison ``(txid, id) > (t, i)``: the planner
    estimates that comparison at one row when many rows share a txid (one big transaction) and then
    sorts the whole backlog after the cursor for every poll. The rest of the cursor's transaction
    (``txid = t AND id > i``, ordered by id) and the transactions after it (``txid > t``, ordered by
    txid, id) each read their index in order and stop at the limit; only the at most 2 x limit rows
    they return are merged. Parameters: $1 txid, $2 id, $3 partitions, $4 the partitions wanted
    (int[], null: all), $5 limit.
    """
    columns = (
        "o.bucket % $3::int AS part, o.txid::text::bigint AS txid, o.id, o.topic, o.key, o.payload, "
        "o.headers::text AS headers, o.created_at"
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
