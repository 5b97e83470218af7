-- The same tables as on PostgreSQL; only the history's key differs: SQLite has
-- AUTOINCREMENT where PostgreSQL has identity columns.
-- Workflow definitions as run: each instance refers to the snapshot it started on.
CREATE TABLE wf_definitions (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- One row per workflow instance: where it is, what it has done, and who holds its lease.
-- `rev` grows with every write; writers name the revision they read, so a write made from
-- stale state (a lease that expired, a decision made meanwhile) changes nothing.
CREATE TABLE wf_instances (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    definition TEXT NOT NULL,
    version BIGINT NOT NULL,
    digest TEXT NOT NULL REFERENCES wf_definitions (digest),
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    requester TEXT NOT NULL,
    roles TEXT NOT NULL,
    company_id TEXT,
    state TEXT NOT NULL,
    ending TEXT,
    cursor BIGINT NOT NULL,
    round BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    entered_ms BIGINT,
    role TEXT,
    escalated_to TEXT,
    reminders BIGINT NOT NULL,
    input TEXT NOT NULL,
    outputs TEXT NOT NULL,
    done TEXT NOT NULL,
    error TEXT,
    cancel_requested BIGINT NOT NULL,
    due_ms BIGINT,
    lease_owner TEXT,
    lease_until_ms BIGINT,
    rev BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
-- NULL keys are distinct in both databases: instances started without a key never collide.
CREATE UNIQUE INDEX wf_instances_key ON wf_instances (tenant, idempotency_key);
CREATE INDEX wf_instances_due ON wf_instances (due_ms) WHERE due_ms IS NOT NULL;
CREATE INDEX wf_instances_list ON wf_instances (tenant, created_ms, id);

-- Every event of every instance, in order.
CREATE TABLE wf_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    step TEXT,
    actor TEXT,
    comment TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX wf_history_instance ON wf_history (instance, id);

-- External events sent to an instance; each name is received once.
CREATE TABLE wf_signals (
    instance TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (instance, name)
);

-- On SQLite, the one process allowed to run workflows, and when it was last seen.
CREATE TABLE wf_executors (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    heartbeat_ms BIGINT NOT NULL
);
