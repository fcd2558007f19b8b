-- Per-tenant quotas and the dashboard's server-side sessions.

-- The operator's override of each quota for this tenant; NULL follows the service default
-- (OUTBOX_RELAY_QUOTA_<NAME>). Creating a resource locks the tenant row, so concurrent creations of one
-- tenant are counted one after the other.
ALTER TABLE tenants
    ADD COLUMN quota_relays     integer CHECK (quota_relays >= 0),
    ADD COLUMN quota_databases  integer CHECK (quota_databases >= 0),
    ADD COLUMN quota_targets    integer CHECK (quota_targets >= 0),
    ADD COLUMN quota_partitions integer CHECK (quota_partitions >= 0),
    ADD COLUMN quota_api_keys   integer CHECK (quota_api_keys >= 0);

-- A signed-in dashboard browser. The cookie carries only a random token; its SHA-256 is the key here.
-- key_hash is the hash of the API key that signed in (the admin key's too), checked again on every
-- request, so revoking the key ends its sessions; signing out deletes the row, so a copied cookie
-- stops working everywhere at once.
CREATE TABLE ui_sessions (
    token_hash  bytea PRIMARY KEY,
    key_hash    bytea NOT NULL,
    csrf        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX ui_sessions_key ON ui_sessions (key_hash);
CREATE INDEX ui_sessions_expires ON ui_sessions (expires_at);
