//! `local-cluster`: a whole cluster on a laptop, for trying failover by hand. It starts a
//! `nats-server` (or a routed NATS cluster), creates a fresh PostgreSQL database, starts N
//! `dispatcher` replicas on free ports with every NATS URL, mints an api token and a pairing
//! code, prints how to reach all of it (URLs, pids, token, curl and host-agent commands), and
//! runs until Ctrl-C or SIGTERM. Then it stops everything and drops the database (unless
//! `--keep`).
//!
//! `deploy/local/run.sh` builds the binaries and runs this; see `deploy/local/README.md`.
//!
//! Not here: any logic of the cluster itself ([`e2e::LocalCluster`] starts the processes).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use e2e::LocalCluster;

/// Starts NATS, a PostgreSQL database and dispatcher replicas on this machine, and keeps them
/// running until Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "local-cluster", version)]
struct Args {
    /// How many dispatcher replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=26))]
    replicas: u16,
    /// How many NATS servers: 1 is a standalone server, more a routed NATS cluster.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
    nats_nodes: u16,
    /// The PostgreSQL server the database is created on (no database name; trust or password
    /// auth in the URL).
    #[arg(long, env = "PG_URL", default_value = "postgres://postgres@127.0.0.1:5432")]
    pg_url: String,
    /// Use this existing database instead of creating one (it is never dropped).
    #[arg(long, env = "LOCAL_CLUSTER_DATABASE_URL")]
    database_url: Option<String>,
    /// Keep the database when stopping (its URL is printed).
    #[arg(long)]
    keep: bool,
    /// `--keepalive-secs` of the replicas: devices treat two intervals of silence as a dead
    /// stream, so this sets how fast devices leave a frozen replica.
    #[arg(long, default_value_t = 5)]
    keepalive_secs: u64,
    /// `--broker-grace-secs` of the replicas: how long a replica keeps its streams without NATS.
    #[arg(long, default_value_t = 5)]
    broker_grace_secs: u64,
    /// The user the api token acts for.
    #[arg(long, default_value = "local-user")]
    user: String,
    /// RUST_LOG of the replicas.
    #[arg(long, default_value = "info")]
    log: String,
    /// Start a replica (same port, same id) or a NATS server (same port) again a few seconds
    /// after it died.
    #[arg(long)]
    respawn: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    use_sibling_binaries();
    // TestDatabase creates its database on the server named by E2E_POSTGRES_URL.
    std::env::set_var("E2E_POSTGRES_URL", args.pg_url.trim_end_matches('/'));
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

/// Prefers the `dispatcher` and `host-agent` built next to this binary (same profile) unless
/// `CARGO_BIN_EXE_*` already names them.
fn use_sibling_binaries() {
    let Some(dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) else {
        return;
    };
    for name in [e2e::bin::DISPATCHER, e2e::bin::HOST_AGENT] {
        let variable = format!("CARGO_BIN_EXE_{name}");
        let sibling = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        if std::env::var_os(&variable).is_none() && sibling.is_file() {
            std::env::set_var(variable, sibling);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dispatcher = e2e::bin::dispatcher();
    let host_agent = e2e::bin::host_agent();
    eprintln!(
        "starting {} NATS server(s), a database on {} and {} replica(s) of {}",
        args.nats_nodes,
        args.database_url.as_deref().unwrap_or(&args.pg_url),
        args.replicas,
        dispatcher.display()
    );
    let mut builder = LocalCluster::builder()
        .replicas(usize::from(args.replicas))
        .nats_nodes(usize::from(args.nats_nodes))
        .keepalive_secs(args.keepalive_secs)
        .broker_grace_secs(args.broker_grace_secs)
        .user(args.user.clone())
        .rust_log(args.log.clone())
        .configure(|_, builder| builder.drain_delay_secs(2).shutdown_grace_secs(20));
    if let Some(url) = &args.database_url {
        builder = builder.database_url(url.clone());
    }
    let mut cluster = builder.start().await.context("starting the local cluster")?;
    if args.keep {
        cluster.keep_database();
    }
    let (status, body) = cluster
        .control()
        .create_pairing_code(&serde_json::json!({"ttlSeconds": 3600}))
        .await
        .context("minting a pairing code")?;
    anyhow::ensure!(status == reqwest::StatusCode::CREATED, "pairing code: {status} {body}");
    let code = body["code"].as_str().unwrap_or_default().to_owned();
    print_summary(&cluster, &args, &host_agent, &code);

    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut dead_since: Vec<Option<tokio::time::Instant>> = vec![None; cluster.len()];
    let mut nats_down_since: Vec<Option<tokio::time::Instant>> = vec![None; cluster.nats_len()];
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for (index, down_since) in nats_down_since.iter_mut().enumerate() {
                watch_nats(&mut cluster, index, down_since, args.respawn).await;
            }
            for (index, dead_since) in dead_since.iter_mut().enumerate() {
                watch_replica(&mut cluster, index, dead_since, args.respawn).await;
            }
        }
    };
    // Ctrl-C wins even in the middle of a restart.
    tokio::select! {
        () = &mut stop => {}
        () = watch => {}
    }
    eprintln!("\nstopping the replicas and NATS{}", if args.keep { "" } else { ", dropping the database" });
    let database = cluster.database_url().to_owned();
    drop(cluster);
    if args.keep {
        println!("kept the database: {database}");
    }
    Ok(())
}

/// Notices a replica that exited (killed by hand), and restarts it after a pause with
/// `--respawn`.
async fn watch_replica(
    cluster: &mut LocalCluster,
    index: usize,
    dead_since: &mut Option<tokio::time::Instant>,
    respawn: bool,
) {
    let id = cluster.replica_id(index).to_owned();
    let running = cluster.replica_mut(index).is_running();
    match (running, *dead_since) {
        (true, _) => *dead_since = None,
        (false, None) => {
            *dead_since = Some(tokio::time::Instant::now());
            let hint =
                if respawn { "; restarting it in 3 s" } else { " (run with --respawn to restart dead replicas)" };
            eprintln!("{id} exited{hint}\n{}", cluster.replica(index).log_tail(5));
        }
        (false, Some(since)) if respawn && since.elapsed() >= Duration::from_secs(3) => {
            // Healthy is enough: it is ready once NATS and the database answer.
            match cluster.replica_mut(index).restart().await {
                Ok(()) => eprintln!("{id} restarted on {} (pid {})", cluster.url(index), cluster.replica(index).pid()),
                Err(error) => eprintln!("{id} did not restart: {error:#}"),
            }
            *dead_since = None;
        }
        (false, Some(_)) => {}
    }
}

/// Notices a NATS server that stopped accepting connections (killed by hand), and restarts it
/// on its port after a pause with `--respawn`.
async fn watch_nats(
    cluster: &mut LocalCluster,
    index: usize,
    down_since: &mut Option<tokio::time::Instant>,
    respawn: bool,
) {
    let port = cluster.nats_node(index).port();
    let accepting =
        tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(("127.0.0.1", port)))
            .await
            .is_ok_and(|connected| connected.is_ok());
    match (accepting, *down_since) {
        (true, _) => *down_since = None,
        (false, None) => {
            *down_since = Some(tokio::time::Instant::now());
            let hint = if respawn { "; restarting it in 3 s" } else { " (run with --respawn to restart it)" };
            eprintln!("nats-server {} is down{hint}", cluster.nats_node(index).url());
        }
        (false, Some(since)) if respawn && since.elapsed() >= Duration::from_secs(3) => {
            match cluster.restart_nats(index).await {
                Ok(()) => {
                    let node = cluster.nats_node(index);
                    eprintln!("nats-server {} restarted (pid {})", node.url(), node.pid());
                }
                Err(error) => eprintln!("nats-server {} did not restart: {error:#}", cluster.nats_node(index).url()),
            }
            *down_since = None;
        }
        (false, Some(_)) => {}
    }
}

fn print_summary(cluster: &LocalCluster, args: &Args, host_agent: &Path, code: &str) {
    let api = cluster.url(0);
    let token = cluster.token();
    let servers: Vec<String> = cluster.urls().iter().map(|url| format!("--server {url}")).collect();
    println!("\nLocal cluster is up.\n");
    println!("NATS (--nats-url {}):", cluster.nats_urls());
    for index in 0..cluster.nats_len() {
        let node = cluster.nats_node(index);
        println!("  {}  pid {}  monitor {}", node.url(), node.pid(), node.monitor_url());
    }
    println!("\nDatabase: {}{}", cluster.database_url(), if args.keep { "  (kept on exit)" } else { "" });
    println!("\nReplicas (keepalive {} s, broker grace {} s):", args.keepalive_secs, args.broker_grace_secs);
    for index in 0..cluster.len() {
        let replica = cluster.replica(index);
        println!(
            "  {}  {}  pid {}  log {}",
            replica.replica_id(),
            replica.base_url(),
            replica.pid(),
            replica.log_path().display()
        );
    }
    println!("\nApi token (user {}):\n  {token}", args.user);
    println!("Pairing code (valid 1 h, single use):\n  {code}");
    println!(
        r#"
Try it:
  export API={api} TOKEN={token}
  curl -s -H "Authorization: Bearer $TOKEN" $API/api/devices
  curl -s -X POST -H "Authorization: Bearer $TOKEN" $API/api/pairing-codes

Run a device against every replica (it fails over between them):
  {agent} run {servers} \
      --code {code} --name laptop --root "$HOME" \
      --credentials-dir /tmp/local-cluster-agent --keepalive-secs {keepalive}

Call it from any replica (its id is in the device list):
  curl -s -X POST -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
      $API/api/devices/<device-id>/calls -d '{{"tool": "list_directory", "input": {{"path": "."}}}}'

Failover by hand (the pids are above):
  kill -9 <replica pid>       its devices reconnect to the other replicas within seconds
  kill -STOP <replica pid>    frozen: devices leave after {silence} s of silence; kill -CONT resumes it
  kill -9 <nats pid>          after {grace} s replicas close their streams; GET /readyz stays 200 for the
                              readiness grace (10 s), then 503
                              (--respawn restarts dead replicas and NATS servers after 3 s)

Ctrl-C stops everything{drop}."#,
        agent = host_agent.display(),
        servers = servers.join(" "),
        keepalive = args.keepalive_secs,
        silence = args.keepalive_secs * 2,
        grace = args.broker_grace_secs,
        drop = if args.keep || args.database_url.is_some() { "" } else { " and drops the database (--keep keeps it)" },
    );
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
