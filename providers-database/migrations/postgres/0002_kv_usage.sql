-- Each entry's size in bytes, and each (tenant, store)'s totals, so quotas are checked without
-- scanning the store. PostgreSQL counts bytes with octet_length().
ALTER TABLE kv_entries ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
UPDATE kv_entries SET bytes = octet_length(value);
CREATE TABLE IF NOT EXISTS kv_usage (
    tenant TEXT   NOT NULL,
    store  TEXT   NOT NULL,
    keys   BIGINT NOT NULL,
    bytes  BIGINT NOT NULL,
    PRIMARY KEY (tenant, store)
);
INSERT INTO kv_usage (tenant, store, keys, bytes)
    SELECT tenant, store, COUNT(*), SUM(bytes) FROM kv_entries GROUP BY tenant, store;
