//! Api tokens: the bearer secrets the app's backend uses for a user. Minting (the clear token
//! exists once, in the return value), looking up the user behind one, revoking by prefix (which
//! also expires the unused pairing codes the revoked tokens minted), and listing the tokens
//! revoked lately, which every replica polls to evict them from its cache.
//!
//! Not here: caching lookups for the hot path, telling the replicas (the bus and the
//! revocation watch do), and the `dispatcher token` command line that calls these.

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
    /// with `prefix`, and returns their hashes (hex SHA-256, as stored): none when no live token
    /// matched. At least 8 characters are required; characters past the 12th are ignored, so a
    /// whole token revokes itself. In the same transaction, the unused pairing codes those
    /// tokens minted expire.
    pub async fn revoke_api_token(&self, prefix: &str) -> Result<Vec<String>, RegistryError> {
        let wanted: String = prefix.trim().chars().take(STORED_PREFIX_CHARS).collect();
        let chars = wanted.chars().count();
        if chars < MIN_REVOKE_PREFIX_CHARS {
            return Err(RegistryError::PrefixTooShort { min: MIN_REVOKE_PREFIX_CHARS });
        }
        let now = self.now_ms();
        let mut tx = self.pool.begin().await?;
        // `chars` is a number this function computed (8..=12), not input: safe to format in.
        // Compared with `=` rather than LIKE, whose `_` is a wildcard and which SQLite folds case.
        let sql = format!(
            "UPDATE api_tokens SET revoked_at = $1 WHERE substr(prefix, 1, {chars}) = $2 AND revoked_at IS NULL \
             RETURNING token_hash"
        );
        let revoked: Vec<(String,)> = sqlx::query_as(&sql).bind(now).bind(&wanted).fetch_all(&mut *tx).await?;
        for (hash,) in &revoked {
            sqlx::query(
                "UPDATE pairing_codes SET expires_at = $1 \
                 WHERE api_token_hash = $2 AND used_at IS NULL AND expires_at > $1",
            )
            .bind(now)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(revoked.into_iter().map(|(hash,)| hash).collect())
    }

    /// The hashes of the api tokens revoked after `since` (unix milliseconds, exclusive): what a
    /// replica evicts from its cache. One range scan of an index.
    pub async fn api_tokens_revoked_since(&self, since_ms: i64) -> Result<Vec<String>, RegistryError> {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT token_hash FROM api_tokens WHERE revoked_at > $1")
            .bind(since_ms)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|(hash,)| hash).collect())
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
