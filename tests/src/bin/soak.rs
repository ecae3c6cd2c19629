//! `soak`: an hour's worth of a busy fleet's traffic in a few minutes, against a local
//! three-replica cluster (NATS + PostgreSQL), and the memory and open descriptors of every
//! process before and after. A leak shows as a figure that grows with the work and does not
//! come back when the work stops.
//!
//! ```text
//! cargo build --release -p dispatcher -p host-agent -p e2e && target/release/soak [--calls 200000]
//! ```
//!
//! The default, 200,000 calls, is an hour of 55 calls a second. Of the work:
//! - small calls at 64 in flight to simulated devices (the swarm), spread over the replicas;
//! - large calls (256 KiB of input each), 2 % of the count;
//! - calls to an enrolled device with no stream (`device offline`), 1 %;
//! - calls that time out (a device that holds its answer past the call's timeout), 0.2 %;
//! - real `host-agent` processes running reads (read_file, list_directory, grep, hash_file,
//!   stat) and write proposals, every tenth approved and applied, 1 %;
//! - churn: devices enrolled and revoked, 0.1 %, and pairing codes left unused (at most 40).
//!
//! Printed: each phase's report, then every process's VmRSS and descriptor count before the
//! work, right after it, and after a settle period. Nothing is asserted beyond the work itself
//! answering as it should (exit 1 otherwise); the figures go to BENCHMARKS.md.
//!
//! Not here: faults (the `chaos` binary) and throughput targets (the `bench` binary).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use e2e::cluster::LocalCluster;
use e2e::load::{closed_loop, CallTarget, LoadReport, Outcome, Stop};
use e2e::swarm::{enroll_many, Placement, PostTo, Swarm, SwarmConfig};
use e2e::{Agent, Control, TestDevice};
use reqwest::StatusCode;
use serde_json::json;

/// The replicas' keepalive interval: a stream whose device went away is noticed within it.
const KEEPALIVE_SECS: u64 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "soak",
    about = "Runs an hour's worth of calls through a local cluster and prints memory and descriptors."
)]
struct Args {
    /// Small calls in the main phase; the other phases are fractions of it.
    #[arg(long)]
    calls: Option<u64>,
    /// Simulated devices.
    #[arg(long)]
    devices: Option<usize>,
    /// Real host-agent processes.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Calls in flight.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Seconds to wait after the work before the last snapshot.
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// A smoke run for CI: 2,000 calls, 30 devices, one agent.
    #[arg(long)]
    quick: bool,
}

/// One process's figures at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss_kib: u64,
    fds: usize,
    /// Of the descriptors: TCP connections accepted on the process's HTTP port, to PostgreSQL,
    /// and to NATS.
    http_in: usize,
    postgres: usize,
    nats: usize,
}

/// The TCP sockets of this machine: inode to (local port, remote port).
fn tcp_sockets() -> HashMap<u64, (u16, u16)> {
    let mut sockets = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let port = |field: &str| field.rsplit(':').next().and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if let (Some(local), Some(remote), Ok(inode)) = (port(fields[1]), port(fields[2]), fields[9].parse()) {
                sockets.insert(inode, (local, remote));
            }
        }
    }
    sockets
}

fn usage(process: &Process, sockets: &HashMap<u64, (u16, u16)>) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid)).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0);
    let mut usage = Usage { rss_kib, ..Usage::default() };
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", process.pid)) else { return usage };
    for entry in dir.filter_map(Result::ok) {
        usage.fds += 1;
        let Ok(link) = std::fs::read_link(entry.path()) else { continue };
        let link = link.to_string_lossy();
        let Some(inode) = link.strip_prefix("socket:[").and_then(|rest| rest.trim_end_matches(']').parse().ok()) else {
            continue;
        };
        match sockets.get(&inode) {
            Some(&(local, remote)) if remote != 0 && Some(local) == process.http_port => usage.http_in += 1,
            Some(&(_, 5432)) => usage.postgres += 1,
            Some(&(_, remote)) if remote != 0 && remote == process.nats_port => usage.nats += 1,
            _ => {}
        }
    }
    usage
}

/// A process watched: its label, pid, the HTTP port it serves (if any) and the NATS port.
struct Process {
    label: String,
    pid: u32,
    http_port: Option<u16>,
    nats_port: u16,
}

struct Watched(Vec<Process>);

impl Watched {
    fn snapshot(&self) -> Vec<Usage> {
        let sockets = tcp_sockets();
        self.0.iter().map(|process| usage(process, &sockets)).collect()
    }
}

fn port_of(url: &str) -> Option<u16> {
    url.rsplit(':').next().and_then(|port| port.trim_end_matches('/').parse().ok())
}

fn main() {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            std::process::exit(if error.use_stderr() { 2 } else { 0 });
        }
    };
    use_sibling_binaries();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("soak: {error}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(()) => 0,
        Err(error) => {
            println!("soak FAILED: {error:#}");
            1
        }
    };
    drop(runtime);
    std::process::exit(code);
}

/// Points the harness at the `dispatcher` and `host-agent` binaries next to this one.
fn use_sibling_binaries() {
    let Ok(exe) = std::env::current_exe() else { return };
    for (var, name) in [("CARGO_BIN_EXE_dispatcher", "dispatcher"), ("CARGO_BIN_EXE_host-agent", "host-agent")] {
        if std::env::var_os(var).is_some() {
            continue;
        }
        let path = exe.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        if path.is_file() {
            std::env::set_var(var, &path);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let calls = args.calls.unwrap_or(if args.quick { 2_000 } else { 200_000 });
    let devices = args.devices.unwrap_or(if args.quick { 30 } else { 300 });
    let agents = if args.quick { args.agents.min(1) } else { args.agents };
    let started = Instant::now();

    let cluster = LocalCluster::builder()
        .replicas(3)
        .keepalive_secs(KEEPALIVE_SECS)
        .start()
        .await
        .context("starting the local cluster")?;
    let urls = cluster.urls();
    let control = cluster.control().clone();
    println!("== soak: {calls} calls, {devices} simulated devices, {agents} host-agents, 3 replicas");

    let swarm_devices = enroll_many(&urls, &control, devices, 0, 8).await.context("enrolling devices")?;
    let mut config = SwarmConfig::new(urls.clone());
    config.placement = Placement::Balanced;
    config.post_to = PostTo::Balanced;
    config.result_bytes = 512;
    let swarm = Swarm::start(swarm_devices, config)?;
    swarm.wait_online(swarm.len(), Duration::from_secs(60)).await?;

    let mut fleet = Vec::new();
    for index in 0..agents {
        fleet.push(AgentOnDisk::start(&control, &urls, index).await?);
    }
    // An enrolled device that never opens a stream: every call to it is `device offline`.
    let offline = TestDevice::pair(&urls[0], &control, "soak-offline").await?;

    let nats_port = cluster.nats_node(0).port();
    let mut watched = Watched(Vec::new());
    for (index, pid) in cluster.pids().into_iter().enumerate() {
        let label = format!("dispatcher {index}");
        watched.0.push(Process { label, pid, http_port: port_of(&urls[index]), nats_port });
    }
    for index in 0..cluster.nats_len() {
        let label = format!("nats-server {index}");
        watched.0.push(Process { label, pid: cluster.nats_node(index).pid(), http_port: None, nats_port });
    }
    for (index, agent) in fleet.iter().enumerate() {
        let label = format!("host-agent {index}");
        watched.0.push(Process { label, pid: agent.agent.pid(), http_port: None, nats_port });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = watched.snapshot();

    let token = cluster.token().to_owned();
    let mut problems = Vec::new();

    // Small calls.
    let target = CallTarget::new(urls.clone(), &token, swarm.device_ids().to_vec(), "echo", json!({"n": 1}), 10_000)?;
    let report = run_load(args.in_flight, calls, &target).await;
    expect_all(&mut problems, "small calls", &report, &Outcome::Ok);

    // Large calls.
    let big = json!({"pad": "x".repeat(256 * 1024)});
    let target = CallTarget::new(urls.clone(), &token, swarm.device_ids().to_vec(), "echo", big, 10_000)?;
    let report = run_load(args.in_flight.min(16), calls / 50, &target).await;
    expect_all(&mut problems, "large calls (256 KiB)", &report, &Outcome::Ok);

    // Offline.
    let target = CallTarget::new(urls.clone(), &token, vec![offline.device_id.clone()], "echo", json!({}), 10_000)?;
    let report = run_load(args.in_flight, calls / 100, &target).await;
    expect_all(&mut problems, "offline calls", &report, &Outcome::Offline);

    // Timeouts: a device that never answers.
    let silent = TestDevice::pair(&urls[1], &control, "soak-silent").await?;
    let silent_conn = silent.connect(&urls[1], e2e::Answer::Silent).await?;
    let target = CallTarget::new(urls.clone(), &token, vec![silent.device_id.clone()], "echo", json!({}), 200)?;
    let report = run_load(args.in_flight, (calls / 500).max(10), &target).await;
    expect_all(&mut problems, "calls that time out", &report, &Outcome::TimedOut);
    drop(silent_conn);

    // Real agents: reads and proposals.
    let agent_calls = (calls / 100).max(20);
    let agent_started = Instant::now();
    let (mut reads, mut proposed, mut applied) = (0u64, 0u64, 0u64);
    for k in 0..agent_calls {
        let agent = &fleet[(k as usize) % fleet.len()];
        let replica = Control::new(urls[(k as usize) % urls.len()].clone(), token.clone());
        if k % 10 == 9 {
            let input = json!({"path": format!("out/note-{k}.txt"), "content": format!("note {k}\n")});
            let (status, body) = replica.call(&agent.device_id, "write_file", input, Some(10_000)).await?;
            let Some(id) = body["proposalId"].as_str() else {
                problems.push(format!("write_file proposal answered {status}: {body}"));
                continue;
            };
            proposed += 1;
            if k % 100 == 99 {
                let (status, body) = replica.approve(id).await?;
                if status == StatusCode::OK && body["ok"] == true {
                    applied += 1;
                } else {
                    problems.push(format!("approve answered {status}: {body}"));
                }
            } else {
                let (status, body) = replica.reject(id).await?;
                if status != StatusCode::OK {
                    problems.push(format!("reject answered {status}: {body}"));
                }
            }
            continue;
        }
        let (tool, input) = match k % 5 {
            0 => ("read_file", json!({"path": "src/lib.txt"})),
            1 => ("list_directory", json!({"path": ".", "recursive": true})),
            2 => ("grep", json!({"pattern": "needle", "path": "."})),
            3 => ("hash_file", json!({"path": "blob.bin"})),
            _ => ("stat", json!({"path": "src/lib.txt"})),
        };
        let (status, body) = replica.call(&agent.device_id, tool, input, Some(10_000)).await?;
        if status == StatusCode::OK && body["ok"] == true {
            reads += 1;
        } else {
            problems.push(format!("{tool} answered {status}: {body}"));
        }
    }
    println!(
        "  host-agents: {reads} reads, {proposed} proposals ({applied} applied, the rest rejected) in {:.1} s",
        agent_started.elapsed().as_secs_f64()
    );

    // Churn: devices enrolled and revoked, pairing codes minted and left to expire.
    let churn = (calls / 1000).max(5) as usize;
    let churned = enroll_many(&urls, &control, churn, devices + 1, 4).await.context("churn enrollments")?;
    for device in &churned {
        let (status, _) = control.delete_device(&device.device_id).await?;
        if status != StatusCode::NO_CONTENT {
            problems.push(format!("revoking a churned device answered {status}"));
        }
    }
    // Codes left unused to expire, within the user's quota of live codes (50 by default).
    let unused = churn.min(40);
    for _ in 0..unused {
        control.pairing_code().await?;
    }
    println!("  churn: {churn} devices enrolled and revoked, {unused} more pairing codes minted and left unused");

    let after_work = watched.snapshot();
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let settled = watched.snapshot();
    let stats = swarm.stats();
    let (distinct, doubles) = (swarm.distinct_calls(), swarm.double_executions().len());
    // Every client gone: the devices' streams and the pooled connections of the load.
    swarm.stop(Duration::from_secs(5)).await;
    drop(fleet);
    // A replica notices a stream whose device went away at its next keepalive.
    tokio::time::sleep(Duration::from_secs(KEEPALIVE_SECS * 2 + 1)).await;
    let gone = watched.snapshot();

    println!(
        "\n== memory (VmRSS) and open descriptors: before the work, after it, after {} s, and with every client gone",
        args.settle_secs
    );
    println!(
        "  {:<16} {:>11} {:>11} {:>11} {:>11} {:>8}   {:>5} {:>5} {:>5} {:>5}",
        "process", "before", "after", "settled", "no clients", "growth", "fds", "after", "settl", "gone"
    );
    for (index, process) in watched.0.iter().enumerate() {
        let (b, a, s, g) = (before[index], after_work[index], settled[index], gone[index]);
        println!(
            "  {:<16} {:>7} KiB {:>7} KiB {:>7} KiB {:>7} KiB {:>+7.1}%   {:>5} {:>5} {:>5} {:>5}",
            process.label,
            b.rss_kib,
            a.rss_kib,
            s.rss_kib,
            g.rss_kib,
            percent(b.rss_kib, s.rss_kib),
            b.fds,
            a.fds,
            s.fds,
            g.fds
        );
    }
    println!("\n  descriptors by kind (HTTP connections in / to PostgreSQL / to NATS): before, after, settled, gone");
    for (index, process) in watched.0.iter().filter(|p| p.http_port.is_some()).enumerate() {
        let kinds = |u: &Usage| format!("{}/{}/{}", u.http_in, u.postgres, u.nats);
        println!(
            "  {:<16} {:>10} {:>10} {:>10} {:>10}",
            process.label,
            kinds(&before[index]),
            kinds(&after_work[index]),
            kinds(&settled[index]),
            kinds(&gone[index])
        );
    }
    println!(
        "\n  swarm: {} calls received, {distinct} distinct, {doubles} executed twice; {} stream losses",
        stats.calls, stats.losses
    );
    if doubles > 0 {
        problems.push(format!("{doubles} calls executed twice"));
    }
    println!("  total {:.1} s", started.elapsed().as_secs_f64());

    if !problems.is_empty() {
        problems.truncate(20);
        bail!("the work did not answer as it should:\n  {}", problems.join("\n  "));
    }
    println!("soak done");
    Ok(())
}

fn percent(before: u64, after: u64) -> f64 {
    if before == 0 {
        return 0.0;
    }
    (after as f64 - before as f64) * 100.0 / before as f64
}

async fn run_load(in_flight: usize, count: u64, target: &CallTarget) -> LoadReport {
    let target = target.clone();
    closed_loop(in_flight, Stop::Calls(count), move |seq| {
        let target = target.clone();
        async move { target.call(seq).await.outcome }
    })
    .await
}

/// Prints a phase's report and records a problem when any call ended otherwise than `want`.
fn expect_all(problems: &mut Vec<String>, what: &str, report: &LoadReport, want: &Outcome) {
    println!("  {what}: {}", report.summary());
    let other: u64 = report.outcomes.iter().filter(|(outcome, _)| *outcome != want).map(|(_, n)| n).sum();
    if other > 0 {
        problems.push(format!("{what}: {other} calls did not end {want}: {}", report.errors()));
    }
}

/// A real `host-agent` serving a root with a few files, enrolled and online.
struct AgentOnDisk {
    agent: Agent,
    device_id: String,
    _root: tempfile::TempDir,
}

impl AgentOnDisk {
    async fn start(control: &Control, urls: &[String], index: usize) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new().prefix("soak-root-").tempdir()?;
        std::fs::create_dir_all(root.path().join("src"))?;
        std::fs::create_dir_all(root.path().join("out"))?;
        let text: String =
            (0..2_000).map(|i| format!("line {i}{}\n", if i % 97 == 0 { " needle" } else { "" })).collect();
        std::fs::write(root.path().join("src/lib.txt"), text)?;
        std::fs::write(root.path().join("blob.bin"), vec![7u8; 4 << 20])?;
        let name = format!("soak-agent-{index}");
        let code = control.pairing_code().await?;
        let agent =
            Agent::builder(urls[index % urls.len()].clone()).root(root.path()).code(code).name(&name).spawn()?;
        let started = Instant::now();
        let device_id = loop {
            let devices = control.all_devices().await?;
            let found = devices
                .iter()
                .find(|d| d["name"] == name.as_str() && d["online"] == true)
                .and_then(|d| d["id"].as_str().map(str::to_owned));
            if let Some(id) = found {
                break id;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("{name} not online after 30 s\n{}", agent.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(Self { agent, device_id, _root: root })
    }
}
