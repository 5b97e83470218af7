-- The token service's clients (secrets only as Argon2id PHC strings) and refresh tokens
-- (only their SHA-256; a family is every token rotated from one client-credentials grant).
CREATE TABLE IF NOT EXISTS auth_clients (
    client_id    TEXT   NOT NULL PRIMARY KEY,
    tenant       TEXT   NOT NULL,
    subject      TEXT   NOT NULL,
    roles        TEXT   NOT NULL,
    company_id   TEXT,
    secret_hash  TEXT   NOT NULL,
    created_by   TEXT   NOT NULL,
    created_ms   BIGINT NOT NULL,
    revoked_ms   BIGINT
);
CREATE INDEX IF NOT EXISTS auth_clients_by_tenant ON auth_clients (tenant, client_id);
CREATE TABLE IF NOT EXISTS auth_refresh_tokens (
    token_sha256 TEXT   NOT NULL PRIMARY KEY,
    family       TEXT   NOT NULL,
    client_id    TEXT   NOT NULL,
    issued_ms    BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL,
    used_ms      BIGINT,
    revoked_ms   BIGINT
);
CREATE INDEX IF NOT EXISTS auth_refresh_by_family ON auth_refresh_tokens (family);
CREATE INDEX IF NOT EXISTS auth_refresh_by_client ON auth_refresh_tokens (client_id);
