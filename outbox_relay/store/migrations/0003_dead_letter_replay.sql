-- Dead-letter replay: who holds a letter while it is being replayed, and bulk replay jobs.

-- A replay claims its letter (status 'replaying', claimed_by = a token) with a compare-and-set from
-- 'dead', so two replays of one letter never run at once; only the claimer may finish it. A claim
-- older than the stale limit (a process that died mid-replay) may be taken over.
ALTER TABLE dead_letters
    ADD COLUMN claimed_by       text,
    ADD COLUMN claimed_at       timestamptz,
    ADD COLUMN last_replayed_at timestamptz,
    ADD COLUMN discarded_at     timestamptz;

-- The admin key lists across tenants, newest first.
CREATE INDEX dead_letters_created ON dead_letters (created_at DESC, id);
-- The list's counts per relay and error class (an index-only scan of the tenant's letters), and
-- "what happened to order 123": the key filter.
CREATE INDEX dead_letters_counts ON dead_letters (tenant_id, status, relay_name, error_class);
CREATE INDEX dead_letters_tenant_key ON dead_letters (tenant_id, key, created_at DESC);

-- A bulk replay runs as an arq job; this row is its progress. letter_ids is the set the caller
-- confirmed (an id list, or what the filter matched when the job was created).
CREATE TABLE dead_letter_jobs (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid REFERENCES tenants(id) ON DELETE CASCADE,
    actor       text NOT NULL,
    status      text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running', 'done', 'failed')),
    filter      jsonb,
    letter_ids  uuid[] NOT NULL,
    target_name text,
    destination text,
    total       integer NOT NULL,
    replayed    integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    skipped     integer NOT NULL DEFAULT 0,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letter_jobs_tenant_created ON dead_letter_jobs (tenant_id, created_at DESC);
