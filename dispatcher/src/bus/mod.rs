//! The bus: how replicas reach each other. The only code that talks to a broker lives under
//! this module; the rest of the dispatcher sees the [`Bus`] trait.
//!
//! Two implementations share one contract and one test suite:
//! - [`memory::MemoryBus`]: one process, no broker. The embedded default.
//! - [`nats::NatsBus`]: many replicas on NATS (the scheme is in `protocol::subject`).
//!
//! A bus moves bytes and acts on this replica's [`Hub`] for what arrives; it makes no
//! decisions of its own about streams or calls.

use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use protocol::events::UserEvent;
use protocol::subject::{DeliverAck, Holder, ReplicaLoad};
use protocol::{HostCall, HostResult};

pub mod memory;
pub mod nats;

pub use crate::core::Hub;

/// How a call fared on its way to a device's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// A holder wrote it to the device's stream.
    Accepted,
    /// No replica holds a stream of the device.
    Offline,
    /// A holder answered that it does not (or no longer) hold the device, or could not vouch
    /// for its stream: worth another try until the deadline.
    NotHeld,
    /// The deadline passed before any holder could push it.
    Expired,
    /// The holder's stream of the device has more waiting than its budget: worth another try,
    /// after a pause, until the deadline.
    Full,
    /// No answer in time, or the broker is unreachable: worth another try until the deadline.
    Unreachable,
}

/// Events a replica buffers for its fan-out before the slowest reader misses some.
pub const EVENTS_CAPACITY: usize = 4096;

/// Whether the bus can route right now (readiness).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// The broker is unreachable.
    Down,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("message broker unavailable: {0}")]
    Unavailable(String),
    #[error("malformed message on the bus: {0}")]
    Malformed(String),
    /// The broker refused this client (credentials, TLS) or its settings cannot be used:
    /// retrying will not help.
    #[error("{0}")]
    Refused(String),
}

/// What a bus counted since it started (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Times the broker connection came back after it was lost.
    pub reconnects: u64,
    /// Publishes (requests included) that failed or timed out before the broker took them.
    pub publish_failures: u64,
}

/// Where a device's newest stream opened: the route tag of the replica that issued its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRoute {
    pub route: u32,
    pub epoch: u64,
}

/// The record of where each device's newest stream opened, shared by every replica (the
/// registry's database): what a bus asks when it does not know where a device is held. It is
/// written before a stream says `ready`, so a device that is ready can always be found; the
/// holder it names still has the last word on whether the stream is live.
#[async_trait]
pub trait StreamDirectory: Send + Sync + 'static {
    async fn last_stream(&self, device_id: &str) -> Result<Option<StreamRoute>, BusError>;
}

/// The cluster's transport, as the dispatcher core uses it.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Routes `call` to whichever replica holds `device_id`'s stream; waits at most
    /// `ack_timeout` for a holder to say it pushed it.
    async fn send_call(&self, device_id: &str, call: &HostCall, ack_timeout: Duration) -> Routed;

    /// Hands a result posted by `device_id` to the replica whose route tag is `route`.
    async fn send_result(&self, route: &str, device_id: &str, result: &HostResult) -> DeliverAck;

    /// This replica now holds a stream of `device_id` with `epoch`: answer its calls and
    /// presence queries, and tell the cluster so older streams elsewhere close.
    async fn hold(&self, device_id: &str, epoch: u64) -> Result<(), BusError>;

    /// The stream of `device_id` with `epoch` ended here: stop answering for it.
    async fn release(&self, device_id: &str, epoch: u64);

    /// Which replica holds the device's stream, asked of the holders themselves.
    async fn holder(&self, device_id: &str) -> Result<Option<Holder>, BusError>;

    /// Every device with a stream anywhere, and the replica holding it.
    async fn online_devices(&self) -> Result<Vec<(String, String)>, BusError>;

    /// Revoke `device_id` on every replica: close its stream, fail its pending calls, evict its
    /// cached token. Acts on the local hub too.
    async fn revoke(&self, device_id: &str) -> Result<(), BusError>;

    /// Publishes one user's event to the listeners of every replica, this one's included.
    /// Best effort, like core NATS: an event lost on the way is made good by the snapshot a
    /// listener gets when it reconnects.
    async fn publish_event(&self, event: &UserEvent) -> Result<(), BusError>;

    /// The events published from now on, by any replica (this one's included). A receiver that
    /// falls more than [`EVENTS_CAPACITY`] behind misses events (`Lagged`).
    fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<Arc<UserEvent>>;

    fn health(&self) -> Health;

    /// Tells the other replicas how many streams this one holds (best effort; nothing to tell
    /// on a single replica).
    async fn publish_load(&self, _load: &ReplicaLoad) -> Result<(), BusError> {
        Ok(())
    }

    /// The latest load each other replica published, with how long ago it was heard.
    fn peer_loads(&self) -> Vec<(ReplicaLoad, Duration)> {
        Vec::new()
    }

    /// Counters of the broker link.
    fn stats(&self) -> BusStats {
        BusStats::default()
    }

    /// The largest message the bus carries, when it has a limit (NATS `max_payload`). A call
    /// that cannot fit is refused before it is dispatched.
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }

    /// Short name for logs and metrics.
    fn kind(&self) -> &'static str;
}
