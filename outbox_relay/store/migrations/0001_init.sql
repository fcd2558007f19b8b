-- Control DB schema, version 1: tenants, keys, tenant databases, targets, relays,
-- per-partition cursors and leases, audit log.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL UNIQUE,
    display_name text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- Tenant resources keep the spec exactly as written (minus secrets) in `spec`;
-- the secret, if any, is stored encrypted in `secret`.
CREATE TABLE databases (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        text NOT NULL,
    spec        jsonb NOT NULL,
    secret      bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE targets (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        text NOT NULL,
    kind        text NOT NULL,
    spec        jsonb NOT NULL,
    secret      bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE relays (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        text NOT NULL,
    database_id uuid NOT NULL REFERENCES databases(id) ON DELETE RESTRICT,
    target_id   uuid NOT NULL REFERENCES targets(id) ON DELETE RESTRICT,
    partitions  integer NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
    enabled     boolean NOT NULL DEFAULT true,
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE INDEX relays_database ON relays (database_id);
CREATE INDEX relays_target ON relays (target_id);

-- One row per (relay, partition): the write-free cursor (txid, id) into the tenant outbox
-- and the fenced lease. Every cursor write checks lease_epoch.
CREATE TABLE relay_partitions (
    relay_id        uuid NOT NULL REFERENCES relays(id) ON DELETE CASCADE,
    partition       integer NOT NULL,
    cursor_txid     bigint NOT NULL DEFAULT 0,
    cursor_id       bigint NOT NULL DEFAULT 0,
    system_identifier text,
    lease_holder    text,
    lease_epoch     bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    last_published_at timestamptz,
    last_error      text,
    last_error_at   timestamptz,
    published_count bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relay_id, partition)
);

CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid REFERENCES tenants(id) ON DELETE SET NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    resource    text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at DESC);
