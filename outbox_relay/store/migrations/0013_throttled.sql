-- How long a partition's batches last waited on their target's limits (rate_limit_per_s,
-- max_in_flight), over the worker's last lag sample, and when: the relay status shows a relay held
-- back by its target's policy (the fleet's lag sampler writes it with the lag).
ALTER TABLE relay_partitions ADD COLUMN throttled_s double precision;
ALTER TABLE relay_partitions ADD COLUMN throttled_at timestamptz;
