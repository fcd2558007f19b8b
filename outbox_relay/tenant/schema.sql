-- Outbox Relay: the outbox schema for your PostgreSQL database (version 2).
-- Apply it once (the service's "provision" action runs exactly this). Safe to run again, and it
-- upgrades an outbox of version 1 in place without rewriting it (see "version 2" below).
-- The relay never updates or deletes rows: it reads committed rows below the
-- transaction horizon. Old rows go away by dropping whole daily partitions.

-- Only when it is missing: CREATE SCHEMA IF NOT EXISTS would ask for CREATE on the database even when
-- the schema exists, and a schema made ahead for the relay's role is all this needs.
DO $schema$
BEGIN
    IF to_regnamespace({schema_literal}) IS NULL THEN
        CREATE SCHEMA {schema};
    END IF;
END
$schema$;

CREATE TABLE IF NOT EXISTS {schema}.outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    txid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    topic       text NOT NULL CHECK (length(topic) BETWEEN 1 AND 249),
    key         text,
    -- 4096 hash buckets of the key (keyless rows are spread by id); a relay with N
    -- partitions reads the buckets where bucket % N = partition, so one key always
    -- lands in one relay partition, whatever N a relay chooses.
    bucket      smallint GENERATED ALWAYS AS
                ((hashtextextended(coalesce(key, id::text), 0) & 4095)::smallint) STORED,
    payload     bytea NOT NULL,
    headers     jsonb NOT NULL DEFAULT '{{}}',
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The message id consumers dedupe on (`outbox-id` on every broker): random, so unique across
    -- restores, failovers and clusters, where `id` (a sequence) and `txid` can repeat.
    message_id  uuid DEFAULT gen_random_uuid(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

CREATE INDEX IF NOT EXISTS outbox_txid_id ON {schema}.outbox (txid, id);

-- Catches rows whose day has no partition yet, so an insert never fails.
CREATE TABLE IF NOT EXISTS {schema}.outbox_default PARTITION OF {schema}.outbox DEFAULT;

CREATE TABLE IF NOT EXISTS {schema}.outbox_meta (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version     integer NOT NULL,
    -- Rows written before the upgrade to version 2 have no message_id; the relay gives each the
    -- UUID v5 of (id_namespace, "txid:id"). The namespace is data of this database, so a dump,
    -- a restore or a replica derives the same ids, and no other outbox derives them.
    id_namespace uuid DEFAULT gen_random_uuid()
);
INSERT INTO {schema}.outbox_meta (version) VALUES (2) ON CONFLICT (singleton) DO NOTHING;

-- Version 2: message ids. Upgrading a version 1 outbox only touches the catalog: the column is
-- added without a default (no rewrite: a volatile default such as gen_random_uuid() would rewrite
-- every partition under an exclusive lock), then the default is set for new rows. Both take the
-- table lock for an instant; provision waits at most a few seconds for it (lock_timeout) and tries
-- again, so writers are never queued behind it for long. Old rows keep message_id NULL.
DO $upgrade$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass({outbox_literal})
                   AND attname = 'message_id' AND NOT attisdropped) THEN
        ALTER TABLE {schema}.outbox ADD COLUMN message_id uuid;
        ALTER TABLE {schema}.outbox ALTER COLUMN message_id SET DEFAULT gen_random_uuid();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass({meta_literal})
                   AND attname = 'id_namespace' AND NOT attisdropped) THEN
        ALTER TABLE {schema}.outbox_meta ADD COLUMN id_namespace uuid DEFAULT gen_random_uuid();
    END IF;
END
$upgrade$;
UPDATE {schema}.outbox_meta SET id_namespace = gen_random_uuid() WHERE id_namespace IS NULL;
UPDATE {schema}.outbox_meta SET version = 2 WHERE version < 2;

-- Wakes idle relays at commit: one notification per inserting statement, naming the buckets it
-- wrote (comma-separated) so that a worker wakes only the partitions that read them; an empty
-- payload (more than 64 buckets, or an older version of this trigger) wakes every partition.
CREATE OR REPLACE FUNCTION {schema}.outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    buckets text;
BEGIN
    SELECT CASE WHEN count(*) > 64 THEN '' ELSE string_agg(bucket::text, ',') END INTO buckets
    FROM (SELECT DISTINCT bucket FROM new_rows LIMIT 65) AS written;
    PERFORM pg_notify({channel}, coalesce(buckets, ''));
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS outbox_notify ON {schema}.outbox;
CREATE TRIGGER outbox_notify AFTER INSERT ON {schema}.outbox
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.outbox_notify();

-- Daily partitions from today on; the maintenance job keeps creating them ahead.
CREATE OR REPLACE FUNCTION {schema}.outbox_ensure_partitions(days_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    made integer := 0;
    part text;
BEGIN
    FOR i IN 0..days_ahead LOOP
        d := (now() AT TIME ZONE 'UTC')::date + i;
        part := 'outbox_' || to_char(d, 'YYYYMMDD');
        IF to_regclass(format('%I.%I', {schema_literal}, part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I.%I PARTITION OF %I.outbox FOR VALUES FROM (%L) TO (%L)',
                {schema_literal}, part, {schema_literal},
                (d::timestamp AT TIME ZONE 'UTC'), ((d + 1)::timestamp AT TIME ZONE 'UTC'));
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END
$$;

SELECT {schema}.outbox_ensure_partitions(7);
