//! The NATS bus: cluster mode, many replicas sharing a NATS cluster. It carries out the scheme
//! of [`protocol::subject`] and acts on this replica's [`Hub`] for what arrives.
//!
//! Subscriptions of a replica, each read by its own task bound to the bus's cancel token:
//! - `{p}.result.{tag}`: results for the calls this replica dispatched ([`Hub::resolve`]);
//! - `{p}.revoked`: revocations from any replica ([`Hub::revoke`]);
//! - `{p}.api-tokens.revoked`: api tokens revoked by `dispatcher token revoke`
//!   ([`Hub::revoke_api_tokens`]; [`publish_api_token_revocation`] is the sending side);
//! - `{p}.presence.all`: the scatter-gather of online devices ([`Hub::held_devices`]);
//! - `{p}.load`: the other replicas' stream counts, kept for [`Bus::peer_loads`];
//! - `{p}.events.*`: every user's events, handed to this replica's listeners through
//!   [`Bus::subscribe_events`];
//! - its own reply inbox (`inbox`), which answers every request this bus makes;
//! - `{p}.holder.{tag}.*`: calls ([`Hub::push`]) and presence questions for the devices it
//!   holds, whichever device they are about;
//! - `{p}.takeover`: every stream opened anywhere, to close older streams here and to remember
//!   where devices are held.
//!
//! Nothing is subscribed per device: holding a stream costs the broker and this client one
//! entry in a map. To reach a device held elsewhere, a replica looks in its route cache (fed
//! by takeovers), else asks the [`StreamDirectory`] (the database, written before a stream
//! says `ready`); the holder it names answers for the device, or says it is absent, and then
//! the directory is asked again. `protocol::subject` explains the scheme and its trade-offs.
//!
//! Requests never go through async-nats's request multiplexer (it keeps state for requests
//! that get no reply, nats.rs issue 1617): they use `inbox::Inbox`, whose entries leave on
//! every path. Connection events and the broker grace live in `link`.
//!
//! Not here: any decision about streams or calls (the [`Hub`] makes them), retries (the
//! dispatcher core retries `NotHeld` and `Unreachable`), or epochs (the registry issues them).

pub mod auth;
mod inbox;
mod link;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, HeaderMap, Message, StatusCode, Subject, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use protocol::events::UserEvent;
use protocol::subject::{
    is_uuid, route_tag, ApiTokensRevoked, CallAck, DeliverAck, HeldDevices, Holder, ReplicaLoad, Revoked, Subjects,
    Takeover, HEADER_DEVICE_ID, HEADER_TRACEPARENT, HOLDER_CALL, HOLDER_PRESENCE,
};
use protocol::{HostCall, HostResult};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use self::auth::{NatsAuth, NatsCredentials, NatsTls};
use self::inbox::Inbox;
use super::{Bus, BusError, BusStats, Health, Hub, Routed, StreamDirectory, StreamRoute, EVENTS_CAPACITY};
use crate::core::cache::parse_token_hash;
use crate::core::CallFrame;

/// Longest a fire-and-forget publish (a reply, a takeover, a revocation) may wait for room in
/// the client's command queue, which fills while the broker is unreachable.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);
/// A replica whose load report is older than this is forgotten.
const LOAD_FORGET_AFTER: Duration = Duration::from_secs(60);
/// Replies a scatter-gather accepts; more are dropped.
const GATHER_CAPACITY: usize = 1024;
/// How often a wait for the connection looks at the client's state.
const CONNECTED_POLL: Duration = Duration::from_millis(10);
/// Devices held elsewhere whose route a replica remembers; past it, one is forgotten for each
/// one learnt (a forgotten route costs one directory lookup on the next call).
const ROUTES_CAPACITY: usize = 200_000;
/// Holders a call or presence question tries before the device counts as offline: the one
/// remembered, then those the directory names, as long as each names a newer stream.
const MAX_HOLDER_HOPS: usize = 3;

/// Settings of the NATS bus.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// How long NATS may be unreachable before this replica closes its streams with
    /// `reconnect` so its devices move to a healthy replica.
    pub broker_grace: Duration,
    /// Client pings; two unanswered in a row (about three intervals) mark the server dead.
    pub ping_interval: Duration,
    /// Cap of the (jittered, exponential) delay between reconnect attempts.
    pub max_reconnect_delay: Duration,
    /// Longest a TCP connect plus handshake to one server may take.
    pub connection_timeout: Duration,
    /// How long `holder` waits for a holder to answer a presence request.
    pub presence_timeout: Duration,
    /// How long `send_result` waits for the dispatching replica's answer (and for NATS, if
    /// the link is down). The dispatching replica is alive when it has a subscriber (a dead
    /// one finds no responders at once), so its answer is worth waiting for: a busy replica
    /// may take seconds to get to it, and giving up early would answer the device 404 for a
    /// result that was in fact delivered. Well under host-agent's 30 s request timeout.
    pub result_timeout: Duration,
    /// Longest `online_devices` collects replies.
    pub gather_window: Duration,
    /// `online_devices` stops early once no reply came for this long after the last one.
    pub gather_idle: Duration,
    /// Credentials and TLS.
    pub auth: NatsAuth,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            broker_grace: Duration::from_secs(5),
            ping_interval: Duration::from_secs(1),
            max_reconnect_delay: Duration::from_secs(1),
            connection_timeout: Duration::from_secs(2),
            presence_timeout: Duration::from_millis(500),
            result_timeout: Duration::from_secs(10),
            gather_window: Duration::from_millis(250),
            gather_idle: Duration::from_millis(50),
            auth: NatsAuth::default(),
        }
    }
}

/// The bus of cluster mode. Built by [`NatsBus::connect`]; dropping it stops its tasks.
pub struct NatsBus {
    shared: Arc<Shared>,
    /// Child of the caller's token: cancelled when the bus is dropped.
    cancel: CancellationToken,
}

/// State shared by the bus and its subscription tasks.
struct Shared {
    client: Client,
    subjects: Subjects,
    hub: Arc<Hub>,
    replica: String,
    inbox: Inbox,
    /// This replica's route tag, where its holder requests arrive.
    route: u32,
    /// Devices this replica answers for, with the epoch of their stream here.
    held: Mutex<HashMap<String, u64>>,
    /// Where devices held by other replicas were last heard of: a hint, corrected by the
    /// holder's answer and the directory.
    routes: Mutex<HashMap<String, StreamRoute>>,
    /// Where each device's newest stream opened, for the devices `routes` does not know.
    directory: Arc<dyn StreamDirectory>,
    options: NatsOptions,
    /// Users' events from `{p}.events.*`, for this replica's listeners.
    events: broadcast::Sender<Arc<UserEvent>>,
    /// The latest `{p}.load` of every other replica, and when it came.
    loads: Mutex<HashMap<String, (ReplicaLoad, Instant)>>,
    publish_failures: std::sync::atomic::AtomicU64,
}

/// How a request failed.
#[derive(Debug, thiserror::Error)]
enum RequestFailure {
    #[error("no responders")]
    NoResponders,
    #[error("timed out")]
    TimedOut,
    #[error("not connected to NATS")]
    Disconnected,
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("the bus is shutting down")]
    Closed,
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("replica", &self.shared.replica)
            .field("state", &self.shared.client.connection_state())
            .field("held", &self.held_device_count())
            .field("pending_requests", &self.pending_requests())
            .finish()
    }
}

impl NatsBus {
    /// Connects to the NATS servers in `urls` (comma-separated: several servers of one
    /// cluster), subscribes this replica's subjects and starts its tasks. `directory` says where
    /// a device's newest stream opened when no takeover told this replica. Returns without
    /// waiting for the broker: the client keeps trying, and [`Bus::health`] is `Down` until it
    /// connects. Fails only on unusable settings.
    pub async fn connect(
        urls: &str,
        subjects: Subjects,
        hub: Arc<Hub>,
        directory: Arc<dyn StreamDirectory>,
        options: NatsOptions,
        cancel: CancellationToken,
    ) -> Result<Arc<NatsBus>, BusError> {
        let servers: Vec<&str> = urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect();
        if servers.is_empty() {
            return Err(BusError::Unavailable("no NATS server URL given".into()));
        }
        if !protocol::subject::is_valid_prefix(subjects.prefix()) {
            return Err(BusError::Unavailable(format!("invalid subject prefix {:?}", subjects.prefix())));
        }
        let server_count = servers.len();
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let client = connect_client(urls, &servers, &options, hub.replica_id(), events_tx).await?;

        let cancel = cancel.child_token();
        let shared = Arc::new(Shared {
            inbox: Inbox::new(client.new_inbox()),
            replica: hub.replica_id().to_owned(),
            route: hub.route_tag(),
            client,
            subjects,
            hub,
            held: Mutex::default(),
            routes: Mutex::default(),
            directory,
            options,
            events: broadcast::channel(EVENTS_CAPACITY).0,
            loads: Mutex::default(),
            publish_failures: std::sync::atomic::AtomicU64::new(0),
        });

        let route = route_tag(shared.hub.route_tag());
        let inbox = shared.subscribe(shared.inbox.subject()).await?;
        let results = shared.subscribe(shared.subjects.result(&route)).await?;
        let revoked = shared.subscribe(shared.subjects.revoked()).await?;
        let presence = shared.subscribe(shared.subjects.presence_all()).await?;
        let events = shared.subscribe(shared.subjects.all_user_events()).await?;
        let api_tokens = shared.subscribe(shared.subjects.api_tokens_revoked()).await?;
        let loads = shared.subscribe(shared.subjects.load()).await?;
        let holder_requests = shared.subscribe(shared.subjects.holder_requests(&route)).await?;
        let takeovers = shared.subscribe(shared.subjects.takeover()).await?;
        tokio::spawn(serve(shared.clone(), inbox, cancel.clone(), |shared, message| async move {
            shared.inbox.route(message);
        }));
        tokio::spawn(serve(shared.clone(), results, cancel.clone(), Shared::on_result));
        tokio::spawn(serve(shared.clone(), revoked, cancel.clone(), Shared::on_revoked));
        tokio::spawn(serve(shared.clone(), presence, cancel.clone(), Shared::on_presence_all));
        tokio::spawn(serve(shared.clone(), events, cancel.clone(), Shared::on_user_event));
        tokio::spawn(serve(shared.clone(), api_tokens, cancel.clone(), Shared::on_api_tokens_revoked));
        tokio::spawn(serve(shared.clone(), loads, cancel.clone(), Shared::on_load));
        tokio::spawn(serve(shared.clone(), holder_requests, cancel.clone(), Shared::on_holder_request));
        tokio::spawn(serve(shared.clone(), takeovers, cancel.clone(), Shared::on_takeover));
        tokio::spawn(link::watch(shared.clone(), events_rx, shared.options.broker_grace, cancel.clone()));
        // Server URLs may carry credentials: log how many, not what.
        tracing::info!(
            replica = %shared.replica,
            route = %route,
            servers = server_count,
            auth = %shared.options.auth.describe(),
            "NATS bus started"
        );
        Ok(Arc::new(NatsBus { shared, cancel }))
    }

    /// The underlying client (server info, statistics).
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Requests this bus still waits for a reply to: zero when nothing is in flight.
    pub fn pending_requests(&self) -> usize {
        self.shared.inbox.waiting()
    }

    /// Devices this bus answers for (zero once every stream here has ended).
    pub fn held_device_count(&self) -> usize {
        self.shared.held.lock().len()
    }

    /// Devices held elsewhere whose route this replica remembers.
    pub fn remembered_routes(&self) -> usize {
        self.shared.routes.lock().len()
    }

    /// Waits until the client is connected, at most `timeout`. True when it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.shared.connected_by(Instant::now() + timeout).await
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn send_call(&self, device_id: &str, call: &HostCall, ack_timeout: Duration) -> Routed {
        let span = tracing::info_span!(
            "nats.send_call",
            otel.kind = "producer",
            messaging.system = "nats",
            device_id = %device_id,
            call_id = %call.call_id,
            traceparent = call.traceparent.as_deref(),
            routed = tracing::field::Empty,
        );
        let routed = self.shared.send_call(device_id, call, ack_timeout).instrument(span.clone()).await;
        span.record("routed", tracing::field::debug(routed));
        routed
    }

    async fn send_result(&self, route: &str, device_id: &str, result: &HostResult) -> DeliverAck {
        let span = tracing::info_span!(
            "nats.send_result",
            otel.kind = "producer",
            messaging.system = "nats",
            device_id = %device_id,
            call_id = %result.call_id,
            route = %route,
            ack = tracing::field::Empty,
        );
        let ack = self.shared.send_result(route, device_id, result).instrument(span.clone()).await;
        span.record("ack", tracing::field::debug(ack));
        ack
    }

    async fn hold(&self, device_id: &str, epoch: u64) -> Result<(), BusError> {
        self.shared.hold(device_id, epoch).await
    }

    async fn release(&self, device_id: &str, epoch: u64) {
        self.shared.release(device_id, epoch);
    }

    async fn holder(&self, device_id: &str) -> Result<Option<Holder>, BusError> {
        self.shared.holder(device_id).await
    }

    async fn online_devices(&self) -> Result<Vec<(String, String)>, BusError> {
        self.shared.online_devices().await
    }

    async fn revoke(&self, device_id: &str) -> Result<(), BusError> {
        self.shared.revoke(device_id).await
    }

    async fn publish_event(&self, event: &UserEvent) -> Result<(), BusError> {
        let payload = encode(event).map_err(|error| BusError::Malformed(error.to_string()))?;
        let max_payload = self.shared.client.max_payload();
        if payload.len() + HEADER_ROOM > max_payload {
            return Err(BusError::Malformed(format!(
                "an event of {} bytes exceeds NATS max_payload ({max_payload} bytes)",
                payload.len()
            )));
        }
        self.shared
            .publish(self.shared.subjects.user_events(&event.user_id), payload)
            .await
            .map_err(|failure| BusError::Unavailable(format!("event: {failure}")))
    }

    fn subscribe_events(&self) -> broadcast::Receiver<Arc<UserEvent>> {
        self.shared.events.subscribe()
    }

    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.shared.client.max_payload())
    }

    fn health(&self) -> Health {
        if self.shared.is_connected() {
            Health::Up
        } else {
            Health::Down
        }
    }

    async fn publish_load(&self, load: &ReplicaLoad) -> Result<(), BusError> {
        let payload = encode(load).map_err(|error| BusError::Malformed(error.to_string()))?;
        self.shared
            .publish(self.shared.subjects.load(), payload)
            .await
            .map_err(|failure| BusError::Unavailable(format!("load: {failure}")))
    }

    fn peer_loads(&self) -> Vec<(ReplicaLoad, Duration)> {
        let now = Instant::now();
        self.shared.loads.lock().values().map(|(load, at)| (load.clone(), now.saturating_duration_since(*at))).collect()
    }

    fn stats(&self) -> BusStats {
        // The client counts every connection it made; the first is not a reconnect.
        let connects = self.shared.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed);
        BusStats {
            reconnects: connects.saturating_sub(1),
            publish_failures: self.shared.publish_failures.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}

impl Shared {
    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Waits until the client is connected, at most until `deadline`. True when it is.
    async fn connected_by(&self, deadline: Instant) -> bool {
        loop {
            if self.is_connected() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(CONNECTED_POLL).await;
        }
    }

    async fn subscribe(&self, subject: String) -> Result<Subscriber, BusError> {
        self.client.subscribe(subject).await.map_err(|error| BusError::Unavailable(format!("subscribe: {error}")))
    }

    // ---- outgoing ----

    async fn send_call(&self, device_id: &str, call: &HostCall, ack_timeout: Duration) -> Routed {
        if !is_uuid(device_id) {
            // No device with such an id can hold a stream.
            return Routed::Offline;
        }
        // A device held here needs no broker.
        if self.held.lock().contains_key(device_id) {
            return match self.push_here(device_id, call) {
                CallAck::Accepted => Routed::Accepted,
                CallAck::Expired => Routed::Expired,
                CallAck::Full => Routed::Full,
                CallAck::NotHeld => Routed::NotHeld,
                CallAck::Absent => Routed::Offline,
            };
        }
        let payload = match encode(call) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, device_id, call_id = %call.call_id, "cannot encode a call");
                return Routed::Unreachable;
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_DEVICE_ID, device_id);
        if let Some(traceparent) = call.traceparent.as_deref().filter(|value| is_header_safe(value)) {
            headers.insert(HEADER_TRACEPARENT, traceparent);
        }
        let mut target = match self.route_of(device_id).await {
            Ok(target) => target,
            Err(error) => {
                tracing::warn!(%error, device_id, "cannot tell where the device is held");
                return Routed::Unreachable;
            }
        };
        for _ in 0..MAX_HOLDER_HOPS {
            let Some(route) = target else {
                return Routed::Offline;
            };
            if route.route != self.route {
                let subject = self.subjects.holder_call(&route_tag(route.route));
                match self.request(subject, headers.clone(), payload.clone(), ack_timeout).await {
                    Ok(reply) => match serde_json::from_slice::<CallAck>(&reply.payload) {
                        Ok(CallAck::Accepted) => return Routed::Accepted,
                        Ok(CallAck::Expired) => return Routed::Expired,
                        Ok(CallAck::Full) => return Routed::Full,
                        Ok(CallAck::NotHeld) => {
                            // Closing or moving: the next try asks the directory afresh.
                            self.forget_route(device_id, route);
                            return Routed::NotHeld;
                        }
                        Ok(CallAck::Absent) => {}
                        Err(error) => {
                            tracing::warn!(%error, device_id, call_id = %call.call_id, "malformed call ack");
                            return Routed::Unreachable;
                        }
                    },
                    // The replica named is gone (a restart takes a new route tag).
                    Err(RequestFailure::NoResponders) => {}
                    Err(failure) => {
                        tracing::debug!(%failure, device_id, call_id = %call.call_id, "call not acknowledged");
                        return Routed::Unreachable;
                    }
                }
            }
            // The holder named has no stream of the device: did a newer one open elsewhere?
            match self.newer_route(device_id, route).await {
                Ok(newer) => target = newer,
                Err(error) => {
                    tracing::warn!(%error, device_id, "cannot tell where the device is held");
                    return Routed::Unreachable;
                }
            }
        }
        // Moving from replica to replica faster than we can follow: worth another try.
        Routed::NotHeld
    }

    async fn send_result(&self, route: &str, device_id: &str, result: &HostResult) -> DeliverAck {
        if !is_route(route) || !is_uuid(device_id) {
            return DeliverAck::Unknown;
        }
        let payload = match encode(result) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, device_id, call_id = %result.call_id, "cannot encode a result");
                return DeliverAck::Unknown;
            }
        };
        let payload = match fit_result(result, payload, self.client.max_payload()) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, device_id, call_id = %result.call_id, "cannot encode a result");
                return DeliverAck::Unknown;
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_DEVICE_ID, device_id);
        // A result is worth waiting for through a short reconnection: the device will not post
        // it twice. (A call is not: the dispatcher retries it, and buffered copies would pile up.)
        let deadline = Instant::now() + self.options.result_timeout;
        if !self.connected_by(deadline).await {
            tracing::warn!(device_id, call_id = %result.call_id, "result not handed over: NATS unreachable; answering unknown");
            return DeliverAck::Unknown;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        match self.request(self.subjects.result(route), headers, payload, remaining).await {
            Ok(reply) => serde_json::from_slice::<DeliverAck>(&reply.payload).unwrap_or_else(|error| {
                tracing::warn!(%error, device_id, call_id = %result.call_id, "malformed deliver ack");
                DeliverAck::Unknown
            }),
            // The dispatching replica is gone (a restart takes a new tag): nobody waits.
            Err(RequestFailure::NoResponders) => DeliverAck::Unknown,
            Err(failure) => {
                tracing::warn!(%failure, device_id, call_id = %result.call_id, "result not handed over; answering unknown");
                DeliverAck::Unknown
            }
        }
    }

    async fn hold(&self, device_id: &str, epoch: u64) -> Result<(), BusError> {
        if !is_uuid(device_id) {
            return Err(BusError::Malformed(format!("device id {device_id:?} is not a UUID")));
        }
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        {
            let mut held = self.held.lock();
            match held.get(device_id) {
                // A newer stream of the device is held here already: it answers.
                Some(newer) if *newer > epoch => {}
                _ => {
                    held.insert(device_id.to_owned(), epoch);
                }
            }
        }
        self.routes.lock().remove(device_id);
        // Older streams anywhere close; a newer one re-announces itself and closes ours.
        self.announce(device_id, epoch).await?;
        // One round trip: the server has taken the announcement before we say we hold it.
        self.round_trip().await.map_err(|failure| BusError::Unavailable(format!("hold: {failure}")))
    }

    /// Stops answering for `device_id` if its stream here is still the one of `epoch`.
    fn release(&self, device_id: &str, epoch: u64) -> bool {
        let mut held = self.held.lock();
        match held.get(device_id) {
            Some(held_epoch) if *held_epoch == epoch => {
                held.remove(device_id);
                true
            }
            _ => false,
        }
    }

    /// Stops answering for the device's stream of `epoch` when the hub has no stream of it any
    /// more (closed by a takeover, a revocation, a stall or a broker outage).
    fn release_if_gone(&self, device_id: &str, epoch: u64) {
        // A device the rebalancer moved lingers until its new stream is up (or a moment passed).
        if self.hub.holder(device_id).is_none()
            && self.hub.moving_for(device_id).is_none()
            && self.release(device_id, epoch)
        {
            tracing::debug!(device_id, epoch, "let go of a stream that is gone");
        }
    }

    /// Stops answering for every device (the streams were all closed). Returns how many.
    fn release_all(&self) -> usize {
        let mut held = self.held.lock();
        let count = held.len();
        held.clear();
        count
    }

    /// Lets go of the devices whose stream the hub no longer has.
    fn sweep(&self) {
        let entries: Vec<(String, u64)> =
            self.held.lock().iter().map(|(device, epoch)| (device.clone(), *epoch)).collect();
        for (device_id, epoch) in entries {
            self.release_if_gone(&device_id, epoch);
        }
    }

    /// Where `device_id` is held, as far as this replica knows: its route cache, else the
    /// directory.
    async fn route_of(&self, device_id: &str) -> Result<Option<StreamRoute>, BusError> {
        if let Some(route) = self.routes.lock().get(device_id).copied() {
            return Ok(Some(route));
        }
        let found = self.directory.last_stream(device_id).await?;
        if let Some(route) = found {
            self.remember_route(device_id, route);
        }
        Ok(found)
    }

    /// The holder at `refused` has no stream of the device: forgets it, and asks the directory
    /// for a newer stream. `None` when there is none (the device is offline).
    async fn newer_route(&self, device_id: &str, refused: StreamRoute) -> Result<Option<StreamRoute>, BusError> {
        self.forget_route(device_id, refused);
        match self.directory.last_stream(device_id).await? {
            Some(route)
                if route.epoch > refused.epoch || (route.epoch == refused.epoch && route.route != refused.route) =>
            {
                self.remember_route(device_id, route);
                Ok(Some(route))
            }
            _ => Ok(None),
        }
    }

    /// Remembers where a device is held, unless a newer stream is remembered already.
    fn remember_route(&self, device_id: &str, route: StreamRoute) {
        if route.route == self.route {
            // Our own devices are in `held`.
            return;
        }
        let mut routes = self.routes.lock();
        if let Some(known) = routes.get_mut(device_id) {
            if known.epoch <= route.epoch {
                *known = route;
            }
            return;
        }
        if routes.len() >= ROUTES_CAPACITY {
            if let Some(victim) = routes.keys().next().cloned() {
                routes.remove(&victim);
            }
        }
        routes.insert(device_id.to_owned(), route);
    }

    /// Forgets the remembered route of a device if it is still `route`.
    fn forget_route(&self, device_id: &str, route: StreamRoute) {
        let mut routes = self.routes.lock();
        if routes.get(device_id) == Some(&route) {
            routes.remove(device_id);
        }
    }

    /// Publishes a takeover for `device_id` with `epoch`.
    async fn announce(&self, device_id: &str, epoch: u64) -> Result<(), BusError> {
        let takeover =
            Takeover { device_id: device_id.to_owned(), epoch, replica: self.replica.clone(), route: self.route };
        let payload = encode(&takeover).map_err(|error| BusError::Malformed(error.to_string()))?;
        self.publish(self.subjects.takeover(), payload)
            .await
            .map_err(|failure| BusError::Unavailable(format!("takeover: {failure}")))
    }

    /// Re-announces every stream held here (after a reconnection). Returns how many.
    async fn announce_held(&self) -> usize {
        let entries: Vec<(String, u64)> =
            self.held.lock().iter().map(|(device, epoch)| (device.clone(), *epoch)).collect();
        for (device_id, epoch) in &entries {
            if let Err(error) = self.announce(device_id, *epoch).await {
                tracing::warn!(%error, device_id, "could not re-announce a held stream");
            }
        }
        entries.len()
    }

    async fn holder(&self, device_id: &str) -> Result<Option<Holder>, BusError> {
        if !is_uuid(device_id) {
            return Ok(None);
        }
        if self.held.lock().contains_key(device_id) {
            return Ok(self.hub.holder(device_id));
        }
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_DEVICE_ID, device_id);
        let mut target = self.route_of(device_id).await?;
        for _ in 0..MAX_HOLDER_HOPS {
            let Some(route) = target else {
                return Ok(None);
            };
            if route.route != self.route {
                let subject = self.subjects.holder_presence(&route_tag(route.route));
                match self.request(subject, headers.clone(), Bytes::new(), self.options.presence_timeout).await {
                    Ok(reply) => match serde_json::from_slice::<Option<Holder>>(&reply.payload) {
                        Ok(Some(holder)) => return Ok(Some(holder)),
                        Ok(None) => {}
                        Err(error) => return Err(BusError::Malformed(format!("holder: {error}"))),
                    },
                    Err(RequestFailure::NoResponders) => {}
                    // The replica named is there but does not answer (frozen): it cannot
                    // vouch for a live stream.
                    Err(RequestFailure::TimedOut) => return Ok(None),
                    Err(failure) => return Err(BusError::Unavailable(format!("presence: {failure}"))),
                }
            }
            target = self.newer_route(device_id, route).await?;
        }
        Ok(None)
    }

    async fn online_devices(&self) -> Result<Vec<(String, String)>, BusError> {
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        let mut waiter = self.inbox.waiter(GATHER_CAPACITY);
        let reply_to = waiter.reply_to().to_owned();
        let started = Instant::now();
        let window_end = started + self.options.gather_window;
        tokio::time::timeout_at(
            window_end,
            self.client.publish_with_reply(self.subjects.presence_all(), reply_to, Bytes::new()),
        )
        .await
        .map_err(|_| BusError::Unavailable("presence: publish timed out".into()))?
        .map_err(|error| BusError::Unavailable(format!("presence: {error}")))?;
        let mut devices = Vec::new();
        let mut replies = 0usize;
        loop {
            let until =
                if replies == 0 { window_end } else { window_end.min(Instant::now() + self.options.gather_idle) };
            let message = match tokio::time::timeout_at(until, waiter.recv()).await {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => break,
            };
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                break;
            }
            replies += 1;
            match serde_json::from_slice::<HeldDevices>(&message.payload) {
                Ok(held) => devices.extend(held.devices.into_iter().map(|device| (device, held.replica.clone()))),
                Err(error) => tracing::warn!(%error, "malformed presence reply"),
            }
        }
        if replies == 0 {
            return Err(BusError::Unavailable("presence: no replica answered".into()));
        }
        devices.sort();
        devices.dedup();
        tracing::debug!(
            replies,
            devices = devices.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "presence gathered"
        );
        Ok(devices)
    }

    async fn revoke(&self, device_id: &str) -> Result<(), BusError> {
        let payload = encode(&Revoked { device_id: device_id.to_owned() })
            .map_err(|error| BusError::Malformed(error.to_string()))?;
        self.publish(self.subjects.revoked(), payload)
            .await
            .map_err(|failure| BusError::Unavailable(format!("revoke: {failure}")))?;
        tokio::time::timeout(PUBLISH_TIMEOUT, self.client.flush())
            .await
            .map_err(|_| BusError::Unavailable("revoke: flush timed out".into()))?
            .map_err(|error| BusError::Unavailable(format!("revoke: {error}")))
    }

    // ---- transport ----

    /// One request through the bus's own inbox; the waiter leaves the table on every path.
    async fn request(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, RequestFailure> {
        if !self.is_connected() {
            return Err(RequestFailure::Disconnected);
        }
        let mut waiter = self.inbox.waiter(1);
        let reply_to = waiter.reply_to().to_owned();
        let exchange = async {
            let published = if headers.is_empty() {
                self.client.publish_with_reply(subject, reply_to, payload).await
            } else {
                self.client.publish_with_reply_and_headers(subject, reply_to, headers, payload).await
            };
            published.map_err(|error| {
                self.publish_failed();
                RequestFailure::Publish(error.to_string())
            })?;
            waiter.recv().await.ok_or(RequestFailure::Closed)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Err(RequestFailure::TimedOut),
            Ok(Err(failure)) => Err(failure),
            Ok(Ok(message)) if message.status == Some(StatusCode::NO_RESPONDERS) => Err(RequestFailure::NoResponders),
            Ok(Ok(message)) => Ok(message),
        }
    }

    /// Publishes to our own inbox and waits for it to come back: everything this client sent
    /// before (subscriptions included) has been processed by its server.
    async fn round_trip(&self) -> Result<(), RequestFailure> {
        let mut waiter = self.inbox.waiter(1);
        let subject = waiter.reply_to().to_owned();
        let exchange = async {
            self.client
                .publish(subject, Bytes::new())
                .await
                .map_err(|error| RequestFailure::Publish(error.to_string()))?;
            waiter.recv().await.ok_or(RequestFailure::Closed)
        };
        match tokio::time::timeout(PUBLISH_TIMEOUT, exchange).await {
            Err(_) => Err(RequestFailure::TimedOut),
            Ok(result) => result.map(|_| ()),
        }
    }

    async fn publish(&self, subject: impl Into<Subject>, payload: Bytes) -> Result<(), RequestFailure> {
        let subject: Subject = subject.into();
        let result = match tokio::time::timeout(PUBLISH_TIMEOUT, self.client.publish(subject, payload)).await {
            Err(_) => Err(RequestFailure::TimedOut),
            Ok(result) => result.map_err(|error| RequestFailure::Publish(error.to_string())),
        };
        if result.is_err() {
            self.publish_failed();
        }
        result
    }

    fn publish_failed(&self) {
        self.publish_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Answers a request, if it asked for an answer.
    async fn reply(&self, request: &Message, body: &impl Serialize) {
        let Some(reply_to) = request.reply.clone() else {
            return;
        };
        let payload = match encode(body) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, "cannot encode a reply");
                return;
            }
        };
        if let Err(failure) = self.publish(reply_to, payload).await {
            tracing::debug!(%failure, "reply not sent");
        }
    }

    // ---- incoming ----

    /// `{p}.result.{tag}`: a result for a call this replica dispatched.
    async fn on_result(self: Arc<Self>, message: Message) {
        let device_id = message.headers.as_ref().and_then(|headers| headers.get(HEADER_DEVICE_ID)).map(|v| v.as_str());
        let ack = match (device_id, serde_json::from_slice::<HostResult>(&message.payload)) {
            (Some(device_id), Ok(result)) => {
                let span = tracing::info_span!("nats.on_result", otel.kind = "consumer", device_id = %device_id, call_id = %result.call_id);
                let _entered = span.enter();
                let ack = self.hub.resolve(device_id, result);
                tracing::debug!(?ack, "result handed in");
                ack
            }
            (None, _) => {
                tracing::warn!("result without a device id header");
                DeliverAck::Unknown
            }
            (_, Err(error)) => {
                tracing::warn!(%error, "malformed result");
                DeliverAck::Unknown
            }
        };
        self.reply(&message, &ack).await;
    }

    /// `{p}.revoked`: a device was revoked somewhere.
    async fn on_revoked(self: Arc<Self>, message: Message) {
        match serde_json::from_slice::<Revoked>(&message.payload) {
            Ok(Revoked { device_id }) => {
                tracing::info!(device_id, "device revoked");
                self.hub.revoke(&device_id);
                self.routes.lock().remove(&device_id);
                let epoch = self.held.lock().get(&device_id).copied();
                if let Some(epoch) = epoch {
                    self.release_if_gone(&device_id, epoch);
                }
            }
            Err(error) => tracing::warn!(%error, "malformed revocation"),
        }
    }

    /// `{p}.load`: another replica's stream count (our own is not kept).
    async fn on_load(self: Arc<Self>, message: Message) {
        match serde_json::from_slice::<ReplicaLoad>(&message.payload) {
            Ok(load) if load.replica == self.replica => {}
            Ok(load) if load.leaving => {
                self.loads.lock().remove(&load.replica);
            }
            Ok(load) => {
                let mut loads = self.loads.lock();
                // Replicas come and go (a new pod name each restart): forget the long silent.
                loads.retain(|_, (_, at)| at.elapsed() < LOAD_FORGET_AFTER);
                loads.insert(load.replica.clone(), (load, Instant::now()));
            }
            Err(error) => tracing::warn!(%error, "malformed load report"),
        }
    }

    /// `{p}.events.*`: a user's event, for this replica's listeners.
    async fn on_user_event(self: Arc<Self>, message: Message) {
        match serde_json::from_slice::<UserEvent>(&message.payload) {
            // No receiver (no listener task yet) is not a failure.
            Ok(event) => drop(self.events.send(Arc::new(event))),
            Err(error) => tracing::warn!(%error, "malformed user event"),
        }
    }

    /// `{p}.api-tokens.revoked`: api tokens were revoked; forget them here.
    async fn on_api_tokens_revoked(self: Arc<Self>, message: Message) {
        match serde_json::from_slice::<ApiTokensRevoked>(&message.payload) {
            Ok(ApiTokensRevoked { token_hashes }) => {
                let hashes: Vec<[u8; 32]> = token_hashes.iter().filter_map(|hash| parse_token_hash(hash)).collect();
                let evicted = self.hub.revoke_api_tokens(&hashes);
                tracing::info!(tokens = hashes.len(), evicted, "api tokens revoked");
            }
            Err(error) => tracing::warn!(%error, "malformed api-token revocation"),
        }
    }

    /// `{p}.presence.all`: which devices this replica holds.
    async fn on_presence_all(self: Arc<Self>, message: Message) {
        let held = HeldDevices { replica: self.replica.clone(), devices: self.hub.held_devices() };
        self.reply(&message, &held).await;
    }

    /// `{p}.holder.{tag}.*`: a call or a presence question about a device held here.
    async fn on_holder_request(self: Arc<Self>, message: Message) {
        let device_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(HEADER_DEVICE_ID))
            .map(|value| value.as_str().to_owned())
            .filter(|device_id| is_uuid(device_id));
        let Some(device_id) = device_id else {
            tracing::warn!(subject = %message.subject, "holder request without a device id; not answered");
            return;
        };
        match message.subject.as_str().rsplit('.').next() {
            Some(HOLDER_CALL) => self.on_call(&device_id, message).await,
            Some(HOLDER_PRESENCE) => {
                let holder = if self.held.lock().contains_key(&device_id) { self.hub.holder(&device_id) } else { None };
                self.reply(&message, &holder).await;
            }
            _ => tracing::warn!(subject = %message.subject, "unknown holder request; not answered"),
        }
    }

    /// A call for a device held here: push it to the device's stream. The message is the
    /// call's JSON exactly as the device's `call` frame carries it (both are the serialized
    /// [`HostCall`]), so it is checked and queued as it is: only the call id and the deadline
    /// are read, and the input is never decoded and encoded again.
    async fn on_call(&self, device_id: &str, message: Message) {
        let head = match CallHead::read(&message.payload) {
            Ok(head) => head,
            Err(error) => {
                tracing::warn!(%error, device_id, "malformed call; not answered");
                return;
            }
        };
        let traceparent = message.headers.as_ref().and_then(|headers| headers.get(HEADER_TRACEPARENT));
        let span = tracing::info_span!(
            "nats.on_call",
            otel.kind = "consumer",
            messaging.system = "nats",
            device_id = %device_id,
            call_id = %head.call_id,
            traceparent = traceparent.map(|value| value.as_str()),
        );
        crate::telemetry::set_parent(&span, traceparent.map(|value| value.as_str()));
        let ack = span.in_scope(|| match std::str::from_utf8(&message.payload) {
            Ok(json) => {
                let frame = CallFrame { call_id: head.call_id.clone(), json: json.to_owned() };
                self.push_here_with(device_id, |hub| hub.push_frame(device_id, frame, head.deadline))
            }
            Err(_) => CallAck::NotHeld,
        });
        self.reply(&message, &ack).instrument(span).await;
    }

    /// Pushes a call to the stream of a device this replica answers for;
    /// [`CallAck::Absent`] when it answers for none.
    fn push_here(&self, device_id: &str, call: &HostCall) -> CallAck {
        self.push_here_with(device_id, |hub| hub.push(device_id, call))
    }

    fn push_here_with(&self, device_id: &str, push: impl FnOnce(&Hub) -> CallAck) -> CallAck {
        let Some(epoch) = self.held.lock().get(device_id).copied() else {
            return CallAck::Absent;
        };
        let ack = push(&self.hub);
        if ack == CallAck::NotHeld {
            self.release_if_gone(device_id, epoch);
        }
        ack
    }

    /// `{p}.takeover`: a stream opened somewhere. Closes ours if it is older, re-announces ours
    /// if it is newer, and remembers where the device is held.
    async fn on_takeover(self: Arc<Self>, message: Message) {
        let Takeover { device_id, epoch: theirs, replica, route } = match serde_json::from_slice(&message.payload) {
            Ok(takeover) => takeover,
            Err(error) => {
                tracing::warn!(%error, "malformed takeover");
                return;
            }
        };
        if replica == self.replica || !is_uuid(&device_id) {
            // Our own announcement: the hub already settled local streams.
            return;
        }
        self.remember_route(&device_id, StreamRoute { route, epoch: theirs });
        let Some(held_epoch) = self.held.lock().get(&device_id).copied() else {
            return;
        };
        match self.hub.takeover(&device_id, theirs) {
            Some(mine) => {
                tracing::info!(device_id, mine, theirs, %replica, "an older stream announced itself; re-announcing ours");
                if let Err(error) = self.announce(&device_id, mine).await {
                    tracing::warn!(%error, device_id, "could not re-announce");
                }
            }
            None => {
                if self.hub.holder(&device_id).is_none() {
                    tracing::info!(device_id, theirs, %replica, "stream superseded by a newer one elsewhere");
                    self.release(&device_id, held_epoch);
                }
            }
        }
    }
}

/// Reads one replica-wide subscription until cancelled, handling messages in order.
async fn serve<F, Fut>(shared: Arc<Shared>, mut subscriber: Subscriber, cancel: CancellationToken, handle: F)
where
    F: Fn(Arc<Shared>, Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Made once, and on a child token of the serve loop's own: it is looked at before every
    // message, and the shared token's lock would be contended by every loop of the replica.
    let cancel = cancel.child_token();
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut cancelled => break,
            message = subscriber.next() => message,
        };
        match message {
            Some(message) => handle(shared.clone(), message).await,
            None => break,
        }
    }
}

/// What a holder reads of a call before queueing its JSON as it came.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CallHead {
    call_id: String,
    #[serde(default)]
    deadline: Option<chrono::DateTime<chrono::Utc>>,
}

impl CallHead {
    /// Reads the call id and deadline of a call's JSON, checking the whole of it is one JSON
    /// object on one line (an SSE `data` field cannot hold a line break).
    fn read(payload: &[u8]) -> Result<CallHead, String> {
        if payload.iter().any(|b| *b == b'\n' || *b == b'\r') {
            return Err("a line break in the call's JSON".into());
        }
        // serde would also read a struct from a JSON array; a call is an object.
        if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("not a JSON object".into());
        }
        serde_json::from_slice(payload).map_err(|error| error.to_string())
    }
}

fn encode(body: &impl Serialize) -> Result<Bytes, serde_json::Error> {
    serde_json::to_vec(body).map(Bytes::from)
}

/// Tells every replica on the NATS servers in `urls` that the api tokens with these hashes
/// (lowercase hex SHA-256) are revoked, for a process that is not a replica (`dispatcher token
/// revoke`): connects, publishes `{p}.api-tokens.revoked`, flushes and closes, all within
/// `timeout`. Replicas that miss it learn the same from the database within a second.
pub async fn publish_api_token_revocation(
    urls: &str,
    auth: &NatsAuth,
    subjects: &Subjects,
    token_hashes: &[String],
    timeout: Duration,
) -> Result<(), BusError> {
    let servers: Vec<&str> = urls.split(',').map(str::trim).filter(|url| !url.is_empty()).collect();
    if servers.is_empty() {
        return Err(BusError::Unavailable("no NATS server URL given".into()));
    }
    if !protocol::subject::is_valid_prefix(subjects.prefix()) {
        return Err(BusError::Unavailable(format!("invalid subject prefix {:?}", subjects.prefix())));
    }
    let payload = encode(&ApiTokensRevoked { token_hashes: token_hashes.to_vec() })
        .map_err(|error| BusError::Malformed(error.to_string()))?;
    let publish = async {
        let client = auth::connect_options(auth)
            .await?
            .name("dispatcher token revoke")
            .connection_timeout(timeout)
            .connect(servers)
            .await
            .map_err(|error| BusError::Unavailable(auth::describe_connect_error(&error, urls, auth)))?;
        client
            .publish(subjects.api_tokens_revoked(), payload)
            .await
            .map_err(|error| BusError::Unavailable(format!("publish: {error}")))?;
        client.flush().await.map_err(|error| BusError::Unavailable(format!("flush: {error}")))?;
        Ok::<_, BusError>(())
    };
    tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| BusError::Unavailable(format!("no NATS server took the message within {timeout:?}")))?
}

/// The client of a replica. A first attempt is made at once: if NATS refuses the credentials
/// or TLS fails, that is an error of the settings and the replica does not start. If no server
/// answers, the client keeps trying in the background (the replica starts without the broker,
/// and its readiness says so).
async fn connect_client(
    urls: &str,
    servers: &[&str],
    options: &NatsOptions,
    name: &str,
    events_tx: tokio::sync::mpsc::UnboundedSender<async_nats::Event>,
) -> Result<Client, BusError> {
    let build = |base: ConnectOptions| {
        let max_delay = options.max_reconnect_delay;
        let events_tx = events_tx.clone();
        base.name(name)
            .max_reconnects(None)
            .ping_interval(options.ping_interval)
            .connection_timeout(options.connection_timeout)
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay))
            .event_callback(move |event| {
                let events_tx = events_tx.clone();
                async move {
                    let _ = events_tx.send(event);
                }
            })
    };
    let first = build(auth::connect_options(&options.auth).await?).connect(servers.to_vec()).await;
    match first {
        Ok(client) => Ok(client),
        Err(error) if auth::is_refusal(&error) => {
            Err(BusError::Refused(auth::describe_connect_error(&error, urls, &options.auth)))
        }
        Err(error) => {
            tracing::warn!(%error, "NATS unreachable at start; the replica starts without it and keeps trying");
            build(auth::connect_options(&options.auth).await?)
                .retry_on_initial_connect()
                .connect(servers.to_vec())
                .await
                .map_err(|error| BusError::Unavailable(format!("NATS client: {error}")))
        }
    }
}

/// Room left in a message for headers and protocol framing.
const HEADER_ROOM: usize = 1024;

/// A result too large for the broker cannot reach the replica that waits for it; in its place
/// travels a failure that says so, so the dispatch answers at once instead of timing out.
fn fit_result(result: &HostResult, payload: Bytes, max_payload: usize) -> Result<Bytes, serde_json::Error> {
    if payload.len() + HEADER_ROOM <= max_payload {
        return Ok(payload);
    }
    tracing::warn!(bytes = payload.len(), max_payload, "result larger than NATS max_payload; sending a failure");
    let error = format!(
        "the device's result ({} bytes) exceeds the cluster bus limit ({max_payload} bytes); raise NATS max_payload",
        payload.len()
    );
    encode(&HostResult::failure(result.call_id.clone(), error))
}

/// Eight hex digits: the only form of a route tag allowed into a subject.
fn is_route(route: &str) -> bool {
    route.len() == 8 && route.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Visible ASCII only: nothing that could break a header line.
fn is_header_safe(value: &str) -> bool {
    !value.is_empty() && value.len() <= 512 && value.bytes().all(|b| b.is_ascii_graphic())
}

/// Exponential backoff from 25 ms up to `max`, jittered to half..full, first attempt at once.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    let base = Duration::from_millis(25u64 << exponent).min(max);
    base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_message_is_its_frame_and_only_its_head_is_read() {
        let call = HostCall {
            call_id: "c-1".into(),
            tool: "write_file".into(),
            input: serde_json::json!({"path": "a\nb", "content": "line\r\nline", "n": [1, 2.5, null]}),
            mode: None,
            preconditions: None,
            deadline: Some(chrono::DateTime::from_timestamp(2_000_000_000, 0).expect("time")),
            traceparent: None,
        };
        // What the caller publishes is byte for byte the `call` frame the holder queues.
        let payload = encode(&call).expect("encode");
        assert_eq!(payload, CallFrame::encode(&call).expect("frame").json.as_bytes());
        let head = CallHead::read(&payload).expect("head");
        assert_eq!((head.call_id.as_str(), head.deadline), ("c-1", call.deadline));

        let without_deadline = br#"{"callId":"c-2","tool":"stat","input":{}}"#;
        assert_eq!(CallHead::read(without_deadline).expect("head").deadline, None);
        for bad in [
            &b"[\"c-3\", null]"[..],
            b"{\"tool\":\"stat\"}",
            b"{\"callId\":\"c-4\",\n\"tool\":\"stat\"}",
            b"{\"callId\":\"c-5\",\r\"tool\":\"stat\"}",
            b"{\"callId\":\"c-6\"",
            b"{\"callId\":\"c-7\",\"deadline\":\"soon\"}",
            b"",
        ] {
            assert!(CallHead::read(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn reconnect_delays_grow_and_stay_capped() {
        let max = Duration::from_secs(1);
        assert_eq!(reconnect_delay(0, max), Duration::ZERO);
        assert_eq!(reconnect_delay(1, max), Duration::ZERO);
        let second = reconnect_delay(2, max);
        assert!(second >= Duration::from_millis(12) && second <= Duration::from_millis(25), "{second:?}");
        for attempts in [10, 100, usize::MAX] {
            assert!(reconnect_delay(attempts, max) <= max);
        }
    }

    #[test]
    fn routes_and_header_values() {
        assert!(is_route("deadbeef"));
        for bad in ["", "deadbee", "deadbeef0", "dead.eef", "dead*eef", "deadbeeg"] {
            assert!(!is_route(bad), "{bad:?}");
        }
        assert!(is_header_safe("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        for bad in ["", "a b", "a\r\nb: c"] {
            assert!(!is_header_safe(bad), "{bad:?}");
        }
    }
}
