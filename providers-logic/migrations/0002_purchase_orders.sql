-- `purchase-orders`: orders, their sync outbox, and per-tenant counters. One DDL for SQLite and PostgreSQL.
-- Money and quantities are exact decimal text (never floating point).
CREATE TABLE IF NOT EXISTS po_counters (
    tenant TEXT   NOT NULL,
    name   TEXT   NOT NULL,
    last   BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);
CREATE TABLE IF NOT EXISTS po_orders (
    tenant                 TEXT   NOT NULL,
    po_number              TEXT   NOT NULL,
    seq                    BIGINT NOT NULL,
    version                BIGINT NOT NULL,
    buyer_company          TEXT   NOT NULL,
    seller_company         TEXT   NOT NULL,
    product                TEXT   NOT NULL,
    quantity               TEXT   NOT NULL,
    unit                   TEXT   NOT NULL,
    unit_price             TEXT   NOT NULL,
    total                  TEXT   NOT NULL,
    currency               TEXT   NOT NULL,
    delivery_date          TEXT   NOT NULL,
    delivery_location      TEXT   NOT NULL,
    status                 TEXT   NOT NULL,
    amendment_status       TEXT   NOT NULL,
    proposed_quantity      TEXT,
    proposed_unit          TEXT,
    proposed_unit_price    TEXT,
    proposed_delivery_date TEXT,
    amendment_reason       TEXT,
    buyer_notes            TEXT,
    erp_sync_status        TEXT   NOT NULL,
    created_by             TEXT   NOT NULL,
    changed_by             TEXT   NOT NULL,
    created_ms             BIGINT NOT NULL,
    updated_ms             BIGINT NOT NULL,
    PRIMARY KEY (tenant, po_number)
);
CREATE UNIQUE INDEX IF NOT EXISTS po_orders_by_seq ON po_orders (tenant, seq);
CREATE TABLE IF NOT EXISTS po_updates (
    tenant          TEXT   NOT NULL,
    cursor          BIGINT NOT NULL,
    po_number       TEXT   NOT NULL,
    event           TEXT   NOT NULL,
    version         BIGINT NOT NULL,
    snapshot        TEXT   NOT NULL,
    at_ms           BIGINT NOT NULL,
    acknowledged_ms BIGINT,
    acknowledged_by TEXT,
    PRIMARY KEY (tenant, cursor)
);
CREATE INDEX IF NOT EXISTS po_updates_by_order ON po_updates (tenant, po_number, acknowledged_ms);
