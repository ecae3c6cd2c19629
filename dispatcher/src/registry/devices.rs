//! Pairing codes, enrollment and devices: minting a code for a user, trading it once for a device
//! and its token, looking devices up by token or by owner, revoking them, and keeping their
//! manifest, last-seen time and stream epochs.
//!
//! Not here: rate-limiting enrollment attempts (HTTP layer), closing a revoked device's stream
//! or evicting cached tokens (the caller broadcasts that), and whether a device is online.

use std::time::Duration;

use protocol::subject::is_uuid;
use protocol::{EnrollResponse, Manifest, PairingCode};

use super::secret::{self, DEVICE_TOKEN_PREFIX};
use super::{from_json_text, json_text, optional_time_of, time_of, MAX_PAIRING_TTL};
use super::{DeviceAuth, DeviceRecord, EnrollOutcome, Registry, RegistryError};

/// Pairing codes past their expiry by more than this are deleted when a new code is minted.
const PAIRING_CODE_RETENTION_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// The columns [`device_of_row`] reads, in its order.
const DEVICE_COLUMNS: &str = "id, owner, name, platform, created_at, last_seen_at, manifest, revoked_at";

type DeviceRow = (String, String, String, Option<String>, i64, Option<i64>, Option<String>, Option<i64>);

fn device_of_row(row: DeviceRow) -> Result<DeviceRecord, RegistryError> {
    let (id, owner, name, platform, created_at, last_seen_at, manifest, revoked_at) = row;
    Ok(DeviceRecord {
        manifest: manifest.as_deref().map(|text| from_json_text::<Manifest>(text, "device manifest")).transpose()?,
        created_at: time_of(created_at)?,
        last_seen_at: optional_time_of(last_seen_at)?,
        revoked: revoked_at.is_some(),
        id,
        owner,
        name,
        platform,
    })
}

impl Registry {
    /// Mints a single-use pairing code for `user_id`, valid for `ttl`. The code is returned in
    /// clear (`XXXX-XXXX-XXXX`) and stored only as the hash of its normalized form.
    /// `api_token_hash` (hex SHA-256, as stored) names the api token that minted it: revoking
    /// that token invalidates the code while it is unused.
    pub async fn create_pairing_code(
        &self,
        user_id: &str,
        ttl: Duration,
        api_token_hash: Option<&str>,
    ) -> Result<PairingCode, RegistryError> {
        if user_id.is_empty() {
            return Err(RegistryError::InvalidArgument("user id is empty"));
        }
        if ttl > MAX_PAIRING_TTL {
            return Err(RegistryError::InvalidArgument("pairing code lifetime is over a year"));
        }
        // At most a year: fits in i64 milliseconds.
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let now = self.now_ms();
        let expires_at = now.saturating_add(ttl_ms);
        let code = secret::new_pairing_code();
        let normalized = secret::normalize_pairing_code(&code)
            .ok_or_else(|| RegistryError::Corrupt("minted pairing code does not normalize".into()))?;
        sqlx::query("DELETE FROM pairing_codes WHERE expires_at < $1")
            .bind(now.saturating_sub(PAIRING_CODE_RETENTION_MS))
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO pairing_codes (code_hash, user_id, created_at, expires_at, api_token_hash) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(secret::hash_secret(&normalized))
        .bind(user_id)
        .bind(now)
        .bind(expires_at)
        .bind(api_token_hash)
        .execute(&self.pool)
        .await?;
        Ok(PairingCode { code, expires_at: time_of(expires_at)? })
    }

    /// Trades a pairing code for a new device of the code's user, with its token. The code is
    /// claimed by one conditional UPDATE (unused, unexpired, and not minted by an api token
    /// revoked since, or nothing happens) in the same transaction that creates the device, so
    /// of any number of concurrent attempts with one code, on any number of replicas, exactly
    /// one enrolls.
    pub async fn enroll(&self, code: &str, name: &str, platform: Option<&str>) -> Result<EnrollOutcome, RegistryError> {
        let Some(normalized) = secret::normalize_pairing_code(code) else {
            return Ok(EnrollOutcome::Refused);
        };
        let device_id = uuid::Uuid::new_v4().to_string();
        let token = secret::new_token(DEVICE_TOKEN_PREFIX);
        let now = self.now_ms();

        let mut tx = self.pool.begin().await?;
        // The first statement writes, so on SQLite the transaction takes the write lock at once
        // (waiting its turn) instead of failing to upgrade a read.
        let claimed: Option<(String,)> = sqlx::query_as(
            "UPDATE pairing_codes SET used_at = $1, device_id = $2 \
             WHERE code_hash = $3 AND used_at IS NULL AND expires_at > $1 \
             AND NOT EXISTS (SELECT 1 FROM api_tokens \
                 WHERE api_tokens.token_hash = pairing_codes.api_token_hash AND api_tokens.revoked_at IS NOT NULL) \
             RETURNING user_id",
        )
        .bind(now)
        .bind(&device_id)
        .bind(secret::hash_secret(&normalized))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((owner,)) = claimed else {
            tx.rollback().await?;
            return Ok(EnrollOutcome::Refused);
        };
        sqlx::query(
            "INSERT INTO devices (id, owner, name, platform, token_hash, token_prefix, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&device_id)
        .bind(&owner)
        .bind(name)
        .bind(platform)
        .bind(secret::hash_secret(&token))
        .bind(secret::stored_prefix(&token))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(EnrollOutcome::Enrolled(EnrollResponse { device_id, token }))
    }

    /// The device a device token belongs to; `None` when it is unknown, revoked or not a token.
    pub async fn device_for_token(&self, token: &str) -> Result<Option<DeviceAuth>, RegistryError> {
        if !secret::is_token_shaped(token, DEVICE_TOKEN_PREFIX) {
            return Ok(None);
        }
        let hash = secret::hash_secret(token);
        let row: Option<(String, String, String)> =
            sqlx::query_as("SELECT id, owner, token_hash FROM devices WHERE token_hash = $1 AND revoked_at IS NULL")
                .bind(&hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row
            .filter(|(_, _, stored)| secret::hashes_match(stored, &hash))
            .map(|(device_id, owner, _)| DeviceAuth { device_id, owner }))
    }

    /// `owner`'s device `id`; `None` when it does not exist, is another user's or is revoked.
    pub async fn device(&self, owner: &str, id: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        if !is_uuid(id) {
            return Ok(None);
        }
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1 AND owner = $2 AND revoked_at IS NULL");
        let row: Option<DeviceRow> = sqlx::query_as(&sql).bind(id).bind(owner).fetch_optional(&self.pool).await?;
        row.map(device_of_row).transpose()
    }

    /// `owner`'s devices that are not revoked, oldest first.
    pub async fn devices(&self, owner: &str) -> Result<Vec<DeviceRecord>, RegistryError> {
        let sql = format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE owner = $1 AND revoked_at IS NULL ORDER BY created_at, id"
        );
        let rows: Vec<DeviceRow> = sqlx::query_as(&sql).bind(owner).fetch_all(&self.pool).await?;
        rows.into_iter().map(device_of_row).collect()
    }

    /// Revokes `owner`'s device `id`: its token stops working. False when there is no such live
    /// device of `owner`'s (unknown, another user's, or already revoked).
    pub async fn revoke_device(&self, owner: &str, id: &str) -> Result<bool, RegistryError> {
        if !is_uuid(id) {
            return Ok(false);
        }
        let done =
            sqlx::query("UPDATE devices SET revoked_at = $1 WHERE id = $2 AND owner = $3 AND revoked_at IS NULL")
                .bind(self.now_ms())
                .bind(id)
                .bind(owner)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The epoch of a stream the device is opening: larger than every epoch handed out before
    /// for this device, by any replica sharing the database (one UPDATE increments the device's
    /// counter and reads it back). [`RegistryError::NotFound`] when the device is unknown or
    /// revoked.
    pub async fn next_stream_epoch(&self, device_id: &str) -> Result<u64, RegistryError> {
        if !is_uuid(device_id) {
            return Err(RegistryError::NotFound);
        }
        let row: Option<(i64,)> = sqlx::query_as(
            "UPDATE devices SET stream_epoch = stream_epoch + 1, last_seen_at = $1 \
             WHERE id = $2 AND revoked_at IS NULL RETURNING stream_epoch",
        )
        .bind(self.now_ms())
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?;
        let (epoch,) = row.ok_or(RegistryError::NotFound)?;
        u64::try_from(epoch).map_err(|_| RegistryError::Corrupt(format!("negative stream epoch {epoch}")))
    }

    /// Stores the manifest a device announced. [`RegistryError::NotFound`] when the device is
    /// unknown or revoked.
    pub async fn set_manifest(&self, device_id: &str, manifest: &Manifest) -> Result<(), RegistryError> {
        if !is_uuid(device_id) {
            return Err(RegistryError::NotFound);
        }
        let done = sqlx::query("UPDATE devices SET manifest = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(json_text(manifest)?)
            .bind(device_id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::NotFound);
        }
        Ok(())
    }

    /// Sets a device's last-seen time to now. [`RegistryError::NotFound`] when the device is
    /// unknown or revoked.
    pub async fn touch_device(&self, device_id: &str) -> Result<(), RegistryError> {
        if !is_uuid(device_id) {
            return Err(RegistryError::NotFound);
        }
        let done = sqlx::query("UPDATE devices SET last_seen_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(self.now_ms())
            .bind(device_id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::NotFound);
        }
        Ok(())
    }
}
