//! `chaos`: kills, pauses (SIGSTOP/SIGCONT) and restarts dispatcher replicas and NATS on a
//! schedule while a swarm of devices holds streams and an open-loop load makes calls, then
//! checks the invariants the faults must not break:
//!
//! - no call executed twice (a call id received by two streams, or twice by one);
//! - no call unresolved past its timeout plus one second (excused only when the replica the
//!   caller was talking to was itself killed or paused during the call: no process can answer
//!   while frozen or dead);
//! - no `ok` answer for a call no device executed;
//!
//! and reports how long each fault took to heal (the disturbed devices back on a stream, and a
//! call through every running replica answered again). Exits 1 when an invariant broke or the
//! cluster did not heal within a minute, 2 on a usage error.
//!
//! ```text
//! chaos [--duration 60] [--quick]                     # a local cluster it starts itself
//! chaos --replica http://127.0.0.1:8080 --replica … --api-token pat_… \
//!       [--pids 123,124,125] [--nats-pids 99] [--destructive] \
//!       [--fault-command './fault.sh {action} {target} {index}']
//! ```
//!
//! Against a cluster of your own it injects only the faults it has a way to inject: with
//! `--pids` it pauses and resumes replicas (and, with `--destructive`, SIGKILLs and SIGTERMs
//! them, leaving restarts to your supervisor); with `--fault-command` it runs the command
//! (`sh -c`) with `{action}` one of kill, pause, resume, term, restart, `{target}` replica or
//! nats, and `{index}` the replica's position among the `--replica` URLs (or the NATS
//! server's); a command that exits non-zero for a fault marks that fault as one it cannot
//! inject, and it is skipped from then on. Without either it only measures. The devices it enrolls there are revoked at
//! the end. Traffic goes only to 127.0.0.0/8 (reach a remote cluster through port-forwards).
//!
//! Not here: throughput and latency figures (the `bench` binary).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use e2e::cluster::LocalCluster;
use e2e::load::{ms, open_loop, CallTarget, Latencies, Outcome};
use e2e::process::send_signal;
use e2e::swarm::{enroll_many, Placement, PostTo, Swarm, SwarmConfig};
use e2e::Control;
use parking_lot::Mutex;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "chaos", about = "Injects faults into a dispatcher cluster under load and checks the invariants.")]
struct Args {
    /// Seconds of load and faults.
    #[arg(long)]
    duration: Option<u64>,
    /// A short run for CI (about 15 s of faults, a few dozen devices).
    #[arg(long)]
    quick: bool,
    /// Replicas of the local cluster.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// NATS servers of the local cluster (more than one: a routed NATS cluster).
    #[arg(long, default_value_t = 1)]
    nats_nodes: usize,
    /// Simulated devices.
    #[arg(long)]
    devices: Option<usize>,
    /// Calls started per second (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// `timeoutMs` of every call.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Seconds of steady load between two faults.
    #[arg(long)]
    interval: Option<f64>,
    /// Tool latency of the simulated devices, in milliseconds.
    #[arg(long, default_value_t = 5)]
    tool_ms: u64,
    /// The devices' reconnect backoff base and cap (host-agent's --backoff-base-ms and
    /// --max-backoff-ms).
    #[arg(long, default_value_t = 1000)]
    backoff_base_ms: u64,
    #[arg(long, default_value_t = 2000)]
    max_backoff_ms: u64,
    /// The local replicas' --keepalive-secs (devices give a stream up after two of silence).
    #[arg(long, default_value_t = 2)]
    keepalive_secs: u64,
    /// A replica of your own cluster (repeat for each); without it a local cluster is started.
    #[arg(long = "replica")]
    replica_urls: Vec<String>,
    /// The api token for your cluster (`dispatcher token create`).
    #[arg(long, env = "CHAOS_API_TOKEN")]
    api_token: Option<String>,
    /// Process ids of your replicas, in the order of --replica, to signal.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Process ids of your NATS servers, to signal.
    #[arg(long, value_delimiter = ',')]
    nats_pids: Vec<u32>,
    /// With --pids: also SIGKILL and SIGTERM (restarting is up to your supervisor).
    #[arg(long)]
    destructive: bool,
    /// A shell command that injects a fault: {action} {target} {index} are substituted.
    #[arg(long)]
    fault_command: Option<String>,
    /// Keepalive interval of your cluster, in seconds (sets how long a pause lasts).
    #[arg(long, default_value_t = 15)]
    remote_keepalive_secs: u64,
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    Pause,
    Term,
}

/// Which process a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Replica(usize),
    Nats(usize),
}

#[derive(Debug, Clone, Copy)]
struct Fault {
    action: Action,
    target: Target,
    /// How long the fault lasts before the repair.
    hold: Duration,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match self.action {
            Action::Kill => "kill -9",
            Action::Pause => "SIGSTOP",
            Action::Term => "SIGTERM",
        };
        match self.target {
            Target::Replica(i) => write!(f, "{action} replica {}", i + 1),
            Target::Nats(i) => write!(f, "{action} NATS server {}", i + 1),
        }
    }
}

/// How faults are injected.
enum Injector {
    Local(Box<LocalCluster>),
    Pids { replicas: Vec<u32>, nats: Vec<u32>, destructive: bool },
    Command(String),
    Measure,
}

impl Injector {
    fn supports(&self, fault: &Fault) -> bool {
        match self {
            Self::Local(_) | Self::Command(_) => true,
            Self::Measure => false,
            Self::Pids { replicas, nats, destructive } => {
                let known = match fault.target {
                    Target::Replica(i) => i < replicas.len(),
                    Target::Nats(i) => i < nats.len(),
                };
                known && (fault.action == Action::Pause || *destructive)
            }
        }
    }

    async fn inject(&mut self, fault: &Fault) -> anyhow::Result<()> {
        match self {
            Self::Local(cluster) => match (fault.action, fault.target) {
                (Action::Kill, Target::Replica(i)) => cluster.kill(i).await,
                (Action::Pause, Target::Replica(i)) => cluster.pause(i)?,
                (Action::Term, Target::Replica(i)) => {
                    cluster.replica(i).sigterm()?;
                }
                (Action::Kill | Action::Term, Target::Nats(i)) => cluster.kill_nats(i),
                (Action::Pause, Target::Nats(i)) => cluster.pause_nats(i)?,
            },
            Self::Pids { replicas, nats, .. } => {
                let pid = match fault.target {
                    Target::Replica(i) => replicas[i],
                    Target::Nats(i) => nats[i],
                };
                let signal = match fault.action {
                    Action::Kill => libc::SIGKILL,
                    Action::Pause => libc::SIGSTOP,
                    Action::Term => libc::SIGTERM,
                };
                send_signal(pid, signal).with_context(|| format!("signal {signal} to {pid}"))?;
            }
            Self::Command(template) => {
                let action = match fault.action {
                    Action::Kill => "kill",
                    Action::Pause => "pause",
                    Action::Term => "term",
                };
                run_command(template, action, fault.target).await?;
            }
            Self::Measure => {}
        }
        Ok(())
    }

    async fn repair(&mut self, fault: &Fault) -> anyhow::Result<()> {
        match self {
            Self::Local(cluster) => match (fault.action, fault.target) {
                (Action::Kill | Action::Term, Target::Replica(i)) => {
                    if fault.action == Action::Term {
                        let _ = cluster.replica_mut(i).wait_exit(Duration::from_secs(30)).await;
                    }
                    cluster.restart(i, Duration::from_secs(60)).await?;
                }
                (Action::Pause, Target::Replica(i)) => cluster.resume(i)?,
                (Action::Kill | Action::Term, Target::Nats(i)) => cluster.restart_nats(i).await?,
                (Action::Pause, Target::Nats(i)) => cluster.resume_nats(i)?,
            },
            Self::Pids { replicas, nats, .. } => {
                if fault.action == Action::Pause {
                    let pid = match fault.target {
                        Target::Replica(i) => replicas[i],
                        Target::Nats(i) => nats[i],
                    };
                    send_signal(pid, libc::SIGCONT).with_context(|| format!("SIGCONT to {pid}"))?;
                }
            }
            Self::Command(template) => {
                let action = if fault.action == Action::Pause { "resume" } else { "restart" };
                run_command(template, action, fault.target).await?;
            }
            Self::Measure => {}
        }
        Ok(())
    }
}

async fn run_command(template: &str, action: &str, target: Target) -> anyhow::Result<()> {
    let (kind, index) = match target {
        Target::Replica(i) => ("replica", i),
        Target::Nats(i) => ("nats", i),
    };
    let command = template.replace("{action}", action).replace("{target}", kind).replace("{index}", &index.to_string());
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("sh").arg("-c").arg(&command).kill_on_drop(true).status(),
    )
    .await
    .with_context(|| format!("{command:?} took over 120 s"))?
    .with_context(|| format!("running {command:?}"))?;
    anyhow::ensure!(status.success(), "{command:?} exited with {status}");
    Ok(())
}

/// One call the load made.
#[derive(Debug, Clone)]
struct CallRecord {
    started: Instant,
    latency: Duration,
    replica: usize,
    outcome: Outcome,
    call_id: Option<String>,
}

/// When a replica could not answer: from the fault until its repair completed.
#[derive(Debug, Clone, Copy)]
struct Window {
    replica: usize,
    from: Instant,
    to: Instant,
}

/// How one fault healed.
#[derive(Debug, Clone)]
struct Healing {
    fault: String,
    at: Duration,
    moved: usize,
    devices_back: Option<Duration>,
    calls_ok: Option<Duration>,
}

/// What the load sees of the replicas (a load balancer's health checks): which not to send
/// new calls to.
struct Health {
    down: Vec<AtomicBool>,
    next: AtomicU64,
}

impl Health {
    fn pick(&self) -> usize {
        let n = self.down.len();
        for _ in 0..n {
            let i = (self.next.fetch_add(1, Ordering::Relaxed) % n as u64) as usize;
            if !self.down[i].load(Ordering::Acquire) {
                return i;
            }
        }
        (self.next.fetch_add(1, Ordering::Relaxed) % n as u64) as usize
    }
}

fn main() {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            std::process::exit(if error.use_stderr() { 2 } else { 0 });
        }
    };
    if !args.replica_urls.is_empty() && args.api_token.is_none() {
        eprintln!("error: --replica needs --api-token");
        std::process::exit(2);
    }
    if let Err(error) = use_sibling_dispatcher() {
        eprintln!("chaos: {error:#}");
        std::process::exit(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("chaos: {error}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(error) => {
            println!("chaos FAILED: {error:#}");
            1
        }
    };
    drop(runtime);
    std::process::exit(code);
}

/// Points the harness at the `dispatcher` binary next to this one, if there is one.
fn use_sibling_dispatcher() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_BIN_EXE_dispatcher").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(format!("dispatcher{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        std::env::set_var("CARGO_BIN_EXE_dispatcher", &path);
    }
    Ok(())
}

/// The fault plan: kinds of fault in turn, each replica fault hitting the next replica.
fn schedule(replicas: usize, nats: usize, keepalive: Duration, quick: bool) -> Vec<Fault> {
    let pause = keepalive * 2 + Duration::from_secs(1);
    let kinds: &[(Action, bool)] = if quick {
        &[(Action::Kill, false), (Action::Pause, false), (Action::Kill, true)]
    } else {
        &[
            (Action::Kill, false),
            (Action::Pause, false),
            (Action::Kill, true),
            (Action::Term, false),
            (Action::Pause, true),
        ]
    };
    let mut faults = Vec::new();
    let (mut next_replica, mut next_nats) = (0, 0);
    for _ in 0..replicas.max(1) {
        for &(action, on_nats) in kinds {
            let target = if on_nats {
                if nats == 0 {
                    continue;
                }
                next_nats += 1;
                Target::Nats((next_nats - 1) % nats)
            } else {
                next_replica += 1;
                Target::Replica((next_replica - 1) % replicas.max(1))
            };
            let hold = match (action, on_nats) {
                (Action::Pause, false) => pause,
                (Action::Pause, true) | (Action::Kill, true) => Duration::from_secs(3),
                _ => Duration::from_secs(2),
            };
            faults.push(Fault { action, target, hold });
        }
    }
    faults
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let quick = args.quick;
    let duration = Duration::from_secs(args.duration.unwrap_or(if quick { 15 } else { 60 }));
    let devices_wanted = args.devices.unwrap_or(if quick { 30 } else { 300 });
    let rate = args.rate.unwrap_or(if quick { 20.0 } else { 50.0 });
    let interval = Duration::from_secs_f64(args.interval.unwrap_or(if quick { 1.0 } else { 3.0 }));
    let timeout = Duration::from_millis(args.timeout_ms);

    let local = args.replica_urls.is_empty();
    let (mut injector, urls, token, keepalive, nats_count) = if local {
        let cluster = LocalCluster::builder()
            .replicas(args.replicas)
            .nats_nodes(args.nats_nodes)
            .keepalive_secs(args.keepalive_secs)
            .broker_grace_secs(2)
            // The swarm's devices all belong to one user: past the default quota of devices.
            .configure(|_, builder| builder.flag("--max-devices-per-user", 1_000_000))
            .start()
            .await
            .context("starting the local cluster")?;
        let urls = cluster.urls();
        let token = cluster.token().to_owned();
        println!(
            "== chaos: local cluster of {} replicas, {} NATS server(s), PostgreSQL; keepalive {} s",
            args.replicas, args.nats_nodes, args.keepalive_secs
        );
        (Injector::Local(Box::new(cluster)), urls, token, Duration::from_secs(args.keepalive_secs), args.nats_nodes)
    } else {
        let injector = if let Some(template) = &args.fault_command {
            Injector::Command(template.clone())
        } else if !args.pids.is_empty() || !args.nats_pids.is_empty() {
            Injector::Pids { replicas: args.pids.clone(), nats: args.nats_pids.clone(), destructive: args.destructive }
        } else {
            Injector::Measure
        };
        let nats = match &injector {
            Injector::Pids { nats, .. } => nats.len(),
            Injector::Command(_) => 1,
            _ => 0,
        };
        println!("== chaos: your cluster, {} replicas", args.replica_urls.len());
        let token = args.api_token.clone().unwrap_or_default();
        let keepalive = Duration::from_secs(args.remote_keepalive_secs);
        (injector, args.replica_urls.clone(), token, keepalive, nats)
    };
    let control = Control::new(urls[0].clone(), token.clone());

    // The devices.
    let enrolled = enroll_many(&urls, &control, devices_wanted, 0, 8).await.context("enrolling devices")?;
    let mut config = SwarmConfig::new(urls.clone());
    config.placement = Placement::Balanced;
    config.post_to = PostTo::Stream;
    config.tool_latency = Duration::from_millis(args.tool_ms);
    config.backoff_base = Duration::from_millis(args.backoff_base_ms);
    config.backoff_cap = Duration::from_millis(args.max_backoff_ms);
    config.silence = keepalive * 2;
    // host-agent gives up a stream request unanswered for two keepalives, too.
    config.open_timeout = keepalive * 2;
    let swarm = Arc::new(Swarm::start(enrolled, config)?);
    swarm.wait_online(swarm.len(), Duration::from_secs(120)).await?;
    println!(
        "  {} devices online; load {rate}/s, timeout {} ms, tool {} ms; {} s of faults",
        swarm.len(),
        args.timeout_ms,
        args.tool_ms,
        duration.as_secs()
    );

    let faults: Vec<Fault> = schedule(urls.len(), nats_count, keepalive, quick)
        .into_iter()
        .filter(|fault| injector.supports(fault))
        .collect();
    if faults.is_empty() {
        println!("  no way to inject faults: measuring only (give --pids, --nats-pids or --fault-command)");
    }

    // The load, in the background.
    let target =
        CallTarget::new(urls.clone(), &token, swarm.device_ids().to_vec(), "echo", json!({"n": 1}), args.timeout_ms)?;
    let health =
        Arc::new(Health { down: urls.iter().map(|_| AtomicBool::new(false)).collect(), next: AtomicU64::new(0) });
    let records: Arc<Mutex<Vec<CallRecord>>> = Arc::default();
    let load = {
        let target = target.clone();
        let health = health.clone();
        let records = records.clone();
        let devices = swarm.device_ids().to_vec();
        tokio::spawn(open_loop(rate, duration, 10_000, move |seq| {
            let target = target.clone();
            let health = health.clone();
            let records = records.clone();
            let device = devices[rand::random_range(0..devices.len())].clone();
            let _ = seq;
            async move {
                let replica = health.pick();
                let started = Instant::now();
                let answer = target.call_on(replica, &device).await;
                let outcome = answer.outcome.clone();
                records.lock().push(CallRecord {
                    started,
                    latency: answer.latency,
                    replica,
                    outcome: answer.outcome,
                    call_id: answer.call_id,
                });
                outcome
            }
        }))
    };

    // The faults.
    let began = Instant::now();
    let mut windows: Vec<Window> = Vec::new();
    let mut healings: Vec<Healing> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut next = 0usize;
    let mut faults = faults;
    let mut skipped: Vec<Fault> = Vec::new();
    while !faults.is_empty() && began.elapsed() + interval < duration {
        tokio::time::sleep(interval).await;
        let fault = faults[next % faults.len()];
        next += 1;
        let on_replica = match fault.target {
            Target::Replica(i) => Some(i),
            Target::Nats(_) => None,
        };
        let disturbed: Vec<usize> = match on_replica {
            Some(i) => swarm.devices_on(i),
            None => (0..swarm.len()).collect(),
        };
        let injected = Instant::now();
        if let Some(i) = on_replica {
            health.down[i].store(true, Ordering::Release);
        }
        if let Err(error) = injector.inject(&fault).await {
            if let Some(i) = on_replica {
                health.down[i].store(false, Ordering::Release);
            }
            // A hook that cannot inject this fault says so by failing: skip it, and it is not
            // tried again.
            println!(
                "  t={:5.1} s {fault:<22} skipped: could not inject it ({error:#})",
                began.elapsed().as_secs_f64()
            );
            skipped.push(fault);
            faults.retain(|f| !(f.action == fault.action && f.target == fault.target));
            continue;
        }
        // Healing is watched from the injection on, while the fault holds and is repaired.
        let hold_and_repair = async {
            tokio::time::sleep(fault.hold).await;
            let repaired = injector.repair(&fault).await;
            if let Some(i) = on_replica {
                windows.push(Window { replica: i, from: injected, to: Instant::now() });
                health.down[i].store(false, Ordering::Release);
            }
            repaired
        };
        let (repaired, healing) =
            tokio::join!(hold_and_repair, heal(&swarm, &target, &health, &fault, &disturbed, injected, began));
        if let Err(error) = repaired {
            failures.push(format!("{fault}: could not repair: {error:#}"));
            break;
        }
        println!(
            "  t={:5.1} s {:<22} {} devices on it, {} moved; back after {}; calls through every running replica ok after {}",
            healing.at.as_secs_f64(),
            healing.fault,
            disturbed.len(),
            healing.moved,
            healing.devices_back.map_or("NEVER".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            healing.calls_ok.map_or("NEVER".into(), |d| format!("{:.2} s", d.as_secs_f64())),
        );
        if healing.devices_back.is_none() || healing.calls_ok.is_none() {
            failures.push(format!("{fault}: the cluster did not heal within 60 s"));
        }
        healings.push(healing);
    }
    let report = load.await.context("the load task")?;
    // Results still on their way settle.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The invariants.
    let records = records.lock().clone();
    let twice = swarm.double_executions();
    let deadline = timeout + Duration::from_secs(1);
    let excused = |record: &CallRecord| {
        let end = record.started + record.latency;
        windows.iter().any(|w| w.replica == record.replica && w.from <= end && record.started <= w.to)
    };
    let mut unresolved = Vec::new();
    let mut excused_count = 0usize;
    let mut ok_never_executed = Vec::new();
    for record in &records {
        let late = record.latency > deadline || matches!(record.outcome, Outcome::Transport(_));
        if late {
            if excused(record) {
                excused_count += 1;
            } else {
                unresolved.push(record.clone());
            }
        }
        if record.outcome == Outcome::Ok {
            if let Some(id) = &record.call_id {
                if swarm.times_executed(id) == 0 {
                    ok_never_executed.push(id.clone());
                }
            }
        }
    }
    let mut outcomes = BTreeMap::<String, usize>::new();
    for record in &records {
        *outcomes.entry(record.outcome.to_string()).or_default() += 1;
    }
    let ok_latency = Latencies::new(records.iter().filter(|r| r.outcome == Outcome::Ok).map(|r| r.latency).collect());

    println!("\n== results");
    println!(
        "  calls: {} answered ({}); {} not started (too many outstanding)",
        records.len(),
        outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        report.skipped
    );
    println!("  ok calls: {}", ok_latency.summary());
    println!("  swarm: {:?}", swarm.stats());
    let verdict = |n: usize| if n == 0 { "[ok]    " } else { "[BROKEN]" };
    println!("  {} calls executed twice: {}", verdict(twice.len()), twice.len());
    for (id, n) in twice.iter().take(10) {
        println!("           {id} executed {n} times");
    }
    println!(
        "  {} calls unresolved past their timeout + 1 s: {} ({} more on a replica that was killed or paused meanwhile, excused)",
        verdict(unresolved.len()),
        unresolved.len(),
        excused_count
    );
    for record in unresolved.iter().take(10) {
        println!(
            "           t={:.1} s via replica {}: {} after {}",
            record.started.duration_since(began).as_secs_f64(),
            record.replica + 1,
            record.outcome,
            ms(record.latency)
        );
    }
    println!(
        "  {} ok answers for calls no device executed: {}",
        verdict(ok_never_executed.len()),
        ok_never_executed.len()
    );
    if !healings.is_empty() {
        let back = Latencies::new(healings.iter().filter_map(|h| h.devices_back).collect());
        let calls = Latencies::new(healings.iter().filter_map(|h| h.calls_ok).collect());
        println!(
            "  recovery over {} faults: devices back p50 {:.2} s max {:.2} s; calls ok again p50 {:.2} s max {:.2} s",
            healings.len(),
            back.p50().as_secs_f64(),
            back.max().as_secs_f64(),
            calls.p50().as_secs_f64(),
            calls.max().as_secs_f64()
        );
    }
    if !skipped.is_empty() {
        println!("  faults the hook could not inject: {}", skipped.len());
    }
    for failure in &failures {
        println!("  [FAILED] {failure}");
    }

    // Clean up what was enrolled on a cluster not ours.
    if !local {
        for id in swarm.device_ids() {
            let _ = control.delete_device(id).await;
        }
    }
    let swarm = Arc::try_unwrap(swarm).map_err(|_| anyhow::anyhow!("swarm still shared"))?;
    swarm.stop(Duration::from_secs(10)).await;
    drop(injector);

    let held = twice.is_empty() && unresolved.is_empty() && ok_never_executed.is_empty() && failures.is_empty();
    println!("\nchaos {}", if held { "passed: every invariant held" } else { "FAILED" });
    if records.is_empty() {
        bail!("no call was made");
    }
    Ok(held)
}

/// Watches (60 s at most from the injection) until the devices a fault disturbed are back on a
/// stream opened after it, every device is online, and a call through every replica the load
/// balancer considers up is answered `ok` (for a paused NATS, only once it answers again).
async fn heal(
    swarm: &Swarm,
    target: &CallTarget,
    health: &Health,
    fault: &Fault,
    disturbed: &[usize],
    injected: Instant,
    began: Instant,
) -> Healing {
    let limit = injected + Duration::from_secs(60);
    let must_move = matches!(fault.target, Target::Replica(_)) || fault.action != Action::Pause;
    let mut devices_back = None;
    let mut calls_ok = None;
    let mut moved = 0;
    // Calls are probed once the fault is in effect (the injection returned).
    tokio::time::sleep(Duration::from_millis(20)).await;
    while Instant::now() < limit && (devices_back.is_none() || calls_ok.is_none()) {
        if devices_back.is_none() {
            let reconnected = disturbed
                .iter()
                .filter(|&&i| swarm.last_ready(i).is_some_and(|t| t > injected) && swarm.replica_of(i).is_some())
                .count();
            moved = moved.max(reconnected);
            let all_online = swarm.online() == swarm.len();
            let settled = if must_move { reconnected == disturbed.len() } else { true };
            if all_online && settled {
                devices_back = Some(injected.elapsed());
            }
        }
        if calls_ok.is_none() {
            let mut all = true;
            for replica in 0..health.down.len() {
                if health.down[replica].load(Ordering::Acquire) {
                    continue;
                }
                let online: Vec<usize> = (0..swarm.len()).filter(|&i| swarm.replica_of(i).is_some()).collect();
                let Some(&device) = online.get(rand::random_range(0..online.len().max(1))) else {
                    all = false;
                    break;
                };
                let answer = target.call_on(replica, &swarm.device_ids()[device]).await;
                if answer.outcome != Outcome::Ok {
                    all = false;
                    break;
                }
            }
            if all {
                calls_ok = Some(injected.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Healing { fault: fault.to_string(), at: injected.duration_since(began), moved, devices_back, calls_ok }
}
