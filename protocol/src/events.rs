//! The live events of the control API (`GET /api/events`): frame names, what each frame
//! carries, and the message that takes one user's event from the replica where it happened to
//! every replica's listeners (`{p}.events.{user token}`, see [`crate::subject`]).
//!
//! Not here: who is told what (the dispatcher's listener table), or when a change is an event
//! (the dispatcher's handlers).
//!
//! Frames, in order: `snapshot` first ([`Snapshot`]), then `device` ([`DeviceChange`]) and
//! `proposal` ([`crate::Proposal`]) as they happen, and a `: keepalive` comment at the
//! keepalive interval.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::subject::Subjects;
use crate::{Device, Proposal};

/// First frame of every events stream.
pub const EVENT_SNAPSHOT: &str = "snapshot";
/// A device was enrolled, opened or closed its stream, changed its manifest, or was revoked.
pub const EVENT_DEVICE: &str = "device";
/// A proposal was created, decided (applying, rejected), applied or failed.
pub const EVENT_PROPOSAL: &str = "proposal";

/// Data of the `snapshot` frame: the user's devices (as `GET /api/devices` shows them) and
/// pending proposals, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub devices: Vec<Device>,
    pub proposals: Vec<Proposal>,
}

/// Data of a `device` frame: the device as `GET /api/devices/{id}` shows it, and
/// `revoked: true` when the change is its revocation (it is then gone from every list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceChange {
    #[serde(flatten)]
    pub device: Device,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

/// What changed, as the frame that tells it: its event name and its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "lowercase")]
pub enum Change {
    Device(DeviceChange),
    Proposal(Proposal),
}

impl Change {
    /// The frame's `event:` name.
    pub fn event_name(&self) -> &'static str {
        match self {
            Self::Device(_) => EVENT_DEVICE,
            Self::Proposal(_) => EVENT_PROPOSAL,
        }
    }

    /// The frame's data: the change as one line of JSON.
    pub fn data_json(&self) -> String {
        let encoded = match self {
            Self::Device(device) => serde_json::to_string(device),
            Self::Proposal(proposal) => serde_json::to_string(proposal),
        };
        encoded.unwrap_or_else(|_| "{}".into())
    }
}

/// One user's event on its way between replicas: only that user's listeners are told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserEvent {
    pub user_id: String,
    pub change: Change,
}

/// The subject token of a user: user ids are arbitrary strings (dots, spaces, wildcards), so
/// a subject carries the first 16 bytes of their SHA-256 as 32 lowercase hex digits instead.
pub fn user_token(user_id: &str) -> String {
    Sha256::digest(user_id.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect()
}

impl Subjects {
    /// `{p}.events.{user token}`: the events of one user.
    pub fn user_events(&self, user_id: &str) -> String {
        format!("{}.events.{}", self.prefix(), user_token(user_id))
    }

    /// `{p}.events.*`: every user's events (one subscription per replica).
    pub fn all_user_events(&self) -> String {
        format!("{}.events.*", self.prefix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_tokens_are_safe_subject_tokens() {
        for user in ["alice", "", "a.b", "*", ">", "with space", "ünïcødé", "a\nb"] {
            let token = user_token(user);
            assert_eq!(token.len(), 32, "{user:?}");
            assert!(token.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{user:?}: {token}");
        }
        assert_eq!(user_token("alice"), user_token("alice"));
        assert_ne!(user_token("alice"), user_token("mallory"));
        let subjects = Subjects::default();
        assert_eq!(subjects.user_events("a.b"), format!("pulsn.host.events.{}", user_token("a.b")));
        assert_eq!(subjects.all_user_events(), "pulsn.host.events.*");
    }
}
