//! Test support for the runtime suites: a small fake dispatcher (axum, on `127.0.0.1:0`) that
//! speaks the device-facing half of the contract, and a handle on a real `host-agent` process.
//!
//! The fake keeps everything in memory and lets a test push raw SSE frames down a device's
//! stream, silence its keepalives, fail result posts, stop and restart on the same port, and
//! read back what the agent sent (enrollments, manifests, results with their `traceparent`).
//!
//! Not here: the real dispatcher (the end-to-end suites in `tests/` run it).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State as Extract;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::channel::mpsc::{unbounded, UnboundedSender};
use futures::StreamExt;
use protocol::{EnrollRequest, EnrollResponse, HostResult, Manifest};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A result as the fake received it.
#[derive(Debug, Clone)]
pub struct Posted {
    pub result: HostResult,
    pub traceparent: Option<String>,
}

/// Everything the fake knows; survives a stop and restart.
#[derive(Default)]
pub struct State {
    /// Pairing codes that enroll (single use).
    pub codes: Mutex<HashSet<String>>,
    /// When set, every enrollment answers this status.
    pub enroll_status: Mutex<Option<StatusCode>>,
    pub enrollments: Mutex<Vec<EnrollRequest>>,
    /// token → device id.
    pub devices: Mutex<HashMap<String, String>>,
    /// Every stream opened, in order; closing a sender ends that stream.
    pub streams: Mutex<Vec<UnboundedSender<Bytes>>>,
    /// Streams refused with 401.
    pub refused_streams: AtomicUsize,
    /// Comment keepalive interval of new streams; `None` keeps them silent.
    pub keepalive: Mutex<Option<Duration>>,
    /// The next this many result posts answer 503.
    pub failing_results: AtomicUsize,
    pub results: Mutex<Vec<Posted>>,
    pub result_attempts: AtomicUsize,
    pub manifests: Mutex<Vec<Manifest>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl State {
    pub fn new(codes: &[&str]) -> Arc<Self> {
        let state = Self::default();
        lock(&state.codes).extend(codes.iter().map(|c| c.to_string()));
        *lock(&state.keepalive) = Some(Duration::from_millis(250));
        Arc::new(state)
    }

    /// A device the fake already knows, as if enrolled earlier.
    pub fn add_device(&self, device_id: &str, token: &str) {
        lock(&self.devices).insert(token.to_owned(), device_id.to_owned());
    }

    pub fn revoke_all(&self) {
        lock(&self.devices).clear();
    }

    pub fn set_keepalive(&self, every: Option<Duration>) {
        *lock(&self.keepalive) = every;
    }

    pub fn set_enroll_status(&self, status: Option<StatusCode>) {
        *lock(&self.enroll_status) = status;
    }

    pub fn stream_count(&self) -> usize {
        lock(&self.streams).len()
    }

    pub fn results(&self) -> Vec<Posted> {
        lock(&self.results).clone()
    }

    pub fn manifests(&self) -> Vec<Manifest> {
        lock(&self.manifests).clone()
    }

    pub fn enrollments(&self) -> Vec<EnrollRequest> {
        lock(&self.enrollments).clone()
    }

    /// Writes raw SSE text to the newest stream.
    pub fn send_raw(&self, text: &str) {
        let streams = lock(&self.streams);
        let newest = streams.last().expect("a stream is open");
        newest.unbounded_send(Bytes::from(text.to_owned())).expect("the stream is still open");
    }

    /// Sends one named event with one line of data to the newest stream.
    pub fn send_event(&self, event: &str, data: &str) {
        self.send_raw(&format!("event: {event}\ndata: {data}\n\n"));
    }

    /// Sends a call frame to the newest stream.
    pub fn send_call(&self, call: &serde_json::Value) {
        let id = call["callId"].as_str().unwrap_or_default();
        self.send_raw(&format!("event: call\nid: {id}\ndata: {call}\n\n"));
    }

    /// Ends every open stream (the connection closes cleanly).
    pub fn close_streams(&self) {
        for stream in lock(&self.streams).iter() {
            stream.close_channel();
        }
    }

    fn device_of(&self, headers: &HeaderMap) -> Option<String> {
        let token = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?;
        lock(&self.devices).get(token).cloned()
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn enroll(Extract(state): Extract<Arc<State>>, Json(request): Json<EnrollRequest>) -> Response {
    lock(&state.enrollments).push(request.clone());
    if let Some(status) = *lock(&state.enroll_status) {
        return error(status, "enrollment refused by the test");
    }
    if !lock(&state.codes).remove(&request.code) {
        return error(StatusCode::UNAUTHORIZED, "pairing code unknown, expired or already used");
    }
    let device_id = uuid::Uuid::new_v4().to_string();
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    state.add_device(&device_id, &token);
    (StatusCode::CREATED, Json(EnrollResponse { device_id, token })).into_response()
}

async fn stream(Extract(state): Extract<Arc<State>>, headers: HeaderMap) -> Response {
    let Some(device_id) = state.device_of(&headers) else {
        state.refused_streams.fetch_add(1, Ordering::SeqCst);
        return error(StatusCode::UNAUTHORIZED, "bad or revoked token");
    };
    let (tx, rx) = unbounded::<Bytes>();
    let ready = json!({ "deviceId": device_id, "replica": "fake-1" });
    let _ = tx.unbounded_send(Bytes::from(format!("event: ready\ndata: {ready}\n\n")));
    if let Some(every) = *lock(&state.keepalive) {
        let keepalive = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if keepalive.unbounded_send(Bytes::from_static(b": keepalive\n\n")).is_err() {
                    break;
                }
            }
        });
    }
    lock(&state.streams).push(tx);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(rx.map(Ok::<Bytes, Infallible>)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn result(Extract(state): Extract<Arc<State>>, headers: HeaderMap, Json(result): Json<HostResult>) -> Response {
    state.result_attempts.fetch_add(1, Ordering::SeqCst);
    if state.device_of(&headers).is_none() {
        return error(StatusCode::UNAUTHORIZED, "bad token");
    }
    if state.failing_results.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "try again");
    }
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
    lock(&state.results).push(Posted { result, traceparent });
    Json(json!({ "delivered": true })).into_response()
}

async fn manifest(Extract(state): Extract<Arc<State>>, headers: HeaderMap, Json(manifest): Json<Manifest>) -> Response {
    if state.device_of(&headers).is_none() {
        return error(StatusCode::UNAUTHORIZED, "bad token");
    }
    lock(&state.manifests).push(manifest);
    StatusCode::NO_CONTENT.into_response()
}

/// A running fake dispatcher.
pub struct Fake {
    pub addr: SocketAddr,
    pub url: String,
    pub state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Fake {
    /// A fake on a fresh port, knowing the given pairing codes.
    pub async fn start(codes: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), State::new(codes)).await
    }

    /// A fake on `addr` (port 0 picks one) with existing `state`.
    pub async fn start_on(addr: SocketAddr, state: Arc<State>) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the fake dispatcher");
        let addr = listener.local_addr().expect("local addr");
        let app = Router::new()
            .route("/api/host/enroll", post(enroll))
            .route("/api/host/stream", get(stream))
            .route("/api/host/result", post(result))
            .route("/api/host/manifest", put(manifest))
            .with_state(Arc::clone(&state));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Self { addr, url: format!("http://{addr}"), state, stop: Some(stop), task: Some(task) }
    }

    /// Closes every stream and stops serving; the port is free afterwards.
    pub async fn stop(mut self) -> (SocketAddr, Arc<State>) {
        self.state.close_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        (self.addr, Arc::clone(&self.state))
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.state.close_streams();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Polls `check` until it holds, or fails the test after `timeout` saying `what`.
pub async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The environment variables of `host-agent`, cleared so the host's settings cannot leak in.
pub const AGENT_ENV: &[&str] = &[
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
    "RUST_LOG",
    // No session bus: `auto` keeps the tokens in the files these suites look at.
    "DBUS_SESSION_BUS_ADDRESS",
];

/// A running `host-agent` binary with its output captured.
pub struct AgentProcess {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    exit: Option<i32>,
}

fn capture(pipe: impl std::io::Read + Send + 'static, sink: Arc<Mutex<String>>, label: &'static str) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            eprintln!("[agent {label}] {line}");
            let mut text = lock(&sink);
            text.push_str(&line);
            text.push('\n');
        }
    });
}

impl AgentProcess {
    /// Starts `host-agent` with `args` and only the given environment variables of its own.
    pub fn spawn(args: &[String], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_host-agent"));
        command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for name in AGENT_ENV {
            command.env_remove(name);
        }
        command.env("FUSION_HOST_LOG", "info");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start host-agent");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(pipe) = child.stdout.take() {
            capture(pipe, Arc::clone(&stdout), "stdout");
        }
        if let Some(pipe) = child.stderr.take() {
            capture(pipe, Arc::clone(&stderr), "stderr");
        }
        Self { child, stdout, stderr, exit: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        lock(&self.stdout).clone()
    }

    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// How many times `needle` appears in stderr so far.
    pub fn count_in_stderr(&self, needle: &str) -> usize {
        lock(&self.stderr).matches(needle).count()
    }

    /// Waits until stderr has shown `needle` at least `times` times.
    pub async fn wait_for_stderr(&self, needle: &str, times: usize, timeout: Duration) {
        let what = format!("{times}x {needle:?} in the agent's stderr");
        let stderr = Arc::clone(&self.stderr);
        let deadline = tokio::time::Instant::now() + timeout;
        while lock(&stderr).matches(needle).count() < times {
            if tokio::time::Instant::now() >= deadline {
                panic!("timed out waiting for {what}; stderr so far:\n{}", lock(&stderr));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal by name (`TERM`, `INT`) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The exit code, waiting at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let code = status.code().unwrap_or(-1);
                self.exit = Some(code);
                // Let the capture threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return code;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("host-agent did not exit within {timeout:?}; stderr:\n{}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `run` arguments for a fast test agent: one-second keepalive (dead after two), short
/// backoff, the given servers, root and credentials directory.
pub fn run_args(servers: &[&str], root: &Path, credentials: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["run".to_owned()];
    for server in servers {
        args.push("--server".into());
        args.push((*server).to_owned());
    }
    args.extend(
        [
            "--root",
            &root.display().to_string(),
            "--credentials-dir",
            &credentials.display().to_string(),
            "--name",
            "test device",
            "--keepalive-secs",
            "1",
            "--backoff-base-ms",
            "50",
            "--max-backoff-ms",
            "300",
            "--shutdown-grace-secs",
            "5",
        ]
        .map(str::to_owned),
    );
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Writes cached credentials the way the agent does, for a device the fake knows.
pub fn seed_credentials(dir: &Path, server_url: &str, device_id: &str, token: &str) -> std::path::PathBuf {
    let url = reqwest::Url::parse(server_url).expect("url");
    let origin = host_agent::credentials::origin_of(&url).expect("origin");
    let store = host_agent::credentials::CredentialStore::new(dir);
    store
        .save(&host_agent::credentials::Credentials {
            device_id: device_id.into(),
            token: token.into(),
            server: origin,
        })
        .expect("seed credentials")
}
