"""The client's SQL, written once with ``$n`` placeholders (see ``_drivers`` for the other styles).

Schema and table names are validated identifiers (``quote_ident``); values always travel as
parameters.
"""

from __future__ import annotations

import functools

from outbox_relay.client.message import ClientError
from outbox_relay.tenant.sql import quote_ident as _quote_ident


def quote_ident(name: str) -> str:
    try:
        return _quote_ident(name)
    except ValueError as exc:
        raise ClientError(str(exc)) from exc


@functools.cache
def insert_one(schema: str) -> str:
    return (
        f"INSERT INTO {quote_ident(schema)}.outbox (topic, key, payload, headers) "
        "VALUES ($1, $2, $3, CAST($4 AS jsonb)) RETURNING message_id"
    )


@functools.cache
def insert_many(schema: str) -> str:
    """One statement for a whole batch: four arrays, unnested in the caller's order.

    ``ORDER BY n`` makes the identity values follow the batch order, so messages of one key keep
    the order they were given in (the relay reads ``ORDER BY txid, id``). Returns ``(id,
    message_id)``: the ids map the message ids back onto the batch.
    """
    return (
        f"INSERT INTO {quote_ident(schema)}.outbox (topic, key, payload, headers) "
        "SELECT m.topic, m.key, m.payload, CAST(m.headers AS jsonb) "
        "FROM unnest(CAST($1 AS text[]), CAST($2 AS text[]), CAST($3 AS bytea[]), CAST($4 AS text[])) "
        "WITH ORDINALITY AS m(topic, key, payload, headers, n) "
        "ORDER BY m.n RETURNING id, message_id"
    )


@functools.cache
def inbox_install(schema: str, table: str) -> str:
    """Creates the inbox table; one statement, serialised by an advisory lock so that consumers
    starting together do not trip over each other's ``CREATE ... IF NOT EXISTS``."""
    s, t = quote_ident(schema), quote_ident(table)
    index = quote_ident(f"{table}_expiry")
    return (
        "DO $inbox$ BEGIN "
        "PERFORM pg_advisory_xact_lock(hashtextextended('outbox_relay.inbox.install', 0)); "
        f"CREATE SCHEMA IF NOT EXISTS {s}; "
        f"CREATE TABLE IF NOT EXISTS {s}.{t} ("
        " consumer text NOT NULL,"
        " relay text NOT NULL,"
        " message_id text NOT NULL,"
        " received_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
        " PRIMARY KEY (consumer, relay, message_id)); "
        f"CREATE INDEX IF NOT EXISTS {index} ON {s}.{t} (consumer, received_at); "
        # An inbox from before message ids keyed on the bigint row id: ids are text now (UUIDs, and
        # the decimal row ids of messages published before). A one-time rewrite of the table,
        # which the retention window keeps small.
        "IF (SELECT atttypid = 'bigint'::regtype FROM pg_attribute "
        f"WHERE attrelid = '{s}.{t}'::regclass AND attname = 'message_id') THEN "
        f"ALTER TABLE {s}.{t} ALTER COLUMN message_id TYPE text USING message_id::text; "
        "END IF; "
        "END $inbox$"
    )


@functools.cache
def inbox_claim(schema: str, table: str) -> str:
    """A row when the message is new; none when it was seen (or a concurrent transaction that
    inserted it commits first: ``ON CONFLICT`` waits for it)."""
    return (
        f"INSERT INTO {quote_ident(schema)}.{quote_ident(table)} (consumer, relay, message_id) "
        "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING message_id"
    )


@functools.cache
def inbox_seen(schema: str, table: str) -> str:
    return (
        f"SELECT true FROM {quote_ident(schema)}.{quote_ident(table)} "
        "WHERE consumer = $1 AND relay = $2 AND message_id = $3"
    )


@functools.cache
def inbox_expire(schema: str, table: str) -> str:
    """Deletes at most $3 of consumer $1's ids older than $2 seconds; skips rows another expiry holds."""
    qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
    return (
        f"WITH gone AS (DELETE FROM {qualified} WHERE ctid = ANY (ARRAY("
        f"SELECT ctid FROM {qualified} WHERE consumer = $1 "
        "AND received_at < clock_timestamp() - make_interval(secs => CAST($2 AS double precision)) "
        "LIMIT $3 FOR UPDATE SKIP LOCKED)) RETURNING 1) "
        "SELECT count(*) FROM gone"
    )
