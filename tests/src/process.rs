//! The real binaries as child processes: [`Dispatcher`] (`dispatcher serve`), the
//! `dispatcher token` commands ([`mint_token`], [`revoke_token`]) and [`Agent`]
//! (`host-agent run`).
//!
//! Each process writes its stdout and stderr to a log file in a temporary directory; when a
//! handle is dropped while the test panics, the log's tail is printed. Dropping a handle
//! SIGKILLs the process and reaps it. Environment variables the binaries read (DATABASE_URL,
//! NATS_URL, DISPATCHER_*, PULSN_URL, FUSION_HOST_*) are cleared so the host's environment
//! never leaks into a test; HOME of an agent is its temporary directory.
//!
//! Not here: what the processes say over HTTP (see [`crate::device`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// Lines of log printed when a test fails with a process still held.
pub(crate) const TAIL_LINES: usize = 80;

const DISPATCHER_ENV: &[&str] = &[
    "DATABASE_URL",
    "NATS_URL",
    "DISPATCHER_LISTEN",
    "DISPATCHER_REPLICA_ID",
    "DISPATCHER_SUBJECT_PREFIX",
    "DISPATCHER_KEEPALIVE_SECS",
    "DISPATCHER_MAX_BODY_BYTES",
    "DISPATCHER_SHUTDOWN_GRACE_SECS",
    "DISPATCHER_DRAIN_DELAY_SECS",
    "DISPATCHER_BROKER_GRACE_SECS",
    "DISPATCHER_READINESS_GRACE_SECS",
    "DISPATCHER_HEADER_TIMEOUT_SECS",
    "DISPATCHER_CONNECTION_TIMEOUT_SECS",
    "DISPATCHER_IDLE_TIMEOUT_SECS",
    "DISPATCHER_MAX_CONNECTIONS",
    "DISPATCHER_MAX_CONNECTIONS_PER_IP",
    "DISPATCHER_MAX_MANIFEST_BYTES",
    "DISPATCHER_MAX_PROPOSAL_BYTES",
    "DISPATCHER_MAX_PAGE_BYTES",
    "DISPATCHER_MAX_PAIRING_CODES_PER_USER",
    "DISPATCHER_MAX_DEVICES_PER_USER",
    "DISPATCHER_PROPOSAL_RETENTION_DAYS",
    "DISPATCHER_APPLY_TIMEOUT_SECS",
    "DISPATCHER_STALE_APPLY_SECS",
    "DISPATCHER_STREAM_QUEUE_BYTES",
    "DISPATCHER_TLS_CERT",
    "DISPATCHER_TLS_KEY",
    "DISPATCHER_TRUSTED_PROXIES",
    "NATS_CREDS_FILE",
    "NATS_NKEY_SEED_FILE",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_TLS_CA_FILE",
    "NATS_TLS_CERT_FILE",
    "NATS_TLS_KEY_FILE",
    "DISPATCHER_DB_POOL_SIZE",
    "DISPATCHER_MAX_STREAMS",
    "DISPATCHER_REBALANCE_THRESHOLD_PERCENT",
    "DISPATCHER_REBALANCE_RATE",
    "DISPATCHER_PUBLIC_URL",
    "DISPATCHER_DEVICE_CODE_TTL_SECS",
    "DISPATCHER_DEVICE_CODE_INTERVAL_SECS",
];

const AGENT_ENV: &[&str] = &[
    "PULSN_URL",
    "FUSION_HOST_ROOTS",
    "FUSION_HOST_CODE",
    "FUSION_HOST_NAME",
    "FUSION_HOST_CREDENTIALS_DIR",
    "FUSION_HOST_CREDENTIALS_STORE",
    "FUSION_HOST_CA_CERT",
    "FUSION_HOST_KEEPALIVE_SECS",
    "FUSION_HOST_BACKOFF_BASE_MS",
    "FUSION_HOST_MAX_BACKOFF_MS",
    "FUSION_HOST_SHUTDOWN_GRACE_SECS",
    "FUSION_HOST_LOG",
    "FUSION_HOST_ALLOW_INSECURE_HTTP",
    "FUSION_HOST_TOOLS_FILE",
    // No session bus unless a test gives one: `auto` keeps tokens in the credentials files.
    "DBUS_SESSION_BUS_ADDRESS",
];

/// Sends `signal` (a `libc::SIG*` number) to process `pid`.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A child process with its log file; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) label: String,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) clear_env: &'static [&'static str],
    pub(crate) log_path: PathBuf,
    pub(crate) child: Option<Child>,
    pub(crate) status: Option<ExitStatus>,
}

impl Proc {
    pub(crate) fn spawn(&mut self) -> anyhow::Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        writeln!(log, "==== e2e: starting {} {}", self.program.display(), self.args.join(" "))?;
        let stderr = log.try_clone()?;
        let mut command = Command::new(&self.program);
        command.args(&self.args).stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(stderr));
        for name in self.clear_env {
            command.env_remove(name);
        }
        for (name, value) in &self.env {
            command.env(name, value);
        }
        let child = command.spawn().with_context(|| format!("spawning {}", self.program.display()))?;
        self.child = Some(child);
        self.status = None;
        Ok(())
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(crate) fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("{} is not running", self.label))?;
        if self.status.is_some() {
            bail!("{} has exited already", self.label);
        }
        send_signal(pid, signal).with_context(|| format!("signal {signal} to {} ({pid})", self.label))
    }

    /// The exit status if the process has exited (reaping it).
    pub(crate) fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.try_wait().ok().flatten();
            }
        }
        self.status
    }

    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if self.child.is_none() {
                bail!("{} was never started", self.label);
            }
            if started.elapsed() > timeout {
                bail!("{} still running after {timeout:?}\n{}", self.label, self.tail(TAIL_LINES));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.status.is_none() {
                let _ = child.kill();
                self.status = child.wait().ok();
            }
        }
    }

    pub(crate) fn tail(&self, lines: usize) -> String {
        format!(
            "---- last lines of {} ({}):\n{}",
            self.label,
            self.log_path.display(),
            crate::tail_file(&self.log_path, lines)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.tail(TAIL_LINES));
        }
    }
}

/// How to start a `dispatcher serve`. Unset flags keep the binary's defaults, except: the
/// database is a SQLite file in the process's temporary directory, `--listen` is a free port,
/// the replica id is `e2e-<random>`, and `--drain-delay-secs` is 0 (tests need no load
/// balancer to catch up).
#[derive(Debug, Clone)]
pub struct DispatcherBuilder {
    binary: Option<PathBuf>,
    database_url: Option<String>,
    nats_url: Option<String>,
    replica_id: Option<String>,
    listen: Option<SocketAddr>,
    flags: Vec<(String, String)>,
    env: Vec<(String, String)>,
    rust_log: String,
    ready_timeout: Duration,
    fd_limit: Option<u64>,
    /// The CA of `--tls-cert`, when the replica serves HTTPS.
    tls_ca: Option<PathBuf>,
}

impl Default for DispatcherBuilder {
    fn default() -> Self {
        Self {
            binary: None,
            database_url: None,
            nats_url: None,
            replica_id: None,
            listen: None,
            flags: vec![("--drain-delay-secs".into(), "0".into())],
            env: Vec::new(),
            rust_log: std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
            ready_timeout: Duration::from_secs(60),
            fd_limit: None,
            tls_ca: None,
        }
    }
}

impl DispatcherBuilder {
    /// The binary to run (default: [`crate::bin::dispatcher`]).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.nats_url = Some(url.into());
        self
    }

    pub fn replica_id(mut self, id: impl Into<String>) -> Self {
        self.replica_id = Some(id.into());
        self
    }

    /// Listen on this address instead of a free port.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Any `--flag value` pair; a later value for the same flag replaces an earlier one.
    pub fn flag(mut self, name: &str, value: impl ToString) -> Self {
        self.flags.retain(|(n, _)| n != name);
        self.flags.push((name.into(), value.to_string()));
        self
    }

    pub fn keepalive_secs(self, secs: u64) -> Self {
        self.flag("--keepalive-secs", secs)
    }

    pub fn max_body_bytes(self, bytes: usize) -> Self {
        self.flag("--max-body-bytes", bytes)
    }

    pub fn shutdown_grace_secs(self, secs: u64) -> Self {
        self.flag("--shutdown-grace-secs", secs)
    }

    pub fn drain_delay_secs(self, secs: u64) -> Self {
        self.flag("--drain-delay-secs", secs)
    }

    pub fn broker_grace_secs(self, secs: u64) -> Self {
        self.flag("--broker-grace-secs", secs)
    }

    pub fn subject_prefix(self, prefix: &str) -> Self {
        self.flag("--subject-prefix", prefix)
    }

    /// An environment variable of the process.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// `RUST_LOG` of the process (default `info`, or `E2E_RUST_LOG`).
    pub fn rust_log(mut self, filter: impl Into<String>) -> Self {
        self.rust_log = filter.into();
        self
    }

    /// How long to wait for `/healthz` (default 60 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Serves HTTPS with `cert` and `key` (`--tls-cert`, `--tls-key`); `ca` is what the harness
    /// trusts to check `/healthz`. The base URL becomes `https://127.0.0.1:<port>`.
    pub fn https(mut self, cert: &Path, key: &Path, ca: &Path) -> Self {
        self.tls_ca = Some(ca.to_owned());
        self.flag("--tls-cert", cert.display()).flag("--tls-key", key.display())
    }

    /// Runs the process under `prlimit --nofile=N:N` (util-linux): at most `n` open file
    /// descriptors, soft and hard.
    pub fn fd_limit(mut self, n: u64) -> Self {
        self.fd_limit = Some(n);
        self
    }

    /// Spawns the process and waits until `/healthz` answers 200.
    pub async fn start(self) -> anyhow::Result<Dispatcher> {
        let dir = Arc::new(tempfile::Builder::new().prefix("e2e-dispatcher-").tempdir()?);
        let addr = self.listen.unwrap_or_else(crate::free_addr);
        let replica_id = self.replica_id.clone().unwrap_or_else(|| format!("e2e-{:06x}", rand::random::<u32>() >> 8));
        let database_url = self
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("dispatcher.db").display()));
        let mut args = vec![
            "serve".to_owned(),
            "--listen".into(),
            addr.to_string(),
            "--database-url".into(),
            database_url.clone(),
            "--replica-id".into(),
            replica_id.clone(),
        ];
        if let Some(url) = &self.nats_url {
            args.extend(["--nats-url".into(), url.clone()]);
        }
        for (name, value) in &self.flags {
            args.extend([name.clone(), value.clone()]);
        }
        let mut env = vec![("RUST_LOG".to_owned(), self.rust_log.clone()), ("NO_COLOR".into(), "1".into())];
        env.extend(self.env.iter().cloned());
        let mut program = self.binary.clone().unwrap_or_else(crate::bin::dispatcher);
        if let Some(n) = self.fd_limit {
            let mut wrapped = vec![format!("--nofile={n}:{n}"), "--".into(), program.display().to_string()];
            wrapped.append(&mut args);
            args = wrapped;
            program = PathBuf::from("prlimit");
        }
        let proc = Proc {
            label: format!("dispatcher {replica_id}"),
            program,
            args,
            env,
            clear_env: DISPATCHER_ENV,
            log_path: dir.path().join("dispatcher.log"),
            child: None,
            status: None,
        };
        let mut dispatcher = Dispatcher {
            proc,
            addr,
            replica_id,
            database_url,
            dir,
            ready_timeout: self.ready_timeout,
            tls_ca: self.tls_ca.clone(),
        };
        dispatcher.proc.spawn()?;
        dispatcher.wait_healthy().await?;
        Ok(dispatcher)
    }
}

/// A running `dispatcher serve` process.
#[derive(Debug)]
pub struct Dispatcher {
    proc: Proc,
    addr: SocketAddr,
    replica_id: String,
    database_url: String,
    dir: Arc<tempfile::TempDir>,
    ready_timeout: Duration,
    tls_ca: Option<PathBuf>,
}

impl Dispatcher {
    pub fn builder() -> DispatcherBuilder {
        DispatcherBuilder::default()
    }

    /// The embedded default: a SQLite file in a temporary directory, no NATS.
    pub async fn start() -> anyhow::Result<Self> {
        Self::builder().start().await
    }

    /// `http://127.0.0.1:<port>` (`https://…` when it serves HTTPS).
    pub fn base_url(&self) -> String {
        let scheme = if self.tls_ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A client that trusts the replica's certificate (any client when it serves plain HTTP).
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(ca) = &self.tls_ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(builder.build()?)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The process's temporary directory (log, SQLite file); it outlives restarts.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.proc.log_path
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.proc.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `lines` lines of the log, with a header naming the process.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.tail(lines)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid().unwrap_or(0)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.proc.child.is_some() && self.proc.try_status().is_none()
    }

    pub fn sigkill(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGKILL)
    }

    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGTERM)
    }

    pub fn sigstop(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGSTOP)
    }

    pub fn sigcont(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGCONT)
    }

    /// Waits for the process to exit and reaps it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.proc.wait_exit(timeout).await
    }

    /// SIGKILLs the process (if running) and waits for it to be gone.
    pub async fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the process again with the same arguments, on the same port and database
    /// (killing it first if it still runs), and waits for `/healthz`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The port may linger for a moment after the old process is reaped.
        while std::net::TcpListener::bind(self.addr).is_err() {
            if Instant::now() > deadline {
                bail!("port {} still taken after the old process exited", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.proc.spawn()?;
        self.wait_healthy().await
    }

    /// Polls `/healthz` until 200; fails at once when the process exits.
    pub async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = self.client()?;
        let url = format!("{}/healthz", self.base_url());
        let started = Instant::now();
        loop {
            if let Some(status) = self.proc.try_status() {
                bail!("dispatcher exited before serving ({status})\n{}", self.log_tail(TAIL_LINES));
            }
            if let Ok(response) = client.get(&url).timeout(Duration::from_secs(2)).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if started.elapsed() > self.ready_timeout {
                bail!("dispatcher not healthy after {:?}\n{}", self.ready_timeout, self.log_tail(TAIL_LINES));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Mints an api token for `user` on this replica's database.
    pub async fn mint_token(&self, user: &str) -> anyhow::Result<String> {
        mint_token(&self.database_url, user).await
    }
}

/// The resident set size of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`); `None` when
/// it cannot be read (the process is gone, or this is not Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `dispatcher <args>` (a short-lived command) with DATABASE_URL cleared; returns its
/// output whatever the exit status.
pub async fn dispatcher_command(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut command = tokio::process::Command::new(crate::bin::dispatcher());
    command.args(args).stdin(Stdio::null()).env("RUST_LOG", "warn").env("NO_COLOR", "1");
    for name in DISPATCHER_ENV {
        command.env_remove(name);
    }
    command.kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("dispatcher command took over 60 s")?
        .context("running the dispatcher binary")?;
    Ok(output)
}

/// `dispatcher token create --user <user>`: the token it prints as its only stdout line.
pub async fn mint_token(database_url: &str, user: &str) -> anyhow::Result<String> {
    let output = dispatcher_command(&["token", "create", "--user", user, "--database-url", database_url]).await?;
    if !output.status.success() {
        bail!("token create failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8(output.stdout).context("token create printed non-UTF-8")?;
    let lines: Vec<&str> = stdout.lines().filter(|line| !line.trim().is_empty()).collect();
    match lines.as_slice() {
        [token] => Ok(token.trim().to_owned()),
        _ => bail!("token create should print exactly one line, printed {stdout:?}"),
    }
}

/// `dispatcher token revoke <prefix>`.
pub async fn revoke_token(database_url: &str, prefix: &str) -> anyhow::Result<()> {
    revoke_token_with_env(database_url, prefix, &[]).await.map(|_| ())
}

/// `dispatcher token revoke <prefix>` with extra environment (`NATS_URL`,
/// `DISPATCHER_SUBJECT_PREFIX`, as a replica's pod has them). Returns what it printed on stderr.
pub async fn revoke_token_with_env(database_url: &str, prefix: &str, env: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut command = tokio::process::Command::new(crate::bin::dispatcher());
    command.args(["token", "revoke", prefix, "--database-url", database_url]);
    command.stdin(Stdio::null()).env("RUST_LOG", "warn").env("NO_COLOR", "1");
    for name in DISPATCHER_ENV {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("dispatcher token revoke took over 60 s")?
        .context("running the dispatcher binary")?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        bail!("token revoke failed ({}): {stderr}", output.status);
    }
    Ok(stderr)
}

/// How to start a `host-agent run`. Defaults tuned for tests: keepalive 15 s, reconnect
/// backoff from 100 ms capped at 1 s, shutdown grace 5 s, credentials in the agent's temporary
/// directory, the device name `e2e-agent`.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    binary: Option<PathBuf>,
    servers: Vec<String>,
    roots: Vec<PathBuf>,
    code: Option<String>,
    name: Option<String>,
    credentials_dir: Option<PathBuf>,
    flags: Vec<(String, String)>,
    env: Vec<(String, String)>,
    log: String,
}

impl AgentBuilder {
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            binary: None,
            servers: vec![server.into()],
            roots: Vec::new(),
            code: None,
            name: Some("e2e-agent".into()),
            credentials_dir: None,
            flags: vec![
                ("--backoff-base-ms".into(), "100".into()),
                ("--max-backoff-ms".into(), "1000".into()),
                ("--shutdown-grace-secs".into(), "5".into()),
            ],
            env: Vec::new(),
            log: std::env::var("E2E_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        }
    }

    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Another `--server`, tried in turn.
    pub fn server(mut self, url: impl Into<String>) -> Self {
        self.servers.push(url.into());
        self
    }

    pub fn root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.roots.push(dir.into());
        self
    }

    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn credentials_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.credentials_dir = Some(dir.into());
        self
    }

    /// Any `--flag value` pair; a later value for the same flag replaces an earlier one.
    pub fn flag(mut self, name: &str, value: impl ToString) -> Self {
        self.flags.retain(|(n, _)| n != name);
        self.flags.push((name.into(), value.to_string()));
        self
    }

    pub fn keepalive_secs(self, secs: u64) -> Self {
        self.flag("--keepalive-secs", secs)
    }

    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Spawns `host-agent run`. It does not wait for anything: poll the control API for the
    /// device, or [`Agent::wait_exit`].
    pub fn spawn(self) -> anyhow::Result<Agent> {
        let dir = tempfile::Builder::new().prefix("e2e-agent-").tempdir()?;
        let credentials_dir = self.credentials_dir.clone().unwrap_or_else(|| dir.path().join("credentials"));
        let mut args = vec!["run".to_owned()];
        for server in &self.servers {
            args.extend(["--server".into(), server.clone()]);
        }
        for root in &self.roots {
            args.extend(["--root".into(), root.display().to_string()]);
        }
        if let Some(code) = &self.code {
            args.extend(["--code".into(), code.clone()]);
        }
        if let Some(name) = &self.name {
            args.extend(["--name".into(), name.clone()]);
        }
        args.extend(["--credentials-dir".into(), credentials_dir.display().to_string()]);
        for (name, value) in &self.flags {
            args.extend([name.clone(), value.clone()]);
        }
        args.extend(["--log".into(), self.log.clone()]);
        let mut env = vec![("HOME".to_owned(), dir.path().display().to_string()), ("NO_COLOR".into(), "1".into())];
        env.extend(self.env.iter().cloned());
        let mut proc = Proc {
            label: "host-agent".into(),
            program: self.binary.clone().unwrap_or_else(crate::bin::host_agent),
            args,
            env,
            clear_env: AGENT_ENV,
            log_path: dir.path().join("host-agent.log"),
            child: None,
            status: None,
        };
        proc.spawn()?;
        Ok(Agent { proc, credentials_dir, _dir: dir })
    }
}

/// A running `host-agent run` process.
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    credentials_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub fn builder(server: impl Into<String>) -> AgentBuilder {
        AgentBuilder::new(server)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid().unwrap_or(0)
    }

    pub fn credentials_dir(&self) -> &Path {
        &self.credentials_dir
    }

    /// The files in the credentials directory (empty when it does not exist).
    pub fn credential_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.credentials_dir)
            .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect())
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read(&self.proc.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.tail(lines)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.try_status().is_none()
    }

    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGTERM)
    }

    pub fn sigkill(&self) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGKILL)
    }

    /// Waits for the process to exit and reaps it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.proc.wait_exit(timeout).await
    }

    /// Waits for the exit and returns its code (an error when a signal ended it).
    pub async fn exit_code(&mut self, timeout: Duration) -> anyhow::Result<i32> {
        let status = self.wait_exit(timeout).await?;
        status.code().ok_or_else(|| anyhow!("host-agent ended by a signal: {status}\n{}", self.log_tail(TAIL_LINES)))
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while !self.log().contains(needle) {
            if started.elapsed() > timeout {
                bail!("host-agent log never said {needle:?}\n{}", self.log_tail(TAIL_LINES));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}
