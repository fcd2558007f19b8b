-- Rotating a database's or a target's password without a gap (issue 19, item 5). A PUT that changes
-- only the password of a resource that has one (or the password and the user it logs in as: the
-- spec with the new user waits in pending_spec) starts a rotation: the new secret waits in
-- pending_secret next to the current one (both are valid on the server meanwhile), each worker
-- switches to it make-before-break and reports the version it uses in worker_credentials, and once
-- every live worker owning a partition of a relay using the resource reports the pending version, the
-- pending secret replaces the current one (the old one is gone from the store). updated_at does not
-- move during a rotation: the relays are not restarted; the workers hear of it as 'rotations:...'.
ALTER TABLE databases
    ADD COLUMN secret_version integer NOT NULL DEFAULT 0,
    ADD COLUMN pending_secret bytea,
    ADD COLUMN pending_spec jsonb,
    ADD COLUMN pending_version integer,
    ADD COLUMN rotation_started_at timestamptz;
ALTER TABLE targets
    ADD COLUMN secret_version integer NOT NULL DEFAULT 0,
    ADD COLUMN pending_secret bytea,
    ADD COLUMN pending_spec jsonb,
    ADD COLUMN pending_version integer,
    ADD COLUMN rotation_started_at timestamptz;
CREATE INDEX databases_rotating ON databases (id) WHERE pending_secret IS NOT NULL;
CREATE INDEX targets_rotating ON targets (id) WHERE pending_secret IS NOT NULL;

-- The credential version each worker uses per resource it has open, and the last version it could
-- not switch to (with the secret-free error). Gone with the worker's membership.
CREATE TABLE worker_credentials (
    worker_key      text NOT NULL REFERENCES workers(key) ON DELETE CASCADE,
    kind            text NOT NULL CHECK (kind IN ('databases', 'targets')),
    resource_id     uuid NOT NULL,
    version         integer NOT NULL,
    refused_version integer,
    error           text,
    reported_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, resource_id, worker_key)
);

CREATE OR REPLACE FUNCTION notify_rotation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay_config', 'rotations:' || TG_TABLE_NAME || ':' || NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER databases_rotation_changed AFTER UPDATE ON databases FOR EACH ROW
    WHEN (OLD.pending_version IS DISTINCT FROM NEW.pending_version
          OR OLD.secret_version IS DISTINCT FROM NEW.secret_version)
    EXECUTE FUNCTION notify_rotation();
CREATE TRIGGER targets_rotation_changed AFTER UPDATE ON targets FOR EACH ROW
    WHEN (OLD.pending_version IS DISTINCT FROM NEW.pending_version
          OR OLD.secret_version IS DISTINCT FROM NEW.secret_version)
    EXECUTE FUNCTION notify_rotation();
