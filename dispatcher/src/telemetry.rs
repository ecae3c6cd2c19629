//! Telemetry: log setup for the binary and the Prometheus metrics served at `/metrics`
//! (dispatches by outcome, dispatch latency, device streams, pending calls, broker state).

use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocol::HostResult;

/// Logs to stderr; `RUST_LOG` filters (default `info`), `LOG_FORMAT=json` for JSON lines.
pub fn init_logging() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // Already initialised (tests, embedding apps): keep theirs.
    drop(result);
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

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    dispatches: Family<Outcome, Counter>,
    latency: Histogram,
    streams: Gauge<i64, AtomicI64>,
    pending: Gauge<i64, AtomicI64>,
    broker_up: Gauge<i64, AtomicI64>,
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
        Self { registry, dispatches, latency, streams, pending, broker_up }
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
