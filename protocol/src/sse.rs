//! The frames of `GET /api/host/stream`: event names and the JSON each carries.
//!
//! A `call` frame's `id:` line is the call id and its data is a [`crate::HostCall`] on one
//! line. Keepalives are SSE comment lines (`: keepalive`).

use serde::{Deserialize, Serialize};

/// First frame of every stream.
pub const EVENT_READY: &str = "ready";
/// A tool call to run.
pub const EVENT_CALL: &str = "call";
/// The replica is going away, or sheds load: reconnect at once, to any replica.
pub const EVENT_RECONNECT: &str = "reconnect";
/// A newer stream for this device opened elsewhere.
pub const EVENT_SUPERSEDED: &str = "superseded";
/// The device was revoked: stop and forget the credentials.
pub const EVENT_REVOKED: &str = "revoked";
/// The comment text of a keepalive line.
pub const KEEPALIVE_COMMENT: &str = "keepalive";

/// Data of the `ready` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    pub device_id: String,
    pub replica: String,
}

/// Data of the `reconnect` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Reconnect {
    pub reason: ReconnectReason,
}

/// Why a replica asks its devices to go elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ReconnectReason {
    /// Graceful shutdown (SIGTERM, rolling restart).
    Shutdown,
    /// The replica lost its broker and cannot route calls.
    BrokerLost,
    /// The replica found it had been frozen (paused process, stalled VM): its streams may
    /// have moved meanwhile, so it gives them all up.
    Stalled,
    /// The replica holds far more streams than the cluster's average (after a scale-out) and
    /// asks a few of its devices at a time to reconnect, so the load balancer spreads them.
    Rebalance,
}
