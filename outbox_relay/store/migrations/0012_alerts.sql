-- Alerts (issue 19, item 3): a tenant's alert channels (a webhook URL, an optional signing secret,
-- which events about which relays), what the fleet's evaluation has seen, and each alert it owes.

-- A tenant's alert channel, a resource like a target (spec as written, write-only secret encrypted).
CREATE TABLE alerts (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        text NOT NULL,
    spec        jsonb NOT NULL,
    secret      bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- One row: when the fleet last evaluated (the next evaluation's "since"); the evaluation runs under an
-- advisory lock and only when this is older than the interval, so once per fleet, not once per worker.
CREATE TABLE alert_marks (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    evaluated_at  timestamptz NOT NULL DEFAULT now(),
    evaluations   bigint NOT NULL DEFAULT 0
);
INSERT INTO alert_marks DEFAULT VALUES;

-- A relay's current stall cause and since when it has lasted (the same kind kept: its first sighting
-- stays); gone when the relay has no cause any more. As many rows as relays with a cause.
CREATE TABLE alert_stalls (
    relay_id    uuid PRIMARY KEY REFERENCES relays(id) ON DELETE CASCADE,
    kind        text NOT NULL,
    cause       jsonb NOT NULL,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL
);

-- A lease a worker lost (its partition taken over, its membership lapsed), kept for the alert window.
CREATE TABLE lease_losses (
    relay_id    uuid NOT NULL REFERENCES relays(id) ON DELETE CASCADE,
    partition   integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lease_losses_at ON lease_losses (at);

-- A request a quota refused (409 quota-exceeded, replays-in-flight), one row per tenant and quota.
CREATE TABLE quota_refusals (
    tenant_id   uuid NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    quota       text NOT NULL,
    detail      text NOT NULL,
    count       bigint NOT NULL DEFAULT 1,
    first_at    timestamptz NOT NULL DEFAULT now(),
    last_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, quota)
);
CREATE INDEX quota_refusals_last ON quota_refusals (last_at);

-- The partitions that may have a status cause (the evaluation's first read), and the per-slice leases
-- (the fleet's partitions have none: their holder's heartbeat is their lease).
CREATE INDEX relay_partitions_troubled ON relay_partitions (relay_id)
    WHERE retry_outbox_id IS NOT NULL OR stall IS NOT NULL;
CREATE INDEX relay_partitions_errors ON relay_partitions (last_error_at) WHERE last_error_at IS NOT NULL;
CREATE INDEX relay_partitions_expiring ON relay_partitions (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;

-- The evaluation reads the dead letters (dead_letters_created, 0003) and restores that appeared since
-- its last run.
CREATE INDEX relay_partitions_restore_detected ON relay_partitions (restore_detected_at)
    WHERE restore_detected_at IS NOT NULL;

-- The alert owed to one channel ('alert:<uuid>' of a tenant's, 'operator') about one subject
-- ('relay:<uuid>', 'quota:<tenant uuid>:<quota>') and event kind: one per period. sent_at NULL: not
-- yet taken by the endpoint, sent again at the next evaluation; once sent, nothing more for the same
-- triple until period_s after it was raised.
CREATE TABLE alert_deliveries (
    channel     text NOT NULL,
    subject     text NOT NULL,
    kind        text NOT NULL,
    id          uuid NOT NULL,
    alert_id    uuid REFERENCES alerts(id) ON DELETE CASCADE,
    tenant_id   uuid REFERENCES tenants(id) ON DELETE CASCADE,
    body        json NOT NULL,
    raised_at   timestamptz NOT NULL,
    sent_at     timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    claimed_until timestamptz,
    PRIMARY KEY (channel, subject, kind)
);
CREATE INDEX alert_deliveries_unsent ON alert_deliveries (raised_at) WHERE sent_at IS NULL;
