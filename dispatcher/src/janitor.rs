//! The janitor: every replica's periodic upkeep of the shared database. It fails proposals left
//! `applying` by a replica that died waiting on the apply, and marks `unknown` the call log
//! records still pending that long past their deadline (the sweep, every `--stale-apply-secs`),
//! and deletes what is past keeping (decided proposals after `--proposal-retention-days`, used
//! or expired pairing codes and device authorizations after a day, call log records after
//! `--call-log-days` and records that never got their dispatch part after an hour; every ten
//! minutes and at start).
//!
//! Each step is a conditional UPDATE or an indexed DELETE, so every replica running it at once
//! is harmless: a row is swept or deleted once between them. Not here: what the statements do
//! (the registry) and when a live replica records its own apply (the approve handler).

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::Storage;
use crate::registry::{Expiry, Registry};

/// How often decided proposals and done pairing codes are looked for.
const PURGE_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// How long a call log record may wait for its dispatch part (written by a replica that may
/// have died) before it is deleted.
const ORPHAN_CALL_RETENTION: Duration = Duration::from_secs(60 * 60);

/// Sweeps and purges until `cancel` fires.
pub async fn run(registry: Registry, storage: Storage, cancel: CancellationToken) {
    let mut sweep = tokio::time::interval(storage.stale_apply);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut purge = tokio::time::interval(PURGE_INTERVAL);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sweep.tick() => {
                sweep_stale_applies(&registry, &storage, Utc::now()).await;
                sweep_unanswered_calls(&registry, &storage, Utc::now()).await;
            }
            _ = purge.tick() => {
                delete_expired(&registry, &storage, Utc::now()).await;
                delete_old_calls(&registry, &storage, Utc::now()).await;
            }
        }
    }
}

/// Applies whose deadline is before this are stale: their replica would have recorded an
/// outcome by the deadline plus a second, and `stale_apply` covers clocks that disagree.
pub fn stale_before(now: DateTime<Utc>, storage: &Storage) -> DateTime<Utc> {
    now - chrono::Duration::from_std(storage.stale_apply).unwrap_or(chrono::Duration::MAX)
}

/// What is past keeping at `now`.
pub fn expiry_at(now: DateTime<Utc>, storage: &Storage) -> Expiry {
    let ago = |keep: Duration| now - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    Expiry {
        proposals_decided_before: ago(storage.proposal_retention),
        codes_done_before: ago(storage.pairing_code_retention),
    }
}

async fn sweep_stale_applies(registry: &Registry, storage: &Storage, now: DateTime<Utc>) {
    match registry.fail_stale_applies(stale_before(now, storage)).await {
        Ok(failed) => {
            for proposal_id in failed {
                tracing::warn!(%proposal_id, "apply still pending past its deadline: failed with `device timed out`");
            }
        }
        Err(error) => tracing::warn!(%error, "sweep of stuck applies failed; next try in a moment"),
    }
}

/// Call log records older than this are deleted, and records still without their dispatch
/// part first logged before the second time.
pub fn calls_expire_before(now: DateTime<Utc>, storage: &Storage) -> (DateTime<Utc>, DateTime<Utc>) {
    let ago = |keep: Duration| now - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    (ago(storage.call_log_retention), ago(ORPHAN_CALL_RETENTION))
}

/// Call log records still pending `--stale-apply-secs` past their deadline become `unknown`: a
/// live dispatching replica records `timed out` at the deadline, so theirs is gone, and no
/// device result came back anywhere.
async fn sweep_unanswered_calls(registry: &Registry, storage: &Storage, now: DateTime<Utc>) {
    match registry.mark_unknown_calls(stale_before(now, storage)).await {
        Ok(0) => {}
        Ok(marked) => tracing::info!(marked, "call log: calls with no outcome past their deadline marked unknown"),
        Err(error) => tracing::warn!(%error, "call log sweep failed; next try in a moment"),
    }
}

async fn delete_old_calls(registry: &Registry, storage: &Storage, now: DateTime<Utc>) {
    let (logged_before, orphans_before) = calls_expire_before(now, storage);
    match registry.delete_old_calls(logged_before, orphans_before).await {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(deleted, "call log: records past keeping deleted"),
        Err(error) => tracing::warn!(%error, "deleting old call log records failed; next try later"),
    }
}

async fn delete_expired(registry: &Registry, storage: &Storage, now: DateTime<Utc>) {
    let expiry = expiry_at(now, storage);
    match registry.delete_done_device_authorizations(expiry.codes_done_before).await {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(device_authorizations = deleted, "expired rows deleted"),
        Err(error) => tracing::warn!(%error, "deleting expired device authorizations failed; next try later"),
    }
    match registry.delete_expired(expiry).await {
        Ok(expired) if expired.proposals + expired.pairing_codes > 0 => {
            tracing::info!(
                proposals = expired.proposals,
                pairing_codes = expired.pairing_codes,
                "expired rows deleted"
            );
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "deleting expired rows failed; next try later"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn cutoffs() {
        let now = Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap();
        let storage = Storage {
            stale_apply: Duration::from_secs(10),
            proposal_retention: Duration::from_secs(30 * 86_400),
            pairing_code_retention: Duration::from_secs(86_400),
            ..Storage::default()
        };
        assert_eq!(stale_before(now, &storage), Utc.with_ymd_and_hms(2026, 3, 31, 11, 59, 50).unwrap());
        let expiry = expiry_at(now, &storage);
        assert_eq!(expiry.proposals_decided_before, Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap());
        assert_eq!(expiry.codes_done_before, Utc.with_ymd_and_hms(2026, 3, 30, 12, 0, 0).unwrap());
        let (calls, orphans) =
            calls_expire_before(now, &Storage { call_log_retention: Duration::from_secs(7 * 86_400), ..storage });
        assert_eq!(calls, Utc.with_ymd_and_hms(2026, 3, 24, 12, 0, 0).unwrap());
        assert_eq!(orphans, Utc.with_ymd_and_hms(2026, 3, 31, 11, 0, 0).unwrap());
    }
}
