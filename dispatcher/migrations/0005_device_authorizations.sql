-- Enrollment by link (RFC 8628, the device authorization grant).
--
-- A device asks for an authorization (its name, platform and the roots it will serve) and gets
-- two secrets: a device code it polls with, and a short user code a person types or follows in
-- a link. Both are stored only as SHA-256 hashes (hex) of their normalized forms.
--
-- status moves one way: pending -> approved -> used, or pending -> denied; a pending or
-- approved row past expires_at reads as expired. Each move is one conditional UPDATE, so of
-- racing approvals or token polls on any replicas exactly one wins.
--
-- owner is the user who approved (or denied) it, with the hash of the api token used, so that
-- revoking that token withdraws an approval not yet collected. device_id is chosen at
-- approval; the device itself is created when the device collects its token (used_at).
-- interval_ms grows by 5 s each time the device polls faster than it (slow_down);
-- last_polled_at is when it last asked.
CREATE TABLE device_authorizations (
    device_code_hash TEXT PRIMARY KEY,
    user_code_hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    platform TEXT,
    roots TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    interval_ms BIGINT NOT NULL,
    last_polled_at BIGINT,
    owner TEXT,
    api_token_hash TEXT,
    decided_at BIGINT,
    device_id TEXT,
    used_at BIGINT
);

-- Expiry of rows past keeping.
CREATE INDEX device_authorizations_expires_at ON device_authorizations (expires_at);
