-- The registry's schema, portable between SQLite and PostgreSQL: ids and JSON as TEXT, times
-- as BIGINT unix milliseconds, booleans as nullable timestamps (revoked_at, used_at).
-- Secrets are never stored: only the SHA-256 (hex) of a token or of a normalized pairing code.

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    name TEXT,
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE INDEX api_tokens_prefix ON api_tokens (prefix);

CREATE TABLE pairing_codes (
    code_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    device_id TEXT
);

CREATE INDEX pairing_codes_expires_at ON pairing_codes (expires_at);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    platform TEXT,
    token_hash TEXT NOT NULL UNIQUE,
    token_prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT,
    revoked_at BIGINT,
    manifest TEXT
);

CREATE INDEX devices_owner ON devices (owner, created_at);

CREATE TABLE proposals (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices (id),
    owner TEXT NOT NULL,
    tool TEXT NOT NULL,
    input TEXT NOT NULL,
    plan TEXT NOT NULL,
    preconditions TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    decided_at BIGINT,
    result TEXT
);

CREATE INDEX proposals_owner ON proposals (owner, created_at);
CREATE INDEX proposals_device ON proposals (device_id);
