//! The in-memory bus: one replica, no broker. Every "remote" replica is this one, so each
//! operation is a direct call on the local [`Hub`]; events go through a broadcast channel to
//! this replica's listeners.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use protocol::events::UserEvent;
use protocol::subject::{route_tag, CallAck, DeliverAck, Holder};
use protocol::{HostCall, HostResult};

use tokio::sync::broadcast;

use super::{Bus, BusError, Health, Hub, Routed, EVENTS_CAPACITY};

#[derive(Debug, Clone)]
pub struct MemoryBus {
    hub: Arc<Hub>,
    events: broadcast::Sender<Arc<UserEvent>>,
}

impl MemoryBus {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub, events: broadcast::channel(EVENTS_CAPACITY).0 }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn send_call(&self, device_id: &str, call: &HostCall, _ack_timeout: Duration) -> Routed {
        match self.hub.push(device_id, call) {
            CallAck::Accepted => Routed::Accepted,
            CallAck::Expired => Routed::Expired,
            CallAck::Full => Routed::Full,
            // One replica: a device not held here is held nowhere.
            CallAck::NotHeld if self.hub.holder(device_id).is_none() => Routed::Offline,
            CallAck::NotHeld => Routed::NotHeld,
            // The hub never answers it (a holder request to a replica that holds nothing does).
            CallAck::Absent => Routed::Offline,
        }
    }

    async fn send_result(&self, route: &str, device_id: &str, result: &HostResult) -> DeliverAck {
        if route != route_tag(self.hub.route_tag()) {
            return DeliverAck::Unknown;
        }
        self.hub.resolve(device_id, result.clone())
    }

    async fn hold(&self, _device_id: &str, _epoch: u64) -> Result<(), BusError> {
        Ok(())
    }

    async fn release(&self, _device_id: &str, _epoch: u64) {}

    async fn holder(&self, device_id: &str) -> Result<Option<Holder>, BusError> {
        Ok(self.hub.holder(device_id))
    }

    async fn online_devices(&self) -> Result<Vec<(String, String)>, BusError> {
        let replica = self.hub.replica_id().to_owned();
        Ok(self.hub.held_devices().into_iter().map(|id| (id, replica.clone())).collect())
    }

    async fn revoke(&self, device_id: &str) -> Result<(), BusError> {
        self.hub.revoke(device_id);
        Ok(())
    }

    async fn publish_event(&self, event: &UserEvent) -> Result<(), BusError> {
        // No receiver (nobody listens yet) is not a failure.
        let _ = self.events.send(Arc::new(event.clone()));
        Ok(())
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<UserEvent>> {
        self.events.subscribe()
    }

    fn health(&self) -> Health {
        Health::Up
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
