//! `bench`: measures the dispatcher on this machine in one run, and prints every figure with
//! its target (met or missed; nothing is asserted).
//!
//! ```text
//! cargo build --release -p dispatcher -p e2e && target/release/bench [--quick]
//! ```
//!
//! Sections, in order:
//! 1. baselines built from the same crate versions: raw async-nats request-reply against a
//!    local nats-server, and a bare axum SSE push answered by a POST (an in-process server);
//! 2. the embedded dispatcher (one replica process, in-memory bus, SQLite) end to end over HTTP
//!    with swarm devices;
//! 3. a three-replica cluster (NATS + PostgreSQL) end to end, the stream on replica 1, the
//!    dispatch on replica 2, the result POSTed to replica 3;
//!
//!    each at 1 call in flight (p50/p99) and 64 in flight (throughput); then the offline
//!    answer, memory per idle device stream (VmRSS before and after connecting the streams;
//!    then, on top of them, as many idle HTTP/1.1 keep-alive connections: the connection's
//!    share as hyper keeps it), and the time for the devices of a replica to be back after
//!    `kill -9` of it.
//!
//! `--quick` runs the same sections with small counts in seconds (the CI smoke test).
//!
//! `--only deaf` (run only when named) measures memory around a device that stops reading its
//! stream: a normal call load first (throughput, CPU per call, VmRSS after), then, repeated,
//! many 1 MiB calls to a stream whose socket is never read; VmRSS before, at its peak and as it
//! settles, the queued bytes, and when the stream was dropped. Run it once per allocator build
//! of the dispatcher (`--features jemalloc` / `mimalloc`) to compare them.
//!
//! Not here: invariants under faults (the `chaos` binary).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use clap::Parser;
use e2e::cluster::LocalCluster;
use e2e::load::{closed_loop, ms, CallTarget, Latencies, LoadReport, Outcome, Stop};
use e2e::swarm::{enroll_many, Placement, PostTo, Swarm, SwarmConfig, DEVICES_PER_ADDRESS};
use e2e::{Control, Dispatcher, NatsServer, TestDevice};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Parser)]
#[command(name = "bench", about = "Measures the dispatcher on this machine and prints each figure against its target.")]
struct Args {
    /// A smoke run with small counts (seconds), as CI runs it.
    #[arg(long)]
    quick: bool,
    /// Only these sections (comma-separated): baselines, embedded, cluster, memory, kill.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Streams for the memory figure (default 10000; 200 with --quick).
    #[arg(long)]
    streams: Option<usize>,
    /// Devices for the kill -9 recovery figure (default 1000; 50 with --quick).
    #[arg(long)]
    kill_devices: Option<usize>,
    /// Seconds of each 64-in-flight throughput run (default 10; 1 with --quick).
    #[arg(long)]
    seconds: Option<u64>,
    /// The simulated devices' first reconnect window after a lost stream, in milliseconds
    /// (host-agent's --backoff-base-ms; default 1000, host-agent's default), for the kill -9
    /// figure.
    #[arg(long, default_value_t = 1000)]
    kill_backoff_base_ms: u64,
    /// Calls of 1 MiB sent to the stream that does not read, per repeat (default 300; 50 with
    /// --quick).
    #[arg(long)]
    deaf_calls: Option<usize>,
    /// Rounds of the deaf-stream scenario (default 3; 1 with --quick).
    #[arg(long)]
    deaf_repeats: Option<usize>,
    /// The dispatcher's keepalive for the deaf-stream section: a stream is dropped after two.
    #[arg(long, default_value_t = 5)]
    deaf_keepalive_secs: u64,
}

/// The counts of a run.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    /// Calls measured at 1 in flight (after `warmup` calls).
    serial_calls: u64,
    warmup: u64,
    /// Calls in flight for throughput, and devices sharing them.
    parallel: usize,
    parallel_for: Duration,
    devices: usize,
    offline_calls: u64,
    streams: usize,
    kill_devices: usize,
}

impl Plan {
    fn new(args: &Args) -> Plan {
        let quick = args.quick;
        Plan {
            quick,
            serial_calls: if quick { 200 } else { 5000 },
            warmup: if quick { 20 } else { 500 },
            parallel: 64,
            parallel_for: Duration::from_secs(args.seconds.unwrap_or(if quick { 1 } else { 10 })),
            devices: if quick { 8 } else { 64 },
            offline_calls: if quick { 100 } else { 2000 },
            streams: args.streams.unwrap_or(if quick { 200 } else { 10_000 }),
            kill_devices: args.kill_devices.unwrap_or(if quick { 50 } else { 1000 }),
        }
    }
}

/// A figure at 1 in flight and at 64 in flight.
#[derive(Debug, Clone, Default)]
struct Pair {
    /// Every call at 1 in flight, pooled over the rounds.
    serial: Latencies,
    /// The p50 of each round at 1 in flight.
    round_p50s: Vec<Duration>,
    parallel: LoadReport,
    /// CPU time per call of each watched process: (name, at 1 in flight, at 64 in flight).
    cpu: Vec<(String, Duration, Duration)>,
}

impl Pair {
    /// The p50 at 1 in flight: the median of the rounds' p50s (steadier than one long run on a
    /// machine whose wake-up latency drifts).
    fn p50(&self) -> Duration {
        let mut p50s = self.round_p50s.clone();
        p50s.sort_unstable();
        p50s.get(p50s.len() / 2).copied().unwrap_or_else(|| self.serial.p50())
    }
}

/// Rounds the calls at 1 in flight are split into.
const ROUNDS: u64 = 5;
/// `--max-devices-per-user` of the replicas measured: the bench enrolls every device for one user.
const MANY_DEVICES: u64 = 1_000_000;

/// Every figure measured, for the targets at the end.
#[derive(Debug, Default)]
struct Figures {
    nats: Option<Pair>,
    sse: Option<Pair>,
    sse_http: Option<Pair>,
    embedded: Option<Pair>,
    cluster: Option<Pair>,
    offline_embedded: Option<Latencies>,
    offline_cluster: Option<Latencies>,
    memory_embedded: Option<f64>,
    memory_cluster: Option<f64>,
    kill: Option<KillFigures>,
    failures: Vec<String>,
}

#[derive(Debug, Clone)]
struct KillFigures {
    devices: usize,
    back: usize,
    times: Latencies,
    largest_window: f64,
    reachable: usize,
    /// What the reconnects cost the database; `None` when it could not be read.
    database: Option<HerdDatabase>,
}

/// The database's work for the reconnects after a kill, per device back.
#[derive(Debug, Clone, Copy)]
struct HerdDatabase {
    /// Transactions PostgreSQL counted in the cluster's database in the window, idle ones
    /// included, per device back: an upper bound.
    raw_statements: f64,
    /// Transactions PostgreSQL counted in the cluster's database (`pg_stat_database`:
    /// `xact_commit + xact_rollback`; a statement outside a transaction is one), less the idle
    /// rate measured just before the kill, per device back.
    statements: f64,
    /// Pool pings before handing out a connection (the survivors' `db_pings` counter, less its
    /// idle rate), per device back: round trips PostgreSQL does not count as transactions.
    /// `None` when the build does not count them (before it did, sqlx pinged on every acquire).
    pings: Option<f64>,
    /// Stream opens per stream-open statement on the survivors (`stream_opens` /
    /// `db_stream_open_statements`); `None` when the build does not count statements.
    opens_per_statement: Option<f64>,
}

impl HerdDatabase {
    /// Round trips per reconnect, when the pings are known.
    fn round_trips(&self) -> Option<f64> {
        self.pings.map(|pings| self.statements + pings)
    }
}

/// Hands out loopback source-address indexes so every enrollment batch uses fresh addresses.
#[derive(Debug, Default)]
struct Addresses {
    next: usize,
}

impl Addresses {
    fn take(&mut self, devices: usize) -> usize {
        let first = self.next;
        self.next += devices.div_ceil(DEVICES_PER_ADDRESS) * DEVICES_PER_ADDRESS;
        first
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    use_sibling_dispatcher()?;
    raise_descriptor_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let code = runtime.block_on(run(args))?;
    drop(runtime);
    std::process::exit(code);
}

/// Raises this process's open-file limit to its hard limit: the swarm holds a socket per
/// device, and the replicas it starts inherit the limit. Ten thousand devices need more than
/// the usual 1024.
#[allow(unsafe_code)]
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Points the harness at the `dispatcher` binary next to this one (same profile), building it
/// when it is missing.
fn use_sibling_dispatcher() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_BIN_EXE_dispatcher").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("bench has no directory")?.to_path_buf();
    let name = format!("dispatcher{}", std::env::consts::EXE_SUFFIX);
    let path: PathBuf = dir.join(&name);
    if !path.is_file() {
        let release = dir.file_name().is_some_and(|n| n == "release");
        eprintln!("bench: {} is missing; building it", path.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = std::process::Command::new(cargo);
        command.current_dir(e2e::bin::workspace_root()).args(["build", "-p", "dispatcher"]);
        if release {
            command.arg("--release");
        }
        let status = command.status().context("running cargo build -p dispatcher")?;
        anyhow::ensure!(status.success() && path.is_file(), "could not build {}", path.display());
    }
    std::env::set_var("CARGO_BIN_EXE_dispatcher", &path);
    Ok(())
}

fn wants(args: &Args, section: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|s| s == section)
}

async fn run(args: Args) -> anyhow::Result<i32> {
    let plan = Plan::new(&args);
    let started = Instant::now();
    print_machine(&plan).await;
    let mut figures = Figures::default();
    let mut addresses = Addresses::default();

    if wants(&args, "baselines") {
        section("baseline: raw NATS request-reply (async-nats, one local nats-server)");
        match baseline_nats(&plan).await {
            Ok(pair) => {
                print_pair(&pair);
                figures.nats = Some(pair);
            }
            Err(error) => fail(&mut figures, "baseline NATS", error),
        }
        section("baseline: bare axum SSE push answered by a POST (in-process server)");
        match baseline_sse(&plan).await {
            Ok((pair, http, legs)) => {
                print_pair(&pair);
                print_legs(&legs);
                println!("  variant with the push triggered by an HTTP request (like POST /calls):");
                print_pair(&http);
                figures.sse = Some(pair);
                figures.sse_http = Some(http);
            }
            Err(error) => fail(&mut figures, "baseline SSE", error),
        }
    }
    if wants(&args, "embedded") || wants(&args, "memory") {
        section("embedded dispatcher: one replica, in-memory bus, SQLite; calls over HTTP");
        if let Err(error) = embedded(&plan, &args, &mut figures, &mut addresses).await {
            fail(&mut figures, "embedded", error);
        }
    }
    if args.only.iter().any(|s| s == "deaf") {
        section("deaf stream: a device that stops reading, sent many 1 MiB calls; memory of the replica");
        if let Err(error) = deaf_stream(&args).await {
            fail(&mut figures, "deaf", error);
        }
    }
    if wants(&args, "cluster") || wants(&args, "memory") || wants(&args, "kill") {
        section("cluster: three replicas, NATS + PostgreSQL; stream on replica 1, dispatch on 2, result to 3");
        if let Err(error) = cluster(&plan, &args, &mut figures, &mut addresses).await {
            fail(&mut figures, "cluster", error);
        }
    }
    print_targets(&figures);
    println!("\nbench finished in {:.1} s", started.elapsed().as_secs_f64());
    if figures.failures.is_empty() {
        Ok(0)
    } else {
        println!("sections that failed: {}", figures.failures.join("; "));
        Ok(1)
    }
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn fail(figures: &mut Figures, what: &str, error: anyhow::Error) {
    println!("  FAILED: {error:#}");
    figures.failures.push(format!("{what}: {error:#}"));
}

fn print_pair(pair: &Pair) {
    let rounds: Vec<String> = pair.round_p50s.iter().map(|d| format!("{:.3}", d.as_secs_f64() * 1000.0)).collect();
    println!(
        "  1 in flight:  {} calls; p50 {} (median of {} rounds: {} ms); p90 {} p99 {} max {}",
        pair.serial.len(),
        ms(pair.p50()),
        pair.round_p50s.len(),
        rounds.join(" "),
        ms(pair.serial.p90()),
        ms(pair.serial.p99()),
        ms(pair.serial.max())
    );
    println!("  64 in flight: {}", pair.parallel.summary());
    if !pair.cpu.is_empty() {
        let each = |f: &dyn Fn(&(String, Duration, Duration)) -> Duration| {
            let parts: Vec<String> =
                pair.cpu.iter().map(|c| format!("{} {:.0}", c.0, f(c).as_secs_f64() * 1e6)).collect();
            let total: Duration = pair.cpu.iter().map(f).sum();
            format!("{} = {:.0} us", parts.join(" + "), total.as_secs_f64() * 1e6)
        };
        println!("  CPU per call at 1 in flight:  {}", each(&|c| c.1));
        println!("  CPU per call at 64 in flight: {}", each(&|c| c.2));
    }
}

/// Where the time of a call goes at 1 in flight: (start, arrived at the device, its result
/// POST answered, answer back at the caller) per call; prints the legs' medians.
fn print_legs(samples: &[Leg]) {
    if samples.is_empty() {
        return;
    }
    let leg = |f: &dyn Fn(&Leg) -> Duration| Latencies::new(samples.iter().map(f).collect()).p50();
    println!(
        "  where the time goes (medians of {} calls at 1 in flight): to the device {}, the device's result POST {}, \
         its answer to the caller's {}",
        samples.len(),
        ms(leg(&|s| s.1.saturating_duration_since(s.0))),
        ms(leg(&|s| s.2.saturating_duration_since(s.1))),
        ms(leg(&|s| s.3.saturating_duration_since(s.2))),
    );
}

/// Calls `target` one at a time `count` times and breaks each call into legs.
async fn dispatcher_legs(target: &CallTarget, swarm: &Swarm, count: u64) -> Legs {
    let mut samples = Vec::new();
    for seq in 0..count {
        let started = Instant::now();
        let answer = target.call(seq).await;
        let ended = Instant::now();
        let Some(id) = answer.call_id.filter(|_| answer.outcome == Outcome::Ok) else {
            continue;
        };
        if let Some((arrived, posted)) = posted_timing(swarm, &id).await {
            samples.push((started, arrived, posted, ended));
        }
    }
    samples
}

/// The swarm's timing of call `id`, waiting (50 ms at most) for its result POST's answer.
async fn posted_timing(swarm: &Swarm, id: &str) -> Option<(Instant, Instant)> {
    let limit = Instant::now() + Duration::from_millis(50);
    loop {
        match swarm.timing(id) {
            Some((arrived, Some(posted))) => return Some((arrived, posted)),
            Some(_) if Instant::now() < limit => tokio::time::sleep(Duration::from_millis(1)).await,
            _ => return None,
        }
    }
}

async fn print_machine(plan: &Plan) {
    section("machine");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| text.lines().find(|l| l.starts_with("model name")).map(|l| l.to_owned()))
        .and_then(|line| line.split_once(':').map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| text.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned()))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nats = std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "not found".into());
    println!("  cpu: {cpu}, {cores} cores; memory {memory}; linux {}", kernel.trim());
    println!("  {nats}; profile: {}", if cfg!(debug_assertions) { "debug (not for figures)" } else { "release" });
    println!(
        "  plan: {} calls at 1 in flight, {} s at {} in flight over {} devices, {} streams, {} devices killed{}",
        plan.serial_calls,
        plan.parallel_for.as_secs(),
        plan.parallel,
        plan.devices,
        plan.streams,
        plan.kill_devices,
        if plan.quick { " (--quick)" } else { "" }
    );
}

/// CPU time (user + system, all threads) process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from after the command name (field 3 is index 0).
    let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    utime + stime
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // USER_HZ, the unit of stat(5) times, is 100 on every Linux architecture.
    Duration::from_millis(ticks * 10)
}

/// Processes whose CPU time is counted per call: (name, pid).
type Watch = Vec<(String, u32)>;

fn cpu_snapshot(watch: &Watch) -> Vec<u64> {
    watch.iter().map(|(_, pid)| cpu_ticks(*pid)).collect()
}

fn cpu_per_call(before: &[u64], after: &[u64], calls: u64) -> Vec<Duration> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| ticks_to_duration(a.saturating_sub(*b)) / u32::try_from(calls.max(1)).unwrap_or(u32::MAX))
        .collect()
}

/// Runs `call` at 1 in flight (after a warm-up) and at 64 in flight.
async fn measure_pair<F, Fut>(plan: &Plan, call: F) -> Pair
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    measure_pair_watching(plan, &Vec::new(), call).await
}

/// [`measure_pair`], counting the CPU time the `watch`ed processes spend per call (this
/// process is always watched, as `bench`).
async fn measure_pair_watching<F, Fut>(plan: &Plan, watch: &Watch, call: F) -> Pair
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let mut watch = watch.clone();
    watch.insert(0, ("bench".into(), std::process::id()));
    closed_loop(1, Stop::Calls(plan.warmup), call.clone()).await;
    let mut pooled = Vec::new();
    let mut round_p50s = Vec::new();
    let before = cpu_snapshot(&watch);
    for _ in 0..ROUNDS {
        let round = closed_loop(1, Stop::Calls(plan.serial_calls / ROUNDS), call.clone()).await;
        round_p50s.push(round.ok.p50());
        pooled.extend(round.ok.sorted().iter().copied());
    }
    let serial_cpu = cpu_per_call(&before, &cpu_snapshot(&watch), pooled.len() as u64);
    closed_loop(plan.parallel, Stop::After(plan.parallel_for / 5), call.clone()).await;
    let before = cpu_snapshot(&watch);
    let parallel = closed_loop(plan.parallel, Stop::After(plan.parallel_for), call).await;
    let parallel_cpu = cpu_per_call(&before, &cpu_snapshot(&watch), parallel.succeeded());
    let cpu = watch
        .into_iter()
        .zip(serial_cpu.into_iter().zip(parallel_cpu))
        .map(|((name, _), (serial, parallel))| (name, serial, parallel))
        .collect();
    Pair { serial: Latencies::new(pooled), round_p50s, parallel, cpu }
}

// ---- baselines ----

/// A payload the size of a small call.
fn call_payload() -> Bytes {
    let call = json!({
        "callId": "0000000a-1b2c3d4e5f60718293a4b5c6d7e8f901",
        "tool": "echo",
        "input": {"text": "hello"},
        "deadline": "2030-01-01T00:00:00Z",
    });
    Bytes::from(serde_json::to_vec(&call).unwrap_or_default())
}

async fn baseline_nats(plan: &Plan) -> anyhow::Result<Pair> {
    let server = NatsServer::start().await?;
    let responder = async_nats::connect(server.url()).await?;
    let requester = async_nats::connect(server.url()).await?;
    let mut subscription = responder.subscribe("bench.echo").await?;
    responder.flush().await?;
    let echo = tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    let payload = call_payload();
    let watch = vec![("nats-server".to_owned(), server.pid())];
    let pair = measure_pair_watching(plan, &watch, move |_| {
        let requester = requester.clone();
        let payload = payload.clone();
        async move {
            match requester.request("bench.echo", payload).await {
                Ok(_) => Outcome::Ok,
                Err(_) => Outcome::Transport("nats"),
            }
        }
    })
    .await;
    echo.abort();
    drop(server);
    Ok(pair)
}

/// The bare SSE server's state: the streams, and the calls waiting for a POST.
#[derive(Default)]
struct Bare {
    streams: Mutex<Vec<mpsc::Sender<Event>>>,
    pending: Mutex<std::collections::HashMap<String, oneshot::Sender<()>>>,
    next: AtomicU64,
}

impl Bare {
    /// Pushes a call to a stream and waits for its POST.
    async fn call(&self, seq: u64) -> Outcome {
        self.call_with_id(seq).await.0
    }

    /// [`Bare::call`], with the call's id.
    async fn call_with_id(&self, seq: u64) -> (Outcome, String) {
        let tx = {
            let streams = self.streams.lock();
            if streams.is_empty() {
                return (Outcome::Offline, String::new());
            }
            streams[(seq % streams.len() as u64) as usize].clone()
        };
        let id = format!("{:016x}", self.next.fetch_add(1, Ordering::Relaxed));
        let (done_tx, done_rx) = oneshot::channel();
        self.pending.lock().insert(id.clone(), done_tx);
        let call = protocol::HostCall {
            call_id: id.clone(),
            tool: "echo".into(),
            input: json!({"text": "hello"}),
            mode: None,
            preconditions: None,
            deadline: None,
            traceparent: None,
        };
        let data = serde_json::to_string(&call).unwrap_or_default();
        if tx.send(Event::default().event("call").id(id.clone()).data(data)).await.is_err() {
            self.pending.lock().remove(&id);
            return (Outcome::Offline, id);
        }
        match tokio::time::timeout(Duration::from_secs(10), done_rx).await {
            Ok(Ok(())) => (Outcome::Ok, id),
            _ => {
                self.pending.lock().remove(&id);
                (Outcome::TimedOut, id)
            }
        }
    }
}

async fn bare_stream(
    State(bare): State<Arc<Bare>>,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let (tx, rx) = mpsc::channel(256);
    bare.streams.lock().push(tx);
    let ready = Event::default().event("ready").data(r#"{"deviceId":"bare","replica":"bare"}"#);
    let events = futures::stream::once(async move { Ok(ready) })
        .chain(tokio_stream_from(rx).map(Ok::<_, std::convert::Infallible>));
    Sse::new(events)
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Event>) -> impl futures::Stream<Item = Event> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn bare_result(State(bare): State<Arc<Bare>>, Json(body): Json<Value>) -> (axum::http::StatusCode, Json<Value>) {
    let id = body["callId"].as_str().unwrap_or_default();
    match bare.pending.lock().remove(id) {
        Some(done) => {
            let _ = done.send(());
            (axum::http::StatusCode::OK, Json(json!({"delivered": true})))
        }
        None => (axum::http::StatusCode::NOT_FOUND, Json(json!({"delivered": false}))),
    }
}

async fn bare_http_call(State(bare): State<Arc<Bare>>) -> axum::http::StatusCode {
    match bare.call(bare.next.load(Ordering::Relaxed)).await {
        Outcome::Ok => axum::http::StatusCode::OK,
        _ => axum::http::StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The bare server on its own runtime (its own threads, as if another process), until the
/// returned sender is dropped.
fn start_bare(bare: Arc<Bare>) -> anyhow::Result<(SocketAddr, oneshot::Sender<()>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::Builder::new().name("bare-sse".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("bench: bare server runtime: {error}");
                return;
            }
        };
        runtime.block_on(async move {
            let app = Router::new()
                .route("/api/host/stream", get(bare_stream))
                .route("/api/host/result", post(bare_result))
                .route("/call", post(bare_http_call))
                .with_state(bare);
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            });
            let _ = tokio::time::timeout(Duration::from_secs(3600), serve).await;
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
    })?;
    Ok((addr, stop_tx))
}

/// One call's (start, arrived at the device, its result POST answered, answer at the caller).
type Leg = (Instant, Instant, Instant, Instant);
type Legs = Vec<Leg>;

async fn baseline_sse(plan: &Plan) -> anyhow::Result<(Pair, Pair, Legs)> {
    let bare = Arc::new(Bare::default());
    let (addr, stop) = start_bare(bare.clone())?;
    let base = format!("http://{addr}");
    let devices: Vec<TestDevice> = (0..plan.devices)
        .map(|i| TestDevice { device_id: format!("bare-{i}"), token: format!("bare-token-{i}") })
        .collect();
    let mut config = SwarmConfig::new(vec![base.clone()]);
    config.placement = Placement::Pinned(0);
    config.record_timings = true;
    let swarm = Swarm::start(devices, config)?;
    swarm.wait_online(plan.devices, Duration::from_secs(30)).await?;
    let in_process = {
        let bare = bare.clone();
        measure_pair(plan, move |seq| {
            let bare = bare.clone();
            async move { bare.call(seq).await }
        })
        .await
    };
    let mut legs = Vec::new();
    for seq in 0..plan.serial_calls / ROUNDS {
        let started = Instant::now();
        let (outcome, id) = bare.call_with_id(seq).await;
        let ended = Instant::now();
        if outcome == Outcome::Ok {
            if let Some((arrived, posted)) = posted_timing(&swarm, &id).await {
                legs.push((started, arrived, posted, ended));
            }
        }
    }
    let client = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(1024).build()?;
    let url = format!("{base}/call");
    let over_http = measure_pair(plan, move |_| {
        let request = client.post(url.clone()).body("x").timeout(Duration::from_secs(15)).send();
        async move {
            match request.await {
                Ok(response) if response.status().is_success() => Outcome::Ok,
                Ok(response) => Outcome::Http(response.status().as_u16()),
                Err(_) => Outcome::Transport("request"),
            }
        }
    })
    .await;
    swarm.stop(Duration::from_secs(5)).await;
    drop(stop);
    Ok((in_process, over_http, legs))
}

// ---- the dispatcher ----

fn echo_target(replicas: Vec<String>, token: &str, devices: Vec<String>) -> anyhow::Result<CallTarget> {
    CallTarget::new(replicas, token, devices, "echo", json!({"text": "hello"}), 10_000)
}

fn target_call(target: &CallTarget) -> impl Fn(u64) -> futures::future::BoxFuture<'static, Outcome> + Clone {
    let target = target.clone();
    move |seq| {
        let target = target.clone();
        Box::pin(async move { target.call(seq).await.outcome })
    }
}

/// VmRSS of process `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    line.split_whitespace().nth(1).context("VmRSS without a value")?.parse().context("VmRSS not a number")
}

/// Connects `devices` streams to replica `replica` and returns KiB of VmRSS per stream.
/// Idle keep-alive connections measured next to the streams: enough for a per-connection
/// figure, few enough that the streams and they fit the bench's descriptor limit.
const IDLE_CONNECTIONS: usize = 2000;

async fn memory_per_stream(
    pid: u32,
    replicas: Vec<String>,
    replica: usize,
    devices: Vec<TestDevice>,
    first_index: usize,
) -> anyhow::Result<(f64, Swarm)> {
    let count = devices.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid)?;
    let mut config = SwarmConfig::new(replicas);
    config.placement = Placement::Pinned(replica);
    let swarm = Swarm::start_at(devices, first_index, config)?;
    let took = swarm.wait_online(count, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(before)) as f64 / count as f64;
    println!(
        "  {count} streams connected in {:.1} s; VmRSS {:.1} MiB -> {:.1} MiB: {:.1} KiB per stream",
        took.as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        per
    );
    Ok((per, swarm))
}

/// Opens `count` HTTP/1.1 connections to `base` (from the source addresses of devices
/// `first_index..`), sends `GET /healthz` on each and reads the answer, and keeps them open and
/// idle: KiB of VmRSS of process `pid` per connection, with the connections (dropped by the
/// caller). Measured next to the device streams, this tells the connection's share of a stream:
/// an idle keep-alive connection is what hyper keeps per connection (its task, its read and
/// write buffers), without the stream's request, body and queue.
async fn memory_per_idle_connection(
    pid: u32,
    base: &str,
    count: usize,
    first_index: usize,
) -> anyhow::Result<(f64, Vec<tokio::net::TcpStream>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = reqwest::Url::parse(base)?;
    let host = url.host_str().context("no host")?.to_owned();
    let addr: SocketAddr = format!("{host}:{}", url.port_or_known_default().context("no port")?).parse()?;
    let before = rss_kib(pid)?;
    let started = Instant::now();
    let open = |index: usize| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(e2e::swarm::device_addr(index).into(), 0))?;
        let mut stream = socket.connect(addr).await?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: bench\r\n\r\n").await?;
        // The answer is small; read until its head and its whole body arrived.
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                bail!("closed before the answer");
            }
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|line| {
                        line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if seen.len() >= end + 4 + length {
                    return anyhow::Ok(stream);
                }
            }
        }
    };
    let connections: Vec<tokio::net::TcpStream> = futures::stream::iter(0..count)
        .map(|i| open(first_index + i))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    let per = after.saturating_sub(before) as f64 / count as f64;
    println!(
        "  + {count} idle HTTP/1.1 keep-alive connections (one GET /healthz each) in {:.1} s; VmRSS {:.1} MiB -> {:.1} MiB: {:.1} KiB per connection",
        took.as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        per
    );
    Ok((per, connections))
}

async fn enroll_timed(
    replicas: &[String],
    control: &Control,
    count: usize,
    first_index: usize,
) -> anyhow::Result<Vec<TestDevice>> {
    let started = Instant::now();
    let devices = enroll_many(replicas, control, count, first_index, 16).await?;
    if count >= 100 {
        println!(
            "  enrolled {count} devices in {:.1} s ({:.0}/s)",
            started.elapsed().as_secs_f64(),
            count as f64 / started.elapsed().as_secs_f64()
        );
    }
    Ok(devices)
}

async fn offline_figure(target: &CallTarget, control: &Control, base: &str, plan: &Plan) -> anyhow::Result<Latencies> {
    let device = TestDevice::pair(base, control, "bench-offline").await?;
    let offline = target.with_devices(vec![device.device_id]);
    let call = target_call(&offline);
    closed_loop(1, Stop::Calls(plan.warmup), call.clone()).await;
    let report = closed_loop(1, Stop::Calls(plan.offline_calls), call).await;
    let answered = report.outcomes.get(&Outcome::Offline).copied().unwrap_or(0);
    if answered != plan.offline_calls {
        bail!("offline calls answered {}", report.errors());
    }
    println!("  offline answer (503 device offline), {answered} calls: {}", report.all.summary());
    Ok(report.all)
}

async fn embedded(plan: &Plan, args: &Args, figures: &mut Figures, addresses: &mut Addresses) -> anyhow::Result<()> {
    // Thousands of devices of one user: past the default quota of devices per user.
    let mut dispatcher = Dispatcher::builder().flag("--max-devices-per-user", MANY_DEVICES).start().await?;
    let base = dispatcher.base_url();
    let token = dispatcher.mint_token("bench").await?;
    let control = Control::new(base.clone(), token.clone());
    let replicas = vec![base.clone()];
    if wants(args, "embedded") {
        let first = addresses.take(plan.devices);
        let devices = enroll_timed(&replicas, &control, plan.devices, first).await?;
        let mut config = SwarmConfig::new(replicas.clone());
        config.placement = Placement::Pinned(0);
        config.record_timings = true;
        let swarm = Swarm::start_at(devices, first, config)?;
        swarm.wait_online(plan.devices, Duration::from_secs(30)).await?;
        let target = echo_target(replicas.clone(), &token, swarm.device_ids().to_vec())?;
        let watch = vec![("dispatcher".to_owned(), dispatcher.pid())];
        let pair = measure_pair_watching(plan, &watch, target_call(&target)).await;
        print_pair(&pair);
        print_legs(&dispatcher_legs(&target, &swarm, plan.serial_calls / ROUNDS).await);
        check_swarm(&swarm, figures, "embedded");
        figures.embedded = Some(pair);
        swarm.stop(Duration::from_secs(5)).await;
        figures.offline_embedded = Some(offline_figure(&target, &control, &base, plan).await?);
    }
    if wants(args, "memory") {
        let first = addresses.take(plan.streams);
        let devices = enroll_timed(&replicas, &control, plan.streams, first).await?;
        // A fresh process: the allocator of one that served the enrollments (and the sections
        // before) holds freed memory the streams would reuse without growing VmRSS.
        dispatcher.restart().await?;
        let (per, swarm) = memory_per_stream(dispatcher.pid(), replicas, 0, devices, first).await?;
        figures.memory_embedded = Some(per);
        let idle_count = plan.streams.min(IDLE_CONNECTIONS);
        let (_, idle) = memory_per_idle_connection(dispatcher.pid(), &base, idle_count, first).await?;
        drop(idle);
        swarm.stop(Duration::from_secs(30)).await;
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The `deaf` section: a normal load, then rounds of large calls to a stream never read.
async fn deaf_stream(args: &Args) -> anyhow::Result<()> {
    const CALL_BYTES: usize = 1 << 20;
    let calls = args.deaf_calls.unwrap_or(if args.quick { 50 } else { 300 });
    let repeats = args.deaf_repeats.unwrap_or(if args.quick { 1 } else { 3 });
    let load_for = Duration::from_secs(args.seconds.unwrap_or(if args.quick { 1 } else { 10 }));
    let keepalive = Duration::from_secs(args.deaf_keepalive_secs);
    let dispatcher = Dispatcher::builder().keepalive_secs(keepalive.as_secs()).rust_log("warn").start().await?;
    let (pid, base) = (dispatcher.pid(), dispatcher.base_url());
    let control = Control::new(base.clone(), dispatcher.mint_token("bench").await?);
    println!(
        "  dispatcher {}; keepalive {} s",
        std::env::var("CARGO_BIN_EXE_dispatcher").unwrap_or_default(),
        keepalive.as_secs()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started_rss = rss_kib(pid)?;

    // A normal load: 64 calls in flight, 1 KiB each, to a device that answers.
    let echo = TestDevice::pair(&base, &control, "bench-echo").await?;
    let _echo = echo.connect(&base, e2e::Answer::Echo).await?;
    let input = json!({"data": "x".repeat(1024)});
    let (ticks, done) = (cpu_ticks(pid), Arc::new(AtomicU64::new(0)));
    let load_started = Instant::now();
    let workers = (0..64).map(|_| {
        let (control, id, input, done) = (control.clone(), echo.device_id.clone(), input.clone(), done.clone());
        tokio::spawn(async move {
            while load_started.elapsed() < load_for {
                if let Ok((status, _)) = control.call(&id, "echo", input.clone(), Some(10_000)).await {
                    if status.is_success() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    });
    futures::future::join_all(workers).await;
    let (answered, took) = (done.load(Ordering::Relaxed), load_started.elapsed());
    let cpu = ticks_to_duration(cpu_ticks(pid).saturating_sub(ticks));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_load = rss_kib(pid)?;
    println!(
        "  normal load, 64 in flight, 1 KiB calls: {:.0} calls/s, {:.1} us CPU per call; VmRSS {:.1} MiB at start, \
         {:.1} MiB after",
        answered as f64 / took.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / answered.max(1) as f64,
        mib(started_rss),
        mib(after_load)
    );

    let body = Bytes::from(serde_json::to_vec(
        &json!({"tool": "read_file", "input": {"data": "x".repeat(CALL_BYTES)}, "timeoutMs": 2 * keepalive.as_millis() as u64 + 5000}),
    )?);
    for round in 1..=repeats {
        let before = rss_kib(pid)?;
        let deaf = TestDevice::pair(&base, &control, &format!("bench-deaf-{round}")).await?;
        let socket = deaf.open_unread_stream(dispatcher.addr()).await?;
        control.wait_online(&deaf.device_id, true, Duration::from_secs(10)).await?;
        let stuck_before = e2e::metric(&base, "stuck_streams_total").await.unwrap_or(0.0);
        let client = reqwest::Client::new();
        let url = format!("{base}/api/devices/{}/calls", deaf.device_id);
        let started = Instant::now();
        let sent = futures::future::join_all((0..calls).map(|_| {
            let request = client
                .post(&url)
                .bearer_auth(&control.token)
                .header("content-type", "application/json")
                .body(body.clone());
            tokio::spawn(async move { request.send().await.map(|response| response.status().as_u16()) })
        }));
        let finished = std::sync::atomic::AtomicBool::new(false);
        let sent = async {
            let statuses = sent.await;
            finished.store(true, Ordering::Release);
            statuses
        };
        let watch = async {
            let (mut peak, mut queued, mut dropped) = (0u64, 0f64, None);
            while !finished.load(Ordering::Acquire) {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                queued = queued.max(e2e::metric(&base, "stream_queue_bytes").await.unwrap_or(0.0));
                if dropped.is_none() && e2e::metric(&base, "stuck_streams_total").await.unwrap_or(0.0) > stuck_before {
                    dropped = Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (peak, queued, dropped)
        };
        let (statuses, (peak, queued, dropped)) = tokio::join!(sent, watch);
        let answered_after = started.elapsed();
        let mut tally = std::collections::BTreeMap::new();
        for status in statuses {
            let key = match status {
                Ok(Ok(code)) => code.to_string(),
                _ => "no answer".to_owned(),
            };
            *tally.entry(key).or_insert(0usize) += 1;
        }
        drop(client);
        drop(socket);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let settled_2 = rss_kib(pid)?;
        tokio::time::sleep(Duration::from_secs(18)).await;
        let settled_20 = rss_kib(pid)?;
        println!(
            "  round {round}: {calls} calls of 1 MiB answered {tally:?} within {:.1} s; stream dropped after {}; peak \
             queued {:.1} MiB; VmRSS {:.1} MiB before, {:.1} MiB peak, {:.1} MiB 2 s after, {:.1} MiB 20 s after",
            answered_after.as_secs_f64(),
            dropped.map_or("(never)".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
            queued / 1048576.0,
            mib(before),
            mib(peak),
            mib(settled_2),
            mib(settled_20)
        );
    }
    Ok(())
}

/// Records a failure when the swarm executed a call twice.
fn check_swarm(swarm: &Swarm, figures: &mut Figures, what: &str) {
    let twice = swarm.double_executions();
    if !twice.is_empty() {
        println!("  WARNING: {} calls executed more than once", twice.len());
        figures.failures.push(format!("{what}: {} calls executed twice", twice.len()));
    }
}

async fn cluster(plan: &Plan, args: &Args, figures: &mut Figures, addresses: &mut Addresses) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::builder()
        .replicas(3)
        .keepalive_secs(15)
        .broker_grace_secs(5)
        .configure(|_, builder| builder.flag("--max-devices-per-user", MANY_DEVICES))
        .start()
        .await?;
    let urls = cluster.urls();
    let token = cluster.token().to_owned();
    let control = cluster.control().clone();
    if wants(args, "cluster") {
        let first = addresses.take(plan.devices);
        let devices = enroll_timed(&urls, &control, plan.devices, first).await?;
        let mut config = SwarmConfig::new(urls.clone());
        config.placement = Placement::Pinned(0);
        config.post_to = PostTo::Pinned(2);
        config.record_timings = true;
        let swarm = Swarm::start_at(devices, first, config)?;
        swarm.wait_online(plan.devices, Duration::from_secs(30)).await?;
        // Every replica must see the streams before calls start.
        for id in swarm.device_ids() {
            cluster.control_at(1).wait_online(id, true, Duration::from_secs(10)).await?;
        }
        let target = echo_target(vec![urls[1].clone()], &token, swarm.device_ids().to_vec())?;
        let mut watch: Watch = (0..3).map(|i| (format!("replica{}", i + 1), cluster.replica(i).pid())).collect();
        watch.push(("nats-server".into(), cluster.nats_node(0).pid()));
        let pair = measure_pair_watching(plan, &watch, target_call(&target)).await;
        print_pair(&pair);
        print_legs(&dispatcher_legs(&target, &swarm, plan.serial_calls / ROUNDS).await);
        check_swarm(&swarm, figures, "cluster");
        figures.cluster = Some(pair);
        swarm.stop(Duration::from_secs(5)).await;
        figures.offline_cluster = Some(offline_figure(&target, &control, &urls[0], plan).await?);
    }
    let mut spare: Vec<TestDevice> = Vec::new();
    let mut spare_first = 0;
    if wants(args, "memory") {
        let first = addresses.take(plan.streams);
        let devices = enroll_timed(&urls, &control, plan.streams, first).await?;
        println!("  memory of replica 1, restarted after the enrollments (NATS bus):");
        cluster.restart(0, Duration::from_secs(30)).await?;
        let (per, swarm) = memory_per_stream(cluster.replica(0).pid(), urls.clone(), 0, devices.clone(), first).await?;
        figures.memory_cluster = Some(per);
        let idle_count = plan.streams.min(IDLE_CONNECTIONS);
        let (_, idle) = memory_per_idle_connection(cluster.replica(0).pid(), &urls[0], idle_count, first).await?;
        drop(idle);
        swarm.stop(Duration::from_secs(30)).await;
        spare = devices;
        spare_first = first;
    }
    if wants(args, "kill") {
        section(&format!("recovery: {} devices back after kill -9 of their replica", plan.kill_devices));
        let (devices, first) = if spare.len() >= plan.kill_devices {
            (spare[..plan.kill_devices].to_vec(), spare_first)
        } else {
            let first = addresses.take(plan.kill_devices);
            (enroll_timed(&urls, &control, plan.kill_devices, first).await?, first)
        };
        let backoff = Duration::from_millis(args.kill_backoff_base_ms);
        let kill = kill_recovery(&mut cluster, &urls, &token, devices, first, backoff, plan.quick).await?;
        figures.kill = Some(kill);
    }
    Ok(())
}

async fn kill_recovery(
    cluster: &mut LocalCluster,
    urls: &[String],
    token: &str,
    devices: Vec<TestDevice>,
    first: usize,
    backoff_base: Duration,
    quick: bool,
) -> anyhow::Result<KillFigures> {
    let count = devices.len();
    let mut config = SwarmConfig::new(urls.to_vec());
    config.placement = Placement::StartOn(0);
    config.backoff_base = backoff_base;
    println!(
        "  devices reconnect like host-agent: full jitter over [0, {} ms] after a lost stream, then doubling",
        backoff_base.as_millis()
    );
    let swarm = Swarm::start_at(devices, first, config)?;
    swarm.wait_online(count, Duration::from_secs(120)).await?;
    anyhow::ensure!(swarm.devices_on(0).len() == count, "not every device is on replica 1");
    // PostgreSQL publishes a session's counts when it goes idle, at most every 10 s: wait that
    // long so the streams' opens on replica 1 are counted before the herd's window, then count
    // what an idle cluster does for a few seconds, to take it out of the herd's figure.
    let settle = Duration::from_secs(if quick { 1 } else { 11 });
    tokio::time::sleep(settle).await;
    let database_url = cluster.database_url().to_owned();
    let idle_from = DatabaseCount::read(&database_url, urls).await;
    tokio::time::sleep(Duration::from_secs(if quick { 1 } else { 5 })).await;
    let before = DatabaseCount::read(&database_url, urls).await;
    let killed_at = Instant::now();
    cluster.kill(0).await;
    let deadline = killed_at + Duration::from_secs(60);
    let mut back: Vec<Duration> = Vec::new();
    loop {
        back.clear();
        for i in 0..count {
            if let Some(ready) = swarm.last_ready(i).filter(|&t| t > killed_at) {
                if swarm.replica_of(i).is_some() {
                    back.push(ready - killed_at);
                }
            }
        }
        if back.len() == count || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut windows = std::collections::BTreeMap::<u64, usize>::new();
    for time in &back {
        *windows.entry(time.as_millis() as u64 / 100).or_default() += 1;
    }
    let largest = windows.values().copied().max().unwrap_or(0);
    let largest_window = largest as f64 / count as f64;
    let times = Latencies::new(back.clone());
    println!("  {} of {count} back in {:.1} s; {}", back.len(), times.max().as_secs_f64(), times.summary());
    let mut histogram = String::new();
    for (window, n) in &windows {
        let _ = write!(histogram, " {}-{}ms:{n}", window * 100, window * 100 + 100);
    }
    println!("  reconnects per 100 ms window:{histogram}");
    println!("  largest window: {largest} devices = {:.1}% of them", largest_window * 100.0);
    println!("  swarm: {:?}", swarm.stats());
    tokio::time::sleep(settle).await;
    let after = DatabaseCount::read(&database_url, urls).await;
    let database = herd_database(&idle_from, &before, &after, back.len());
    match &database {
        Some(db) => {
            let per = |value: Option<f64>, unit: &str| {
                value.map_or_else(|| format!("not counted by this build ({unit})"), |v| format!("{v:.3}"))
            };
            println!(
                "  queries per reconnect: {:.3} statements (PostgreSQL's transactions in the window, less the idle \
                 rate; {:.3} with it), {} pings, {} round trips; {} stream opens per statement",
                db.statements,
                db.raw_statements,
                per(db.pings, "sqlx pings on every acquire by default"),
                per(db.round_trips(), "statements plus pings"),
                per(db.opens_per_statement, "one statement per open"),
            );
        }
        None => println!("  queries per reconnect: could not read the database's counters"),
    }
    // Reachable: one call to each through replica 2.
    let target = echo_target(vec![urls[1].clone()], token, swarm.device_ids().to_vec())?;
    let reach = closed_loop(32, Stop::Calls(count as u64), target_call(&target)).await;
    println!("  reachable through replica 2: {} of {count} ({})", reach.succeeded(), reach.errors());
    swarm.stop(Duration::from_secs(10)).await;
    Ok(KillFigures {
        devices: count,
        back: back.len(),
        times,
        largest_window,
        reachable: usize::try_from(reach.succeeded()).unwrap_or(0),
        database,
    })
}

/// The database's counters at one moment: PostgreSQL's transactions in the cluster's database,
/// and the counters of replicas 2 and 3 (the survivors of the kill).
#[derive(Debug)]
struct DatabaseCount {
    at: Instant,
    transactions: Option<f64>,
    stream_opens: Option<f64>,
    open_statements: Option<f64>,
    pings: Option<f64>,
}

impl DatabaseCount {
    async fn read(database_url: &str, urls: &[String]) -> Self {
        let survivors = &urls[1..];
        let sum = |name: &'static str| async move {
            let mut total = None;
            for base in survivors {
                if let Some(value) = e2e::metric(base, name).await {
                    *total.get_or_insert(0.0) += value;
                }
            }
            total
        };
        Self {
            at: Instant::now(),
            transactions: pg_transactions(database_url).await.ok(),
            stream_opens: sum("dispatcher_stream_opens_total").await,
            open_statements: sum("dispatcher_db_stream_open_statements_total").await,
            pings: sum("dispatcher_db_pings_total").await,
        }
    }
}

/// Committed plus rolled-back transactions of the database `database_url` names, read from
/// another database of the same server, so the reading adds none.
async fn pg_transactions(database_url: &str) -> anyhow::Result<f64> {
    use sqlx::Connection;
    let name = database_url.rsplit('/').next().context("database name")?;
    let name = name.split('?').next().unwrap_or(name);
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", e2e::postgres::server_url())).await?;
    let (count,): (i64,) =
        sqlx::query_as("SELECT (xact_commit + xact_rollback)::BIGINT FROM pg_stat_database WHERE datname = $1")
            .bind(name)
            .fetch_one(&mut admin)
            .await?;
    let _ = admin.close().await;
    Ok(count as f64)
}

/// Per device back: the herd's transactions and pings (each counter's growth from `before` to
/// `after`, less its idle rate from `idle_from` to `before` over that window), and opens per
/// statement.
fn herd_database(
    idle_from: &DatabaseCount,
    before: &DatabaseCount,
    after: &DatabaseCount,
    back: usize,
) -> Option<HerdDatabase> {
    if back == 0 {
        return None;
    }
    let devices = back as f64;
    let idle_for = before.at.duration_since(idle_from.at).as_secs_f64().max(0.001);
    let window = after.at.duration_since(before.at).as_secs_f64();
    let raw =
        |read: fn(&DatabaseCount) -> Option<f64>| -> Option<f64> { Some((read(after)? - read(before)?) / devices) };
    let per_device = |read: fn(&DatabaseCount) -> Option<f64>| -> Option<f64> {
        let (t0, t1, t2) = (read(idle_from)?, read(before)?, read(after)?);
        let idle = (t1 - t0) / idle_for * window;
        Some(((t2 - t1) - idle).max(0.0) / devices)
    };
    let delta = |read: fn(&DatabaseCount) -> Option<f64>| Some(read(after)? - read(before)?);
    let opens = delta(|c| c.stream_opens);
    let open_statements = delta(|c| c.open_statements);
    Some(HerdDatabase {
        raw_statements: raw(|c| c.transactions)?,
        statements: per_device(|c| c.transactions)?,
        pings: per_device(|c| c.pings),
        opens_per_statement: match (opens, open_statements) {
            (Some(opens), Some(statements)) if statements > 0.0 => Some(opens / statements),
            _ => None,
        },
    })
}

// ---- targets ----

fn verdict(met: bool) -> &'static str {
    if met {
        "[met]   "
    } else {
        "[MISSED]"
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        return f64::INFINITY;
    }
    a.as_secs_f64() / b.as_secs_f64()
}

fn print_targets(figures: &Figures) {
    section("ratios to the baselines");
    if let (Some(embedded), Some(sse)) = (&figures.embedded, &figures.sse) {
        println!(
            "  embedded / bare SSE+POST: p50 {:.2}x, p99 {:.2}x, throughput at 64 {:.2}x",
            ratio(embedded.p50(), sse.p50()),
            ratio(embedded.serial.p99(), sse.serial.p99()),
            embedded.parallel.throughput() / sse.parallel.throughput()
        );
    }
    if let (Some(embedded), Some(sse)) = (&figures.embedded, &figures.sse_http) {
        println!(
            "  embedded / bare SSE+POST triggered over HTTP: p50 {:.2}x, p99 {:.2}x, throughput at 64 {:.2}x",
            ratio(embedded.p50(), sse.p50()),
            ratio(embedded.serial.p99(), sse.serial.p99()),
            embedded.parallel.throughput() / sse.parallel.throughput()
        );
    }
    if let (Some(cluster), Some(nats)) = (&figures.cluster, &figures.nats) {
        println!(
            "  cross-replica / raw NATS: p50 {:.2}x, p99 {:.2}x, throughput at 64 {:.3}x",
            ratio(cluster.p50(), nats.p50()),
            ratio(cluster.serial.p99(), nats.serial.p99()),
            cluster.parallel.throughput() / nats.parallel.throughput()
        );
    }
    if let (Some(cluster), Some(embedded)) = (&figures.cluster, &figures.embedded) {
        println!(
            "  cross-replica / embedded: p50 {:.2}x, throughput at 64 {:.2}x",
            ratio(cluster.p50(), embedded.p50()),
            cluster.parallel.throughput() / embedded.parallel.throughput()
        );
    }

    section("targets");
    let missing = |what: &str| println!("  [n/a]    {what}: not measured");
    match (&figures.cluster, &figures.nats) {
        (Some(cluster), Some(nats)) => {
            let t = cluster.parallel.throughput() / nats.parallel.throughput();
            println!(
                "  {} cross-replica throughput at 64 >= 0.16x raw NATS: {:.0}/s = {t:.3}x (NATS {:.0}/s)",
                verdict(t >= 0.16),
                cluster.parallel.throughput(),
                nats.parallel.throughput()
            );
            let r = ratio(cluster.p50(), nats.p50());
            println!(
                "  {} cross-replica p50 at 1 in flight <= 2.4x raw NATS: {} = {r:.2}x (NATS {})",
                verdict(r <= 2.4),
                ms(cluster.p50()),
                ms(nats.p50())
            );
        }
        _ => {
            missing("cross-replica throughput at 64 >= 0.16x raw NATS");
            missing("cross-replica p50 at 1 in flight <= 2.4x raw NATS");
        }
    }
    match &figures.cluster {
        Some(cluster) => {
            let servers: Vec<&(String, Duration, Duration)> =
                cluster.cpu.iter().filter(|(name, _, _)| name != "bench").collect();
            let total: Duration = servers.iter().map(|(_, _, parallel)| *parallel).sum();
            let parts: Vec<String> =
                servers.iter().map(|(name, _, parallel)| format!("{name} {}", parallel.as_micros())).collect();
            println!(
                "  {} server CPU per call at 64 in flight, cluster (replicas + nats-server) <= 120 us: {} us ({})",
                verdict(total <= Duration::from_micros(120)),
                total.as_micros(),
                parts.join(" + ")
            );
        }
        None => missing("server CPU per call, cluster"),
    }
    match (&figures.embedded, &figures.sse) {
        (Some(embedded), Some(sse)) => {
            let t = embedded.parallel.throughput() / sse.parallel.throughput();
            println!(
                "  {} embedded throughput at 64 >= 0.6x bare SSE+POST: {:.0}/s = {t:.2}x (bare {:.0}/s)",
                verdict(t >= 0.6),
                embedded.parallel.throughput(),
                sse.parallel.throughput()
            );
        }
        _ => missing("embedded throughput at 64 >= 0.6x bare SSE+POST"),
    }
    for (name, offline) in [("embedded", &figures.offline_embedded), ("cluster", &figures.offline_cluster)] {
        match offline {
            Some(latencies) => {
                let met = latencies.p50() < Duration::from_millis(1) && latencies.p99() < Duration::from_millis(5);
                println!(
                    "  {} offline answer ({name}) < 1 ms p50 and < 5 ms p99: p50 {}, p99 {}",
                    verdict(met),
                    ms(latencies.p50()),
                    ms(latencies.p99())
                );
            }
            None => missing(&format!("offline answer ({name})")),
        }
    }
    for (name, memory) in [("embedded", figures.memory_embedded), ("cluster", figures.memory_cluster)] {
        match memory {
            Some(kib) => {
                let target = if name == "embedded" { 10.0 } else { 12.0 };
                println!(
                    "  {} memory per idle device stream ({name}) <= {target} KiB: {kib:.1} KiB",
                    verdict(kib <= target),
                );
            }
            None => missing(&format!("memory per idle device stream ({name})")),
        }
    }
    match &figures.kill {
        Some(kill) => {
            let all_back = kill.back == kill.devices;
            println!(
                "  {} {} devices back after kill -9: p99 < 3 s: p50 {}, p99 {}, max {} ({} of {} back, {} reachable)",
                verdict(all_back && kill.times.p99() < Duration::from_secs(3)),
                kill.devices,
                ms(kill.times.p50()),
                ms(kill.times.p99()),
                ms(kill.times.max()),
                kill.back,
                kill.devices,
                kill.reachable
            );
            println!(
                "  {} no 100 ms window holds > 20% of the reconnects: largest {:.1}%",
                verdict(kill.largest_window <= 0.20),
                kill.largest_window * 100.0
            );
            match kill.database {
                Some(db) => println!(
                    "  {} database round trips per reconnect < 1: {}",
                    verdict(db.round_trips().is_some_and(|trips| trips < 1.0)),
                    match db.round_trips() {
                        Some(trips) => format!(
                            "{trips:.3} ({:.3} statements + {:.3} pings)",
                            db.statements,
                            db.pings.unwrap_or(0.0)
                        ),
                        None => format!("{:.3} statements + pings not counted by this build", db.statements),
                    }
                ),
                None => missing("database round trips per reconnect < 1"),
            }
        }
        None => {
            missing("devices back after kill -9: p99 < 3 s");
            missing("no 100 ms window > 20% of the reconnects");
            missing("database round trips per reconnect < 1");
        }
    }
}
