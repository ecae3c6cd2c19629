//! The pending table: the calls this replica dispatched and still waits for, and which result
//! resolves which of them.
//!
//! Pure data and decisions. An entry leaves the table when its result arrives, when the
//! device is revoked, or when the waiting dispatch gives up (timeout) or is dropped (its HTTP
//! caller went away): [`PendingTable::cancel`] is called from a drop guard, so no path leaks.

use std::collections::HashMap;

use protocol::subject::DeliverAck;
use protocol::HostResult;
use tokio::sync::oneshot;

#[derive(Debug)]
struct Pending {
    device_id: String,
    tx: oneshot::Sender<HostResult>,
}

#[derive(Debug, Default)]
pub struct PendingTable {
    calls: HashMap<String, Pending>,
}

impl PendingTable {
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// True while a dispatch waits for `call_id`.
    pub fn contains(&self, call_id: &str) -> bool {
        self.calls.contains_key(call_id)
    }

    /// Registers a dispatch to `device_id`; the receiver gets its result. False (and nothing
    /// registered) if the call id is already pending.
    pub fn insert(&mut self, call_id: &str, device_id: &str) -> Option<oneshot::Receiver<HostResult>> {
        if self.calls.contains_key(call_id) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.calls.insert(call_id.to_owned(), Pending { device_id: device_id.to_owned(), tx });
        Some(rx)
    }

    /// A result posted by `from_device`: resolves the call only if it was sent to that device.
    pub fn resolve(&mut self, from_device: &str, result: HostResult) -> DeliverAck {
        match self.calls.get(&result.call_id) {
            None => DeliverAck::Unknown,
            Some(pending) if pending.device_id != from_device => DeliverAck::Forbidden,
            Some(_) => match self.calls.remove(&result.call_id) {
                // The waiter may have gone in the same instant; the call is resolved either way.
                Some(pending) => {
                    let _ = pending.tx.send(result);
                    DeliverAck::Delivered
                }
                None => DeliverAck::Unknown,
            },
        }
    }

    /// Forgets a call whose dispatch stopped waiting.
    pub fn cancel(&mut self, call_id: &str) {
        self.calls.remove(call_id);
    }

    /// Fails every call pending for a device with `result_for(call_id)`; returns how many.
    pub fn fail_device(&mut self, device_id: &str, result_for: impl Fn(&str) -> HostResult) -> usize {
        let ids: Vec<String> =
            self.calls.iter().filter(|(_, p)| p.device_id == device_id).map(|(id, _)| id.clone()).collect();
        for id in &ids {
            if let Some(pending) = self.calls.remove(id) {
                let _ = pending.tx.send(result_for(id));
            }
        }
        ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resolve_decisions() {
        // (registered for, posted by, call id posted, outcome, still pending)
        let cases = [
            ("d1", "d1", "c", DeliverAck::Delivered, false),
            ("d1", "d2", "c", DeliverAck::Forbidden, true),
            ("d1", "d1", "other", DeliverAck::Unknown, true),
        ];
        for (to, by, posted, want, still) in cases {
            let mut table = PendingTable::default();
            let mut rx = table.insert("c", to).expect("fresh id");
            let got = table.resolve(by, HostResult::success(posted, json!(1)));
            assert_eq!(got, want, "{to} {by} {posted}");
            assert_eq!(table.len() == 1, still);
            assert_eq!(rx.try_recv().is_ok(), want == DeliverAck::Delivered);
        }
    }

    #[test]
    fn a_result_resolves_once() {
        let mut table = PendingTable::default();
        let _rx = table.insert("c", "d").expect("fresh id");
        assert_eq!(table.resolve("d", HostResult::success("c", json!(1))), DeliverAck::Delivered);
        assert_eq!(table.resolve("d", HostResult::success("c", json!(2))), DeliverAck::Unknown);
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let mut table = PendingTable::default();
        assert!(table.insert("c", "d").is_some());
        assert!(table.insert("c", "d").is_none());
    }

    #[test]
    fn a_gone_waiter_still_resolves() {
        let mut table = PendingTable::default();
        drop(table.insert("c", "d"));
        assert_eq!(table.resolve("d", HostResult::success("c", json!(1))), DeliverAck::Delivered);
        assert!(table.is_empty());
    }

    #[test]
    fn cancel_and_fail_device_empty_the_table() {
        let mut table = PendingTable::default();
        let _a = table.insert("a", "d1");
        let mut b = table.insert("b", "d2").expect("fresh");
        let mut c = table.insert("c", "d2").expect("fresh");
        table.cancel("a");
        assert_eq!(table.fail_device("d2", |id| HostResult::offline(id)), 2);
        assert!(table.is_empty());
        assert!(b.try_recv().expect("failed").is_offline());
        assert!(c.try_recv().expect("failed").is_offline());
    }
}
