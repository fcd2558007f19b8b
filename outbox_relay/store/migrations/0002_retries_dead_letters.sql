-- Retries and dead letters (issue 3), restore detection, outbox maintenance.

-- The message a partition is retrying, how often it failed and why. It survives slices and worker
-- changes, so a poison message gets exactly its retry budget whoever holds the partition.
ALTER TABLE relay_partitions
    ADD COLUMN retry_outbox_id bigint,
    ADD COLUMN retry_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN retry_errors jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN retry_next_at timestamptz,
    ADD COLUMN dead_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN retried_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN resets integer NOT NULL DEFAULT 0,
    ADD COLUMN last_reset_at timestamptz,
    ADD COLUMN last_reset_reason text;

-- A message the target refused max_attempts times (or could never take): kept whole, with every
-- attempt's error, until an operator replays or discards it.
CREATE TABLE dead_letters (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    relay_id        uuid REFERENCES relays(id) ON DELETE SET NULL,
    relay_name      text NOT NULL,
    target_name     text NOT NULL,
    partition       integer NOT NULL,
    outbox_id       bigint NOT NULL,
    outbox_txid     bigint NOT NULL,
    outbox_created_at timestamptz,
    topic           text NOT NULL,
    key             text,
    destination     text,
    payload         bytea NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{}',
    error_class     text NOT NULL,
    last_error      text NOT NULL,
    attempts        jsonb NOT NULL DEFAULT '[]',
    status          text NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'replaying', 'replayed', 'discarded')),
    replay_count    integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_tenant_created ON dead_letters (tenant_id, created_at DESC, id);
CREATE INDEX dead_letters_relay_created ON dead_letters (relay_id, created_at DESC);
CREATE UNIQUE INDEX dead_letters_once ON dead_letters (relay_id, outbox_id, outbox_txid);

-- Last outbox maintenance per tenant database (partitions created and dropped).
ALTER TABLE databases
    ADD COLUMN maintained_at timestamptz,
    ADD COLUMN maintenance_error text;
