//! [`Dispatcher`]: one replica's entry points, combining its [`Hub`] with the [`Bus`] that
//! reaches the others.
//!
//! A dispatch always resolves with a [`HostResult`]: the device's, `device offline` at once
//! when no replica holds the device, or `device timed out` at its deadline. Its pending entry
//! is removed on every path, including the caller dropping the future.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use protocol::subject::{call_id_tag, new_call_id, DeliverAck, Holder};
use protocol::{CallMode, HostCall, HostResult};
use serde_json::Value;
use tokio::time::Instant;

use super::hub::Hub;
use super::queue::StreamQueue;
use crate::bus::{Bus, BusError, Routed};

/// Longest a dispatch waits for one holder to acknowledge a push before trying again.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between tries when a holder could not vouch for the device (it is moving).
const RETRY_PAUSE: Duration = Duration::from_millis(25);
/// Longest pause between tries when the device's stream is full: each try encodes (and in
/// cluster mode sends) the whole call again, so a call waiting for room backs off to this.
const FULL_PAUSE_MAX: Duration = Duration::from_secs(1);

/// One call to make on a device.
#[derive(Debug, Clone)]
pub struct DispatchRequest {
    pub tool: String,
    pub input: Value,
    pub mode: Option<CallMode>,
    pub preconditions: Option<Value>,
    pub timeout: Duration,
    pub traceparent: Option<String>,
    /// The call's id, when the caller must know it before the push (an apply records it with
    /// its proposal): one from [`Dispatcher::new_call_id`]. A fresh one otherwise.
    pub call_id: Option<String>,
}

impl DispatchRequest {
    pub fn new(tool: impl Into<String>, input: Value, timeout: Duration) -> Self {
        Self { tool: tool.into(), input, mode: None, preconditions: None, timeout, traceparent: None, call_id: None }
    }
}

#[derive(Clone)]
pub struct Dispatcher {
    hub: Arc<Hub>,
    bus: Arc<dyn Bus>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").field("hub", &self.hub).field("bus", &self.bus.kind()).finish()
    }
}

/// A device's stream as registered here: its frame queue (the writer pulls with
/// [`StreamQueue::recv`]), and a guard that unregisters it (here and on the bus) when dropped.
#[derive(Debug)]
pub struct DeviceStream {
    pub frames: Arc<StreamQueue>,
    pub epoch: u64,
    _guard: StreamGuard,
}

struct StreamGuard {
    hub: Arc<Hub>,
    bus: Arc<dyn Bus>,
    device_id: String,
    conn_id: u64,
    epoch: u64,
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGuard").field("device_id", &self.device_id).field("conn_id", &self.conn_id).finish()
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.hub.release(&self.device_id, self.conn_id);
        // Also when the hub already forgot the stream (takeover, revocation, shutdown): the bus
        // releases only what it holds for this epoch, so a newer stream here is untouched.
        // The bus keeps answering for a device the rebalancer moved a moment, so calls routed
        // before its new stream is up elsewhere are retried rather than answered offline.
        let linger = self.hub.moving_for(&self.device_id);
        let bus = self.bus.clone();
        let (device_id, epoch) = (std::mem::take(&mut self.device_id), self.epoch);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Some(linger) = linger {
                    tokio::time::sleep(linger).await;
                }
                bus.release(&device_id, epoch).await
            });
        }
    }
}

/// What became of a result handed to [`Dispatcher::deliver_or_keep`].
#[derive(Debug)]
pub enum Delivery {
    /// A dispatch waited for it: delivered, or refused (another device's call).
    Answered(DeliverAck),
    /// No dispatch anywhere waits for it; here it is back.
    Unclaimed(HostResult),
}

/// Removes a pending call however its dispatch ends.
struct PendingGuard<'a> {
    hub: &'a Hub,
    call_id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.hub.cancel_call(self.call_id);
    }
}

impl Dispatcher {
    pub fn new(hub: Arc<Hub>, bus: Arc<dyn Bus>) -> Self {
        Self { hub, bus }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// A new call id that routes results to this replica, for [`DispatchRequest::call_id`].
    pub fn new_call_id(&self) -> String {
        new_call_id(self.hub.route_tag(), rand::random())
    }

    /// Registers a stream of `device_id` with `epoch` (issued cluster-wide in increasing
    /// order): older streams of the device, here or on any replica, are closed.
    pub async fn connect(&self, device_id: &str, epoch: u64) -> Result<DeviceStream, BusError> {
        let opened = self.hub.open(device_id, epoch);
        let guard = StreamGuard {
            hub: self.hub.clone(),
            bus: self.bus.clone(),
            device_id: device_id.to_owned(),
            conn_id: opened.conn_id,
            epoch,
        };
        if opened.owner {
            // On failure the guard unregisters the stream again.
            self.bus.hold(device_id, epoch).await?;
        }
        Ok(DeviceStream { frames: opened.queue, epoch, _guard: guard })
    }

    /// Sends a call to a device and waits for its result, `device offline` or `device timed
    /// out`. Never fails otherwise.
    #[tracing::instrument(name = "dispatch", level = "debug", skip_all, fields(device_id, tool = %request.tool, call_id, traceparent = request.traceparent.as_deref(), outcome))]
    pub async fn dispatch(&self, device_id: &str, request: DispatchRequest) -> HostResult {
        let span = tracing::Span::current();
        span.record("device_id", device_id);
        let result = self.dispatch_inner(device_id, request).await;
        span.record("call_id", result.call_id.as_str());
        let outcome = if result.ok { "ok" } else { result.error.as_deref().unwrap_or("error") };
        span.record("outcome", outcome);
        tracing::debug!("dispatch resolved");
        result
    }

    async fn dispatch_inner(&self, device_id: &str, request: DispatchRequest) -> HostResult {
        let started = Instant::now();
        let deadline = started + request.timeout;
        let call_id = request.call_id.unwrap_or_else(|| self.new_call_id());
        let wall_deadline = Utc::now() + chrono::Duration::from_std(request.timeout).unwrap_or(chrono::Duration::MAX);
        let call = HostCall {
            call_id: call_id.clone(),
            tool: request.tool,
            input: request.input,
            mode: request.mode,
            preconditions: request.preconditions,
            deadline: Some(wall_deadline),
            traceparent: request.traceparent,
        };
        let Some(mut result) = self.hub.register_call(&call_id, device_id) else {
            // 122 random bits collided with a call in flight: treat like a lost push.
            return HostResult::timed_out(call_id);
        };
        let pending_id = call_id.clone();
        let _pending = PendingGuard { hub: &self.hub, call_id: &pending_id };

        let mut full_pause = RETRY_PAUSE;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return HostResult::timed_out(call_id);
            }
            // The result may come back before a late acknowledgement does: then the call was
            // pushed, and asking again would push it twice.
            let routed = tokio::select! {
                biased;
                answered = &mut result => return answered.unwrap_or_else(|_| HostResult::timed_out(call_id)),
                routed = self.bus.send_call(device_id, &call, remaining.min(ACK_TIMEOUT)) => routed,
            };
            match routed {
                Routed::Accepted => break,
                Routed::Offline => return HostResult::offline(call_id),
                Routed::Expired => return HostResult::timed_out(call_id),
                Routed::NotHeld | Routed::Unreachable => {
                    tokio::time::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now()))).await;
                }
                // Waits for room as long as the stream is there; a stuck one is dropped, and
                // the next try answers offline.
                Routed::Full => {
                    tokio::time::sleep(full_pause.min(deadline.saturating_duration_since(Instant::now()))).await;
                    full_pause = (full_pause * 2).min(FULL_PAUSE_MAX);
                }
            }
        }

        match tokio::time::timeout_at(deadline, result).await {
            Ok(Ok(result)) => result,
            // The sender went without a result: the call was failed elsewhere; keep the
            // contract's answer.
            Ok(Err(_)) | Err(_) => HostResult::timed_out(call_id),
        }
    }

    /// A result posted by `from_device`. Resolved here when this replica dispatched the call,
    /// otherwise handed over the bus to the replica that did.
    pub async fn deliver(&self, from_device: &str, result: HostResult) -> DeliverAck {
        match self.deliver_or_keep(from_device, result).await {
            Delivery::Answered(ack) => ack,
            Delivery::Unclaimed(_) => DeliverAck::Unknown,
        }
    }

    /// [`Dispatcher::deliver`], handing the result back when no dispatch waits for it (the
    /// replica that made the call died, or gave up), so the caller may still record it.
    pub async fn deliver_or_keep(&self, from_device: &str, result: HostResult) -> Delivery {
        let Some(tag) = call_id_tag(&result.call_id) else {
            return Delivery::Unclaimed(result);
        };
        if tag == self.hub.route_tag() {
            if !self.hub.is_pending(&result.call_id) {
                return Delivery::Unclaimed(result);
            }
            return Delivery::Answered(self.hub.resolve(from_device, result));
        }
        let route = protocol::subject::route_tag(tag);
        match self.bus.send_result(&route, from_device, &result).await {
            DeliverAck::Unknown => Delivery::Unclaimed(result),
            ack => Delivery::Answered(ack),
        }
    }

    /// The replica holding the device's stream, if any.
    pub async fn is_online(&self, device_id: &str) -> Result<Option<Holder>, BusError> {
        if let Some(holder) = self.hub.holder(device_id) {
            return Ok(Some(holder));
        }
        self.bus.holder(device_id).await
    }

    /// Every device with a live stream anywhere, with its replica.
    pub async fn online_devices(&self) -> Result<Vec<(String, String)>, BusError> {
        self.bus.online_devices().await
    }

    /// Revokes a device everywhere: streams closed, pending calls failed, cached token gone.
    pub async fn drop_device(&self, device_id: &str) -> Result<(), BusError> {
        self.hub.revoke(device_id);
        self.bus.revoke(device_id).await
    }
}
