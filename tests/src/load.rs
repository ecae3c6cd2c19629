//! A load generator for the measurement tools: a closed loop ([`closed_loop`]: N calls in
//! flight, each worker starting its next call when the last one answered) and an open loop
//! ([`open_loop`]: calls started at a fixed rate whatever the answers, latency counted from the
//! scheduled start so a stall is not hidden). Both drive any async call (`Fn(seq) -> Outcome`),
//! so the baselines and the dispatcher are measured by the same code; [`CallTarget`] is the
//! dispatcher's control API (`POST /api/devices/{id}/calls`), round robin over replicas and
//! devices the way a load balancer would spread an app backend's requests.
//!
//! A [`LoadReport`] has the latency percentiles (p50/p90/p99/max) of the calls that succeeded,
//! the throughput, and every other answer counted by kind: `offline` (503), `timed out` (504),
//! `http <status>`, `transport <kind>`.
//!
//! Not here: devices (see [`crate::swarm`]). Traffic goes only to 127.0.0.0/8.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How one call ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// The device's result (`ok` true or false: the tool answered).
    Ok,
    /// 503 `device offline`.
    Offline,
    /// 504 `device timed out`.
    TimedOut,
    /// Any other HTTP status.
    Http(u16),
    /// No HTTP answer: `connect`, `timeout`, `body`, `request`.
    Transport(&'static str),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok => write!(f, "ok"),
            Self::Offline => write!(f, "offline"),
            Self::TimedOut => write!(f, "timed out"),
            Self::Http(status) => write!(f, "http {status}"),
            Self::Transport(kind) => write!(f, "transport {kind}"),
        }
    }
}

/// Sorted latencies with percentiles.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The samples, shortest first.
    pub fn sorted(&self) -> &[Duration] {
        &self.sorted
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The `p`th percentile (0–100), nearest rank; zero when empty.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn p50(&self) -> Duration {
        self.percentile(50.0)
    }

    pub fn p90(&self) -> Duration {
        self.percentile(90.0)
    }

    pub fn p99(&self) -> Duration {
        self.percentile(99.0)
    }

    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }

    pub fn mean(&self) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        self.sorted.iter().sum::<Duration>() / u32::try_from(self.sorted.len()).unwrap_or(u32::MAX)
    }

    /// `p50 … p90 … p99 … max …` in milliseconds.
    pub fn summary(&self) -> String {
        format!("p50 {} p90 {} p99 {} max {}", ms(self.p50()), ms(self.p90()), ms(self.p99()), ms(self.max()))
    }
}

/// A duration in milliseconds with three decimals (`0.412 ms`).
pub fn ms(duration: Duration) -> String {
    format!("{:.3} ms", duration.as_secs_f64() * 1000.0)
}

/// What a load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// From the first call's start to the last call's end.
    pub elapsed: Duration,
    /// Latencies of the calls that answered [`Outcome::Ok`].
    pub ok: Latencies,
    /// Latencies of every call, whatever its outcome.
    pub all: Latencies,
    /// Calls by outcome.
    pub outcomes: BTreeMap<Outcome, u64>,
    /// Open loop only: calls not started because too many were outstanding.
    pub skipped: u64,
}

impl LoadReport {
    fn from_samples(samples: Vec<(Duration, Outcome)>, elapsed: Duration, skipped: u64) -> Self {
        let mut outcomes = BTreeMap::new();
        let mut ok = Vec::new();
        let mut all = Vec::with_capacity(samples.len());
        for (latency, outcome) in samples {
            if outcome == Outcome::Ok {
                ok.push(latency);
            }
            all.push(latency);
            *outcomes.entry(outcome).or_insert(0) += 1;
        }
        Self { elapsed, ok: Latencies::new(ok), all: Latencies::new(all), outcomes, skipped }
    }

    /// Calls that answered [`Outcome::Ok`].
    pub fn succeeded(&self) -> u64 {
        self.outcomes.get(&Outcome::Ok).copied().unwrap_or(0)
    }

    /// Calls that answered anything else.
    pub fn failed(&self) -> u64 {
        self.outcomes.iter().filter(|(outcome, _)| **outcome != Outcome::Ok).map(|(_, n)| n).sum()
    }

    /// Successful calls per second.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        self.succeeded() as f64 / secs
    }

    /// Failures by kind, `offline 3, http 500 1`; `none` when there were none.
    pub fn errors(&self) -> String {
        let parts: Vec<String> = self
            .outcomes
            .iter()
            .filter(|(outcome, _)| **outcome != Outcome::Ok)
            .map(|(outcome, n)| format!("{outcome} {n}"))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }

    /// One line: count, throughput, percentiles, errors.
    pub fn summary(&self) -> String {
        format!(
            "{} ok in {:.2} s = {:.0}/s; {}; errors: {}{}",
            self.succeeded(),
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.ok.summary(),
            self.errors(),
            if self.skipped > 0 {
                format!(" ({} not started: too many outstanding)", self.skipped)
            } else {
                String::new()
            }
        )
    }
}

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many calls were started.
    Calls(u64),
    /// No call starts after this long.
    After(Duration),
}

/// `in_flight` workers, each calling `call(seq)` again as soon as its last call answered,
/// until `stop`. `seq` counts calls from 0 across all workers.
pub async fn closed_loop<F, Fut>(in_flight: usize, stop: Stop, call: F) -> LoadReport
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let call = call.clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                match stop {
                    Stop::Calls(n) if seq >= n => break,
                    Stop::After(limit) if started.elapsed() >= limit => break,
                    _ => {}
                }
                let begun = Instant::now();
                let outcome = call(seq).await;
                samples.push((begun.elapsed(), outcome));
            }
            samples
        });
    }
    let mut samples = Vec::new();
    while let Some(done) = workers.join_next().await {
        if let Ok(mut part) = done {
            samples.append(&mut part);
        }
    }
    LoadReport::from_samples(samples, started.elapsed(), 0)
}

/// Starts `call(seq)` `rate` times a second for `duration`, whatever the answers; at most
/// `max_outstanding` calls wait at once (a call that would exceed it is counted in `skipped`,
/// not started). Latency runs from each call's scheduled start.
pub async fn open_loop<F, Fut>(rate: f64, duration: Duration, max_outstanding: usize, call: F) -> LoadReport
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let call = Arc::new(call);
    let outstanding = Arc::new(AtomicUsize::new(0));
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let total = (duration.as_secs_f64() * rate).floor() as u64;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut skipped = 0;
    let mut samples = Vec::with_capacity(usize::try_from(total).unwrap_or(0).min(1 << 20));
    for seq in 0..total {
        let scheduled = started + period.mul_f64(seq as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        while let Some(done) = tasks.try_join_next() {
            if let Ok(sample) = done {
                samples.push(sample);
            }
        }
        if outstanding.load(Ordering::Acquire) >= max_outstanding {
            skipped += 1;
            continue;
        }
        outstanding.fetch_add(1, Ordering::AcqRel);
        let call = call.clone();
        let outstanding = outstanding.clone();
        tasks.spawn(async move {
            let outcome = call(seq).await;
            outstanding.fetch_sub(1, Ordering::AcqRel);
            (scheduled.elapsed(), outcome)
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(sample) = done {
            samples.push(sample);
        }
    }
    LoadReport::from_samples(samples, started.elapsed(), skipped)
}

/// A call's outcome with what the control API answered.
#[derive(Debug, Clone)]
pub struct CallAnswer {
    pub outcome: Outcome,
    /// The `callId` of the HostResult, when the answer had one.
    pub call_id: Option<String>,
    /// The replica index the call was sent to.
    pub replica: usize,
    pub latency: Duration,
}

/// The control API's `POST /api/devices/{id}/calls` as a load target: call `seq` goes to
/// replica `seq % replicas` and device `seq % devices`.
#[derive(Debug, Clone)]
pub struct CallTarget {
    client: reqwest::Client,
    replicas: Arc<Vec<String>>,
    token: Arc<str>,
    devices: Arc<Vec<String>>,
    /// The request body, the same for every call.
    body: bytes::Bytes,
    timeout: Duration,
}

impl CallTarget {
    /// Calls of `tool` with `input` and `timeout_ms`, with the api token `token`.
    pub fn new(
        replicas: Vec<String>,
        token: &str,
        devices: Vec<String>,
        tool: &str,
        input: Value,
        timeout_ms: u64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!replicas.is_empty() && !devices.is_empty(), "a call target needs replicas and devices");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let body = serde_json::to_vec(&serde_json::json!({"tool": tool, "input": input, "timeoutMs": timeout_ms}))?;
        Ok(Self {
            client,
            replicas: Arc::new(replicas),
            token: token.into(),
            devices: Arc::new(devices),
            body: body.into(),
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    /// The same calls against other devices.
    pub fn with_devices(&self, devices: Vec<String>) -> Self {
        Self { devices: Arc::new(devices), ..self.clone() }
    }

    /// The calls' `timeoutMs`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Call number `seq`. The HTTP request gives up at the call's timeout plus 5 s.
    pub async fn call(&self, seq: u64) -> CallAnswer {
        let replica = (seq % self.replicas.len() as u64) as usize;
        let device = &self.devices[(seq % self.devices.len() as u64) as usize];
        self.call_on(replica, device).await
    }

    /// One call to `device` through replica `replica`.
    pub async fn call_on(&self, replica: usize, device: &str) -> CallAnswer {
        let started = Instant::now();
        let url = format!("{}/api/devices/{device}/calls", self.replicas[replica]);
        let sent = self
            .client
            .post(url)
            .bearer_auth(&*self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(self.body.clone())
            .timeout(self.timeout + Duration::from_secs(5))
            .send()
            .await;
        let (outcome, call_id) = match sent {
            Err(error) => (Outcome::Transport(transport_kind(&error)), None),
            Ok(response) => {
                let status = response.status().as_u16();
                match response.bytes().await {
                    Err(error) => (Outcome::Transport(transport_kind(&error)), None),
                    Ok(bytes) => {
                        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        let call_id = body["callId"].as_str().map(str::to_owned);
                        let outcome = match status {
                            200 => Outcome::Ok,
                            503 if body["error"] == protocol::ERROR_DEVICE_OFFLINE => Outcome::Offline,
                            504 if body["error"] == protocol::ERROR_DEVICE_TIMED_OUT => Outcome::TimedOut,
                            other => Outcome::Http(other),
                        };
                        (outcome, call_id)
                    }
                }
            }
        };
        CallAnswer { outcome, call_id, replica, latency: started.elapsed() }
    }
}

fn transport_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else {
        "request"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let latencies = Latencies::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(latencies.p50(), Duration::from_millis(50));
        assert_eq!(latencies.p90(), Duration::from_millis(90));
        assert_eq!(latencies.p99(), Duration::from_millis(99));
        assert_eq!(latencies.max(), Duration::from_millis(100));
        assert_eq!(Latencies::default().p99(), Duration::ZERO);
        assert_eq!(Latencies::new(vec![Duration::from_millis(7)]).p50(), Duration::from_millis(7));
    }

    #[test]
    fn reports_count_errors_by_kind() {
        let samples = vec![
            (Duration::from_millis(1), Outcome::Ok),
            (Duration::from_millis(2), Outcome::Offline),
            (Duration::from_millis(3), Outcome::Http(500)),
            (Duration::from_millis(4), Outcome::Ok),
        ];
        let report = LoadReport::from_samples(samples, Duration::from_secs(1), 0);
        assert_eq!(report.succeeded(), 2);
        assert_eq!(report.failed(), 2);
        assert_eq!(report.errors(), "offline 1, http 500 1");
        assert_eq!(report.ok.max(), Duration::from_millis(4));
        assert!((report.throughput() - 2.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn loops_run_and_stop() {
        let closed = closed_loop(4, Stop::Calls(40), |seq| async move {
            if seq % 10 == 0 {
                Outcome::TimedOut
            } else {
                Outcome::Ok
            }
        })
        .await;
        assert_eq!(closed.succeeded() + closed.failed(), 40);
        assert_eq!(closed.outcomes.get(&Outcome::TimedOut), Some(&4));
        let open = open_loop(200.0, Duration::from_millis(100), 100, |_| async { Outcome::Ok }).await;
        assert_eq!(open.succeeded(), 20);
    }
}
