-- Tenant-scoped key-value entries of the `kv` provider. Keys use the "C" collation so that
-- ordering and `key > $after` paging are byte-wise, as on SQLite, whatever the database locale.
CREATE TABLE IF NOT EXISTS kv_entries (
    tenant     TEXT   NOT NULL,
    store      TEXT   NOT NULL,
    key        TEXT   COLLATE "C" NOT NULL,
    value      TEXT   NOT NULL,
    etag       BIGINT NOT NULL,
    expires_at BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, store, key)
);
CREATE INDEX IF NOT EXISTS kv_entries_expiry ON kv_entries (tenant, store, expires_at);
