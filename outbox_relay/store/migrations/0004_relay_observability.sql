-- What workers last saw of each relay partition, for the status API and the pending gauges.
ALTER TABLE relay_partitions
    ADD COLUMN last_error_class text,
    ADD COLUMN pending_estimate bigint,
    ADD COLUMN oldest_pending_at timestamptz,
    ADD COLUMN pending_checked_at timestamptz,
    ADD COLUMN stall jsonb;
