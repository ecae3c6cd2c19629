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
use std::sync::atomic::AtomicI64;
use std::time::Instant;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

/// Logs to stderr (`RUST_LOG` filters, default `info`; `LOG_FORMAT=json` for JSON lines), and
/// exports traces over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(replica_id: &str) -> TelemetryGuard {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, EnvFilter, Layer};

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json");
    let logs = if json {
        fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    // The exporter's HTTP client is a blocking one, which must not be built (or dropped) on
    // an async runtime's thread: build it on a thread of its own.
    let replica_id = replica_id.to_owned();
    let built = std::thread::spawn(move || otlp_provider(&replica_id)).join().unwrap_or(None);
    let (provider, traces) = match built {
        Some(Ok(provider)) => {
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("dispatcher"));
            (Some(provider), Some(layer))
        }
        Some(Err(error)) => {
            eprintln!("dispatcher: OTLP export disabled: {error}");
            (None, None)
        }
        None => (None, None),
    };
    // Already initialised (tests, embedding apps): keep theirs.
    let _ = tracing_subscriber::registry().with(filter).with(logs).with(traces).try_init();
    TelemetryGuard { provider }
}

/// Logs only, for tests and tools.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

fn otlp_provider(replica_id: &str) -> Option<Result<SdkTracerProvider, String>> {
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
        Ok(exporter) => exporter,
        Err(error) => return Some(Err(error.to_string())),
    };
    let resource = Resource::builder()
        .with_service_name("dispatcher")
        .with_attribute(KeyValue::new("service.instance.id", replica_id.to_owned()))
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Some(Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()))
}

/// Makes `span` a child of the trace context in `traceparent` (when spans are exported).
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|t| is_traceparent(t)) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// The `traceparent` of `span` when spans are exported, else `fallback` (the caller's, passed
/// on as it came) or a new one.
pub fn traceparent_of(span: &tracing::Span, fallback: Option<&str>) -> String {
    let context = span.context();
    let span_ref = context.span();
    let own = span_ref.span_context();
    if own.is_valid() {
        return format!("00-{}-{}-{:02x}", own.trace_id(), own.span_id(), own.trace_flags().to_u8());
    }
    fallback.filter(|t| is_traceparent(t)).map_or_else(new_traceparent, str::to_owned)
}

/// True for a well-formed W3C `traceparent` (version 00): `00-<32 hex>-<16 hex>-<2 hex>`, with
/// neither id all zeros.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
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

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    dispatches: Family<Outcome, Counter>,
    latency: Histogram,
    streams: Gauge<i64, AtomicI64>,
    pending: Gauge<i64, AtomicI64>,
    broker_up: Gauge<i64, AtomicI64>,
    connections_open: Gauge<i64, AtomicI64>,
    connections_refused: Family<Reason, Counter>,
    connections_closed: Family<Reason, Counter>,
    accept_errors: Counter,
    stream_queue_bytes: Gauge<i64, AtomicI64>,
    stuck_streams: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dispatcher");
        let dispatches = Family::<Outcome, Counter>::default();
        registry.register("dispatches", "Dispatches by outcome", dispatches.clone());
        let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let latency = Histogram::new(buckets);
        registry.register("dispatch_duration_seconds", "Time from dispatch to its answer", latency.clone());
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
        Self {
            registry,
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

    /// Runs a dispatch and records its outcome and latency.
    pub async fn observe_dispatch(&self, dispatch: impl Future<Output = HostResult>) -> HostResult {
        let started = Instant::now();
        let result = dispatch.await;
        let outcome = if result.is_offline() {
            "offline"
        } else if result.is_timed_out() {
            "timed_out"
        } else if result.is_proposal() {
            "proposal"
        } else if result.ok {
            "ok"
        } else {
            "error"
        };
        self.dispatches.get_or_create(&Outcome { outcome }).inc();
        self.latency.observe(started.elapsed().as_secs_f64());
        result
    }

    /// Records the streams' queue figures (read from the hub before [`Metrics::render`]):
    /// bytes queued now, and the streams dropped for not draining so far.
    pub fn set_stream_queues(&self, queued_bytes: usize, stuck_streams: u64) {
        self.stream_queue_bytes.set(i64::try_from(queued_bytes).unwrap_or(i64::MAX));
        let counted = self.stuck_streams.get();
        self.stuck_streams.inc_by(stuck_streams.saturating_sub(counted));
    }

    /// Registers the call log writer's counters: records written, and dropped by reason.
    pub fn register_call_log(&mut self, counters: &crate::calllog::Counters) {
        self.registry.register("call_log_written", "Call log records stored", counters.written.clone());
        self.registry.register(
            "call_log_dropped",
            "Call log records lost: queue_full (the writer fell behind), database (the database refused them)",
            counters.dropped.clone(),
        );
    }

    /// The text exposition, with the gauges read now.
    pub fn render(&self, streams: usize, pending: usize, broker_up: bool) -> Result<String, std::fmt::Error> {
        self.streams.set(i64::try_from(streams).unwrap_or(i64::MAX));
        self.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.broker_up.set(i64::from(broker_up));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = metrics.render(3, 1, true).expect("encodes");
        assert!(text.contains("dispatcher_dispatches_total{outcome=\"offline\"} 1"), "{text}");
        assert!(text.contains("dispatcher_dispatches_total{outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("dispatcher_device_streams 3"), "{text}");
        assert!(text.contains("dispatcher_pending_calls 1"), "{text}");
    }
}
