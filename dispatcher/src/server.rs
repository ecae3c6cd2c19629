//! `run(settings, listener, shutdown)`: builds a replica (registry, hub, bus, dispatcher),
//! serves the router on the listener (through [`crate::listener`], which bounds connections),
//! and on shutdown drains in the order a load balancer needs: fail readiness, keep serving
//! through the drain delay, close the streams with `reconnect`, keep accepting results until
//! the calls pending here resolve, then stop accepting and let requests in flight finish, all
//! within the grace period.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use protocol::sse::ReconnectReason;
use protocol::subject::Subjects;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::memory::MemoryBus;
use crate::bus::nats::{NatsBus, NatsOptions};
use crate::bus::{Bus, BusError};
use crate::config::Settings;
use crate::core::{Close, Dispatcher, Hub};
use crate::http::limit::RateLimiter;
use crate::http::{AppParts, AppState};
use crate::listener::admission::derive_caps;
use crate::listener::timing::Timeouts;
use crate::listener::tls::CertificateSource;
use crate::listener::Limits;
use crate::readiness::Readiness;
use crate::registry::{Registry, RegistryError};
use crate::telemetry::Metrics;

/// Enrollment attempts a client address gets at once, and the refill interval.
const ENROLL_BURST: u32 = 10;
const ENROLL_REFILL: Duration = Duration::from_secs(3);
/// Longest the exit waits for the database pool to close its connections.
const REGISTRY_CLOSE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("database: {0}")]
    Registry(#[from] RegistryError),
    #[error("message broker: {0}")]
    Bus(#[from] BusError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Builds a replica's state: connects the registry (running migrations) and the bus.
/// Background tasks stop when `cancel` fires.
pub async fn build_state(settings: Settings, cancel: CancellationToken) -> Result<AppState, ServeError> {
    let registry = Registry::connect_with_pool(&settings.database_url, settings.capacity.db_pool_size)
        .await?
        .with_limits(settings.storage.limits);
    let hub = Hub::with_stream_queue_bytes(settings.replica_id.clone(), rand::random(), settings.stream_queue_bytes);
    let bus: Arc<dyn Bus> = match &settings.nats_url {
        Some(urls) => {
            let options = NatsOptions {
                broker_grace: settings.broker_grace,
                auth: settings.nats_auth.clone(),
                ..NatsOptions::default()
            };
            let subjects = Subjects::new(settings.subject_prefix.clone());
            NatsBus::connect(urls, subjects, hub.clone(), Arc::new(registry.clone()), options, cancel.clone()).await?
        }
        None => {
            tracing::warn!(
                "no --nats-url: single-replica mode with the in-memory bus; do not run more than one replica"
            );
            Arc::new(MemoryBus::new(hub.clone()))
        }
    };
    hub.clone().spawn_stall_watch(settings.keepalive, cancel.child_token())?;
    tokio::spawn(crate::janitor::run(registry.clone(), settings.storage.clone(), cancel.child_token()));
    let mut metrics = Metrics::new();
    let call_log_counters = crate::calllog::Counters::default();
    metrics.register_call_log(&call_log_counters);
    let call_log =
        crate::calllog::CallLog::start(registry.clone(), &settings.replica_id, call_log_counters, cancel.child_token());
    let events = crate::events::EventHub::start(&bus, cancel.child_token());
    tokio::spawn(crate::revocation::watch(registry.clone(), hub.clone(), cancel.child_token()));
    let metrics = Arc::new(metrics);
    let draining = Arc::new(AtomicBool::new(false));
    if let Some(policy) = settings.capacity.rebalance {
        tokio::spawn(crate::rebalance::run(
            policy,
            hub.clone(),
            bus.clone(),
            settings.capacity.max_streams,
            draining.clone(),
            metrics.rebalance.clone(),
            cancel.child_token(),
        ));
    }
    tracing::info!(
        replica = %settings.replica_id,
        bus = bus.kind(),
        database = registry.engine(),
        "replica ready"
    );
    let dispatcher = Dispatcher::new(hub, bus);
    let readiness = Arc::new(Readiness::new());
    tokio::spawn(crate::readiness::watch(
        readiness.clone(),
        dispatcher.clone(),
        registry.clone(),
        cancel.child_token(),
    ));
    Ok(AppState::new(AppParts {
        dispatcher,
        registry,
        settings: Arc::new(settings),
        metrics,
        draining,
        enroll_limiter: Arc::new(RateLimiter::new(ENROLL_BURST, ENROLL_REFILL)),
        grant_limits: Arc::default(),
        events,
        call_log,
        readiness,
    }))
}

/// Serves one replica on `listener` until `shutdown` fires, then drains.
pub async fn run(settings: Settings, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServeError> {
    // A certificate that does not load stops the start before anything connects.
    if let Some(files) = &settings.tls {
        CertificateSource::load(files.clone()).map_err(ServeError::Tls)?;
    }
    let background = CancellationToken::new();
    let state = build_state(settings, background.clone()).await?;
    let result = serve(state, listener, shutdown).await;
    background.cancel();
    result
}

/// Serves a built state until `shutdown`, then drains it.
pub async fn serve(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServeError> {
    let settings = state.settings.clone();
    let router = crate::app::app(state.clone());
    let descriptors = crate::listener::raise_descriptor_limit();
    let (caps, warning) = derive_caps(descriptors, settings.max_connections, settings.max_connections_per_ip);
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    let certificates = settings.tls.clone().map(CertificateSource::load).transpose().map_err(ServeError::Tls)?;
    let stop_reloading = CancellationToken::new();
    let _stop_reloading = stop_reloading.clone().drop_guard();
    if let Some(certificates) = &certificates {
        tokio::spawn(certificates.clone().watch(stop_reloading));
    }
    let limits = Limits {
        timeouts: Timeouts { first_request: settings.connection_timeout, idle: settings.idle_timeout },
        header_timeout: settings.header_timeout,
        keepalive: settings.keepalive,
        caps,
        replica_id: settings.replica_id.clone(),
        tls: certificates.clone(),
    };

    let stop_accepting = CancellationToken::new();
    let grace_end: Arc<OnceLock<Instant>> = Arc::default();
    tokio::spawn(drain_on(shutdown, state.clone(), stop_accepting.clone(), grace_end.clone()));

    tracing::info!(
        listen = %listener.local_addr()?,
        replica = %settings.replica_id,
        max_connections = caps.total,
        max_connections_per_ip = caps.per_address,
        descriptor_limit = descriptors,
        tls = certificates.is_some(),
        trusted_proxies = %settings.trusted_proxies,
        "serving"
    );
    let grace = settings.shutdown_grace;
    // One grace period for the whole drain: what the wait for pending calls used of it is not
    // given again to the requests still in flight.
    let until = move || grace_end.get().copied().unwrap_or_else(|| Instant::now() + grace);
    let finished = crate::listener::serve(listener, router, limits, state.metrics.clone(), stop_accepting, until).await;
    if !finished {
        tracing::warn!(grace_secs = grace.as_secs(), "grace period over with requests still in flight");
    }
    state.call_log.close().await;
    if tokio::time::timeout(REGISTRY_CLOSE, state.registry.close()).await.is_err() {
        tracing::warn!("database connections still busy at exit; left to close with the process");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The shutdown sequence up to closing the listener: readiness fails, the replica keeps
/// serving through the drain delay, streams close with `reconnect`, and results for the calls
/// still pending here are accepted until they resolve or the grace period ends.
///
/// The whole shutdown takes at most the drain delay plus the grace period (plus
/// [`REGISTRY_CLOSE`]): `grace_end` is set once, when the grace begins, and bounds both the
/// wait for pending calls here and the wait for requests in flight in the listener.
async fn drain_on(
    shutdown: CancellationToken,
    state: AppState,
    stop_accepting: CancellationToken,
    grace_end: Arc<OnceLock<Instant>>,
) {
    shutdown.cancelled().await;
    state.draining.store(true, Ordering::Release);
    tracing::info!(delay_secs = state.settings.drain_delay.as_secs(), "draining: readiness fails from now");
    tokio::time::sleep(state.settings.drain_delay).await;
    let hub = state.dispatcher.hub();
    let closed = hub.close_all(Close::Reconnect(ReconnectReason::Shutdown));
    state.events.close_all();
    tracing::info!(closed, pending = hub.pending_calls(), "streams closed with reconnect");
    let deadline = *grace_end.get_or_init(|| Instant::now() + state.settings.shutdown_grace);
    while hub.pending_calls() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_accepting.cancel();
}
