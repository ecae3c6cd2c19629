//! Who is told what: this replica's listeners of `GET /api/events`, by user, each with a
//! bounded queue of frames. An event goes to its user's listeners only; a listener whose queue
//! is full has fallen behind and is dropped (its stream ends, and its client reconnects for a
//! fresh snapshot), so a slow reader never holds up the fan-out or anyone else.
//!
//! Pure and synchronous (tokio's channels are used through `try_send`, which never waits);
//! not here: the bus, the database, or writing frames to a connection.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Frames queued to one listener before it counts as fallen behind.
pub const LISTENER_QUEUE: usize = 256;

/// A frame as it is written: its `event:` name and its data (one line of JSON), encoded once
/// for every listener of the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    pub event: &'static str,
    pub data: String,
}

/// The receiving side of one listener.
#[derive(Debug)]
pub struct Listener {
    pub id: u64,
    pub frames: mpsc::Receiver<Arc<EncodedFrame>>,
    /// Cancelled when the table dropped this listener (it fell behind, or every listener was
    /// let go): its stream ends at once, without writing what is still queued.
    pub dropped: CancellationToken,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    tx: mpsc::Sender<Arc<EncodedFrame>>,
    dropped: CancellationToken,
}

/// What one delivery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Listeners that got the frame.
    pub delivered: usize,
    /// Listeners dropped because their queue was full.
    pub dropped: usize,
}

#[derive(Debug)]
pub struct ListenerTable {
    capacity: usize,
    next_id: u64,
    by_user: HashMap<String, Vec<Entry>>,
}

impl Default for ListenerTable {
    fn default() -> Self {
        Self::new(LISTENER_QUEUE)
    }
}

impl ListenerTable {
    /// A table whose listeners queue at most `capacity` frames each.
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), next_id: 1, by_user: HashMap::new() }
    }

    /// A new listener of `user_id`'s events.
    pub fn add(&mut self, user_id: &str) -> Listener {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, frames) = mpsc::channel(self.capacity);
        let dropped = CancellationToken::new();
        self.by_user.entry(user_id.to_owned()).or_default().push(Entry { id, tx, dropped: dropped.clone() });
        Listener { id, frames, dropped }
    }

    /// Forgets listener `id` of `user_id` (its stream ended). False when it was already gone.
    pub fn remove(&mut self, user_id: &str, id: u64) -> bool {
        let Some(entries) = self.by_user.get_mut(user_id) else {
            return false;
        };
        let before = entries.len();
        entries.retain(|entry| entry.id != id);
        let removed = entries.len() < before;
        if entries.is_empty() {
            self.by_user.remove(user_id);
        }
        removed
    }

    /// Queues `frame` to every listener of `user_id`; a listener whose queue is full is
    /// dropped, one whose receiver is gone is forgotten.
    pub fn deliver(&mut self, user_id: &str, frame: &Arc<EncodedFrame>) -> Delivery {
        let mut delivery = Delivery::default();
        let Some(entries) = self.by_user.get_mut(user_id) else {
            return delivery;
        };
        entries.retain(|entry| match entry.tx.try_send(frame.clone()) {
            Ok(()) => {
                delivery.delivered += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                entry.dropped.cancel();
                delivery.dropped += 1;
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if entries.is_empty() {
            self.by_user.remove(user_id);
        }
        delivery
    }

    /// Drops every listener (events were missed, or the replica is going away). Returns how
    /// many there were.
    pub fn drop_all(&mut self) -> usize {
        let mut count = 0;
        for entry in self.by_user.drain().flat_map(|(_, entries)| entries) {
            entry.dropped.cancel();
            count += 1;
        }
        count
    }

    /// Listeners in the table.
    pub fn len(&self) -> usize {
        self.by_user.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Arc<EncodedFrame> {
        Arc::new(EncodedFrame { event: "device", data: format!("{{\"n\":{n}}}") })
    }

    fn drain(listener: &mut Listener) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(frame) = listener.frames.try_recv() {
            seen.push(frame.data.clone());
        }
        seen
    }

    #[test]
    fn a_user_hears_only_their_own_events() {
        let mut table = ListenerTable::new(8);
        let mut alice_1 = table.add("alice");
        let mut alice_2 = table.add("alice");
        let mut mallory = table.add("mallory");
        let mut dotted = table.add("alice.*");
        // (user of the event, listeners told)
        let cases: &[(&str, usize)] = &[("alice", 2), ("mallory", 1), ("nobody", 0), ("alice.*", 1), ("ALICE", 0)];
        for (n, (user, told)) in cases.iter().enumerate() {
            let delivery = table.deliver(user, &frame(n));
            assert_eq!(delivery, Delivery { delivered: *told, dropped: 0 }, "{user}");
        }
        assert_eq!(drain(&mut alice_1), vec![r#"{"n":0}"#]);
        assert_eq!(drain(&mut alice_2), vec![r#"{"n":0}"#]);
        assert_eq!(drain(&mut mallory), vec![r#"{"n":1}"#]);
        assert_eq!(drain(&mut dotted), vec![r#"{"n":3}"#]);
    }

    #[test]
    fn a_listener_that_falls_behind_is_dropped_alone() {
        let mut table = ListenerTable::new(3);
        let slow = table.add("alice");
        let mut quick = table.add("alice");
        for n in 0..3 {
            assert_eq!(table.deliver("alice", &frame(n)).delivered, 2);
            assert_eq!(drain(&mut quick).len(), 1);
        }
        assert!(!slow.dropped.is_cancelled());
        // The slow one's queue is full: the fourth frame drops it, the quick one still hears.
        assert_eq!(table.deliver("alice", &frame(3)), Delivery { delivered: 1, dropped: 1 });
        assert!(slow.dropped.is_cancelled());
        assert_eq!(table.len(), 1);
        assert_eq!(table.deliver("alice", &frame(4)), Delivery { delivered: 1, dropped: 0 });
        assert_eq!(drain(&mut quick), vec![r#"{"n":3}"#, r#"{"n":4}"#]);
    }

    #[test]
    fn gone_receivers_are_forgotten_and_removal_is_exact() {
        let mut table = ListenerTable::new(4);
        let first = table.add("alice");
        let second = table.add("alice");
        drop(first.frames);
        assert_eq!(table.deliver("alice", &frame(0)), Delivery { delivered: 1, dropped: 0 });
        assert!(!first.dropped.is_cancelled(), "a closed receiver is not a slow one");
        assert_eq!(table.len(), 1);
        assert!(!table.remove("alice", first.id));
        assert!(!table.remove("mallory", second.id));
        assert!(table.remove("alice", second.id));
        assert!(table.is_empty());
    }

    #[test]
    fn drop_all_cancels_every_listener() {
        let mut table = ListenerTable::default();
        let listeners: Vec<Listener> = ["a", "b", "b"].iter().map(|user| table.add(user)).collect();
        assert_eq!(table.drop_all(), 3);
        assert!(listeners.iter().all(|listener| listener.dropped.is_cancelled()));
        assert!(table.is_empty());
        assert_eq!(table.deliver("a", &frame(0)), Delivery::default());
    }
}
