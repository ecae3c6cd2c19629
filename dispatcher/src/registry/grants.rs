//! Device authorizations (RFC 8628, the device authorization grant): a device asks for one and
//! gets a device code and a user code; a signed-in user approves or denies it by the user
//! code; the device polls with the device code and, once approved, collects its device token.
//!
//! The state machine, one conditional UPDATE per move so that it holds across replicas:
//!
//! ```text
//! pending --approve--> approved --token poll--> used
//!    \--deny--> denied
//! pending or approved past expires_at: expired (read as such; the row is not rewritten)
//! ```
//!
//! A token poll on an approved authorization creates the device through the same function as a
//! pairing-code enrollment ([`Registry::create_device`]), in the transaction that claims the
//! authorization: of racing polls exactly one gets the token. A pending authorization polled
//! faster than its interval answers slow down and its interval grows by 5 seconds.
//!
//! Not here: the OAuth wire format and error codes, rate limits on guessing (the HTTP layer),
//! and announcing the new device (the caller).

use std::time::Duration;

use chrono::{DateTime, Utc};
use protocol::EnrollResponse;

use super::secret;
use super::{as_u64, from_json_text, json_text, time_of, Limit, Registry, RegistryError};

/// Device codes start with this, then 256 random bits.
pub const DEVICE_CODE_PREFIX: &str = "dac_";
/// How much the interval grows on each `slow_down` (RFC 8628 section 3.5).
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// Longest lifetime of a device authorization.
pub const MAX_AUTHORIZATION_TTL: Duration = Duration::from_secs(3600);
/// A poll this fraction of the interval early still counts as on time (network jitter).
const EARLY_TOLERANCE: f64 = 0.1;
/// Rows deleted per statement by [`Registry::delete_done_device_authorizations`].
const DELETE_BATCH: i64 = 5000;
/// Attempts at drawing a user code no live row holds.
const USER_CODE_ATTEMPTS: usize = 8;

/// What a device asks to be authorized as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeviceAuthorization {
    pub name: String,
    pub platform: Option<String>,
    /// The roots the device says it will serve, shown to the approving user.
    pub roots: Vec<String>,
    /// How long the codes live.
    pub ttl: Duration,
    /// The least time between two polls.
    pub interval: Duration,
}

/// The two codes of a new authorization, in clear: the only time they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedAuthorization {
    pub device_code: String,
    /// As shown: `XXXX-XXXX`.
    pub user_code: String,
    pub expires_at: DateTime<Utc>,
    pub interval: Duration,
}

/// Where an authorization stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationStatus {
    Pending,
    Approved,
    Denied,
    Expired,
    Used,
}

impl AuthorizationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Used => "used",
        }
    }

    fn parse(text: &str) -> Result<Self, RegistryError> {
        Ok(match text {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "denied" => Self::Denied,
            "expired" => Self::Expired,
            "used" => Self::Used,
            other => return Err(RegistryError::Corrupt(format!("device authorization status {other:?}"))),
        })
    }

    /// The status of a stored row at `now_ms`: pending and approved rows past their expiry are
    /// expired.
    fn effective(stored: Self, expires_at_ms: i64, now_ms: i64) -> Self {
        match stored {
            Self::Pending | Self::Approved if expires_at_ms <= now_ms => Self::Expired,
            other => other,
        }
    }
}

/// An authorization as a user sees it before deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuthorization {
    /// As shown: `XXXX-XXXX`.
    pub user_code: String,
    pub name: String,
    pub platform: Option<String>,
    pub roots: Vec<String>,
    pub expires_at: DateTime<Utc>,
    pub status: AuthorizationStatus,
    /// Who approved or denied it.
    pub owner: Option<String>,
    /// The device it makes (chosen at approval).
    pub device_id: Option<String>,
}

/// What approving or denying came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Approved: the device will have this id once it collects its token.
    Approved {
        device_id: String,
    },
    Denied,
    /// No such user code, or another user decided it.
    NotFound,
    /// Decided already (by this user), used, or expired: nothing changed.
    NotPending(AuthorizationStatus),
}

/// What a token poll came to, in RFC 8628 terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOutcome {
    /// Approved: the device exists now, with this token.
    Issued(EnrollResponse),
    /// `authorization_pending`.
    Pending,
    /// `slow_down`: polled faster than the interval, which is now this.
    SlowDown { interval: Duration },
    /// `access_denied`.
    Denied,
    /// `access_denied`: the approval was withdrawn (the api token that gave it is revoked).
    Withdrawn,
    /// `expired_token`.
    Expired,
    /// `invalid_grant`: not a device code of ours, or used already.
    Invalid,
    /// The approving user has as many devices as allowed: nothing was created, the
    /// authorization stays approved until it expires.
    OverLimit { value: u64, max: u64 },
}

/// The user code's hash, or `None` when the text cannot be a user code.
fn user_code_hash(user_code: &str) -> Option<String> {
    secret::normalize_user_code(user_code).map(|normalized| secret::hash_secret(&normalized))
}

/// name, platform, roots, status, expires_at, owner, device_id.
type AuthorizationRow = (String, Option<String>, String, String, i64, Option<String>, Option<String>);

impl Registry {
    /// Stores a new pending authorization and returns its codes: the device code (256 random
    /// bits) and a user code no live authorization holds, both stored as hashes.
    pub async fn create_device_authorization(
        &self,
        request: &NewDeviceAuthorization,
    ) -> Result<IssuedAuthorization, RegistryError> {
        if request.name.trim().is_empty() {
            return Err(RegistryError::InvalidArgument("device name is empty"));
        }
        if request.ttl.is_zero() || request.ttl > MAX_AUTHORIZATION_TTL {
            return Err(RegistryError::InvalidArgument("device authorization lifetime out of range"));
        }
        let now = self.now_ms();
        let ttl_ms = i64::try_from(request.ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at = now.saturating_add(ttl_ms);
        let interval_ms = i64::try_from(request.interval.as_millis()).unwrap_or(i64::MAX);
        let roots = json_text(&request.roots)?;
        let device_code = secret::new_token(DEVICE_CODE_PREFIX);
        for _ in 0..USER_CODE_ATTEMPTS {
            let user_code = secret::new_user_code();
            let hash = user_code_hash(&user_code)
                .ok_or_else(|| RegistryError::Corrupt("minted user code does not normalize".into()))?;
            // A row past keeping that holds the same user code gives it up first.
            sqlx::query("DELETE FROM device_authorizations WHERE user_code_hash = $1 AND expires_at <= $2")
                .bind(&hash)
                .bind(now)
                .execute(&self.pool)
                .await?;
            let done = sqlx::query(
                "INSERT INTO device_authorizations (device_code_hash, user_code_hash, name, platform, roots, status, \
                 created_at, expires_at, interval_ms) VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(secret::hash_secret(&device_code))
            .bind(&hash)
            .bind(request.name.trim())
            .bind(request.platform.as_deref())
            .bind(&roots)
            .bind(now)
            .bind(expires_at)
            .bind(interval_ms)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                return Ok(IssuedAuthorization {
                    device_code,
                    user_code,
                    expires_at: time_of(expires_at)?,
                    interval: request.interval,
                });
            }
        }
        Err(RegistryError::Corrupt("no free user code after several draws".into()))
    }

    /// The authorization of `user_code` (typed in any case, with or without its dash) as
    /// `viewer` may see it: a pending or expired undecided one is anyone's to see (holding
    /// the code is what counts), a decided one only its decider's. `None` otherwise.
    pub async fn device_authorization(
        &self,
        user_code: &str,
        viewer: &str,
    ) -> Result<Option<DeviceAuthorization>, RegistryError> {
        let Some(normalized) = secret::normalize_user_code(user_code) else {
            return Ok(None);
        };
        let row: Option<AuthorizationRow> = sqlx::query_as(
            "SELECT name, platform, roots, status, expires_at, owner, device_id FROM device_authorizations \
                 WHERE user_code_hash = $1",
        )
        .bind(secret::hash_secret(&normalized))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let authorization = self.authorization_of_row(&normalized, row)?;
        if authorization.owner.as_deref().is_some_and(|owner| owner != viewer) {
            return Ok(None);
        }
        Ok(Some(authorization))
    }

    fn authorization_of_row(
        &self,
        normalized: &str,
        row: AuthorizationRow,
    ) -> Result<DeviceAuthorization, RegistryError> {
        let (name, platform, roots, status, expires_at, owner, device_id) = row;
        let status = AuthorizationStatus::effective(AuthorizationStatus::parse(&status)?, expires_at, self.now_ms());
        Ok(DeviceAuthorization {
            user_code: secret::display_user_code(normalized),
            name,
            platform,
            roots: from_json_text(&roots, "device authorization roots")?,
            expires_at: time_of(expires_at)?,
            status,
            owner,
            device_id,
        })
    }

    /// Approves the pending authorization of `user_code` for `owner`: one conditional UPDATE,
    /// so of racing approvals (any users, any replicas) one wins. `api_token_hash` (hex SHA-256,
    /// as stored) names the api token used: should it be revoked before the device collects
    /// its token, the approval is withdrawn. [`RegistryError::OverLimit`] when `owner` already
    /// has as many devices as allowed (nothing changed).
    pub async fn approve_device_authorization(
        &self,
        user_code: &str,
        owner: &str,
        api_token_hash: Option<&str>,
    ) -> Result<Decision, RegistryError> {
        let Some(hash) = user_code_hash(user_code) else {
            return Ok(Decision::NotFound);
        };
        if owner.is_empty() {
            return Err(RegistryError::InvalidArgument("user id is empty"));
        }
        let (devices,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM devices WHERE owner = $1 AND revoked_at IS NULL")
            .bind(owner)
            .fetch_one(&self.pool)
            .await?;
        let max = self.limits.max_devices_per_user;
        if as_u64(devices) >= max {
            return Err(RegistryError::OverLimit { limit: Limit::DevicesPerUser, value: as_u64(devices), max });
        }
        let device_id = uuid::Uuid::new_v4().to_string();
        let now = self.now_ms();
        let done = sqlx::query(
            "UPDATE device_authorizations SET status = 'approved', owner = $1, api_token_hash = $2, decided_at = $3, \
             device_id = $4 WHERE user_code_hash = $5 AND status = 'pending' AND expires_at > $3",
        )
        .bind(owner)
        .bind(api_token_hash)
        .bind(now)
        .bind(&device_id)
        .bind(&hash)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Decision::Approved { device_id });
        }
        self.undecided(user_code, owner).await
    }

    /// Denies the pending authorization of `user_code` for `owner` (one conditional UPDATE).
    pub async fn deny_device_authorization(&self, user_code: &str, owner: &str) -> Result<Decision, RegistryError> {
        let Some(hash) = user_code_hash(user_code) else {
            return Ok(Decision::NotFound);
        };
        let now = self.now_ms();
        let done = sqlx::query(
            "UPDATE device_authorizations SET status = 'denied', owner = $1, decided_at = $2 \
             WHERE user_code_hash = $3 AND status = 'pending' AND expires_at > $2",
        )
        .bind(owner)
        .bind(now)
        .bind(&hash)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Decision::Denied);
        }
        self.undecided(user_code, owner).await
    }

    /// Why a decision changed nothing: no such code (or another user's), or not pending.
    async fn undecided(&self, user_code: &str, owner: &str) -> Result<Decision, RegistryError> {
        Ok(match self.device_authorization(user_code, owner).await? {
            None => Decision::NotFound,
            Some(found) => Decision::NotPending(found.status),
        })
    }

    /// A device's token poll with `device_code`, as RFC 8628 section 3.4 and 3.5 describe it.
    /// An approved authorization is claimed (approved -> used) by one conditional UPDATE in the
    /// transaction that creates the device, so of racing polls exactly one gets the token and
    /// the others find it used.
    pub async fn poll_device_authorization(&self, device_code: &str) -> Result<TokenOutcome, RegistryError> {
        if !secret::is_token_shaped(device_code, DEVICE_CODE_PREFIX) {
            return Ok(TokenOutcome::Invalid);
        }
        let hash = secret::hash_secret(device_code);
        // At most a few rounds: each one that finds nothing to do saw the row change under it.
        for _ in 0..3 {
            let row: Option<(String, i64)> =
                sqlx::query_as("SELECT status, expires_at FROM device_authorizations WHERE device_code_hash = $1")
                    .bind(&hash)
                    .fetch_optional(&self.pool)
                    .await?;
            let Some((status, expires_at)) = row else {
                return Ok(TokenOutcome::Invalid);
            };
            let now = self.now_ms();
            let outcome = match AuthorizationStatus::effective(AuthorizationStatus::parse(&status)?, expires_at, now) {
                AuthorizationStatus::Expired => Some(TokenOutcome::Expired),
                AuthorizationStatus::Denied => Some(TokenOutcome::Denied),
                AuthorizationStatus::Used => Some(TokenOutcome::Invalid),
                AuthorizationStatus::Pending => self.pace_poll(&hash, now).await?,
                AuthorizationStatus::Approved => self.issue_device(&hash, now).await?,
            };
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
        }
        Ok(TokenOutcome::Pending)
    }

    /// A poll of a pending authorization: on time (`Pending`, and the poll is recorded), or
    /// early (`SlowDown`, and the interval grows). `None` when the row is no longer pending.
    async fn pace_poll(&self, hash: &str, now: i64) -> Result<Option<TokenOutcome>, RegistryError> {
        // On time when at least the interval, less a tenth for jitter, passed since the last poll.
        let on_time = sqlx::query(
            "UPDATE device_authorizations SET last_polled_at = $1 WHERE device_code_hash = $2 AND status = 'pending' \
             AND (last_polled_at IS NULL OR last_polled_at + interval_ms - interval_ms / $3 <= $1)",
        )
        .bind(now)
        .bind(hash)
        .bind((1.0 / EARLY_TOLERANCE) as i64)
        .execute(&self.pool)
        .await?;
        if on_time.rows_affected() == 1 {
            return Ok(Some(TokenOutcome::Pending));
        }
        let step = i64::try_from(SLOW_DOWN_STEP.as_millis()).unwrap_or(i64::MAX);
        let slowed: Option<(i64,)> = sqlx::query_as(
            "UPDATE device_authorizations SET last_polled_at = $1, interval_ms = interval_ms + $2 \
             WHERE device_code_hash = $3 AND status = 'pending' RETURNING interval_ms",
        )
        .bind(now)
        .bind(step)
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(slowed.map(|(interval_ms,)| TokenOutcome::SlowDown {
            interval: Duration::from_millis(u64::try_from(interval_ms).unwrap_or(0)),
        }))
    }

    /// Claims an approved authorization and creates its device with a new token, in one
    /// transaction. `None` when the row changed under it (claimed by a racing poll, expired).
    async fn issue_device(&self, hash: &str, now: i64) -> Result<Option<TokenOutcome>, RegistryError> {
        let mut tx = self.pool.begin().await?;
        // The first statement writes, so on SQLite the transaction takes the write lock at once.
        let claimed: Option<(String, String, String, Option<String>)> = sqlx::query_as(
            "UPDATE device_authorizations SET status = 'used', used_at = $1 \
             WHERE device_code_hash = $2 AND status = 'approved' AND expires_at > $1 \
             AND NOT EXISTS (SELECT 1 FROM api_tokens WHERE api_tokens.token_hash = device_authorizations.api_token_hash \
                 AND api_tokens.revoked_at IS NOT NULL) \
             RETURNING owner, device_id, name, platform",
        )
        .bind(now)
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((owner, device_id, name, platform)) = claimed else {
            tx.rollback().await?;
            // Still approved and unexpired: the api token that approved it was revoked.
            let row: Option<(String, i64)> =
                sqlx::query_as("SELECT status, expires_at FROM device_authorizations WHERE device_code_hash = $1")
                    .bind(hash)
                    .fetch_optional(&self.pool)
                    .await?;
            return Ok(match row {
                Some((status, expires_at)) if status == "approved" && expires_at > self.now_ms() => {
                    Some(TokenOutcome::Withdrawn)
                }
                _ => None,
            });
        };
        match self.create_device(&mut tx, &device_id, &owner, &name, platform.as_deref(), now).await {
            Ok(token) => {
                tx.commit().await?;
                Ok(Some(TokenOutcome::Issued(EnrollResponse { device_id, token })))
            }
            Err(RegistryError::OverLimit { value, max, .. }) => {
                tx.rollback().await?;
                Ok(Some(TokenOutcome::OverLimit { value, max }))
            }
            Err(error) => Err(error),
        }
    }

    /// Deletes authorizations that expired before `before` (used, denied or never decided), in
    /// batches; returns how many. Live ones are never touched.
    pub async fn delete_done_device_authorizations(&self, before: DateTime<Utc>) -> Result<u64, RegistryError> {
        let before = before.timestamp_millis();
        let mut deleted = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM device_authorizations WHERE device_code_hash IN \
                 (SELECT device_code_hash FROM device_authorizations WHERE expires_at < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(DELETE_BATCH)
            .execute(&self.pool)
            .await?;
            deleted += done.rows_affected();
            if done.rows_affected() < as_u64(DELETE_BATCH) {
                return Ok(deleted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_status() {
        use AuthorizationStatus::*;
        let table = [
            (Pending, 10, 5, Pending),
            (Pending, 10, 10, Expired),
            (Approved, 10, 5, Approved),
            (Approved, 10, 11, Expired),
            (Denied, 10, 11, Denied),
            (Used, 10, 11, Used),
            (Expired, 10, 5, Expired),
        ];
        for (stored, expires, now, want) in table {
            assert_eq!(AuthorizationStatus::effective(stored, expires, now), want, "{stored:?} {expires} {now}");
        }
        for status in [Pending, Approved, Denied, Expired, Used] {
            assert_eq!(AuthorizationStatus::parse(status.as_str()).expect("parses"), status);
        }
        assert!(AuthorizationStatus::parse("other").is_err());
    }
}
