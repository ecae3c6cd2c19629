//! A real `nats-server` for the cluster suites: one server on a free port
//! ([`NatsServer::start`]) or a cluster of them with full-mesh routes ([`NatsCluster::start`]).
//! A server can be SIGKILLed, paused and restarted on the same ports, so clients reconnect to
//! the same URL.
//!
//! Not here: any client. The dispatcher replicas are the clients; tests that need one use
//! `async_nats::connect(server.url())`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::process::{Proc, TAIL_LINES};

/// The executable (`nats-server` on PATH unless `E2E_NATS_SERVER` names another).
fn program() -> PathBuf {
    std::env::var_os("E2E_NATS_SERVER").map(PathBuf::from).unwrap_or_else(|| "nats-server".into())
}

/// Options of a server: JetStream off unless asked for.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// Start with `-js` (storage in the server's temporary directory).
    pub jetstream: bool,
    /// A configuration file's text (`-c`), for what has no command-line flag: `tls { … }`,
    /// `authorization { … }`, operator mode (see [`crate::nats_auth`]). The flags the harness
    /// passes (address, ports, name, cluster) win over it.
    pub config: Option<String>,
}

/// One `nats-server` process.
#[derive(Debug)]
pub struct NatsServer {
    proc: Proc,
    name: String,
    port: u16,
    monitor_port: u16,
    /// The other nodes' route count this node should reach when ready (0 alone).
    expected_routes: usize,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// A standalone server on a free port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(NatsOptions::default()).await
    }

    pub async fn start_with(options: NatsOptions) -> anyhow::Result<Self> {
        let mut server = Self::new(&options, None)?;
        server.proc.spawn()?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// Builds (without spawning) a node; `cluster` is (name, own route port, every route port).
    fn new(options: &NatsOptions, cluster: Option<(&str, u16, &[u16])>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("e2e-nats-").tempdir()?;
        let port = crate::free_port();
        let monitor_port = crate::free_port();
        let name = format!("e2e-nats-{port}");
        let mut args = vec![
            "-a".to_owned(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-m".into(),
            monitor_port.to_string(),
            "-n".into(),
            name.clone(),
        ];
        if options.jetstream {
            args.extend(["-js".into(), "-sd".into(), dir.path().join("jetstream").display().to_string()]);
        }
        if let Some(config) = &options.config {
            let path = dir.path().join("nats-server.conf");
            std::fs::write(&path, config).context("writing the nats-server configuration")?;
            args.extend(["-c".into(), path.display().to_string()]);
        }
        let mut expected_routes = 0;
        if let Some((cluster_name, own, all)) = cluster {
            let routes: Vec<String> =
                all.iter().filter(|&&p| p != own).map(|p| format!("nats://127.0.0.1:{p}")).collect();
            expected_routes = routes.len();
            args.extend([
                "--cluster_name".into(),
                cluster_name.into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{own}"),
                "--routes".into(),
                routes.join(","),
            ]);
        }
        let proc = Proc {
            label: format!("nats-server :{port}"),
            program: program(),
            args,
            env: Vec::new(),
            clear_env: &[],
            log_path: dir.path().join("nats-server.log"),
            child: None,
            status: None,
        };
        Ok(Self { proc, name, port, monitor_port, expected_routes, _dir: dir })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<monitoring port>` (`/connz`, `/routez`, `/healthz`).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The server's name (`-n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid().unwrap_or(0)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.tail(lines)
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn sigstop(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGSTOP)
    }

    pub fn sigcont(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGCONT)
    }

    /// Starts the server again on the same ports (killing it first if it runs), and waits
    /// until it accepts clients (and, in a cluster, has at least one route back: the other
    /// nodes may be down themselves).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpListener::bind(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("port {} still taken after nats-server exited", self.port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.proc.spawn()?;
        self.wait_routes(self.expected_routes.min(1)).await
    }

    /// Polls the monitoring endpoint until the server is healthy and routed to every other
    /// node of its cluster.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.wait_routes(self.expected_routes).await
    }

    async fn wait_routes(&mut self, routes: usize) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.proc.try_status() {
                bail!("nats-server exited at start ({status})\n{}", self.proc.tail(TAIL_LINES));
            }
            if self.ready(&client, routes).await.unwrap_or(false) {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("nats-server not ready after 20 s\n{}", self.proc.tail(TAIL_LINES));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ready(&self, client: &reqwest::Client, expected_routes: usize) -> anyhow::Result<bool> {
        let base = format!("http://127.0.0.1:{}", self.monitor_port);
        if !client.get(format!("{base}/healthz")).send().await?.status().is_success() {
            return Ok(false);
        }
        if expected_routes == 0 {
            return Ok(true);
        }
        let routez: serde_json::Value = client.get(format!("{base}/routez")).send().await?.json().await?;
        let routes = routez["num_routes"].as_u64().context("routez without num_routes")?;
        Ok(routes as usize >= expected_routes)
    }
}

/// Several `nats-server`s routed to each other as one cluster.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// `size` nodes on free ports, every one routed to every other; returns once all routes
    /// are up.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, NatsOptions::default()).await
    }

    pub async fn start_with(size: usize, options: NatsOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(size >= 1, "a cluster needs a node");
        let cluster_name = format!("e2e-{:08x}", rand::random::<u32>());
        let route_ports: Vec<u16> = (0..size).map(|_| crate::free_port()).collect();
        let mut nodes = Vec::with_capacity(size);
        for &own in &route_ports {
            nodes.push(NatsServer::new(&options, Some((&cluster_name, own, &route_ports)))?);
        }
        for node in &mut nodes {
            node.proc.spawn()?;
        }
        for node in &mut nodes {
            node.wait_ready().await?;
        }
        Ok(Self { nodes })
    }

    /// Every node's client URL, comma-separated (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// The client URL of node `index`.
    pub fn url(&self, index: usize) -> String {
        self.nodes[index].url()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, index: usize) -> &NatsServer {
        &self.nodes[index]
    }

    pub fn node_mut(&mut self, index: usize) -> &mut NatsServer {
        &mut self.nodes[index]
    }

    /// SIGKILL node `index`.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
    }

    /// Restart node `index` on its ports and wait for its routes.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.nodes[index].restart().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn round_trip(sub_url: &str, pub_url: &str) -> anyhow::Result<()> {
        let subscriber = async_nats::connect(sub_url).await?;
        let publisher = async_nats::connect(pub_url).await?;
        let mut subscription = subscriber.subscribe("e2e.ping").await?;
        subscriber.flush().await?;
        // Interest may take a moment to cross a route: publish until it arrives.
        for _ in 0..100 {
            publisher.publish("e2e.ping", "x".into()).await?;
            publisher.flush().await?;
            if let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(100), subscription.next()).await {
                anyhow::ensure!(message.payload.as_ref() == b"x");
                return Ok(());
            }
        }
        bail!("no message from {pub_url} to {sub_url}")
    }

    #[tokio::test]
    async fn server_kill_and_restart_on_the_same_port() {
        let mut server = NatsServer::start().await.expect("nats-server starts");
        round_trip(&server.url(), &server.url()).await.unwrap();
        let url = server.url();
        server.kill();
        assert!(async_nats::connect(&url).await.is_err(), "killed");
        server.restart().await.unwrap();
        assert_eq!(server.url(), url);
        round_trip(&url, &url).await.unwrap();
    }

    #[tokio::test]
    async fn cluster_routes_messages_between_nodes() {
        let mut cluster = NatsCluster::start(3).await.expect("cluster starts");
        assert_eq!(cluster.urls().split(',').count(), 3);
        round_trip(&cluster.url(0), &cluster.url(2)).await.unwrap();
        cluster.kill(1);
        round_trip(&cluster.url(2), &cluster.url(0)).await.unwrap();
        cluster.restart(1).await.unwrap();
        round_trip(&cluster.url(1), &cluster.url(0)).await.unwrap();
    }
}
