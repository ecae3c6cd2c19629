//! Pairing codes, enrollment and devices: minting a code for a user (within the user's quota of
//! live codes), trading it once for a device and its token (within the user's quota of
//! devices), looking devices up by token or by owner (page by page, with or without their
//! manifests), revoking them, and keeping their manifest (within its caps), last-seen time and
//! stream epochs.
//!
//! Not here: rate-limiting enrollment attempts (HTTP layer), closing a revoked device's stream
//! or evicting cached tokens (the caller broadcasts that), and whether a device is online.

use std::time::Duration;

use protocol::subject::is_uuid;
use protocol::{EnrollResponse, Manifest, PairingCode};

use super::page::{choose_rows, Order, Page, PageRequest};
use super::secret::{self, DEVICE_TOKEN_PREFIX};
use super::{as_u64, from_json_text, json_text, lock_user_quota, optional_time_of, time_of, MAX_PAIRING_TTL};
use super::{DeviceAuth, DeviceRecord, EnrollOutcome, Expiry, Limit, Registry, RegistryError};
use crate::bus::{BusError, StreamDirectory, StreamRoute};

/// Pairing codes deleted per statement by [`Registry::delete_expired`].
const DELETE_BATCH: i64 = 5000;

/// The columns [`device_of_row`] reads, in its order; `{manifest}` is the manifest column, or
/// an expression that reads it only where it is needed.
const DEVICE_COLUMNS: &str =
    "id, owner, name, platform, created_at, last_seen_at, {manifest}, revoked_at, roots, tool_count";

/// A list without tools reads a manifest only for rows stored before roots and tool counts were
/// kept beside it.
const MANIFEST_FOR_LEGACY_ROWS: &str = "CASE WHEN tool_count IS NULL THEN manifest END";

type DeviceRow = (
    String,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

fn device_columns(manifest: &str) -> String {
    DEVICE_COLUMNS.replace("{manifest}", manifest)
}

pub(super) fn device_of_row(row: DeviceRow) -> Result<DeviceRecord, RegistryError> {
    let (id, owner, name, platform, created_at, last_seen_at, manifest, revoked_at, roots, tool_count) = row;
    let manifest = manifest.as_deref().map(|text| from_json_text::<Manifest>(text, "device manifest")).transpose()?;
    let roots = match roots {
        Some(text) => Some(from_json_text::<Vec<String>>(&text, "device roots")?),
        None => manifest.as_ref().map(|m| m.roots.clone()),
    };
    let tool_count = match tool_count {
        Some(count) => Some(usize::try_from(count).map_err(|_| RegistryError::Corrupt(format!("tool count {count}")))?),
        None => manifest.as_ref().map(|m| m.tools.len()),
    };
    Ok(DeviceRecord {
        manifest,
        roots,
        tool_count,
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
    /// [`RegistryError::OverLimit`] when the user already holds
    /// [`super::Limits::max_live_pairing_codes`] unused, unexpired codes: the count and the
    /// insert are one statement, serialized per user across replicas.
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
        let max = self.limits.max_live_pairing_codes;
        let mut tx = self.pool.begin().await?;
        lock_user_quota(&mut tx, self.engine, Limit::LivePairingCodes, user_id).await?;
        let done = sqlx::query(
            "INSERT INTO pairing_codes (code_hash, user_id, created_at, expires_at, api_token_hash) \
             SELECT $1, $2, $3, $4, $6 WHERE (SELECT COUNT(*) FROM pairing_codes \
             WHERE user_id = $2 AND used_at IS NULL AND expires_at > $3) < $5",
        )
        .bind(secret::hash_secret(&normalized))
        .bind(user_id)
        .bind(now)
        .bind(expires_at)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .bind(api_token_hash)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let (live,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM pairing_codes WHERE user_id = $1 AND used_at IS NULL AND expires_at > $2",
            )
            .bind(user_id)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Err(RegistryError::OverLimit { limit: Limit::LivePairingCodes, value: as_u64(live), max });
        }
        tx.commit().await?;
        Ok(PairingCode { code, expires_at: time_of(expires_at)? })
    }

    /// Trades a pairing code for a new device of the code's user, with its token. The code is
    /// claimed by one conditional UPDATE (unused, unexpired, and not minted by an api token
    /// revoked since, or nothing happens) in the same transaction that creates the device, so
    /// of any number of concurrent attempts with one code, on any number of replicas, exactly
    /// one enrolls.
    ///
    /// [`RegistryError::OverLimit`] when the code's user already has
    /// [`super::Limits::max_devices_per_user`] devices: the transaction is rolled back, so the
    /// code is not used and stays valid until it expires (counted and created serialized per
    /// user across replicas).
    pub async fn enroll(&self, code: &str, name: &str, platform: Option<&str>) -> Result<EnrollOutcome, RegistryError> {
        let Some(normalized) = secret::normalize_pairing_code(code) else {
            return Ok(EnrollOutcome::Refused);
        };
        let device_id = uuid::Uuid::new_v4().to_string();
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
        let token = match self.create_device(&mut tx, &device_id, &owner, name, platform, now).await {
            Ok(token) => token,
            Err(error) => {
                tx.rollback().await?;
                return Err(error);
            }
        };
        tx.commit().await?;
        Ok(EnrollOutcome::Enrolled(EnrollResponse { device_id, token }))
    }

    /// Creates `owner`'s device `device_id` with a new device token, inside `tx`, and returns
    /// the token (its only time in clear): the one way a device comes to exist, whichever door
    /// it enrolled through (a pairing code, an approved device authorization). Within the
    /// owner's quota of [`super::Limits::max_devices_per_user`] devices, counted and created
    /// serialized per user across replicas; on [`RegistryError::OverLimit`] the caller rolls
    /// `tx` back.
    pub(super) async fn create_device(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        device_id: &str,
        owner: &str,
        name: &str,
        platform: Option<&str>,
        now: i64,
    ) -> Result<String, RegistryError> {
        lock_user_quota(tx, self.engine, Limit::DevicesPerUser, owner).await?;
        let (devices,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM devices WHERE owner = $1 AND revoked_at IS NULL")
            .bind(owner)
            .fetch_one(&mut **tx)
            .await?;
        let max = self.limits.max_devices_per_user;
        if as_u64(devices) >= max {
            return Err(RegistryError::OverLimit { limit: Limit::DevicesPerUser, value: as_u64(devices), max });
        }
        let token = secret::new_token(DEVICE_TOKEN_PREFIX);
        sqlx::query(
            "INSERT INTO devices (id, owner, name, platform, token_hash, token_prefix, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(device_id)
        .bind(owner)
        .bind(name)
        .bind(platform)
        .bind(secret::hash_secret(&token))
        .bind(secret::stored_prefix(&token))
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(token)
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
        let columns = device_columns("manifest");
        let sql = format!("SELECT {columns} FROM devices WHERE id = $1 AND owner = $2 AND revoked_at IS NULL");
        let row: Option<DeviceRow> = sqlx::query_as(&sql).bind(id).bind(owner).fetch_optional(&self.pool).await?;
        row.map(device_of_row).transpose()
    }

    /// All of `owner`'s devices that are not revoked, oldest first, with their manifests.
    /// Unbounded: what clients see goes through [`Registry::devices_page`].
    pub async fn devices(&self, owner: &str) -> Result<Vec<DeviceRecord>, RegistryError> {
        super::page::every_page(|request| async move { self.devices_page(owner, &request, true).await }).await
    }

    /// One page of `owner`'s devices that are not revoked, oldest first (ties broken by id): at
    /// most `request.limit`, cut short where their stored bytes would pass
    /// [`super::Limits::max_page_bytes`] (one always goes). With `with_manifests` false, each
    /// record has its roots and tool count but no manifest, and manifests are not read. `next`
    /// is set when there are more.
    pub async fn devices_page(
        &self,
        owner: &str,
        request: &PageRequest,
        with_manifests: bool,
    ) -> Result<Page<DeviceRecord>, RegistryError> {
        let order = Order::OldestFirst;
        let mut filter = "owner = $1 AND revoked_at IS NULL".to_owned();
        let mut next_param = 2;
        if request.after.is_some() {
            filter.push_str(" AND ");
            filter.push_str(&order.after("created_at", "id", next_param));
            next_param += 2;
        }
        let order_by = order.order_by("created_at", "id");
        let size = if with_manifests { "COALESCE(manifest_bytes, 0)" } else { "COALESCE(LENGTH(roots), 0)" };

        // First the candidates' keys and sizes, then only the rows that fit.
        let sizes_sql =
            format!("SELECT id, created_at, {size} FROM devices WHERE {filter} {order_by} LIMIT ${next_param}");
        let mut query = sqlx::query_as::<_, (String, i64, i64)>(&sizes_sql).bind(owner);
        if let Some(after) = &request.after {
            query = query.bind(after.at_ms).bind(&after.id);
        }
        let limit = request.limit.max(1);
        let candidates = query.bind(i64::try_from(limit + 1).unwrap_or(i64::MAX)).fetch_all(&self.pool).await?;
        let (count, next) = choose_rows(&candidates, limit, as_u64(self.limits.max_page_bytes));
        let chosen = &candidates[..count];
        if chosen.is_empty() {
            return Ok(Page { items: Vec::new(), next });
        }
        let columns = device_columns(if with_manifests { "manifest" } else { MANIFEST_FOR_LEGACY_ROWS });
        let placeholders: Vec<String> = (0..chosen.len()).map(|i| format!("${}", i + 2)).collect();
        let rows_sql = format!(
            "SELECT {columns} FROM devices WHERE owner = $1 AND revoked_at IS NULL AND id IN ({}) {order_by}",
            placeholders.join(", ")
        );
        let mut query = sqlx::query_as::<_, DeviceRow>(&rows_sql).bind(owner);
        for (id, _, _) in chosen {
            query = query.bind(id);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut items = rows.into_iter().map(device_of_row).collect::<Result<Vec<_>, _>>()?;
        if !with_manifests {
            for item in &mut items {
                item.manifest = None;
            }
        }
        Ok(Page { items, next })
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

    /// The epoch of a stream the device is opening on the replica whose route tag is `route`:
    /// larger than every epoch handed out before for this device, by any replica sharing the
    /// database. One UPDATE increments the device's counter, records `route` beside it and reads
    /// the epoch back, so the stored route is always that of the newest epoch.
    /// [`RegistryError::NotFound`] when the device is unknown or revoked.
    pub async fn next_stream_epoch(&self, device_id: &str, route: u32) -> Result<u64, RegistryError> {
        if !is_uuid(device_id) {
            return Err(RegistryError::NotFound);
        }
        let row: Option<(i64,)> = sqlx::query_as(
            "UPDATE devices SET stream_epoch = stream_epoch + 1, stream_route = $1, last_seen_at = $2 \
             WHERE id = $3 AND revoked_at IS NULL RETURNING stream_epoch",
        )
        .bind(i64::from(route))
        .bind(self.now_ms())
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?;
        let (epoch,) = row.ok_or(RegistryError::NotFound)?;
        u64::try_from(epoch).map_err(|_| RegistryError::Corrupt(format!("negative stream epoch {epoch}")))
    }

    /// Where the device's newest stream opened: the route tag of the replica that issued its
    /// latest epoch, and that epoch. `None` when the device is unknown, revoked, or never
    /// opened a stream. The stream may have ended since; only its holder can say.
    pub async fn last_stream(&self, device_id: &str) -> Result<Option<StreamRoute>, RegistryError> {
        if !is_uuid(device_id) {
            return Ok(None);
        }
        let row: Option<(Option<i64>, i64)> =
            sqlx::query_as("SELECT stream_route, stream_epoch FROM devices WHERE id = $1 AND revoked_at IS NULL")
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await?;
        let Some((Some(route), epoch)) = row else {
            return Ok(None);
        };
        let route = u32::try_from(route).map_err(|_| RegistryError::Corrupt(format!("stream route {route}")))?;
        let epoch =
            u64::try_from(epoch).map_err(|_| RegistryError::Corrupt(format!("negative stream epoch {epoch}")))?;
        Ok(Some(StreamRoute { route, epoch }))
    }

    /// Stores the manifest a device announced, with its roots and tool count beside it.
    /// [`RegistryError::NotFound`] when the device is unknown or revoked;
    /// [`RegistryError::OverLimit`] (nothing stored) when it has more tools than
    /// [`super::Limits::max_manifest_tools`] or more JSON bytes than
    /// [`super::Limits::max_manifest_bytes`].
    pub async fn set_manifest(&self, device_id: &str, manifest: &Manifest) -> Result<(), RegistryError> {
        if !is_uuid(device_id) {
            return Err(RegistryError::NotFound);
        }
        let limits = &self.limits;
        if manifest.tools.len() > limits.max_manifest_tools {
            return Err(RegistryError::OverLimit {
                limit: Limit::ManifestTools,
                value: as_u64(manifest.tools.len()),
                max: as_u64(limits.max_manifest_tools),
            });
        }
        let text = json_text(manifest)?;
        if text.len() > limits.max_manifest_bytes {
            return Err(RegistryError::OverLimit {
                limit: Limit::ManifestBytes,
                value: as_u64(text.len()),
                max: as_u64(limits.max_manifest_bytes),
            });
        }
        let bytes = i64::try_from(text.len()).unwrap_or(i64::MAX);
        let done = sqlx::query(
            "UPDATE devices SET manifest = $1, roots = $2, tool_count = $3, manifest_bytes = $4 \
             WHERE id = $5 AND revoked_at IS NULL",
        )
        .bind(text)
        .bind(json_text(&manifest.roots)?)
        .bind(i64::try_from(manifest.tools.len()).unwrap_or(i64::MAX))
        .bind(bytes)
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

impl Registry {
    /// Deletes pairing codes used, or expired, before the expiry's time, in batches; returns
    /// how many. Live codes are never touched.
    pub(super) async fn delete_done_pairing_codes(&self, expiry: &Expiry) -> Result<u64, RegistryError> {
        let before = expiry.codes_done_before.timestamp_millis();
        let mut deleted = 0;
        for column in ["used_at", "expires_at"] {
            // `column` is one of two names written here, not input.
            let sql = format!(
                "DELETE FROM pairing_codes WHERE code_hash IN \
                 (SELECT code_hash FROM pairing_codes WHERE {column} < $1 LIMIT $2)"
            );
            loop {
                let done = sqlx::query(&sql).bind(before).bind(DELETE_BATCH).execute(&self.pool).await?;
                deleted += done.rows_affected();
                if done.rows_affected() < as_u64(DELETE_BATCH) {
                    break;
                }
            }
        }
        Ok(deleted)
    }
}

/// The database is the cluster's record of where each device's newest stream opened.
#[async_trait::async_trait]
impl StreamDirectory for Registry {
    async fn last_stream(&self, device_id: &str) -> Result<Option<StreamRoute>, BusError> {
        Registry::last_stream(self, device_id)
            .await
            .map_err(|error| BusError::Unavailable(format!("registry: {error}")))
    }
}
