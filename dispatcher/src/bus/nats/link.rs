//! The link to the broker: async-nats connection events in, and what they mean for this
//! replica. While connected the bus is up. When the connection drops, the replica waits
//! `broker_grace` and, still disconnected, closes its streams with `reconnect` (`broker-lost`)
//! so its devices move to a healthy replica. On every (re)connection it flushes its credential
//! cache (it may have missed revocations) and re-announces the streams it still holds (it may
//! have missed a newer stream's takeover).
//!
//! Not here: the connection itself (async-nats reconnects and resubscribes on its own), and
//! health (read from the client's state by the bus).

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::Event;
use protocol::sse::ReconnectReason;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::core::Close;

/// How often the connection state is polled besides the events (which async-nats may drop
/// when its event queue is full).
const POLL: Duration = Duration::from_millis(250);
/// How often the bus lets go of streams the hub no longer has (closed by a stall, say).
const SWEEP: Duration = Duration::from_secs(1);

/// What the watch tracks between events.
#[derive(Debug, Default)]
struct Outage {
    /// Seen connected at least once.
    ever_up: bool,
    up: bool,
    down_since: Option<Instant>,
    /// Streams were already closed for this outage.
    gave_up: bool,
}

/// Runs until `cancel`: reacts to connection events and enforces the broker grace.
pub(super) async fn watch(
    shared: Arc<Shared>,
    mut events: mpsc::UnboundedReceiver<Event>,
    grace: Duration,
    cancel: CancellationToken,
) {
    let mut outage = Outage::default();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let grace_end = outage.down_since.filter(|_| !outage.gave_up).map(|since| since + grace);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => on_event(&shared, &mut outage, event).await,
                None => return,
            },
            _ = sleep_until(grace_end) => {
                outage.gave_up = true;
                // Subscriptions first, so nothing answers for a stream once its device is told.
                let released = shared.release_all();
                let closed = shared.hub.close_all(Close::Reconnect(ReconnectReason::BrokerLost));
                tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    closed,
                    released,
                    "NATS unreachable past the grace period; closed this replica's streams so devices move"
                );
            }
            _ = poll.tick() => {
                // A backstop for dropped events: the client's own state is the truth.
                match (shared.client.connection_state(), outage.up) {
                    (State::Connected, false) => on_up(&shared, &mut outage).await,
                    (State::Disconnected, true) => on_down(&mut outage),
                    _ => {}
                }
            }
            _ = sweep.tick() => shared.sweep(),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn on_event(shared: &Shared, outage: &mut Outage, event: Event) {
    match event {
        Event::Connected => on_up(shared, outage).await,
        Event::Disconnected => on_down(outage),
        Event::Closed => {
            tracing::warn!("NATS client closed");
            on_down(outage);
        }
        Event::LameDuckMode => tracing::info!("NATS server entered lame duck mode; the client will move"),
        Event::SlowConsumer(sid) => tracing::warn!(sid, "NATS slow consumer: messages dropped"),
        Event::ServerError(error) => tracing::warn!(%error, "NATS server error"),
        // A refusal (credentials, TLS) is an operator's to fix: an error line, not a debug one.
        Event::ClientError(error) => match super::auth::describe_client_error(&error.to_string(), &shared.options.auth)
        {
            Some(refusal) => tracing::error!(%error, "{refusal}"),
            None => tracing::debug!(%error, "NATS client error"),
        },
        Event::Draining => tracing::info!("NATS client draining"),
    }
}

async fn on_up(shared: &Shared, outage: &mut Outage) {
    if outage.up {
        return;
    }
    let reconnect = outage.ever_up;
    let outage_ms = outage.down_since.map(|since| since.elapsed().as_millis() as u64);
    *outage = Outage { ever_up: true, up: true, down_since: None, gave_up: false };
    shared.hub.flush_credentials();
    if reconnect {
        let announced = shared.announce_held().await;
        tracing::info!(outage_ms, announced, "NATS reconnected; credential cache flushed, held streams re-announced");
    } else {
        tracing::info!("NATS connected");
    }
}

fn on_down(outage: &mut Outage) {
    if !outage.up {
        return;
    }
    outage.up = false;
    outage.down_since = Some(Instant::now());
    tracing::warn!("NATS disconnected; the bus is down until it reconnects");
}
