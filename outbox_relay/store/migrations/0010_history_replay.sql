-- Replay from history (issue 19, item 1): a replay job is either the bulk dead-letter replay it was
-- (kind 'dead_letters', its letters in letter_ids) or a re-publication of retained outbox rows of one
-- relay (kind 'history', its range, filter, target and horizon in spec; letter_ids empty). One job
-- table, one progress (replayed, failed, skipped), one status endpoint for both.
ALTER TABLE dead_letter_jobs
    ADD COLUMN kind text NOT NULL DEFAULT 'dead_letters' CHECK (kind IN ('dead_letters', 'history')),
    ADD COLUMN relay_id uuid REFERENCES relays(id) ON DELETE SET NULL,
    ADD COLUMN relay_name text,
    ADD COLUMN spec jsonb;
-- the per-tenant count of replays in flight, read before each new one
CREATE INDEX dead_letter_jobs_in_flight ON dead_letter_jobs (tenant_id, kind) WHERE status IN ('queued', 'running');
