//! The connection table: which live stream on this replica owns each device, and what a new
//! stream, a takeover from another replica or a revocation closes.
//!
//! Pure data and decisions, no I/O: a stream is represented by its frame queue, and every
//! decision returns the streams the caller must notify. The async shell
//! ([`crate::core::Hub`]) carries them out.
//!
//! Fencing: each stream carries an epoch, issued cluster-wide in increasing order (the
//! registry hands them out). Between two streams of one device the larger epoch wins,
//! wherever and in whatever order the two replicas learn of each other.

use std::collections::HashMap;
use std::sync::Arc;

use super::queue::StreamQueue;

/// One live stream of a device on this replica.
#[derive(Debug, Clone)]
pub struct Conn {
    /// Unique on this replica: tells a stream from a newer one of the same device.
    pub conn_id: u64,
    pub epoch: u64,
    pub queue: Arc<StreamQueue>,
}

/// What accepting a new stream decided.
#[derive(Debug)]
pub enum Accept {
    /// The new stream owns the device; `superseded` (an older local stream) must be closed.
    Owner { superseded: Option<Conn> },
    /// A stream with a larger epoch is already here: the new one is stale and must be closed.
    Stale,
}

/// What a takeover announced by another replica decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Takeover {
    /// The local stream is older: close it (the returned conn id) with `superseded`.
    Close(u64),
    /// The local stream is newer than the announced one: re-announce it so the other closes.
    Reassert(u64),
    /// Nothing here for that device, or the announcement is our own.
    Nothing,
}

#[derive(Debug, Default)]
pub struct ConnectionTable {
    by_device: HashMap<String, Conn>,
}

impl ConnectionTable {
    pub fn len(&self) -> usize {
        self.by_device.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }

    pub fn get(&self, device_id: &str) -> Option<&Conn> {
        self.by_device.get(device_id)
    }

    /// Every stream here, by device.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Conn)> {
        self.by_device.iter()
    }

    pub fn device_ids(&self) -> Vec<String> {
        self.by_device.keys().cloned().collect()
    }

    /// Registers a new stream; the larger epoch keeps the device.
    pub fn accept(&mut self, device_id: &str, conn: Conn) -> Accept {
        match self.by_device.get(device_id) {
            Some(existing) if existing.epoch > conn.epoch => Accept::Stale,
            _ => Accept::Owner { superseded: self.by_device.insert(device_id.to_owned(), conn) },
        }
    }

    /// Forgets a stream that ended, unless a newer one replaced it meanwhile. True when the
    /// device no longer has a stream here.
    pub fn release(&mut self, device_id: &str, conn_id: u64) -> bool {
        match self.by_device.get(device_id) {
            Some(conn) if conn.conn_id == conn_id => {
                self.by_device.remove(device_id);
                true
            }
            _ => false,
        }
    }

    /// Another replica opened a stream with `epoch` for the device.
    pub fn takeover(&mut self, device_id: &str, epoch: u64) -> Takeover {
        match self.by_device.get(device_id) {
            Some(conn) if conn.epoch < epoch => Takeover::Close(conn.conn_id),
            Some(conn) if conn.epoch > epoch => Takeover::Reassert(conn.epoch),
            _ => Takeover::Nothing,
        }
    }

    /// Removes and returns the stream of one device (revocation).
    pub fn remove(&mut self, device_id: &str) -> Option<Conn> {
        self.by_device.remove(device_id)
    }

    /// Removes and returns a stream if it is still the one with `conn_id`.
    pub fn remove_conn(&mut self, device_id: &str, conn_id: u64) -> Option<Conn> {
        match self.by_device.get(device_id) {
            Some(conn) if conn.conn_id == conn_id => self.by_device.remove(device_id),
            _ => None,
        }
    }

    /// Removes and returns every stream (shutdown, lost broker, stall).
    pub fn drain(&mut self) -> Vec<(String, Conn)> {
        self.by_device.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(conn_id: u64, epoch: u64) -> Conn {
        let limits = crate::core::queue::QueueLimits { frames: 1, bytes: 1 };
        Conn { conn_id, epoch, queue: Arc::new(StreamQueue::new(limits, Arc::default())) }
    }

    #[test]
    fn accept_decisions() {
        // (existing epoch, new epoch, new owns?, old superseded?)
        let cases =
            [(None, 5, true, false), (Some(4), 5, true, true), (Some(6), 5, false, false), (Some(5), 5, true, true)];
        for (existing, new, owns, superseded) in cases {
            let mut table = ConnectionTable::default();
            if let Some(epoch) = existing {
                table.accept("d", conn(1, epoch));
            }
            match table.accept("d", conn(2, new)) {
                Accept::Owner { superseded: old } => {
                    assert!(owns, "{existing:?} -> {new}");
                    assert_eq!(old.is_some(), superseded, "{existing:?} -> {new}");
                    assert_eq!(table.get("d").map(|c| c.conn_id), Some(2));
                }
                Accept::Stale => {
                    assert!(!owns, "{existing:?} -> {new}");
                    assert_eq!(table.get("d").map(|c| c.conn_id), Some(1));
                }
            }
        }
    }

    #[test]
    fn release_only_forgets_the_same_stream() {
        let mut table = ConnectionTable::default();
        table.accept("d", conn(1, 1));
        table.accept("d", conn(2, 2));
        assert!(!table.release("d", 1), "a superseded stream's end must not drop its successor");
        assert_eq!(table.len(), 1);
        assert!(table.release("d", 2));
        assert!(table.is_empty());
        assert!(!table.release("d", 2));
    }

    #[test]
    fn takeover_decisions() {
        // (local epoch, announced epoch, decision)
        let cases = [
            (None, 3, Takeover::Nothing),
            (Some(2), 3, Takeover::Close(7)),
            (Some(4), 3, Takeover::Reassert(4)),
            (Some(3), 3, Takeover::Nothing),
        ];
        for (local, announced, want) in cases {
            let mut table = ConnectionTable::default();
            if let Some(epoch) = local {
                table.accept("d", conn(7, epoch));
            }
            assert_eq!(table.takeover("d", announced), want, "{local:?} vs {announced}");
        }
    }

    #[test]
    fn remove_conn_respects_identity() {
        let mut table = ConnectionTable::default();
        table.accept("d", conn(1, 1));
        assert!(table.remove_conn("d", 2).is_none());
        assert!(table.remove_conn("d", 1).is_some());
        table.accept("a", conn(1, 1));
        table.accept("b", conn(2, 1));
        assert_eq!(table.drain().len(), 2);
        assert!(table.is_empty());
    }
}
