//! The revocation watch: every half second, each replica asks the registry for the api tokens
//! revoked lately and evicts them from its credential cache, so a token revoked by
//! `dispatcher token revoke` (a separate process that writes the database and, in cluster mode,
//! publishes the revocation on the bus) is refused by every replica within a second even when
//! no broker carried the news: the embedded replica, or a replica that missed the message.
//!
//! The window looked at overlaps from one poll to the next (the last [`WINDOW`]), so a revocation
//! whose transaction committed late, or whose timestamp came from a clock a little behind this
//! replica's, is still seen; evicting a token twice costs nothing. A revocation missed despite
//! that is still bounded by the cache's own expiry.
//!
//! Not here: the query (the registry's), the cache (the hub's), or the broadcast (the bus's).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::core::cache::parse_token_hash;
use crate::core::hub::AUTH_CACHE_TTL;
use crate::core::Hub;
use crate::registry::Registry;

/// How often the registry is asked.
pub const POLL: Duration = Duration::from_millis(500);
/// How far back each poll looks: twice the cache's expiry, so a revocation stays visible to
/// several polls and a token cached just before it committed is evicted again.
pub const WINDOW: Duration = Duration::from_secs(2 * AUTH_CACHE_TTL.as_secs());

/// What the watch has already reported, to log each revocation once.
#[derive(Debug, Default)]
struct Seen {
    /// Token hash to the poll time (unix ms) it was last returned.
    hashes: HashMap<String, i64>,
}

impl Seen {
    /// Records a poll's answer at `now_ms`; returns the hashes not reported before, and forgets
    /// those that left the window.
    fn update(&mut self, hashes: &[String], now_ms: i64, window_ms: i64) -> Vec<String> {
        self.hashes.retain(|_, at| now_ms.saturating_sub(*at) <= window_ms);
        hashes.iter().filter(|hash| self.hashes.insert((*hash).clone(), now_ms).is_none()).cloned().collect()
    }
}

/// Polls until `cancel`, evicting revoked api tokens from `hub`.
pub async fn watch(registry: Registry, hub: Arc<Hub>, cancel: CancellationToken) {
    let window_ms = i64::try_from(WINDOW.as_millis()).unwrap_or(i64::MAX);
    let mut seen = Seen::default();
    let mut failing = false;
    let mut interval = tokio::time::interval(POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        match registry.api_tokens_revoked_since(now_ms.saturating_sub(window_ms)).await {
            Ok(hashes) => {
                if failing {
                    tracing::info!("revocation watch: the database answers again");
                    failing = false;
                }
                let keys: Vec<[u8; 32]> = hashes.iter().filter_map(|hash| parse_token_hash(hash)).collect();
                let evicted = hub.revoke_api_tokens(&keys);
                let new = seen.update(&hashes, now_ms, window_ms);
                if !new.is_empty() {
                    tracing::info!(tokens = new.len(), evicted, "api tokens revoked (seen in the database)");
                }
            }
            Err(error) => {
                // Once per outage: readiness reports the database, and the cache still expires.
                if !failing {
                    tracing::warn!(%error, "revocation watch: cannot read revoked api tokens");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_revocation_is_reported_once_while_in_the_window() {
        let mut seen = Seen::default();
        let (a, b) = ("a".to_owned(), "b".to_owned());
        // (poll time, hashes returned, newly reported)
        let polls: [(i64, Vec<String>, Vec<String>); 5] = [
            (0, vec![], vec![]),
            (500, vec![a.clone()], vec![a.clone()]),
            (1000, vec![a.clone(), b.clone()], vec![b.clone()]),
            (1500, vec![a.clone(), b.clone()], vec![]),
            // Both left the window long ago and come back (a clock jump): reported again.
            (100_000, vec![a.clone()], vec![a.clone()]),
        ];
        for (now, hashes, want) in polls {
            assert_eq!(seen.update(&hashes, now, 60_000), want, "at {now}");
        }
        assert_eq!(seen.hashes.len(), 1, "b was forgotten once out of the window");
    }
}
