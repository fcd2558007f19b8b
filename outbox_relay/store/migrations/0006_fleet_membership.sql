-- The fleet data plane: workers register in a membership table and own partitions while their
-- heartbeat lives. A partition names its owner (lease_holder = the worker's membership key) and the
-- claim's epoch (lease_epoch, bumped by every claim: the fence every cursor write checks). Renewing
-- ownership costs one row per worker (its heartbeat), not one write per partition.
CREATE TABLE workers (
    key           text PRIMARY KEY,
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz NOT NULL DEFAULT now()
);

-- Partitions of one owner, and free ones, found by index rather than by a scan of every partition.
CREATE INDEX relay_partitions_owner ON relay_partitions (lease_holder) WHERE lease_holder IS NOT NULL;
CREATE INDEX relay_partitions_free ON relay_partitions (relay_id, partition) WHERE lease_holder IS NULL;

-- Holders of the per-slice data plane ("host-pid/job") own nothing any more: free their partitions
-- (the epoch stays, so a slice still running somewhere cannot write: the holder is gone).
UPDATE relay_partitions SET lease_holder = NULL, lease_expires_at = NULL WHERE lease_holder IS NOT NULL;

-- Lag from one index probe, recorded by the owner only when it changes.
ALTER TABLE relay_partitions ADD COLUMN lag_s double precision;

-- A new relay is claimed at once (workers rebalance on any relay change, not at their next tick).
CREATE TRIGGER relays_config_created AFTER INSERT ON relays FOR EACH ROW
    EXECUTE FUNCTION notify_config_change();
