-- Relay filters (issue 19, item 2): the rows a relay's filter left out that the cursor passed,
-- counted like published_count (in the same fenced cursor write).
ALTER TABLE relay_partitions ADD COLUMN filtered_count bigint NOT NULL DEFAULT 0;
