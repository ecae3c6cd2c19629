//! The NATS scheme of cluster mode: subjects, headers and message bodies.
//!
//! `{p}` is the subject prefix (`--subject-prefix`, default `pulsn.host`). Device ids are UUIDs,
//! safe as subject tokens; anything else is refused before it reaches a subject.
//!
//! | Subject | Subscribed by | Flow |
//! |---|---|---|
//! | `{p}.holder.{route}.call` | the replica whose route tag is `{route}`, as `{p}.holder.{route}.*` | request: a [`crate::HostCall`], header [`HEADER_DEVICE_ID`]; reply: a [`CallAck`] ([`CallAck::Absent`]: no stream of that device here). No responders: that replica is gone. |
//! | `{p}.holder.{route}.presence` | the same subscription | request: empty, header [`HEADER_DEVICE_ID`]; reply: a [`Holder`], or `null`. |
//! | `{p}.takeover` | every replica | [`Takeover`]: a stream opened. Holders of an older stream close it, a holder of a newer one re-announces it, everyone remembers where the device is held. |
//! | `{p}.result.{route}` | the one replica whose route tag is `{route}` | request: a [`crate::HostResult`], header [`HEADER_DEVICE_ID`]; reply: a [`DeliverAck`]. No responders: 404. |
//! | `{p}.revoked` | every replica | [`Revoked`]: close the stream, fail the device's pending calls, evict cached tokens. |
//! | `{p}.api-tokens.revoked` | every replica | [`ApiTokensRevoked`]: evict those api tokens from the credential cache. Published by `dispatcher token revoke`; replicas also poll the database for it, so a missed message costs at most that poll. |
//! | `{p}.presence.all` | every replica | request (scatter-gather): each replica answers its [`HeldDevices`]. |
//! | `{p}.load` | every replica | [`ReplicaLoad`], published by each replica every few seconds: how many device streams it holds and its `--max-streams`. Each replica averages the recent ones to decide whether to shed streams to the others (the rebalancing rule is in the dispatcher's `rebalance` module). |
//! | `{p}.events.{user}` | every replica, once, as `{p}.events.*` | [`crate::events::UserEvent`]: one user's device or proposal change, for that user's listeners on every replica. `{user}` is [`crate::events::user_token`] (user ids are not safe tokens). Core NATS, best effort: a listener that reconnects gets a fresh snapshot. |
//!
//! Every subscription is replica-wide: a replica subscribes the same eight subjects whether it
//! holds no device or a hundred thousand. Holding a stream costs the broker nothing and the
//! replica one map entry.
//!
//! **Routing a call to the holder.** Each replica picks a random 32-bit route tag at start.
//! When a device opens a stream, the registry issues its epoch and records the route tag of the
//! accepting replica in the same UPDATE (so the recorded route is always that of the newest
//! epoch), before the stream says `ready`; the replica then publishes a [`Takeover`]. To reach a
//! device, a replica takes the route from its cache (filled by the takeovers it hears), else
//! from the registry, and asks that holder. The holder's answer is the truth: it pushes, or
//! says [`CallAck::Absent`] (no stream of that device here), or there are no responders (that
//! replica is gone: a restart takes a new tag). Either way the caller forgets the route and
//! asks the registry again: a newer stream elsewhere is tried at once; none means the device is
//! offline, answered at once. A device that is `ready` is always found, whatever takeovers a
//! replica missed, because the registry was written first.
//!
//! Trade-offs, against the former scheme (two subscriptions per held device,
//! `{p}.device.{id}.call` in a queue group and `{p}.device.{id}.control`):
//!
//! - memory: each subscription cost the replica an async-nats channel block of 32 messages
//!   (about 6 KB) and the device a task; now a held device costs a map entry, and every replica
//!   remembers up to 200,000 routes of devices held elsewhere (about 100 bytes each);
//! - messages: a call is the same request and reply; a stream open publishes one takeover heard
//!   by every replica (N deliveries for N replicas) instead of one SUB, one UNSUB and one
//!   takeover per subscription; nothing is subscribed or unsubscribed per device, so a reconnect
//!   herd adds no interest churn to propagate through a NATS cluster;
//! - the registry: a call whose route this replica does not know (a device that was never
//!   called from here and whose takeover it missed, or an offline device) costs one indexed
//!   read of the device's row; an offline device is answered after that read instead of after a
//!   "no responders" from the broker. The hot path (a route known, the holder answering) does
//!   not touch the database. A call while the database is unreachable reaches the devices whose
//!   route is known and waits, then times out, for the others;
//! - a call to a device held by the calling replica is pushed in the process, without NATS.
//!
//! **Results route by the call id**, not by a per-call result subject. A replica's call ids are
//! UUIDs whose first eight hex digits are its route tag ([`new_call_id`]), so the replica that
//! receives a result POST knows, from the id alone, where the waiting dispatch lives: one hop,
//! no broadcast, no per-call SUB/UNSUB and no interest to propagate through a NATS cluster.
//! Results for a restarted replica's dead dispatches find no responders: 404.
//!
//! Events (`GET /api/events`) use one subscription per replica, `{p}.events.*`, and fan out in
//! the process to that replica's listeners: no per-listener subscription, so a page opening or
//! closing costs the broker nothing, and a user's event is one message whatever the number of
//! listeners. The per-user subject token keeps the traffic readable and would let a replica
//! subscribe per user should the cluster grow past what one wildcard carries.
//!
//! Fencing: every stream gets an epoch, larger than any the accepting replica has seen for
//! that device. A takeover carries the new epoch; a holder with a smaller one closes its stream
//! (`superseded`), a holder with a larger one re-announces itself so the smaller closes. A
//! replica that finds it was frozen (its own clock ticks stopped for longer than a keepalive)
//! pushes nothing more and gives up all its streams with `reconnect` (`stalled`), since they may
//! have moved meanwhile; calls that reach it in that state are answered [`CallAck::NotHeld`] and
//! the dispatcher tries again until one holder accepts or the deadline passes.
//!
//! Upgrading a cluster from the per-device scheme: replicas of the two schemes do not find each
//! other's devices (calls between them answer offline), so replace every replica at once, or
//! accept that during a rolling update a call made on a replica of one version to a device
//! held by the other answers `device offline` until the rollout ends.

use serde::{Deserialize, Serialize};

/// Default subject prefix.
pub const DEFAULT_PREFIX: &str = "pulsn.host";
/// Last token of `{p}.holder.{route}.call`.
pub const HOLDER_CALL: &str = "call";
/// Last token of `{p}.holder.{route}.presence`.
pub const HOLDER_PRESENCE: &str = "presence";
/// Header naming the device a holder request is about, or the device that posted a result.
pub const HEADER_DEVICE_ID: &str = "Pulsn-Device-Id";
/// Header carrying the W3C trace context across NATS hops.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// Subject names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What one replica answers for the devices it holds: `{p}.holder.{route}.*`.
    pub fn holder_requests(&self, route: &str) -> String {
        format!("{}.holder.{route}.*", self.prefix)
    }

    /// A call for a device held by the replica whose route tag is `route`.
    pub fn holder_call(&self, route: &str) -> String {
        format!("{}.holder.{route}.{HOLDER_CALL}", self.prefix)
    }

    /// A presence question for a device held by the replica whose route tag is `route`.
    pub fn holder_presence(&self, route: &str) -> String {
        format!("{}.holder.{route}.{HOLDER_PRESENCE}", self.prefix)
    }

    pub fn takeover(&self) -> String {
        format!("{}.takeover", self.prefix)
    }

    pub fn result(&self, route: &str) -> String {
        format!("{}.result.{route}", self.prefix)
    }

    pub fn revoked(&self) -> String {
        format!("{}.revoked", self.prefix)
    }

    pub fn api_tokens_revoked(&self) -> String {
        format!("{}.api-tokens.revoked", self.prefix)
    }

    pub fn presence_all(&self) -> String {
        format!("{}.presence.all", self.prefix)
    }

    pub fn load(&self) -> String {
        format!("{}.load", self.prefix)
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

/// True when `prefix` is usable as a subject prefix: dot-separated tokens of letters, digits,
/// `-` and `_`, no wildcards, no empty token.
pub fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty() && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The route tag as it appears in subjects and call ids: eight lowercase hex digits.
pub fn route_tag(tag: u32) -> String {
    format!("{tag:08x}")
}

/// A call id: a version-4 UUID whose first eight hex digits are the dispatching replica's
/// route tag. `random` supplies the other bits.
pub fn new_call_id(tag: u32, random: [u8; 16]) -> String {
    let mut bytes = random;
    bytes[..4].copy_from_slice(&tag.to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant

    // Written digit by digit into one allocation: this runs for every call.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

/// The route tag of a call id made by [`new_call_id`], or `None` when `call_id` is not a
/// UUID in canonical lowercase-or-uppercase hyphenated form (such an id names no call).
pub fn call_id_route(call_id: &str) -> Option<String> {
    is_uuid(call_id).then(|| call_id[..8].to_ascii_lowercase())
}

/// [`call_id_route`] as the number [`route_tag`] formats, without allocating: for comparing a
/// result's call id with this replica's tag.
pub fn call_id_tag(call_id: &str) -> Option<u32> {
    if !is_uuid(call_id) {
        return None;
    }
    u32::from_str_radix(&call_id[..8], 16).ok()
}

/// True when `text` is a hyphenated UUID (8-4-4-4-12 hex digits): the form of device ids and
/// call ids, and the only form allowed into a subject token.
pub fn is_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// A holder's reply to a call request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallAck {
    /// Written to the device's stream.
    Accepted,
    /// The deadline had passed on arrival: dropped, not pushed.
    Expired,
    /// This replica still answers for the device but cannot push to its stream now (the stream
    /// is closing or moving, or the replica was frozen): try again.
    NotHeld,
    /// This replica holds no stream of the device and expects none (it never held it, or let
    /// it go): ask the directory whether a newer stream opened elsewhere.
    Absent,
    /// The device's stream here has more waiting than its budget (it is not reading fast
    /// enough, or not at all): nothing was queued. Try again later; a stream that stays stuck
    /// is dropped, and the device is then offline.
    Full,
}

/// The dispatching replica's reply to a forwarded result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliverAck {
    Delivered,
    /// The call was dispatched to another device.
    Forbidden,
    /// No pending call with that id.
    Unknown,
}

/// Body of `{p}.takeover`: a stream of the device opened on `replica` with `epoch`. Every
/// replica hears it: a holder of an older stream closes it, a holder of a newer one
/// re-announces its own, and the others remember where the device is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Takeover {
    pub device_id: String,
    pub epoch: u64,
    pub replica: String,
    /// The route tag of `replica`, where its holder requests go.
    pub route: u32,
}

/// A holder's answer to a presence question (`{p}.holder.{route}.presence`): JSON `null`
/// when it holds no live stream of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub replica: String,
    pub epoch: u64,
}

/// Body of `{p}.revoked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    pub device_id: String,
}

/// Body of `{p}.api-tokens.revoked`: the revoked api tokens, by the lowercase hex SHA-256 of
/// the token (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiTokensRevoked {
    pub token_hashes: Vec<String>,
}

/// Body of `{p}.load`: one replica's device streams, as it counts them now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaLoad {
    pub replica: String,
    pub streams: u64,
    /// Its `--max-streams`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u64>,
    /// Sent once when the replica starts draining: forget it now rather than when its last
    /// report grows stale.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

/// One replica's answer to `{p}.presence.all`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldDevices {
    pub replica: String,
    pub devices: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_carry_their_route() {
        let id = new_call_id(0xdead_beef, [0xff; 16]);
        assert_eq!(id.len(), 36);
        assert!(id.starts_with("deadbeef-"));
        assert_eq!(&id[14..15], "4", "version nibble");
        assert_eq!(call_id_route(&id).as_deref(), Some("deadbeef"));
        assert_eq!(call_id_tag(&id), Some(0xdead_beef));
        assert_eq!(call_id_tag(&id.to_ascii_uppercase()), Some(0xdead_beef));
        let id =
            new_call_id(0x0102_0304, [0x00, 0x01, 0x02, 0x03, 0xab, 0xcd, 0xff, 0x10, 0x7f, 0x00, 1, 2, 3, 4, 5, 6]);
        assert_eq!(id, "01020304-abcd-4f10-bf00-010203040506");
        assert!(is_uuid(&id));
    }

    #[test]
    fn route_of_non_uuids_is_none() {
        for bad in [
            "",
            "deadbeef",
            "deadbeef-0000-4000-8000-00000000000g",
            "../../../etc/passwd-0000000000000000",
            "a.b.>",
            "deadbeef-0000-4000-8000-0000000000001",
        ] {
            assert_eq!(call_id_route(bad), None, "{bad:?}");
            assert_eq!(call_id_tag(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(is_valid_prefix("pulsn.host"));
        assert!(is_valid_prefix("a_b-c.d1"));
        for bad in ["", ".", "a..b", "a.*", "a.>", "a b", "a."] {
            assert!(!is_valid_prefix(bad), "{bad:?}");
        }
    }

    #[test]
    fn subjects() {
        let s = Subjects::default();
        assert_eq!(s.holder_requests("0000abcd"), "pulsn.host.holder.0000abcd.*");
        assert_eq!(s.holder_call("0000abcd"), "pulsn.host.holder.0000abcd.call");
        assert_eq!(s.holder_presence("0000abcd"), "pulsn.host.holder.0000abcd.presence");
        assert_eq!(s.takeover(), "pulsn.host.takeover");
        assert_eq!(s.result("0000abcd"), "pulsn.host.result.0000abcd");
        assert_eq!(s.revoked(), "pulsn.host.revoked");
        assert_eq!(s.presence_all(), "pulsn.host.presence.all");
        assert_eq!(s.api_tokens_revoked(), "pulsn.host.api-tokens.revoked");
    }
}
