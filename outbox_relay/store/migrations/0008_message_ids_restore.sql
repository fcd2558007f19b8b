-- Message ids that survive restores, and prompt recovery after a restore (issue: fresh machine
-- stays green, no fault loses, hides or stops anything; items 4 and 5).

-- A dead letter keeps the message id it was published with (the outbox's message_id, or the id
-- the relay derived for a row written before the outbox had one), so a replay carries the same
-- `outbox-id` and a consumer's inbox still recognises it. NULL for letters from before this.
ALTER TABLE dead_letters ADD COLUMN message_id text;

-- The last restore (or failover) a partition detected, and how its restored backlog was handled.
-- The backlog is the closed set of rows that existed at detection with id <= restore_max_id and
-- created_at <= restore_max_created_at, where restore_max_id is the highest id among the rows whose
-- txid was at or above the server's next transaction id (restore_next_xid) at detection: rows the
-- horizon read would otherwise hold back until the new server's counter caught up.
--   restore_state 'resending': the partition reads the backlog first (cursor_txid/cursor_id are its
--   position in it), then starts the ordinary read from the beginning, without those rows;
--   'resent' / 'skipped': done (skipped: the backlog was never published again).
-- The bounds stay after the backlog is done: the ordinary read leaves those rows out.
ALTER TABLE relay_partitions
    ADD COLUMN restore_policy text,
    ADD COLUMN restore_state text CHECK (restore_state IN ('resending', 'resent', 'skipped')),
    ADD COLUMN restore_next_xid bigint,
    ADD COLUMN restore_max_id bigint,
    ADD COLUMN restore_max_created_at timestamptz,
    ADD COLUMN restore_rows bigint NOT NULL DEFAULT 0,
    ADD COLUMN restore_done bigint NOT NULL DEFAULT 0,
    ADD COLUMN restore_detected_at timestamptz,
    ADD COLUMN restore_finished_at timestamptz;
