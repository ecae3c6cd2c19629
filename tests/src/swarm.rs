//! A swarm: thousands of simulated devices in one process, each speaking the device side of
//! the contract for real, for the measurement tools (`bench`, `chaos`).
//!
//! - Enrollment is real ([`enroll_many`]): a pairing code per device from the control API, then
//!   `POST /api/host/enroll`. The dispatcher's enrollment limiter allows 10 attempts per client
//!   address at once, so devices enroll from distinct loopback source addresses (127.0.0.2,
//!   127.0.0.3, …: Linux routes all of 127/8 to `lo`), ten devices per address.
//! - Streams are real: one raw HTTP/1.1 connection per device (`GET /api/host/stream`, chunked
//!   body, SSE frames), read by ONE tokio task per device with a small buffer, so the client side
//!   costs little. The task also runs the device's calls (a configurable tool latency) and POSTs
//!   their results (a configurable size) through one shared, pooled HTTP client.
//! - Streams are spread over the replicas like a load balancer would ([`Placement`]): round
//!   robin over the replicas not recently seen refusing connections (passive health checks).
//! - Every call id a device executes is counted, so a call pushed twice is visible
//!   ([`Swarm::double_executions`]).
//! - A stream that ends is reopened the way `host-agent` does it (host-agent/src/backoff.rs):
//!   full jitter in `[0, min(cap, base·2^n)]` after a loss, at most `min(base, 1 s)` after a
//!   `reconnect` frame (none after a `rebalance` one, which the server paces), at least the
//!   `Retry-After` of a 503 plus that jitter, the count reset after a stream stayed up for
//!   `max(cap, 10 s)`. The time of every `ready` is recorded, so recovery after a kill can be
//!   measured.
//!
//! Not here: load (see [`crate::load`]), processes (see [`crate::process`]). Traffic goes only
//! to 127.0.0.0/8.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BytesMut};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::device::{Control, TestDevice};
use crate::sse;

/// Devices enrolled from one loopback source address (the limiter's burst per address).
pub const DEVICES_PER_ADDRESS: usize = 10;
/// host-agent's pause before answering a `reconnect` frame is at most this.
const RECONNECT_JITTER: Duration = Duration::from_secs(1);
/// How long a replica that refused a connection is skipped by [`Placement::Balanced`].
const DOWN_FOR: Duration = Duration::from_secs(1);
/// Largest response head read from a stream.
const MAX_HEAD: usize = 16 * 1024;
/// Initial read buffer of a stream.
const READ_BUFFER: usize = 2048;

/// The `index`th loopback source address, from 127.0.0.2 upwards, skipping addresses ending
/// in .0 and .255.
pub fn source_addr(index: usize) -> Ipv4Addr {
    // 127.0.0.2 ..= 127.0.0.254, then 254 usable addresses (.1 ..= .254) per /24 block.
    if index < 253 {
        return Ipv4Addr::new(127, 0, 0, 2 + index as u8);
    }
    let rest = index - 253;
    let block = 1 + rest / 254;
    let [_, _, hi, lo] = u32::try_from(block).unwrap_or(u32::MAX).min(0xFFFF).to_be_bytes();
    Ipv4Addr::new(127, hi, lo, 1 + (rest % 254) as u8)
}

/// The source address of device `index` (ten devices per address).
pub fn device_addr(index: usize) -> Ipv4Addr {
    source_addr(index / DEVICES_PER_ADDRESS)
}

/// Enrolls `count` devices: a pairing code per device from `control`, then `POST
/// /api/host/enroll` round robin over `replicas`, from device `i`'s source address
/// ([`device_addr`]). `first_index` offsets the addresses so several batches in one process
/// use fresh ones. At most `concurrency` enrollments run at once.
pub async fn enroll_many(
    replicas: &[String],
    control: &Control,
    count: usize,
    first_index: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<TestDevice>> {
    anyhow::ensure!(!replicas.is_empty(), "no replica to enroll with");
    let clients: Arc<Mutex<HashMap<Ipv4Addr, reqwest::Client>>> = Arc::default();
    let results = futures::stream::iter(0..count)
        .map(|i| {
            let clients = clients.clone();
            let base = replicas[i % replicas.len()].clone();
            let control = control.clone();
            async move {
                let addr = device_addr(first_index + i);
                let client = clients
                    .lock()
                    .entry(addr)
                    .or_insert_with(|| {
                        reqwest::Client::builder()
                            .local_address(IpAddr::V4(addr))
                            .timeout(Duration::from_secs(60))
                            .build()
                            .expect("reqwest client")
                    })
                    .clone();
                let code = control.pairing_code().await?;
                let body = json!({"code": code, "name": format!("swarm-{}", first_index + i)});
                let response = client
                    .post(format!("{base}/api/host/enroll"))
                    .json(&body)
                    .send()
                    .await
                    .with_context(|| format!("enrolling from {addr}"))?;
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                if status != StatusCode::CREATED {
                    bail!("enroll from {addr} answered {status}: {body}");
                }
                let device_id = body["deviceId"].as_str().ok_or_else(|| anyhow!("enroll without deviceId"))?;
                let token = body["token"].as_str().ok_or_else(|| anyhow!("enroll without token"))?;
                Ok(TestDevice { device_id: device_id.into(), token: token.into() })
            }
        })
        .buffered(concurrency.max(1))
        .collect::<Vec<anyhow::Result<TestDevice>>>()
        .await;
    results.into_iter().collect()
}

/// Where a device opens its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Always replica `i`, whatever happens.
    Pinned(usize),
    /// Replica `i` first, then [`Placement::Balanced`] once that stream ends.
    StartOn(usize),
    /// Round robin over every replica not seen refusing connections in the last second, like
    /// a load balancer with passive health checks.
    Balanced,
}

/// Where a device POSTs its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostTo {
    /// The replica its stream is on.
    Stream,
    /// Replica `i` (retries move round robin).
    Pinned(usize),
    /// Round robin over the replicas.
    Balanced,
}

/// How the simulated devices behave.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Base URLs (`http://127.x.y.z:port`) of the replicas.
    pub replicas: Vec<String>,
    pub placement: Placement,
    pub post_to: PostTo,
    /// How long a tool runs before its result is posted.
    pub tool_latency: Duration,
    /// Bytes of filler in every result.
    pub result_bytes: usize,
    /// host-agent's `--backoff-base-ms` (default 1 s).
    pub backoff_base: Duration,
    /// host-agent's `--max-backoff-ms` (default 30 s).
    pub backoff_cap: Duration,
    /// A stream silent this long is dead (host-agent: two keepalive intervals).
    pub silence: Duration,
    /// Longest a TCP connect plus the response head plus `ready` may take.
    pub open_timeout: Duration,
    /// Tries of a result POST (moving round robin after the first) on transport errors and 5xx.
    pub post_attempts: u32,
    /// Pause between starting two devices, so thousands of connects do not overflow the
    /// server's accept queue.
    pub start_interval: Duration,
    /// Record when each call arrived and when its result POST was answered
    /// ([`Swarm::timing`]), to break a call's latency into legs.
    pub record_timings: bool,
}

impl SwarmConfig {
    /// host-agent's defaults: backoff from 1 s capped at 30 s, 30 s of silence, results to
    /// the stream's replica, an immediate tool with a small result.
    pub fn new(replicas: Vec<String>) -> Self {
        Self {
            replicas,
            placement: Placement::Balanced,
            post_to: PostTo::Stream,
            tool_latency: Duration::ZERO,
            result_bytes: 64,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            silence: Duration::from_secs(30),
            open_timeout: Duration::from_secs(10),
            post_attempts: 3,
            start_interval: Duration::from_micros(200),
            record_timings: false,
        }
    }
}

/// Counters of a running swarm.
#[derive(Debug, Default)]
struct Counters {
    opens: AtomicU64,
    open_failures: AtomicU64,
    refused: AtomicU64,
    losses: AtomicU64,
    silences: AtomicU64,
    unavailable: AtomicU64,
    reconnect_frames: AtomicU64,
    rebalance_frames: AtomicU64,
    superseded: AtomicU64,
    revoked: AtomicU64,
    calls: AtomicU64,
    posts_delivered: AtomicU64,
    posts_unknown: AtomicU64,
    posts_forbidden: AtomicU64,
    posts_failed: AtomicU64,
    post_retries: AtomicU64,
}

/// A snapshot of the swarm's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwarmStats {
    /// Streams that reached `ready`.
    pub opens: u64,
    /// Stream opens that failed (refused, timed out, non-200).
    pub open_failures: u64,
    /// Of those, connections refused.
    pub refused: u64,
    /// Streams that ended by EOF or error.
    pub losses: u64,
    /// Streams given up after the silence limit.
    pub silences: u64,
    /// Stream opens answered 503 (a replica full, draining or stalled).
    pub unavailable: u64,
    pub reconnect_frames: u64,
    /// Of the `reconnect` frames, those with reason `rebalance`.
    pub rebalance_frames: u64,
    pub superseded: u64,
    pub revoked: u64,
    /// `call` frames received (each executed).
    pub calls: u64,
    pub posts_delivered: u64,
    /// Result POSTs answered 404 (the call was over).
    pub posts_unknown: u64,
    pub posts_forbidden: u64,
    /// Result POSTs that failed every try.
    pub posts_failed: u64,
    pub post_retries: u64,
}

/// When a call arrived, and when its result POST was answered.
type CallTiming = (Instant, Option<Instant>);

/// One device's state, readable from outside its task.
#[derive(Debug)]
struct DeviceState {
    /// The replica its live stream is on, `usize::MAX` when none.
    replica: AtomicUsize,
    /// Microseconds since the swarm started of its latest `ready` (0: never).
    last_ready_us: AtomicU64,
    stopped: AtomicBool,
}

struct Shared {
    config: SwarmConfig,
    addrs: Vec<SocketAddr>,
    hosts: Vec<String>,
    started: Instant,
    round_robin: AtomicUsize,
    /// Per replica: microseconds since start until which it is skipped.
    down_until_us: Vec<AtomicU64>,
    client: reqwest::Client,
    executed: Mutex<HashMap<Box<str>, u32>>,
    devices: Vec<DeviceState>,
    online: AtomicUsize,
    counters: Counters,
    filler: String,
    /// The latest reason a stream could not be opened, for diagnostics.
    last_open_error: Mutex<String>,
    /// Call id to (arrived, result POST answered), when recording.
    timings: Mutex<HashMap<Box<str>, CallTiming>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX).max(1)
    }

    fn pick_balanced(&self) -> usize {
        let n = self.addrs.len();
        let now = self.now_us();
        for _ in 0..n {
            let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % n;
            if self.down_until_us[i].load(Ordering::Relaxed) <= now {
                return i;
            }
        }
        self.round_robin.fetch_add(1, Ordering::Relaxed) % n
    }

    fn mark_down(&self, replica: usize) {
        let until = self.now_us() + u64::try_from(DOWN_FOR.as_micros()).unwrap_or(u64::MAX);
        self.down_until_us[replica].store(until, Ordering::Relaxed);
    }

    fn stream_replica(&self, opened_before: bool) -> usize {
        match self.config.placement {
            Placement::Pinned(i) => i % self.addrs.len(),
            Placement::StartOn(i) if !opened_before => i % self.addrs.len(),
            Placement::StartOn(_) | Placement::Balanced => self.pick_balanced(),
        }
    }

    fn post_replica(&self, stream: usize, attempt: u32) -> usize {
        let n = self.addrs.len();
        let first = match self.config.post_to {
            PostTo::Stream => stream,
            PostTo::Pinned(i) => i % n,
            PostTo::Balanced => return self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
        };
        (first + attempt as usize) % n
    }
}

/// A running swarm. Dropping it stops every device (their connections close).
pub struct Swarm {
    shared: Arc<Shared>,
    ids: Vec<String>,
    cancel: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Swarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm").field("devices", &self.ids.len()).field("online", &self.online()).finish()
    }
}

fn parse_base(base: &str) -> anyhow::Result<(SocketAddr, String)> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{base}: only http:// replicas are supported"))?
        .trim_end_matches('/');
    let addr: SocketAddr = authority.parse().with_context(|| format!("{base}: expected http://<ip>:<port>"))?;
    anyhow::ensure!(addr.ip().is_loopback(), "{base}: the swarm only talks to 127.0.0.0/8");
    Ok((addr, authority.to_owned()))
}

impl Swarm {
    /// Starts one task per device (spaced by `start_interval`); returns at once. Use
    /// [`Swarm::wait_online`] to wait for the streams.
    pub fn start(devices: Vec<TestDevice>, config: SwarmConfig) -> anyhow::Result<Swarm> {
        Self::start_at(devices, 0, config)
    }

    /// As [`Swarm::start`], device `i` connecting from [`device_addr`]`(first_index + i)`.
    pub fn start_at(devices: Vec<TestDevice>, first_index: usize, config: SwarmConfig) -> anyhow::Result<Swarm> {
        anyhow::ensure!(!config.replicas.is_empty(), "a swarm needs a replica");
        let mut addrs = Vec::new();
        let mut hosts = Vec::new();
        for base in &config.replicas {
            let (addr, host) = parse_base(base)?;
            addrs.push(addr);
            hosts.push(host);
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()
            .context("reqwest client")?;
        let shared = Arc::new(Shared {
            down_until_us: addrs.iter().map(|_| AtomicU64::new(0)).collect(),
            addrs,
            hosts,
            started: Instant::now(),
            round_robin: AtomicUsize::new(0),
            client,
            executed: Mutex::default(),
            devices: devices
                .iter()
                .map(|_| DeviceState {
                    replica: AtomicUsize::new(usize::MAX),
                    last_ready_us: AtomicU64::new(0),
                    stopped: AtomicBool::new(false),
                })
                .collect(),
            online: AtomicUsize::new(0),
            counters: Counters::default(),
            filler: "x".repeat(config.result_bytes),
            last_open_error: Mutex::default(),
            timings: Mutex::default(),
            config,
        });
        let cancel = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let ids = devices.iter().map(|d| d.device_id.clone()).collect();
        let interval = shared.config.start_interval;
        let starter = {
            let shared = shared.clone();
            let cancel = cancel.clone();
            let tasks = tasks.clone();
            async move {
                let started = Instant::now();
                for (index, device) in devices.into_iter().enumerate() {
                    if cancel.is_cancelled() {
                        break;
                    }
                    let local = device_addr(first_index + index);
                    tasks.spawn(run_device(shared.clone(), index, device, local, cancel.clone()));
                    if !interval.is_zero() {
                        let due = started + interval * u32::try_from(index + 1).unwrap_or(u32::MAX);
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
            }
        };
        tasks.spawn(starter);
        Ok(Swarm { shared, ids, cancel, tasks })
    }

    /// The devices' ids, in the order they were given.
    pub fn device_ids(&self) -> &[String] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Devices with a live stream (after `ready`).
    pub fn online(&self) -> usize {
        self.shared.online.load(Ordering::Acquire)
    }

    /// Waits until at least `count` devices have a live stream; returns how long it took.
    pub async fn wait_online(&self, count: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while self.online() < count {
            if started.elapsed() > timeout {
                bail!(
                    "{} of {count} devices online after {timeout:?} ({:?}; last open error: {})",
                    self.online(),
                    self.stats(),
                    self.last_open_error()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(started.elapsed())
    }

    /// The replica index device `index`'s live stream is on.
    pub fn replica_of(&self, index: usize) -> Option<usize> {
        let replica = self.shared.devices[index].replica.load(Ordering::Acquire);
        (replica != usize::MAX).then_some(replica)
    }

    /// Indexes of the devices whose live stream is on replica `replica`.
    pub fn devices_on(&self, replica: usize) -> Vec<usize> {
        (0..self.ids.len()).filter(|&i| self.replica_of(i) == Some(replica)).collect()
    }

    /// When device `index` last got `ready`, if ever.
    pub fn last_ready(&self, index: usize) -> Option<Instant> {
        let us = self.shared.devices[index].last_ready_us.load(Ordering::Acquire);
        (us != 0).then(|| self.shared.started + Duration::from_micros(us))
    }

    /// How many times each call id was received (and executed), for the ids received twice or
    /// more.
    pub fn double_executions(&self) -> Vec<(String, u32)> {
        let executed = self.shared.executed.lock();
        let mut twice: Vec<(String, u32)> =
            executed.iter().filter(|(_, &n)| n > 1).map(|(id, &n)| (id.to_string(), n)).collect();
        twice.sort();
        twice
    }

    /// How many times call `call_id` was received.
    pub fn times_executed(&self, call_id: &str) -> u32 {
        self.shared.executed.lock().get(call_id).copied().unwrap_or(0)
    }

    /// Distinct call ids executed.
    pub fn distinct_calls(&self) -> usize {
        self.shared.executed.lock().len()
    }

    pub fn stats(&self) -> SwarmStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SwarmStats {
            opens: get(&c.opens),
            open_failures: get(&c.open_failures),
            refused: get(&c.refused),
            losses: get(&c.losses),
            silences: get(&c.silences),
            unavailable: get(&c.unavailable),
            reconnect_frames: get(&c.reconnect_frames),
            rebalance_frames: get(&c.rebalance_frames),
            superseded: get(&c.superseded),
            revoked: get(&c.revoked),
            calls: get(&c.calls),
            posts_delivered: get(&c.posts_delivered),
            posts_unknown: get(&c.posts_unknown),
            posts_forbidden: get(&c.posts_forbidden),
            posts_failed: get(&c.posts_failed),
            post_retries: get(&c.post_retries),
        }
    }

    /// When call `call_id` arrived, and when its result POST was answered (with
    /// `record_timings`).
    pub fn timing(&self, call_id: &str) -> Option<CallTiming> {
        self.shared.timings.lock().get(call_id).copied()
    }

    /// Why the latest failed stream open failed (empty when none did).
    pub fn last_open_error(&self) -> String {
        self.shared.last_open_error.lock().clone()
    }

    /// Devices whose task ended (revoked, or the swarm stopped).
    pub fn stopped_devices(&self) -> usize {
        self.shared.devices.iter().filter(|d| d.stopped.load(Ordering::Acquire)).count()
    }

    /// Stops every device and waits (at most `timeout`) for their tasks to end.
    pub async fn stop(self, timeout: Duration) {
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(timeout, self.tasks.wait()).await;
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Why opening a stream failed.
#[derive(Debug)]
enum OpenError {
    Refused,
    Unauthorized,
    /// A status other than 200 and 401, with its `Retry-After` (seconds) when it had one.
    Status(u16, Option<Duration>),
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused => write!(f, "connection refused"),
            Self::Unauthorized => write!(f, "401"),
            Self::Status(status, _) => write!(f, "status {status}"),
            Self::Other(reason) => write!(f, "{reason}"),
        }
    }
}

/// Why a live stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    Lost,
    Silent,
    /// A `reconnect` frame; `paced` for reason `rebalance`.
    Reconnect {
        paced: bool,
    },
    Superseded,
    Revoked,
    Cancelled,
}

/// How the body of a stream is framed.
#[derive(Debug, Clone, Copy)]
enum Body {
    /// Chunked: reading a size line.
    ChunkSize,
    /// Chunked: this many data bytes left in the chunk.
    ChunkData(usize),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Until the connection closes.
    UntilClose,
    Done,
}

/// One open stream: a raw HTTP/1.1 connection and its SSE parser.
struct RawStream {
    tcp: TcpStream,
    buf: BytesMut,
    body: Body,
    parser: sse::Parser,
    frames: std::collections::VecDeque<sse::Frame>,
}

impl RawStream {
    /// Connects from `local`, sends the request and reads the response head.
    async fn open(addr: SocketAddr, host: &str, local: Ipv4Addr, token: &str) -> Result<RawStream, OpenError> {
        let socket = TcpSocket::new_v4().map_err(|e| OpenError::Other(e.to_string()))?;
        socket.bind(SocketAddr::new(IpAddr::V4(local), 0)).map_err(|e| OpenError::Other(format!("bind: {e}")))?;
        let tcp = match socket.connect(addr).await {
            Ok(tcp) => tcp,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => return Err(OpenError::Refused),
            Err(error) => return Err(OpenError::Other(format!("connect: {error}"))),
        };
        let _ = tcp.set_nodelay(true);
        let mut stream = RawStream {
            tcp,
            buf: BytesMut::with_capacity(READ_BUFFER),
            body: Body::Done,
            parser: sse::Parser::new(),
            frames: Default::default(),
        };
        let request = format!(
            "GET /api/host/stream HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Accept: text/event-stream\r\n\r\n"
        );
        stream.tcp.write_all(request.as_bytes()).await.map_err(|e| OpenError::Other(format!("write: {e}")))?;
        let head_end = loop {
            if let Some(end) = find(&stream.buf, b"\r\n\r\n") {
                break end;
            }
            if stream.buf.len() > MAX_HEAD {
                return Err(OpenError::Other("response head too large".into()));
            }
            let n = stream.read_more().await.map_err(|e| OpenError::Other(format!("read head: {e}")))?;
            if n == 0 {
                return Err(OpenError::Other("connection closed before the response head".into()));
            }
        };
        let head = String::from_utf8_lossy(&stream.buf[..head_end]).into_owned();
        stream.buf.advance(head_end + 4);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| OpenError::Other(format!("bad status line in {head:?}")))?;
        match status {
            200 => {}
            401 => return Err(OpenError::Unauthorized),
            other => {
                let retry_after = head.lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim().eq_ignore_ascii_case("retry-after").then(|| value.trim().parse().ok())?
                });
                return Err(OpenError::Status(other, retry_after.map(Duration::from_secs)));
            }
        }
        let chunked = head.lines().any(|line| {
            let lower = line.to_ascii_lowercase();
            lower.starts_with("transfer-encoding:") && lower.contains("chunked")
        });
        stream.body = if chunked { Body::ChunkSize } else { Body::UntilClose };
        Ok(stream)
    }

    async fn read_more(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(READ_BUFFER);
        }
        self.tcp.read_buf(&mut self.buf).await
    }

    /// The next SSE frame; `None` when the body ended.
    async fn next_frame(&mut self) -> std::io::Result<Option<sse::Frame>> {
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(Some(frame));
            }
            if self.decode()? {
                continue;
            }
            if matches!(self.body, Body::Done) {
                return Ok(None);
            }
            if self.read_more().await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Moves what the buffer holds through the body framing into the parser. True when it
    /// produced frames.
    fn decode(&mut self) -> std::io::Result<bool> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        loop {
            match self.body {
                Body::Done => return Ok(!self.frames.is_empty()),
                Body::UntilClose => {
                    if self.buf.is_empty() {
                        return Ok(!self.frames.is_empty());
                    }
                    let data = self.buf.split();
                    self.frames.extend(self.parser.push(&data));
                }
                Body::ChunkSize => {
                    let Some(end) = find(&self.buf, b"\r\n") else {
                        if self.buf.len() > 1024 {
                            return Err(bad("chunk size line too long"));
                        }
                        return Ok(!self.frames.is_empty());
                    };
                    let line = std::str::from_utf8(&self.buf[..end]).map_err(|_| bad("chunk size not UTF-8"))?;
                    let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| bad("bad chunk size"))?;
                    self.buf.advance(end + 2);
                    self.body = if size == 0 { Body::Done } else { Body::ChunkData(size) };
                }
                Body::ChunkData(left) => {
                    if self.buf.is_empty() {
                        return Ok(!self.frames.is_empty());
                    }
                    let take = left.min(self.buf.len());
                    let data = self.buf.split_to(take);
                    self.frames.extend(self.parser.push(&data));
                    self.body = if take == left { Body::ChunkEnd } else { Body::ChunkData(left - take) };
                }
                Body::ChunkEnd => {
                    if self.buf.len() < 2 {
                        return Ok(!self.frames.is_empty());
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err(bad("missing CRLF after a chunk"));
                    }
                    self.buf.advance(2);
                    self.body = Body::ChunkSize;
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// host-agent's reconnect delays (host-agent/src/backoff.rs), for one device.
struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let window = self.base.checked_mul(factor).unwrap_or(self.cap).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        window.mul_f64(rand::random::<f64>())
    }

    fn jitter_only(&self) -> Duration {
        self.base.min(RECONNECT_JITTER).mul_f64(rand::random::<f64>())
    }

    fn stable_after(&self) -> Duration {
        self.cap.max(Duration::from_secs(10))
    }
}

type PostFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Polls `work` to completion while also driving the device's result POSTs.
async fn driving<T>(work: impl std::future::Future<Output = T>, posts: &mut FuturesUnordered<PostFuture>) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            Some(()) = posts.next(), if !posts.is_empty() => {}
        }
    }
}

/// The life of one device: open, read, execute, post, reconnect; until cancelled or revoked.
async fn run_device(shared: Arc<Shared>, index: usize, device: TestDevice, local: Ipv4Addr, cancel: CancellationToken) {
    let token: Arc<str> = device.token.into();
    let mut posts: FuturesUnordered<PostFuture> = FuturesUnordered::new();
    let config = &shared.config;
    let mut backoff =
        Backoff { base: config.backoff_base.min(config.backoff_cap), cap: config.backoff_cap, attempt: 0 };
    let mut opened_before = false;
    let counters = &shared.counters;
    loop {
        let replica = shared.stream_replica(opened_before);
        let opening = async {
            let open = RawStream::open(shared.addrs[replica], &shared.hosts[replica], local, &token);
            let mut stream = tokio::time::timeout(config.open_timeout, open)
                .await
                .map_err(|_| OpenError::Other("open timed out".into()))??;
            // The first frame must be `ready`.
            match tokio::time::timeout(config.open_timeout, stream.next_frame()).await {
                Ok(Ok(Some(frame))) if frame.event == protocol::sse::EVENT_READY => Ok(stream),
                Ok(Ok(Some(frame))) => Err(OpenError::Other(format!("first frame {:?}", frame.event))),
                Ok(Ok(None)) => Err(OpenError::Other("stream ended before ready".into())),
                Ok(Err(error)) => Err(OpenError::Other(format!("reading ready: {error}"))),
                Err(_) => Err(OpenError::Other("no ready in time".into())),
            }
        };
        let opened = tokio::select! {
            _ = cancel.cancelled() => break,
            opened = driving(opening, &mut posts) => opened,
        };
        let mut retry_after = None;
        let (end, was_up, up_for) = match opened {
            Ok(mut stream) => {
                opened_before = true;
                counters.opens.fetch_add(1, Ordering::Relaxed);
                let state = &shared.devices[index];
                state.replica.store(replica, Ordering::Release);
                state.last_ready_us.store(shared.now_us(), Ordering::Release);
                shared.online.fetch_add(1, Ordering::AcqRel);
                let up_since = Instant::now();
                let end = read_stream(&shared, &mut stream, replica, &token, &mut posts, &cancel).await;
                state.replica.store(usize::MAX, Ordering::Release);
                shared.online.fetch_sub(1, Ordering::AcqRel);
                (end, true, up_since.elapsed())
            }
            Err(error) => {
                counters.open_failures.fetch_add(1, Ordering::Relaxed);
                *shared.last_open_error.lock() = format!("{}: {error}", shared.config.replicas[replica]);
                match error {
                    OpenError::Refused => {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        shared.mark_down(replica);
                    }
                    OpenError::Unauthorized => {
                        counters.revoked.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    OpenError::Status(503, asked) => {
                        counters.unavailable.fetch_add(1, Ordering::Relaxed);
                        retry_after = asked;
                    }
                    OpenError::Status(..) | OpenError::Other(_) => {}
                }
                (StreamEnd::Lost, false, Duration::ZERO)
            }
        };
        let delay = match end {
            StreamEnd::Cancelled => break,
            StreamEnd::Revoked => {
                counters.revoked.fetch_add(1, Ordering::Relaxed);
                break;
            }
            StreamEnd::Reconnect { paced } => {
                counters.reconnect_frames.fetch_add(1, Ordering::Relaxed);
                backoff.attempt = 0;
                if paced {
                    counters.rebalance_frames.fetch_add(1, Ordering::Relaxed);
                    Duration::ZERO
                } else {
                    backoff.jitter_only()
                }
            }
            StreamEnd::Superseded | StreamEnd::Lost | StreamEnd::Silent => {
                match end {
                    StreamEnd::Superseded => counters.superseded.fetch_add(1, Ordering::Relaxed),
                    StreamEnd::Silent => counters.silences.fetch_add(1, Ordering::Relaxed),
                    _ if was_up => counters.losses.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                if was_up && up_for >= backoff.stable_after() {
                    backoff.attempt = 0;
                }
                let delay = backoff.next_delay();
                match retry_after {
                    Some(asked) => delay.max(asked + backoff.jitter_only()),
                    None => delay,
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            () = driving(tokio::time::sleep(delay), &mut posts) => {}
        }
    }
    shared.devices[index].stopped.store(true, Ordering::Release);
}

/// Reads one live stream until it ends, running every call and POSTing its result (the
/// POSTs are driven here too, and outlive the stream in `posts`).
async fn read_stream(
    shared: &Arc<Shared>,
    stream: &mut RawStream,
    replica: usize,
    token: &Arc<str>,
    posts: &mut FuturesUnordered<PostFuture>,
    cancel: &CancellationToken,
) -> StreamEnd {
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return StreamEnd::Cancelled,
            Some(()) = posts.next(), if !posts.is_empty() => continue,
            next = tokio::time::timeout(shared.config.silence, stream.next_frame()) => next,
        };
        let frame = match next {
            Err(_) => return StreamEnd::Silent,
            Ok(Err(_)) | Ok(Ok(None)) => return StreamEnd::Lost,
            Ok(Ok(Some(frame))) => frame,
        };
        match frame.event.as_str() {
            protocol::sse::EVENT_CALL => {
                let Some(call_id) = call_id_of(&frame) else {
                    continue;
                };
                shared.counters.calls.fetch_add(1, Ordering::Relaxed);
                if shared.config.record_timings {
                    shared.timings.lock().insert(call_id.clone().into_boxed_str(), (Instant::now(), None));
                }
                *shared.executed.lock().entry(call_id.clone().into_boxed_str()).or_default() += 1;
                posts.push(Box::pin(post_result(shared.clone(), token.clone(), call_id, replica)));
            }
            protocol::sse::EVENT_RECONNECT => {
                let paced = frame.data.contains("\"rebalance\"");
                return StreamEnd::Reconnect { paced };
            }
            protocol::sse::EVENT_SUPERSEDED => return StreamEnd::Superseded,
            protocol::sse::EVENT_REVOKED => return StreamEnd::Revoked,
            _ => {}
        }
    }
}

/// The call id of a `call` frame: its `id:` line, else the `callId` of its data.
fn call_id_of(frame: &sse::Frame) -> Option<String> {
    if let Some(id) = frame.id.as_ref().filter(|id| !id.is_empty()) {
        return Some(id.clone());
    }
    serde_json::from_str::<protocol::HostCall>(&frame.data).ok().map(|call| call.call_id)
}

/// Runs the tool (sleeps its latency) and POSTs the result, retrying on transport errors and
/// 5xx.
async fn post_result(shared: Arc<Shared>, token: Arc<str>, call_id: String, stream_replica: usize) {
    let config = &shared.config;
    if !config.tool_latency.is_zero() {
        tokio::time::sleep(config.tool_latency).await;
    }
    let body = format!(
        r#"{{"callId":{},"ok":true,"result":{{"bytes":{},"data":"{}"}}}}"#,
        serde_json::Value::String(call_id.clone()),
        shared.filler.len(),
        shared.filler
    );
    let counters = &shared.counters;
    for attempt in 0..config.post_attempts.max(1) {
        if attempt > 0 {
            counters.post_retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50) * attempt).await;
        }
        let replica = shared.post_replica(stream_replica, attempt);
        let response = shared
            .client
            .post(format!("{}/api/host/result", shared.config.replicas[replica]))
            .bearer_auth(&*token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let status = match response {
            Ok(response) => {
                let status = response.status();
                let _ = response.bytes().await;
                status
            }
            Err(_) => continue,
        };
        match status {
            StatusCode::OK => {
                counters.posts_delivered.fetch_add(1, Ordering::Relaxed);
                if config.record_timings {
                    if let Some((_, posted)) = shared.timings.lock().get_mut(call_id.as_str()) {
                        *posted = Some(Instant::now());
                    }
                }
                return;
            }
            StatusCode::NOT_FOUND => {
                counters.posts_unknown.fetch_add(1, Ordering::Relaxed);
                return;
            }
            StatusCode::FORBIDDEN => {
                counters.posts_forbidden.fetch_add(1, Ordering::Relaxed);
                return;
            }
            status if status.is_server_error() => continue,
            _ => break,
        }
    }
    counters.posts_failed.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_skip_network_and_broadcast() {
        assert_eq!(source_addr(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_addr(252), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(source_addr(253), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(source_addr(253 + 254), Ipv4Addr::new(127, 0, 2, 1));
        assert_eq!(source_addr(253 + 254 * 10 + 5), Ipv4Addr::new(127, 0, 11, 6));
        for i in (0..5000).step_by(97) {
            let last = source_addr(i).octets()[3];
            assert!(last != 0 && last != 255, "{i}");
        }
        assert_eq!(device_addr(9), device_addr(0));
        assert_ne!(device_addr(10), device_addr(0));
    }
}
