//! Api tokens: the bearer secrets the app's backend uses for a user. Minting (the clear token
//! exists once, in the return value), looking up the user behind one, revoking by prefix.
//!
//! Not here: caching lookups for the hot path, and the `dispatcher token` command line that
//! calls these.

use super::secret::{self, API_TOKEN_PREFIX, STORED_PREFIX_CHARS};
use super::{Registry, RegistryError, MIN_REVOKE_PREFIX_CHARS};

impl Registry {
    /// Mints an api token for `user_id`, labelled `name`, and returns it: the only time it
    /// exists in clear.
    pub async fn create_api_token(&self, user_id: &str, name: Option<&str>) -> Result<String, RegistryError> {
        if user_id.is_empty() {
            return Err(RegistryError::InvalidArgument("user id is empty"));
        }
        let token = secret::new_token(API_TOKEN_PREFIX);
        sqlx::query(
            "INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(user_id)
        .bind(name)
        .bind(secret::hash_secret(&token))
        .bind(secret::stored_prefix(&token))
        .bind(self.now_ms())
        .execute(&self.pool)
        .await?;
        Ok(token)
    }

    /// Revokes the live api tokens whose stored prefix (a token's first 12 characters) starts
    /// with `prefix`, and returns how many. At least 8 characters are required; characters past
    /// the 12th are ignored, so a whole token revokes itself.
    pub async fn revoke_api_token(&self, prefix: &str) -> Result<u64, RegistryError> {
        let wanted: String = prefix.trim().chars().take(STORED_PREFIX_CHARS).collect();
        let chars = wanted.chars().count();
        if chars < MIN_REVOKE_PREFIX_CHARS {
            return Err(RegistryError::PrefixTooShort { min: MIN_REVOKE_PREFIX_CHARS });
        }
        // `chars` is a number this function computed (8..=12), not input: safe to format in.
        // Compared with `=` rather than LIKE, whose `_` is a wildcard and which SQLite folds case.
        let sql = format!(
            "UPDATE api_tokens SET revoked_at = $1 WHERE substr(prefix, 1, {chars}) = $2 AND revoked_at IS NULL"
        );
        let done = sqlx::query(&sql).bind(self.now_ms()).bind(&wanted).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    /// The user an api token belongs to; `None` when it is unknown, revoked or not a token.
    pub async fn user_for_api_token(&self, token: &str) -> Result<Option<String>, RegistryError> {
        if !secret::is_token_shaped(token, API_TOKEN_PREFIX) {
            return Ok(None);
        }
        let hash = secret::hash_secret(token);
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT user_id, token_hash FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL")
                .bind(&hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.filter(|(_, stored)| secret::hashes_match(stored, &hash)).map(|(user_id, _)| user_id))
    }
}
