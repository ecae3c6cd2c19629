//! The set of recently seen call ids, so a call delivered twice runs once.
//!
//! Core NATS has been seen to deliver a call twice after reconnects, and a call may also arrive
//! again on a new stream; the agent remembers the last [`RecentIds::DEFAULT_CAPACITY`] call ids
//! (first in, first out) across reconnections and refuses to run one it has seen. The bound
//! keeps memory flat on a device that runs for months.
//!
//! Not here: making an *apply* happen once across devices or restarts: that is the proposal
//! state machine in the dispatcher's database.

use std::collections::{HashSet, VecDeque};

/// A bounded, insertion-ordered set of call ids.
#[derive(Debug, Clone)]
pub struct RecentIds {
    capacity: usize,
    seen: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    /// How many ids the agent remembers by default.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// A set remembering at most `capacity` ids (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self { capacity, seen: HashSet::with_capacity(capacity), order: VecDeque::with_capacity(capacity) }
    }

    /// Records `id`; true when it was not among the remembered ids (the call should run).
    /// When full, the oldest id is forgotten.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }

    /// True when `id` is remembered.
    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Default for RecentIds {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_sighting_is_refused() {
        let mut ids = RecentIds::default();
        assert!(ids.insert("a"));
        assert!(ids.insert("b"));
        assert!(!ids.insert("a"));
        assert!(!ids.insert("b"));
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn bounded_first_in_first_out() {
        let mut ids = RecentIds::new(3);
        for id in ["a", "b", "c", "d"] {
            assert!(ids.insert(id));
        }
        assert_eq!(ids.len(), 3);
        assert!(!ids.contains("a"), "the oldest is forgotten");
        assert!(ids.contains("b") && ids.contains("c") && ids.contains("d"));
        assert!(!ids.insert("d"), "a refused duplicate does not evict anything");
        assert!(ids.contains("b"));
        assert!(ids.insert("a"), "a forgotten id is new again");
        assert!(!ids.contains("b"));
    }

    #[test]
    fn memory_stays_flat() {
        let mut ids = RecentIds::new(100);
        for n in 0..10_000 {
            assert!(ids.insert(&format!("call-{n}")));
        }
        assert_eq!(ids.len(), 100);
        assert!(ids.contains("call-9999") && !ids.contains("call-9899"));
    }

    #[test]
    fn zero_capacity_still_remembers_the_last() {
        let mut ids = RecentIds::new(0);
        assert!(ids.insert("a"));
        assert!(!ids.insert("a"));
        assert!(!ids.is_empty());
    }
}
