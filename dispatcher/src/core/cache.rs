//! The in-memory credential cache that keeps the database off the hot path: token hashes
//! seen recently, mapped to the device or user they authenticate, for a short time.
//!
//! It only remembers positive answers, and forgets them when they expire, when a device or an
//! api token is revoked (on every replica, through the bus, and for api tokens also through the
//! database poll of [`crate::revocation`]) and wholesale when a replica reconnects to its
//! broker (it may have missed a revocation meanwhile). It does not talk to the database.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A device token's owner, as the stream, result and manifest endpoints need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedDevice {
    pub device_id: String,
    pub owner: String,
}

/// A token hash as the registry stores it and the bus carries it (64 hex digits) as the
/// cache's key; `None` for anything else.
pub fn parse_token_hash(hex_hash: &str) -> Option<[u8; 32]> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut hash).ok().map(|()| hash)
}

/// A bounded map whose entries expire `ttl` after insertion.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    entries: HashMap<K, (V, Instant)>,
    ttl: Duration,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { entries: HashMap::new(), ttl, capacity }
    }

    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        match self.entries.get(key) {
            Some((value, at)) if now.duration_since(*at) < self.ttl => Some(value.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&mut self, key: K, value: V, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            let ttl = self.ttl;
            self.entries.retain(|_, (_, at)| now.duration_since(*at) < ttl);
            if self.entries.len() >= self.capacity {
                // Still full of live entries: forget everything rather than grow without bound.
                self.entries.clear();
            }
        }
        self.entries.insert(key, (value, now));
    }

    /// True when `key` has an entry, live or expired.
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.entries.retain(|_, (value, _)| keep(value));
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire() {
        let start = Instant::now();
        let mut cache = TtlCache::new(Duration::from_secs(10), 8);
        cache.insert("k", 1, start);
        assert_eq!(cache.get(&"k", start + Duration::from_secs(9)), Some(1));
        assert_eq!(cache.get(&"k", start + Duration::from_secs(10)), None);
        assert!(cache.is_empty(), "an expired entry is dropped when seen");
    }

    #[test]
    fn token_hashes() {
        let hash = "ab".repeat(32);
        assert_eq!(parse_token_hash(&hash), Some([0xab; 32]));
        for bad in ["", "ab", &"ab".repeat(33), &"zz".repeat(32)] {
            assert_eq!(parse_token_hash(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn capacity_is_a_bound() {
        let start = Instant::now();
        let mut cache = TtlCache::new(Duration::from_secs(10), 4);
        for i in 0..100 {
            cache.insert(i, i, start);
            assert!(cache.len() <= 4);
        }
        assert_eq!(cache.get(&99, start), Some(99));
    }

    #[test]
    fn retain_evicts_by_value() {
        let now = Instant::now();
        let mut cache = TtlCache::new(Duration::from_secs(10), 8);
        cache.insert("a", CachedDevice { device_id: "d1".into(), owner: "u".into() }, now);
        cache.insert("b", CachedDevice { device_id: "d2".into(), owner: "u".into() }, now);
        cache.retain(|d| d.device_id != "d1");
        assert_eq!(cache.get(&"a", now), None);
        assert!(cache.get(&"b", now).is_some());
    }
}
