-- Secrets for `${secret:NAME}`, sealed with XChaCha20-Poly1305 under the key `key_id` names.
CREATE TABLE IF NOT EXISTS secrets (
    name        TEXT   NOT NULL PRIMARY KEY,
    key_id      TEXT   NOT NULL,
    nonce       TEXT   NOT NULL,
    ciphertext  TEXT   NOT NULL,
    updated_ms  BIGINT NOT NULL
);
