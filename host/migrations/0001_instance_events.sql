-- Lifecycle of tenant provider instances: connect, disconnect, evict, failures. One DDL for SQLite and PostgreSQL.
CREATE TABLE IF NOT EXISTS instance_events (
    id       TEXT   NOT NULL PRIMARY KEY,
    tenant   TEXT   NOT NULL,
    service  TEXT   NOT NULL,
    version  TEXT   NOT NULL,
    event    TEXT   NOT NULL,
    detail   TEXT   NOT NULL,
    at_ms    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS instance_events_by_tenant ON instance_events (tenant, service, at_ms);
