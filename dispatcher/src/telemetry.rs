//! Telemetry: logs, traces and the Prometheus metrics served at `/metrics` (dispatches by
//! outcome, dispatch latency, device streams, pending calls, broker state, connections open,
//! refused and closed by the serving loop, failed accepts).
//!
//! Traces: every dispatch is a span, parented on the caller's W3C `traceparent` when it sent
//! one; the call carries the span's context to the device (in the HostCall, and across NATS in
//! a header), and the device's result POST comes back under it, so one trace shows every
//! replica a call crossed. Spans are exported over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard `OTEL_*` variables apply); without it
//! the context still travels as text.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocol::HostResult;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Flushes exported spans when dropped (at the end of `main`).
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let flushed = std::thread::spawn(move || provider.shutdown()).join();
            if let Ok(Err(error)) = flushed {
                eprintln!("dispatcher: flushing traces failed: {error}");
            }
        }
    }
}

/// Set when [`init`] installed this process's subscriber without a span exporter: the trace
/// context helpers below then skip the OpenTelemetry work (a caller's `traceparent` parsed into
/// a context at every request, a span asked for its own), which nothing would read. An
/// embedding app that installed a subscriber of its own (with an exporter or not) keeps it.
static NO_EXPORTER: AtomicBool = AtomicBool::new(false);

/// False only when spans are known not to be exported.
fn exporting() -> bool {
    !NO_EXPORTER.load(Ordering::Relaxed)
}

/// Spans made for the trace export only. The log lines do not show them: what they name is on
/// the request's own span (`http.request`: method, route, path, client, trace id) or on the
/// line itself, and formatting their fields for the log at every call cost more than any other
/// part of the logging. Without an OTLP endpoint no layer wants them, so they are not made.
const EXPORT_ONLY_SPANS: [&str; 6] =
    ["api.dispatch", "api.result", "nats.send_call", "nats.send_result", "nats.on_call", "nats.on_result"];

/// True for what the log layer formats: every event, and every span but the export-only ones.
pub fn is_logged(metadata: &tracing::Metadata<'_>) -> bool {
    !(metadata.is_span() && EXPORT_ONLY_SPANS.contains(&metadata.name()))
}

/// `RUST_LOG`, or `info`.
fn env_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// Logs to stderr (`RUST_LOG` filters, default `info`; `LOG_FORMAT=json` for JSON lines), and
/// exports traces over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Each has its own
/// filter: `RUST_LOG` for both, and the log leaves out the export-only spans ([`is_logged`]).
pub fn init(replica_id: &str) -> TelemetryGuard {
    use tracing_subscriber::filter::{filter_fn, FilterExt};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, Layer, Registry};

    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json");
    let logged = env_filter().and(filter_fn(is_logged));
    // Colours only for a person at a terminal (and not under NO_COLOR): a log file or a pod's
    // log keeps plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs = if json {
        fmt::layer().json().with_writer(std::io::stderr).with_filter(logged).boxed()
    } else {
        fmt::layer().with_ansi(colour).with_writer(std::io::stderr).with_filter(logged).boxed()
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![logs];
    // The exporter's HTTP client is a blocking one, which must not be built (or dropped) on
    // an async runtime's thread: build it on a thread of its own.
    let replica_id = replica_id.to_owned();
    let built = std::thread::spawn(move || otlp_provider(&replica_id)).join().unwrap_or(None);
    let provider = match built {
        Some(Ok(provider)) => {
            let traces = tracing_opentelemetry::layer().with_tracer(provider.tracer("dispatcher"));
            layers.push(traces.with_filter(env_filter()).boxed());
            Some(provider)
        }
        Some(Err(error)) => {
            eprintln!("dispatcher: OTLP export disabled: {error}");
            None
        }
        None => None,
    };
    // Already initialised (tests, embedding apps): keep theirs.
    let installed = tracing_subscriber::registry().with(layers).try_init().is_ok();
    if installed && provider.is_none() {
        NO_EXPORTER.store(true, Ordering::Relaxed);
    }
    TelemetryGuard { provider }
}

/// Logs only, for tests and tools.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt().with_env_filter(env_filter()).with_writer(std::io::stderr).try_init();
}

/// How spans are sent, from `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or
/// `OTEL_EXPORTER_OTLP_PROTOCOL` (default `http/protobuf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    HttpProtobuf,
    Grpc,
}

/// Reads the protocol variables; an unknown value is an error naming the ones supported.
pub fn otlp_protocol(traces: Option<&str>, general: Option<&str>) -> Result<OtlpProtocol, String> {
    match traces.or(general).map(str::trim) {
        None | Some("") | Some("http/protobuf") => Ok(OtlpProtocol::HttpProtobuf),
        Some("grpc") => Ok(OtlpProtocol::Grpc),
        Some(other) => {
            Err(format!("OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported; use \"http/protobuf\" or \"grpc\""))
        }
    }
}

fn otlp_provider(replica_id: &str) -> Option<Result<SdkTracerProvider, String>> {
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return None;
    }
    let protocol = match otlp_protocol(
        std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").ok().as_deref(),
        std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok().as_deref(),
    ) {
        Ok(protocol) => protocol,
        Err(error) => return Some(Err(error)),
    };
    let exporter = match protocol {
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(|error| error.to_string()),
        OtlpProtocol::Grpc => grpc_exporter(),
    };
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(error) => return Some(Err(error)),
    };
    // `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) names the service;
    // `dispatcher` otherwise.
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|attributes| attributes.contains("service.name="));
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name("dispatcher");
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.instance.id", replica_id.to_owned()))
        .with_attribute(KeyValue::new("service.version", VERSION))
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Some(Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()))
}

/// The OTLP/gRPC exporter (tonic). Its channel needs a Tokio runtime for its connection task,
/// and spans are exported from the batch processor's own thread: the channel lives on a small
/// runtime of its own (one worker thread), kept for the life of the process.
#[cfg(feature = "otlp-grpc")]
fn grpc_exporter() -> Result<opentelemetry_otlp::SpanExporter, String> {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = match RUNTIME.get() {
        Some(runtime) => runtime,
        None => {
            let built = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc")
                .enable_all()
                .build()
                .map_err(|error| format!("cannot start the OTLP/gRPC runtime: {error}"))?;
            RUNTIME.get_or_init(|| built)
        }
    };
    let _entered = runtime.enter();
    opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()
        .map_err(|error| error.to_string())
}

#[cfg(not(feature = "otlp-grpc"))]
fn grpc_exporter() -> Result<opentelemetry_otlp::SpanExporter, String> {
    Err("OTEL_EXPORTER_OTLP_PROTOCOL=grpc: this binary was built without the `otlp-grpc` feature; \
         use http/protobuf (port 4318) or rebuild with --features otlp-grpc"
        .into())
}

/// Makes `span` a child of the trace context in `traceparent` (when spans are exported),
/// unless it already sits in a trace (inside a request's span, which took the caller's context).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if !exporting() {
        return;
    }
    let Some(traceparent) = traceparent.filter(|t| is_traceparent(t)) else {
        return;
    };
    if tracing::Span::current().context().span().span_context().is_valid() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// The `traceparent` of `span` when spans are exported, else `fallback` (the caller's, passed
/// on as it came) or a new one.
pub fn traceparent_of(span: &tracing::Span, fallback: Option<&str>) -> String {
    if !exporting() {
        return fallback.filter(|t| is_traceparent(t)).map_or_else(new_traceparent, str::to_owned);
    }
    let context = span.context();
    let span_ref = context.span();
    let own = span_ref.span_context();
    if own.is_valid() {
        return format!("00-{}-{}-{:02x}", own.trace_id(), own.span_id(), own.trace_flags().to_u8());
    }
    fallback.filter(|t| is_traceparent(t)).map_or_else(new_traceparent, str::to_owned)
}

/// The trace id of `span`, as 32 hex digits, when spans are exported.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let context = span.context();
    let span_ref = context.span();
    let own = span_ref.span_context();
    own.is_valid().then(|| own.trace_id().to_string())
}

/// True for a well-formed W3C `traceparent` (version 00): `00-<32 hex>-<16 hex>-<2 hex>`, with
/// neither id all zeros.
pub fn is_traceparent(value: &str) -> bool {
    let mut parts = value.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    version == "00"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0')
}

/// A new sampled trace context: a random trace id and span id.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Fate {
    fate: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Transition {
    transition: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolState {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: &'static str,
    commit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpRoute {
    method: &'static str,
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpRequest {
    method: &'static str,
    route: String,
    status: u16,
}

/// Upper bounds of the dispatch latency buckets, in seconds.
const DISPATCH_BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds of the HTTP latency buckets (time to the response head), in seconds.
const HTTP_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn dispatch_histogram() -> Histogram {
    Histogram::new(DISPATCH_BUCKETS)
}

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS)
}

/// This build's version and git commit (`build.rs` reads `git rev-parse`; `unknown` without).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("DISPATCHER_GIT_COMMIT");

/// Figures read from other parts of the replica just before rendering (gauges and counters
/// kept elsewhere).
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub streams: usize,
    pub pending: usize,
    pub broker_up: bool,
    pub draining: bool,
    pub bus: crate::bus::BusStats,
    pub pool: crate::registry::PoolStats,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    dispatches: Family<Outcome, Counter>,
    latency: Family<Outcome, Histogram, fn() -> Histogram>,
    streams: Gauge<i64, AtomicI64>,
    pending: Gauge<i64, AtomicI64>,
    broker_up: Gauge<i64, AtomicI64>,
    connections_open: Gauge<i64, AtomicI64>,
    connections_refused: Family<Reason, Counter>,
    connections_closed: Family<Reason, Counter>,
    accept_errors: Counter,
    stream_queue_bytes: Gauge<i64, AtomicI64>,
    stuck_streams: Counter,
    http_requests: Family<HttpRequest, Counter>,
    http_duration: Family<HttpRoute, Histogram, fn() -> Histogram>,
    deliveries: Family<Fate, Counter>,
    stream_opens: Counter,
    stream_requests_unbuffered: Counter,
    stream_refusals: Family<Reason, Counter>,
    stream_closes: Family<Reason, Counter>,
    enrollments: Family<Outcome, Counter>,
    proposals: Family<Transition, Counter>,
    nats_reconnects: Counter,
    nats_publish_failures: Counter,
    db_pool: Family<PoolState, Gauge<i64, AtomicI64>>,
    db_pool_max: Gauge<i64, AtomicI64>,
    db_errors: Counter,
    db_pings: Counter,
    db_stream_open_statements: Counter,
    draining: Gauge<i64, AtomicI64>,
    rebalance_shed: Counter,
    cluster_average: Gauge<f64, AtomicU64>,
    /// What the rebalancer counts (shared with its task).
    pub rebalance: Arc<crate::rebalance::Stats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("dispatcher");
        let build = Family::<Build, Gauge<i64, AtomicI64>>::default();
        build.get_or_create(&Build { version: VERSION, commit: COMMIT }).set(1);
        registry.register("build_info", "This build: version and git commit (always 1)", build);
        let dispatches = Family::<Outcome, Counter>::default();
        registry.register("dispatches", "Dispatches by outcome", dispatches.clone());
        let latency = Family::<Outcome, Histogram, fn() -> Histogram>::new_with_constructor(dispatch_histogram as _);
        registry.register(
            "dispatch_duration_seconds",
            "Time from dispatch to its answer, by outcome (ok, error, proposal, offline, timed_out)",
            latency.clone(),
        );
        let streams = Gauge::<i64, AtomicI64>::default();
        registry.register("device_streams", "Device streams held by this replica", streams.clone());
        let pending = Gauge::<i64, AtomicI64>::default();
        registry.register("pending_calls", "Dispatches this replica waits for", pending.clone());
        let broker_up = Gauge::<i64, AtomicI64>::default();
        registry.register("broker_up", "1 while the bus can route (always 1 in memory)", broker_up.clone());
        let connections_open = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "connections_open",
            "TCP connections served, device streams included",
            connections_open.clone(),
        );
        let connections_refused = Family::<Reason, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections refused with a 503 by cap (max_connections, max_connections_per_ip)",
            connections_refused.clone(),
        );
        let connections_closed = Family::<Reason, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections closed by the server: no_request (timed out before a request), idle, evicted",
            connections_closed.clone(),
        );
        let accept_errors = Counter::default();
        registry.register("accept_errors", "Failed accepts (out of descriptors and the like)", accept_errors.clone());
        let stream_queue_bytes = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "stream_queue_bytes",
            "Bytes of call JSON queued on this replica's device streams, not yet written",
            stream_queue_bytes.clone(),
        );
        let stuck_streams = Counter::default();
        registry.register("stuck_streams", "Device streams dropped because they did not drain", stuck_streams.clone());
        let http_requests = Family::<HttpRequest, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route (the matched path template) and status",
            http_requests.clone(),
        );
        let http_duration =
            Family::<HttpRoute, Histogram, fn() -> Histogram>::new_with_constructor(http_histogram as _);
        registry.register(
            "http_request_duration_seconds",
            "Time from a request to its response head, by method and route (a stream counts until it opens)",
            http_duration.clone(),
        );
        let deliveries = Family::<Fate, Counter>::default();
        registry.register(
            "result_deliveries",
            "Result POSTs by fate: delivered, late_apply (recorded on its proposal), unknown (404), forbidden (403)",
            deliveries.clone(),
        );
        let stream_opens = Counter::default();
        registry.register("stream_opens", "Device streams opened here", stream_opens.clone());
        let stream_requests_unbuffered = Counter::default();
        registry.register(
            "stream_requests_unbuffered",
            "Device stream requests that came first on their own HTTP/1.1 connection, served without \
             the HTTP library's per-connection buffers (the others are served by hyper)",
            stream_requests_unbuffered.clone(),
        );
        let stream_refusals = Family::<Reason, Counter>::default();
        registry.register(
            "stream_refusals",
            "Device streams refused with 503, by reason: max_streams, draining, stalled",
            stream_refusals.clone(),
        );
        let stream_closes = Family::<Reason, Counter>::default();
        registry.register(
            "stream_closes",
            "Device streams ended, by reason: superseded, revoked, shutdown, broker_lost, stalled, rebalance \
             (a closing frame sent), stuck (dropped, not draining), disconnected (the device went away)",
            stream_closes.clone(),
        );
        let enrollments = Family::<Outcome, Counter>::default();
        registry.register(
            "enrollments",
            "Enrollments by outcome: enrolled, refused (bad code), rate_limited, over_quota, invalid",
            enrollments.clone(),
        );
        let proposals = Family::<Transition, Counter>::default();
        registry.register(
            "proposals",
            "Proposal transitions made here: proposed, approved (pending to applying), rejected, applied, failed, \
             unpushed (back to pending: the device was offline)",
            proposals.clone(),
        );
        let nats_reconnects = Counter::default();
        registry.register(
            "nats_reconnects",
            "Times the NATS connection came back after it was lost",
            nats_reconnects.clone(),
        );
        let nats_publish_failures = Counter::default();
        registry.register(
            "nats_publish_failures",
            "NATS publishes and requests that failed or timed out before the client took them",
            nats_publish_failures.clone(),
        );
        let db_pool = Family::<PoolState, Gauge<i64, AtomicI64>>::default();
        registry.register("db_pool_connections", "Database pool connections by state: idle, in_use", db_pool.clone());
        let db_pool_max = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "db_pool_max_connections",
            "Size limit of the database pool (--db-pool-size)",
            db_pool_max.clone(),
        );
        let db_errors = Counter::default();
        registry.register(
            "db_errors",
            "Database errors (failed queries, connections, pool timeouts) in this process",
            db_errors.clone(),
        );
        let db_pings = Counter::default();
        registry.register(
            "db_pings",
            "Pings of pooled database connections idle for a second or more, before handing them out",
            db_pings.clone(),
        );
        let db_stream_open_statements = Counter::default();
        registry.register(
            "db_stream_open_statements",
            "Statements that opened device streams (each verifies the tokens and issues the epochs of one or \
             more opens; compare with stream_opens)",
            db_stream_open_statements.clone(),
        );
        let draining = Gauge::<i64, AtomicI64>::default();
        registry.register("draining", "1 once a graceful shutdown began", draining.clone());
        let rebalance_shed = Counter::default();
        registry.register(
            "rebalance_reconnects",
            "Devices asked to reconnect elsewhere because this replica held far more than the average",
            rebalance_shed.clone(),
        );
        let cluster_average = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cluster_streams_average",
            "The cluster's average device streams per replica, as this replica last heard it",
            cluster_average.clone(),
        );
        Self {
            registry: root,
            dispatches,
            latency,
            streams,
            pending,
            broker_up,
            connections_open,
            connections_refused,
            connections_closed,
            accept_errors,
            stream_queue_bytes,
            stuck_streams,
            http_requests,
            http_duration,
            deliveries,
            stream_opens,
            stream_requests_unbuffered,
            stream_refusals,
            stream_closes,
            enrollments,
            proposals,
            nats_reconnects,
            nats_publish_failures,
            db_pool,
            db_pool_max,
            db_errors,
            db_pings,
            db_stream_open_statements,
            draining,
            rebalance_shed,
            cluster_average,
            rebalance: Arc::default(),
        }
    }

    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub fn connection_ended(&self) {
        self.connections_open.dec();
    }

    /// A connection refused, `reason` being the cap it hit.
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused.get_or_create(&Reason { reason }).inc();
    }

    /// A connection closed by the server: `no_request`, `idle` or `evicted`.
    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed.get_or_create(&Reason { reason }).inc();
    }

    pub fn accept_failed(&self) {
        self.accept_errors.inc();
    }

    /// An HTTP request answered: `route` is the matched path template (`unmatched` for none).
    /// `method` is one of a fixed set of labels (`GET`, …, `other`).
    pub fn http_request(&self, method: &'static str, route: &str, status: u16, elapsed: Duration) {
        // One allocation for both keys: a family is looked up by an owned label set.
        let key = HttpRoute { method, route: route.to_owned() };
        self.http_duration.get_or_create(&key).observe(elapsed.as_secs_f64());
        self.http_requests.get_or_create(&HttpRequest { method, route: key.route, status }).inc();
    }

    /// A result POST's fate: `delivered`, `late_apply`, `unknown` or `forbidden`.
    pub fn result_delivery(&self, fate: &'static str) {
        self.deliveries.get_or_create(&Fate { fate }).inc();
    }

    pub fn stream_opened(&self) {
        self.stream_opens.inc();
    }

    /// A device stream request read by the listener itself (see `listener::device_stream`).
    pub fn stream_request_unbuffered(&self) {
        self.stream_requests_unbuffered.inc();
    }

    /// A stream refused with 503: `max_streams`, `draining` or `stalled`.
    pub fn stream_refused(&self, reason: &'static str) {
        self.stream_refusals.get_or_create(&Reason { reason }).inc();
    }

    /// A stream ended, and why.
    pub fn stream_closed(&self, reason: &'static str) {
        self.stream_closes.get_or_create(&Reason { reason }).inc();
    }

    /// An enrollment's outcome: `enrolled`, `refused`, `rate_limited`, `over_quota`, `invalid`.
    pub fn enrollment(&self, outcome: &'static str) {
        self.enrollments.get_or_create(&Outcome { outcome }).inc();
    }

    /// A proposal moved: `proposed`, `approved`, `rejected`, `applied`, `failed`.
    pub fn proposal(&self, transition: &'static str) {
        self.proposals.get_or_create(&Transition { transition }).inc();
    }

    /// Runs a dispatch and records its outcome and latency.
    pub async fn observe_dispatch(&self, dispatch: impl Future<Output = HostResult>) -> HostResult {
        let started = Instant::now();
        let result = dispatch.await;
        let outcome = dispatch_outcome(&result);
        self.dispatches.get_or_create(&Outcome { outcome }).inc();
        self.latency.get_or_create(&Outcome { outcome }).observe(started.elapsed().as_secs_f64());
        result
    }

    /// Records the streams' queue figures (read from the hub before [`Metrics::render`]):
    /// bytes queued now, and the streams dropped for not draining so far.
    pub fn set_stream_queues(&self, queued_bytes: usize, stuck_streams: u64) {
        self.stream_queue_bytes.set(i64::try_from(queued_bytes).unwrap_or(i64::MAX));
        catch_up(&self.stuck_streams, stuck_streams);
    }

    /// Registers the call log writer's counters: records written, and dropped by reason.
    pub fn register_call_log(&mut self, counters: &crate::calllog::Counters) {
        let registry = self.registry.sub_registry_with_prefix("dispatcher");
        registry.register("call_log_written", "Call log records stored", counters.written.clone());
        registry.register(
            "call_log_dropped",
            "Call log records lost: queue_full (the writer fell behind), database (the database refused them)",
            counters.dropped.clone(),
        );
    }

    /// The text exposition, with the gauges read now.
    pub fn render(&self, now: Snapshot) -> Result<String, std::fmt::Error> {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.streams.set(gauge(now.streams));
        self.pending.set(gauge(now.pending));
        self.broker_up.set(i64::from(now.broker_up));
        self.draining.set(i64::from(now.draining));
        catch_up(&self.nats_reconnects, now.bus.reconnects);
        catch_up(&self.nats_publish_failures, now.bus.publish_failures);
        self.db_pool.get_or_create(&PoolState { state: "idle" }).set(gauge(now.pool.idle));
        self.db_pool
            .get_or_create(&PoolState { state: "in_use" })
            .set(gauge(now.pool.size.saturating_sub(now.pool.idle)));
        self.db_pool_max.set(gauge(now.pool.max));
        catch_up(&self.db_errors, crate::registry::database_errors());
        catch_up(&self.db_pings, crate::registry::database_pings());
        catch_up(&self.db_stream_open_statements, crate::registry::stream_open_statements());
        catch_up(&self.rebalance_shed, self.rebalance.shed.load(Ordering::Relaxed));
        self.cluster_average.set(self.rebalance.average_x100.load(Ordering::Relaxed) as f64 / 100.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// The `outcome` label of a dispatch's answer.
pub fn dispatch_outcome(result: &HostResult) -> &'static str {
    if result.is_offline() {
        "offline"
    } else if result.is_timed_out() {
        "timed_out"
    } else if result.is_proposal() {
        "proposal"
    } else if result.ok {
        "ok"
    } else {
        "error"
    }
}

/// Brings a counter up to a total counted elsewhere.
fn catch_up(counter: &Counter, total: u64) {
    let counted = counter.get();
    counter.inc_by(total.saturating_sub(counted));
}

/// The standard `process_*` metrics, read from `/proc` at each scrape (Linux; nothing
/// elsewhere): CPU seconds, resident and virtual memory, open and maximum descriptors, start
/// time.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(process) = process::read() else {
            return Ok(());
        };
        let counter = ConstCounter::new(process.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            counter.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 5] = [
            ("process_resident_memory_bytes", "Resident memory size in bytes", process.resident_bytes as f64),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", process.virtual_bytes as f64),
            ("process_open_fds", "Open file descriptors", process.open_fds as f64),
            ("process_max_fds", "Limit of open file descriptors", process.max_fds as f64),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                process.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Reading this process's figures from `/proc/self`.
mod process {
    /// One reading.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Process {
        pub cpu_seconds: f64,
        pub resident_bytes: u64,
        pub virtual_bytes: u64,
        pub open_fds: u64,
        pub max_fds: u64,
        pub start_time_seconds: f64,
    }

    /// Reads `/proc/self/stat`, `/proc/self/status`, `/proc/self/fd` and `/proc/stat`; `None`
    /// where there is no `/proc`.
    pub fn read() -> Option<Process> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let fields = parse_stat(&stat)?;
        let ticks = ticks_per_second();
        let boot_time: f64 = boot.lines().find_map(|line| line.strip_prefix("btime "))?.trim().parse().ok()?;
        let resident_kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let open_fds = std::fs::read_dir("/proc/self/fd").map(|dir| dir.count() as u64).unwrap_or(0);
        Some(Process {
            cpu_seconds: (fields.utime + fields.stime) as f64 / ticks,
            resident_bytes: resident_kib * 1024,
            virtual_bytes: fields.vsize,
            open_fds,
            max_fds: max_fds(),
            start_time_seconds: boot_time + fields.starttime as f64 / ticks,
        })
    }

    /// The fields of `/proc/self/stat` used here.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Stat {
        pub utime: u64,
        pub stime: u64,
        pub starttime: u64,
        pub vsize: u64,
    }

    /// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
    /// spaces and parentheses itself: fields are counted from its last `)`.
    pub fn parse_stat(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        // `rest` starts at field 3 (state).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        Some(Stat { utime: field(14)?, stime: field(15)?, starttime: field(22)?, vsize: field(23)? })
    }

    #[cfg(unix)]
    fn ticks_per_second() -> f64 {
        rustix::param::clock_ticks_per_second() as f64
    }

    #[cfg(not(unix))]
    fn ticks_per_second() -> f64 {
        100.0
    }

    #[cfg(unix)]
    fn max_fds() -> u64 {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX)
    }

    #[cfg(not(unix))]
    fn max_fds() -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, for a log layer under test.
    #[derive(Clone, Default)]
    struct Buffer(Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_carry_the_request_span_but_not_the_export_only_ones() {
        use tracing_subscriber::filter::filter_fn;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::Layer;

        let buffer = Buffer::default();
        let writer = buffer.clone();
        let logs = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .with_filter(filter_fn(is_logged));
        let made = tracing::subscriber::with_default(tracing_subscriber::registry().with(logs), || {
            let request = tracing::info_span!("http.request", http.route = "/api/devices/{id}/calls");
            let _request = request.enter();
            let dispatch = tracing::info_span!("api.dispatch", tool = "stat");
            let made = !dispatch.is_disabled();
            dispatch.in_scope(|| tracing::warn!(device_id = "d1", "inside the dispatch"));
            made
        });
        let text = String::from_utf8(buffer.0.lock().clone()).expect("UTF-8");
        assert!(!made, "no layer wants an export-only span: it is not made");
        assert!(text.contains("inside the dispatch") && text.contains("device_id=\"d1\""), "{text}");
        assert!(text.contains("http.request{") && text.contains("/api/devices/{id}/calls"), "{text}");
        assert!(!text.contains("api.dispatch") && !text.contains("tool="), "{text}");
    }

    #[test]
    fn proc_stat_is_parsed_past_odd_command_names() {
        let line =
            "4242 (disp (a) b) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 12 0 123456 987654321 2000 \
                    18446744073709551615 1 1 0 0 0 0 0 4096 17664 0 0 0 17 1 0 0 0 0 0";
        let stat = process::parse_stat(line).expect("parses");
        assert_eq!(stat, process::Stat { utime: 250, stime: 75, starttime: 123456, vsize: 987654321 });
        assert!(process::parse_stat("garbage").is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_rendered() {
        let text = Metrics::new().render(Snapshot::default()).expect("encodes");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing: {text}");
        }
    }

    #[test]
    fn trace_contexts() {
        for _ in 0..100 {
            assert!(is_traceparent(&new_traceparent()));
        }
        let valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(is_traceparent(valid));
        for bad in [
            "",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert!(!is_traceparent(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn outcomes_are_counted() {
        let metrics = Metrics::new();
        metrics.observe_dispatch(async { HostResult::offline("c") }).await;
        metrics.observe_dispatch(async { HostResult::success("c", serde_json::json!(1)) }).await;
        let snapshot = Snapshot { streams: 3, pending: 1, broker_up: true, ..Snapshot::default() };
        let text = metrics.render(snapshot).expect("encodes");
        assert!(text.contains("dispatcher_dispatches_total{outcome=\"offline\"} 1"), "{text}");
        assert!(text.contains("dispatcher_dispatch_duration_seconds_count{outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("dispatcher_build_info{version=\""), "{text}");
        assert!(text.contains("dispatcher_draining 0"), "{text}");
        assert!(text.contains("dispatcher_dispatches_total{outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("dispatcher_device_streams 3"), "{text}");
        assert!(text.contains("dispatcher_pending_calls 1"), "{text}");
    }
}
