-- Api-token revocation reaches every replica within a second, with or without a broker.
--
-- Each replica asks every half second for the api tokens revoked lately (a range scan of this
-- index, normally empty) and evicts them from its credential cache.
CREATE INDEX api_tokens_revoked_at ON api_tokens (revoked_at);

-- The api token (its hash) that minted a pairing code: revoking the token expires its unused
-- codes, and enrollment refuses a code whose token is revoked. NULL for codes minted before
-- this column existed, and for codes minted by other means.
ALTER TABLE pairing_codes ADD COLUMN api_token_hash TEXT;
CREATE INDEX pairing_codes_api_token_hash ON pairing_codes (api_token_hash);
