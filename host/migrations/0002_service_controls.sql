-- Operators' switches on a tenant's service, kept across restarts: 'paused' (calls answer 503)
-- and 'disabled' (the service is hidden from the tenant). Tenant '*' pauses a service for all.
CREATE TABLE IF NOT EXISTS service_controls (
    tenant   TEXT   NOT NULL,
    service  TEXT   NOT NULL,
    control  TEXT   NOT NULL,
    set_by   TEXT   NOT NULL,
    at_ms    BIGINT NOT NULL,
    PRIMARY KEY (tenant, service, control)
);
