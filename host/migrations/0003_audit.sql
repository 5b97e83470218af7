-- The audit trail: append-only, one hash chain per tenant ('-' for requests without a
-- configured tenant). `audit_heads` holds each chain's last link; a writer takes its row
-- first, so chains grow one batch at a time even with several hosts on one database.
CREATE TABLE IF NOT EXISTS audit_log (
    tenant         TEXT   NOT NULL,
    seq            BIGINT NOT NULL,
    at_ms          BIGINT NOT NULL,
    kind           TEXT   NOT NULL,
    subject        TEXT   NOT NULL,
    service        TEXT   NOT NULL,
    action         TEXT   NOT NULL,
    outcome        TEXT   NOT NULL,
    error_code     TEXT   NOT NULL,
    request_id     TEXT   NOT NULL,
    latency_us     BIGINT NOT NULL,
    payload_sha256 TEXT   NOT NULL,
    note           TEXT   NOT NULL,
    prev_hash      TEXT   NOT NULL,
    hash           TEXT   NOT NULL,
    PRIMARY KEY (tenant, seq)
);
CREATE INDEX IF NOT EXISTS audit_log_by_time ON audit_log (tenant, at_ms);
CREATE TABLE IF NOT EXISTS audit_heads (
    tenant TEXT   NOT NULL PRIMARY KEY,
    seq    BIGINT NOT NULL,
    hash   TEXT   NOT NULL
);
