-- Tenant-scoped key-value entries of the `kv` provider (SQLite: keys compare byte-wise already).
CREATE TABLE IF NOT EXISTS kv_entries (
    tenant     TEXT   NOT NULL,
    store      TEXT   NOT NULL,
    key        TEXT   NOT NULL,
    value      TEXT   NOT NULL,
    etag       BIGINT NOT NULL,
    expires_at BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, store, key)
);
CREATE INDEX IF NOT EXISTS kv_entries_expiry ON kv_entries (tenant, store, expires_at);
