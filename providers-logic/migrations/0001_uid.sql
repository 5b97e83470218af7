-- `uid`: sequences per (tenant, plant, type), issued identifiers, and their lifecycle. One DDL for SQLite and PostgreSQL.
CREATE TABLE IF NOT EXISTS uid_sequences (
    tenant   TEXT   NOT NULL,
    plant    TEXT   NOT NULL,
    kind     TEXT   NOT NULL,
    last     BIGINT NOT NULL,
    PRIMARY KEY (tenant, plant, kind)
);
CREATE TABLE IF NOT EXISTS uid_items (
    tenant       TEXT   NOT NULL,
    uid          TEXT   NOT NULL,
    plant        TEXT   NOT NULL,
    kind         TEXT   NOT NULL,
    sequence     BIGINT NOT NULL,
    entity_type  TEXT   NOT NULL,
    entity_id    TEXT   NOT NULL,
    parent       TEXT,
    created_ms   BIGINT NOT NULL,
    PRIMARY KEY (tenant, uid)
);
CREATE INDEX IF NOT EXISTS uid_items_by_entity ON uid_items (tenant, entity_type, entity_id);
CREATE INDEX IF NOT EXISTS uid_items_by_parent ON uid_items (tenant, parent);
CREATE TABLE IF NOT EXISTS uid_events (
    tenant    TEXT   NOT NULL,
    uid       TEXT   NOT NULL,
    position  BIGINT NOT NULL,
    stage     TEXT   NOT NULL,
    reference TEXT   NOT NULL,
    location  TEXT   NOT NULL,
    at_ms     BIGINT NOT NULL,
    PRIMARY KEY (tenant, uid, position)
);
