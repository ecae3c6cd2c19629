//! [`LocalCluster`]: a whole cluster of real processes on one machine, as the cluster suite,
//! the `local-cluster` binary and the measurement tools use it. It starts a `nats-server` (or
//! a NATS cluster of several routed nodes), a fresh PostgreSQL database (or uses a given one),
//! and N `dispatcher serve` replicas on free ports, named `replica-a`, `replica-b`, …, each
//! given every NATS URL and the same database; then it mints an api token and waits until every
//! replica is ready.
//!
//! A replica can be SIGKILLed, paused (SIGSTOP), resumed and restarted on the same port with
//! the same replica id; a NATS node can be killed, paused and restarted on the same port.
//!
//! Not here: devices and assertions. Tests pair [`crate::TestDevice`]s or spawn
//! [`crate::Agent`]s against [`LocalCluster::url`]s and drive calls through [`Control`].
//!
//! Dropping the cluster kills the replicas first, then the NATS servers, then drops the
//! database (unless [`LocalCluster::keep_database`] was called).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::Value;

use crate::device::{Control, TestDevice};
use crate::nats::{NatsCluster, NatsOptions, NatsServer};
use crate::postgres::TestDatabase;
use crate::process::{Dispatcher, DispatcherBuilder};

/// A hook that adjusts the builder of replica `index` (extra flags, environment, log level).
pub type ConfigureReplica = Arc<dyn Fn(usize, DispatcherBuilder) -> DispatcherBuilder + Send + Sync>;

/// The id of replica `index`: `replica-a`, `replica-b`, … `replica-z`, then `replica-26`, ….
pub fn replica_id(index: usize) -> String {
    match u8::try_from(index) {
        Ok(i) if i < 26 => format!("replica-{}", char::from(b'a' + i)),
        _ => format!("replica-{index}"),
    }
}

/// How to start a [`LocalCluster`]. Defaults: three replicas, one NATS server, keepalive 2 s,
/// broker grace 2 s, a fresh PostgreSQL database, user `user-a`, no rebalancing.
#[derive(Clone)]
pub struct ClusterBuilder {
    replicas: usize,
    nats_nodes: usize,
    keepalive_secs: u64,
    broker_grace_secs: u64,
    user: String,
    database_url: Option<String>,
    rust_log: Option<String>,
    configure: Option<ConfigureReplica>,
    ready_timeout: Duration,
    nats_options: NatsOptions,
    rebalance: bool,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            replicas: 3,
            nats_nodes: 1,
            keepalive_secs: 2,
            broker_grace_secs: 2,
            user: "user-a".into(),
            database_url: None,
            rust_log: None,
            configure: None,
            ready_timeout: Duration::from_secs(60),
            nats_options: NatsOptions::default(),
            rebalance: false,
        }
    }
}

impl fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("replicas", &self.replicas)
            .field("nats_nodes", &self.nats_nodes)
            .field("keepalive_secs", &self.keepalive_secs)
            .field("broker_grace_secs", &self.broker_grace_secs)
            .field("user", &self.user)
            .field("database_url", &self.database_url)
            .finish_non_exhaustive()
    }
}

impl ClusterBuilder {
    /// How many dispatcher replicas (at least 1).
    pub fn replicas(mut self, count: usize) -> Self {
        self.replicas = count;
        self
    }

    /// How many NATS servers: 1 is a standalone server, more is a routed NATS cluster.
    pub fn nats_nodes(mut self, count: usize) -> Self {
        self.nats_nodes = count;
        self
    }

    /// `--keepalive-secs` of every replica.
    pub fn keepalive_secs(mut self, secs: u64) -> Self {
        self.keepalive_secs = secs;
        self
    }

    /// `--broker-grace-secs` of every replica.
    pub fn broker_grace_secs(mut self, secs: u64) -> Self {
        self.broker_grace_secs = secs;
        self
    }

    /// The user the api token acts for.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    /// Use this database (already existing, never dropped) instead of a fresh one.
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// `RUST_LOG` of every replica.
    pub fn rust_log(mut self, filter: impl Into<String>) -> Self {
        self.rust_log = Some(filter.into());
        self
    }

    /// Adjust each replica's builder (called with the replica's index).
    pub fn configure(
        mut self,
        f: impl Fn(usize, DispatcherBuilder) -> DispatcherBuilder + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }

    /// Options of every NATS server (a configuration with TLS or authentication).
    pub fn nats_options(mut self, options: NatsOptions) -> Self {
        self.nats_options = options;
        self
    }

    /// Let replicas rebalance streams among themselves (off by default: suites place devices
    /// on given replicas and expect them to stay there).
    pub fn rebalance(mut self, on: bool) -> Self {
        self.rebalance = on;
        self
    }

    /// How long to wait for every replica to be ready (default 60 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    fn replica_builder(&self, index: usize, nats_urls: &str, database_url: &str) -> DispatcherBuilder {
        let mut builder = Dispatcher::builder()
            .replica_id(replica_id(index))
            .nats_url(nats_urls)
            .database_url(database_url)
            .keepalive_secs(self.keepalive_secs)
            .broker_grace_secs(self.broker_grace_secs)
            .shutdown_grace_secs(5)
            .ready_timeout(self.ready_timeout);
        if let Some(filter) = &self.rust_log {
            builder = builder.rust_log(filter.clone());
        }
        if !self.rebalance {
            builder = builder.flag("--rebalance-threshold-percent", 0);
        }
        if let Some(configure) = &self.configure {
            builder = configure(index, builder);
        }
        builder
    }

    /// Starts NATS, the database and the replicas; mints the api token; waits until every
    /// replica answers `/readyz` 200.
    pub async fn start(self) -> anyhow::Result<LocalCluster> {
        anyhow::ensure!(self.replicas >= 1, "a cluster needs a replica");
        anyhow::ensure!(self.nats_nodes >= 1, "a cluster needs a NATS server");
        let nats = if self.nats_nodes == 1 {
            Nats::Single(Box::new(
                NatsServer::start_with(self.nats_options.clone()).await.context("starting nats-server")?,
            ))
        } else {
            Nats::Cluster(
                NatsCluster::start_with(self.nats_nodes, self.nats_options.clone())
                    .await
                    .context("starting the NATS cluster")?,
            )
        };
        let (database, database_url) = match &self.database_url {
            Some(url) => (None, url.clone()),
            None => {
                let database = TestDatabase::create().await.context("creating a PostgreSQL database")?;
                let url = database.url().to_owned();
                (Some(database), url)
            }
        };
        let nats_urls = nats.urls();
        // The first replica runs the migrations alone; the others start together after it.
        let first = self.replica_builder(0, &nats_urls, &database_url).start().await.context("starting replica 0")?;
        let rest =
            join_all((1..self.replicas).map(|index| self.replica_builder(index, &nats_urls, &database_url).start()))
                .await;
        let mut replicas = vec![first];
        for (index, started) in rest.into_iter().enumerate() {
            replicas.push(started.with_context(|| format!("starting replica {}", index + 1))?);
        }
        let token = crate::process::mint_token(&database_url, &self.user).await.context("minting an api token")?;
        let control = Control::new(replicas[0].base_url(), token.clone());
        let states = vec![ReplicaState::Running; replicas.len()];
        let cluster = LocalCluster { replicas, states, nats, control, token, database_url, database };
        for index in 0..cluster.len() {
            cluster.wait_ready(index, self.ready_timeout).await?;
        }
        Ok(cluster)
    }
}

/// What the cluster last did to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    Running,
    Paused,
    Killed,
}

/// The NATS side: one server or a routed cluster.
#[derive(Debug)]
enum Nats {
    Single(Box<NatsServer>),
    Cluster(NatsCluster),
}

impl Nats {
    fn urls(&self) -> String {
        match self {
            Self::Single(server) => server.url(),
            Self::Cluster(cluster) => cluster.urls(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            Self::Cluster(cluster) => cluster.len(),
        }
    }

    fn node(&self, index: usize) -> &NatsServer {
        match self {
            Self::Single(server) => {
                assert_eq!(index, 0, "a single NATS server has only node 0");
                server
            }
            Self::Cluster(cluster) => cluster.node(index),
        }
    }

    fn node_mut(&mut self, index: usize) -> &mut NatsServer {
        match self {
            Self::Single(server) => {
                assert_eq!(index, 0, "a single NATS server has only node 0");
                server
            }
            Self::Cluster(cluster) => cluster.node_mut(index),
        }
    }
}

/// A running cluster. Fields drop in order: replicas, NATS, then the database.
#[derive(Debug)]
pub struct LocalCluster {
    replicas: Vec<Dispatcher>,
    states: Vec<ReplicaState>,
    nats: Nats,
    control: Control,
    token: String,
    database_url: String,
    database: Option<TestDatabase>,
}

impl LocalCluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// `replicas` replicas on one NATS server and a fresh database, with the defaults.
    pub async fn start(replicas: usize) -> anyhow::Result<Self> {
        Self::builder().replicas(replicas).start().await
    }

    /// How many replicas (whatever their state).
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Base URL of replica `index` (`http://127.0.0.1:<port>`).
    pub fn url(&self, index: usize) -> String {
        self.replicas[index].base_url()
    }

    /// Every replica's base URL, in index order.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(Dispatcher::base_url).collect()
    }

    /// The replica id of replica `index` (`replica-a`, …).
    pub fn replica_id(&self, index: usize) -> &str {
        self.replicas[index].replica_id()
    }

    /// The index of the replica named `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.replicas.iter().position(|r| r.replica_id() == id)
    }

    pub fn replica(&self, index: usize) -> &Dispatcher {
        &self.replicas[index]
    }

    pub fn replica_mut(&mut self, index: usize) -> &mut Dispatcher {
        &mut self.replicas[index]
    }

    pub fn state(&self, index: usize) -> ReplicaState {
        self.states[index]
    }

    /// Indexes of the replicas neither killed nor paused.
    pub fn running(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.states[i] == ReplicaState::Running).collect()
    }

    /// Every replica's process id, in index order (0 for one never started).
    pub fn pids(&self) -> Vec<u32> {
        self.replicas.iter().map(Dispatcher::pid).collect()
    }

    /// The control API with the cluster's api token, on replica 0.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The control API with the cluster's api token, on replica `index`.
    pub fn control_at(&self, index: usize) -> Control {
        self.control.at(self.url(index))
    }

    /// The api token minted at start.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Mints another api token, for `user`.
    pub async fn mint_token(&self, user: &str) -> anyhow::Result<String> {
        crate::process::mint_token(&self.database_url, user).await
    }

    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// Keeps the database when the cluster is dropped (a no-op for a given database).
    pub fn keep_database(&mut self) {
        if let Some(database) = self.database.take() {
            // TestDatabase drops its database in Drop; forgetting the handle keeps it.
            std::mem::forget(database);
        }
    }

    /// Every NATS client URL, comma-separated (what the replicas got as `--nats-url`).
    pub fn nats_urls(&self) -> String {
        self.nats.urls()
    }

    /// How many NATS servers.
    pub fn nats_len(&self) -> usize {
        self.nats.len()
    }

    pub fn nats_node(&self, index: usize) -> &NatsServer {
        self.nats.node(index)
    }

    pub fn nats_node_mut(&mut self, index: usize) -> &mut NatsServer {
        self.nats.node_mut(index)
    }

    /// SIGKILLs NATS server `index`.
    pub fn kill_nats(&mut self, index: usize) {
        self.nats.node_mut(index).kill();
    }

    /// Restarts NATS server `index` on the same port.
    pub async fn restart_nats(&mut self, index: usize) -> anyhow::Result<()> {
        self.nats.node_mut(index).restart().await
    }

    pub fn pause_nats(&self, index: usize) -> anyhow::Result<()> {
        self.nats.node(index).sigstop()
    }

    pub fn resume_nats(&self, index: usize) -> anyhow::Result<()> {
        self.nats.node(index).sigcont()
    }

    /// SIGKILLs replica `index` and reaps it.
    pub async fn kill(&mut self, index: usize) {
        self.replicas[index].kill().await;
        self.states[index] = ReplicaState::Killed;
    }

    /// SIGSTOPs replica `index`.
    pub fn pause(&mut self, index: usize) -> anyhow::Result<()> {
        self.replicas[index].sigstop()?;
        self.states[index] = ReplicaState::Paused;
        Ok(())
    }

    /// SIGCONTs replica `index`.
    pub fn resume(&mut self, index: usize) -> anyhow::Result<()> {
        self.replicas[index].sigcont()?;
        self.states[index] = ReplicaState::Running;
        Ok(())
    }

    /// SIGTERMs replica `index` (a graceful shutdown) and waits up to `timeout` for it to exit.
    pub async fn stop(&mut self, index: usize, timeout: Duration) -> anyhow::Result<()> {
        self.replicas[index].sigterm()?;
        self.replicas[index].wait_exit(timeout).await?;
        self.states[index] = ReplicaState::Killed;
        Ok(())
    }

    /// Starts replica `index` again (killing it first if it runs) on the same port with the
    /// same id and flags, and waits until it is ready.
    pub async fn restart(&mut self, index: usize, timeout: Duration) -> anyhow::Result<()> {
        self.replicas[index].restart().await?;
        self.states[index] = ReplicaState::Running;
        self.wait_ready(index, timeout).await
    }

    /// The status of `GET /readyz` on replica `index` (an error when it does not answer
    /// within two seconds).
    pub async fn readyz(&self, index: usize) -> anyhow::Result<StatusCode> {
        let response = reqwest::Client::new()
            .get(format!("{}/readyz", self.url(index)))
            .timeout(Duration::from_secs(2))
            .send()
            .await?;
        Ok(response.status())
    }

    /// Polls `/readyz` of replica `index` until 200.
    pub async fn wait_ready(&self, index: usize, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if matches!(self.readyz(index).await, Ok(StatusCode::OK)) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "{} not ready after {timeout:?}\n{}",
                    self.replica_id(index),
                    self.replicas[index].log_tail(crate::process::TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pairs a [`TestDevice`]: the code is minted on replica 0, the device enrolls on replica
    /// `index`.
    pub async fn pair_device(&self, index: usize, name: &str) -> anyhow::Result<TestDevice> {
        TestDevice::pair(&self.url(index), &self.control, name).await
    }

    /// `GET /api/devices/{id}` on every running replica: (replica index, `online`, `replica`).
    pub async fn presence(&self, device_id: &str) -> anyhow::Result<Vec<(usize, bool, Option<String>)>> {
        let running = self.running();
        let answers =
            join_all(running.iter().map(|&i| async move { (i, self.control_at(i).device(device_id).await) })).await;
        let mut views = Vec::with_capacity(answers.len());
        for (index, answer) in answers {
            let (status, body) = answer?;
            if status != StatusCode::OK {
                bail!("GET /api/devices/{device_id} on {} answered {status}: {body}", self.replica_id(index));
            }
            views.push((index, body["online"].as_bool().unwrap_or(false), body["replica"].as_str().map(str::to_owned)));
        }
        Ok(views)
    }

    /// Waits until every running replica reports the device with `online == want` and, when
    /// online, names the same holder; returns that holder.
    pub async fn wait_presence(
        &self,
        device_id: &str,
        want: bool,
        timeout: Duration,
    ) -> anyhow::Result<Option<String>> {
        let started = Instant::now();
        loop {
            let views = self.presence(device_id).await;
            if let Ok(views) = &views {
                let agreed = views.iter().all(|(_, online, replica)| *online == want && *replica == views[0].2);
                if agreed && !views.is_empty() {
                    return Ok(views[0].2.clone());
                }
            }
            if started.elapsed() > timeout {
                bail!("device {device_id}: replicas do not agree on online={want} after {timeout:?}: {views:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /api/devices` on replica `index`: the `devices` array.
    pub async fn devices(&self, index: usize) -> anyhow::Result<Vec<Value>> {
        let (status, body) = self.control_at(index).devices().await?;
        if status != StatusCode::OK {
            bail!("GET /api/devices on {} answered {status}: {body}", self.replica_id(index));
        }
        Ok(body["devices"].as_array().cloned().unwrap_or_default())
    }

    /// The tails of every replica's log, for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        self.replicas.iter().map(|r| r.log_tail(lines)).collect::<Vec<_>>().join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_ids() {
        assert_eq!(replica_id(0), "replica-a");
        assert_eq!(replica_id(2), "replica-c");
        assert_eq!(replica_id(25), "replica-z");
        assert_eq!(replica_id(26), "replica-26");
    }
}
