//! Both sides of the contract's HTTP API as the suites drive it:
//!
//! - [`TestDevice`]: a small device. It enrolls with a pairing code, opens
//!   `GET /api/host/stream`, waits for `ready`, then answers every `call` frame per an
//!   [`Answer`] in the background, POSTing the result to the same replica or another one. It
//!   counts how often each call id arrived, so "pushed exactly once" can be asserted.
//! - [`Control`]: the control API as an app backend uses it, each method returning the status
//!   and the JSON body so tests assert codes.
//!
//! Not here: tools. The device answers whatever the test tells it to; the real tools are the
//! agent suite's business.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use parking_lot::Mutex;
use protocol::sse::Ready;
use protocol::{HostCall, HostResult};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::sse;

/// Longest a control or device request may take before the harness gives up on it (a hung
/// server fails the test instead of hanging it). Calls add their own `timeoutMs`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn client() -> reqwest::Client {
    reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build().expect("reqwest client")
}

/// A body as JSON: `null` when empty, a JSON string when it is not JSON.
async fn body_json(response: reqwest::Response) -> anyhow::Result<(StatusCode, Value)> {
    let status = response.status();
    let bytes = response.bytes().await.context("reading a response body")?;
    if bytes.is_empty() {
        return Ok((status, Value::Null));
    }
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Ok((status, value))
}

/// A test's own answer to a call: a result, or `None` to stay silent.
pub type AnswerFn = Arc<dyn Fn(&HostCall) -> Option<HostResult> + Send + Sync>;

/// What a [`TestDevice`] does with each call pushed to it.
#[derive(Clone)]
pub enum Answer {
    /// `ok: true` with `result: {"tool", "input", "mode"}` of the call (`mode` null when
    /// absent).
    Echo,
    /// Never answers.
    Silent,
    /// The closure's result, or no answer when it returns `None`.
    With(AnswerFn),
    /// The inner answer, POSTed to another replica's base URL.
    PostTo(String, Box<Answer>),
    /// The inner answer, POSTed after a delay.
    Delayed(Duration, Box<Answer>),
}

impl Answer {
    /// [`Answer::With`] from a closure.
    pub fn with(f: impl Fn(&HostCall) -> Option<HostResult> + Send + Sync + 'static) -> Self {
        Self::With(Arc::new(f))
    }

    /// The echo result of `call`.
    pub fn echo_of(call: &HostCall) -> HostResult {
        HostResult::success(call.call_id.clone(), json!({"tool": call.tool, "input": call.input, "mode": call.mode}))
    }

    /// The result for `call`, where to POST it and after how long; `None` for no answer.
    fn plan(&self, call: &HostCall, base: &str) -> Option<(HostResult, String, Duration)> {
        match self {
            Self::Echo => Some((Self::echo_of(call), base.to_owned(), Duration::ZERO)),
            Self::Silent => None,
            Self::With(f) => f(call).map(|result| (result, base.to_owned(), Duration::ZERO)),
            Self::PostTo(other, inner) => inner.plan(call, other).map(|(r, _, d)| (r, other.clone(), d)),
            Self::Delayed(delay, inner) => inner.plan(call, base).map(|(r, b, d)| (r, b, d + *delay)),
        }
    }
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Echo => write!(f, "Echo"),
            Self::Silent => write!(f, "Silent"),
            Self::With(_) => write!(f, "With(..)"),
            Self::PostTo(base, inner) => write!(f, "PostTo({base}, {inner:?})"),
            Self::Delayed(delay, inner) => write!(f, "Delayed({delay:?}, {inner:?})"),
        }
    }
}

/// An enrolled device's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestDevice {
    pub device_id: String,
    pub token: String,
}

impl TestDevice {
    /// `POST /api/host/enroll`; fails unless the server answers 201 with an id and a token.
    pub async fn enroll(base_url: &str, code: &str, name: &str) -> anyhow::Result<TestDevice> {
        let (status, body) = Self::enroll_raw(base_url, &json!({"code": code, "name": name})).await?;
        if status != StatusCode::CREATED {
            bail!("enroll answered {status}: {body}");
        }
        let device_id = body["deviceId"].as_str().ok_or_else(|| anyhow!("enroll without deviceId: {body}"))?;
        let token = body["token"].as_str().ok_or_else(|| anyhow!("enroll without token: {body}"))?;
        Ok(TestDevice { device_id: device_id.into(), token: token.into() })
    }

    /// `POST /api/host/enroll` with any JSON body.
    pub async fn enroll_raw(base_url: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        let response =
            client().post(format!("{base_url}/api/host/enroll")).json(body).timeout(REQUEST_TIMEOUT).send().await?;
        body_json(response).await
    }

    /// Mints a pairing code with `control` and enrolls with it.
    pub async fn pair(base_url: &str, control: &Control, name: &str) -> anyhow::Result<TestDevice> {
        let code = control.pairing_code().await?;
        Self::enroll(base_url, &code, name).await
    }

    /// The status of `GET /api/host/stream` (the stream, if any, is closed at once).
    pub async fn stream_status(&self, base_url: &str) -> anyhow::Result<StatusCode> {
        let response = client()
            .get(format!("{base_url}/api/host/stream"))
            .bearer_auth(&self.token)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        Ok(response.status())
    }

    /// Opens the stream on `addr` over a raw TCP connection with a small receive buffer and
    /// returns the socket without reading a byte of the answer: a device that stopped reading
    /// (its socket fills, and the server's writes block).
    pub async fn open_unread_stream(&self, addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let mut stream = socket.connect(addr).await.context("connecting for a raw stream")?;
        let request = format!(
            "GET /api/host/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             Accept: text/event-stream\r\n\r\n",
            self.token
        );
        stream.write_all(request.as_bytes()).await?;
        Ok(stream)
    }

    /// `POST /api/host/result`.
    pub async fn post_result(&self, base_url: &str, result: &HostResult) -> anyhow::Result<(StatusCode, Value)> {
        let response = client()
            .post(format!("{base_url}/api/host/result"))
            .bearer_auth(&self.token)
            .json(result)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        body_json(response).await
    }

    /// `PUT /api/host/manifest`.
    pub async fn put_manifest(&self, base_url: &str, manifest: &Value) -> anyhow::Result<(StatusCode, Value)> {
        let response = client()
            .put(format!("{base_url}/api/host/manifest"))
            .bearer_auth(&self.token)
            .json(manifest)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        body_json(response).await
    }

    /// Opens the stream on `base_url` and waits (10 s at most) for its `ready` frame; then
    /// answers calls per `answer` in the background until the stream ends or the connection
    /// is dropped. Fails when the stream answers anything but 200 or its first frame is not
    /// `ready`.
    pub async fn connect(&self, base_url: &str, answer: Answer) -> anyhow::Result<DeviceConn> {
        let client = client();
        let response = client
            .get(format!("{base_url}/api/host/stream"))
            .bearer_auth(&self.token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .context("opening the stream")?;
        if response.status() != StatusCode::OK {
            let (status, body) = body_json(response).await?;
            bail!("stream answered {status}: {body}");
        }
        let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let posted: Arc<Mutex<Vec<(String, StatusCode)>>> = Arc::default();
        let (frames_tx, frames) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (closed_tx, closed) = watch::channel(false);
        let cancel = CancellationToken::new();
        let reader = Reader {
            device: self.clone(),
            base_url: base_url.to_owned(),
            answer,
            client,
            calls: calls.clone(),
            posted: posted.clone(),
            frames: frames_tx,
            cancel: cancel.clone(),
        };
        tokio::spawn(async move {
            reader.run(response, ready_tx).await;
            let _ = closed_tx.send(true);
        });
        let ready = tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("no ready frame within 10 s")?
            .map_err(|_| anyhow!("the stream ended before its first frame"))??;
        Ok(DeviceConn { ready, calls, posted, frames, cancel, closed })
    }
}

/// The background reader of one stream.
struct Reader {
    device: TestDevice,
    base_url: String,
    answer: Answer,
    client: reqwest::Client,
    calls: Arc<Mutex<HashMap<String, u32>>>,
    posted: Arc<Mutex<Vec<(String, StatusCode)>>>,
    frames: mpsc::UnboundedSender<(String, String)>,
    cancel: CancellationToken,
}

impl Reader {
    async fn run(self, mut response: reqwest::Response, ready_tx: oneshot::Sender<anyhow::Result<Ready>>) {
        let mut parser = sse::Parser::new();
        let mut ready_tx = Some(ready_tx);
        loop {
            let chunk = tokio::select! {
                _ = self.cancel.cancelled() => break,
                chunk = response.chunk() => chunk,
            };
            let bytes = match chunk {
                Ok(Some(bytes)) => bytes,
                Ok(None) | Err(_) => break,
            };
            for frame in parser.push(&bytes) {
                if let Some(tx) = ready_tx.take() {
                    let ready = if frame.event == protocol::sse::EVENT_READY {
                        serde_json::from_str::<Ready>(&frame.data)
                            .map_err(|e| anyhow!("bad ready data {:?}: {e}", frame.data))
                    } else {
                        Err(anyhow!("first frame is {:?}, not ready", frame.event))
                    };
                    let _ = tx.send(ready);
                    continue;
                }
                self.frame(frame);
            }
        }
        if let Some(tx) = ready_tx.take() {
            let _ = tx.send(Err(anyhow!("the stream ended before its first frame")));
        }
    }

    fn frame(&self, frame: sse::Frame) {
        if frame.event == protocol::sse::EVENT_CALL {
            match serde_json::from_str::<HostCall>(&frame.data) {
                Ok(call) => {
                    *self.calls.lock().entry(call.call_id.clone()).or_default() += 1;
                    self.answer_call(&call);
                }
                Err(error) => eprintln!("e2e device: unparsable call frame {:?}: {error}", frame.data),
            }
        }
        let _ = self.frames.send((frame.event, frame.data));
    }

    fn answer_call(&self, call: &HostCall) {
        let Some((result, base, delay)) = self.answer.plan(call, &self.base_url) else {
            return;
        };
        let mut request = self
            .client
            .post(format!("{base}/api/host/result"))
            .bearer_auth(&self.device.token)
            .json(&result)
            .timeout(REQUEST_TIMEOUT);
        if let Some(traceparent) = &call.traceparent {
            request = request.header("traceparent", traceparent);
        }
        let posted = self.posted.clone();
        let call_id = call.call_id.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match request.send().await {
                Ok(response) => posted.lock().push((call_id, response.status())),
                Err(error) => eprintln!("e2e device: result POST for {call_id} failed: {error}"),
            }
        });
    }
}

/// A live stream of a [`TestDevice`]. Dropping it closes the connection.
#[derive(Debug)]
pub struct DeviceConn {
    /// The stream's first frame.
    pub ready: Ready,
    /// Call id → how many times a `call` frame with it arrived.
    pub calls: Arc<Mutex<HashMap<String, u32>>>,
    /// (call id, status) of every result POST the device made.
    pub posted: Arc<Mutex<Vec<(String, StatusCode)>>>,
    /// Every frame after `ready`: (event name, data); keepalive comments as ("keepalive", "").
    /// The channel ends when the stream does.
    pub frames: mpsc::UnboundedReceiver<(String, String)>,
    cancel: CancellationToken,
    closed: watch::Receiver<bool>,
}

impl DeviceConn {
    /// Closes the connection (as dropping does).
    pub fn close(self) {}

    /// True once the stream ended (the server closed it, or the connection broke).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Waits for the server to end the stream.
    pub async fn wait_closed(&mut self, timeout: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(timeout, self.closed.wait_for(|closed| *closed))
            .await
            .map_err(|_| anyhow!("the stream was still open after {timeout:?}"))?
            .map_err(|_| anyhow!("the stream reader went away"))?;
        Ok(())
    }

    /// The next frame, or `None` when the stream ended or nothing came within `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<(String, String)> {
        tokio::time::timeout(timeout, self.frames.recv()).await.ok().flatten()
    }

    /// The next frame that is not a keepalive.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (event, data) = self.next_frame(left).await?;
            if event != sse::KEEPALIVE {
                return Some((event, data));
            }
        }
    }

    /// Skips frames until one named `event`, and returns its data.
    pub async fn wait_event(&mut self, event: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                Some((name, data)) if name == event => return Ok(data),
                Some((name, _)) => seen.push(name),
                None => bail!("no {event:?} frame within {timeout:?} (saw {seen:?})"),
            }
        }
    }

    /// How many times the call `call_id` was pushed to this stream.
    pub fn times_received(&self, call_id: &str) -> u32 {
        self.calls.lock().get(call_id).copied().unwrap_or(0)
    }

    /// How many call frames arrived in all.
    pub fn total_received(&self) -> u32 {
        self.calls.lock().values().sum()
    }
}

impl Drop for DeviceConn {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The control API for one api token on one replica.
#[derive(Debug, Clone)]
pub struct Control {
    pub base_url: String,
    pub token: String,
    client: reqwest::Client,
}

impl Control {
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        Self { base_url: base_url.into(), token: token.into(), client: client() }
    }

    /// With a client of the caller's (one that trusts a test CA, say).
    pub fn with_client(base_url: impl Into<String>, token: impl Into<String>, client: reqwest::Client) -> Self {
        Self { base_url: base_url.into(), token: token.into(), client }
    }

    /// The same token against another replica.
    pub fn at(&self, base_url: impl Into<String>) -> Self {
        Self { base_url: base_url.into(), token: self.token.clone(), client: self.client.clone() }
    }

    /// Any request with this token; the body is JSON when given. Returns status and JSON.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        self.request_with_timeout(method, path, body, REQUEST_TIMEOUT).await
    }

    async fn request_with_timeout(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request =
            self.client.request(method, format!("{}{path}", self.base_url)).bearer_auth(&self.token).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| format!("request to {path}"))?;
        body_json(response).await
    }

    /// `POST /api/pairing-codes` with any body.
    pub async fn create_pairing_code(&self, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        self.request(Method::POST, "/api/pairing-codes", Some(body)).await
    }

    /// A new pairing code (fails unless 201 with a code).
    pub async fn pairing_code(&self) -> anyhow::Result<String> {
        let (status, body) = self.create_pairing_code(&json!({})).await?;
        if status != StatusCode::CREATED {
            bail!("pairing-codes answered {status}: {body}");
        }
        body["code"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("pairing code without code: {body}"))
    }

    /// Asks `GET /api/devices` every 20 ms until it answers 401; how long that took, or `None`
    /// when the token still worked after `limit`.
    pub async fn time_until_refused(&self, limit: Duration) -> anyhow::Result<Option<Duration>> {
        let started = Instant::now();
        loop {
            let (status, _) = self.devices().await?;
            if status == StatusCode::UNAUTHORIZED {
                return Ok(Some(started.elapsed()));
            }
            if started.elapsed() > limit {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn devices(&self) -> anyhow::Result<(StatusCode, Value)> {
        self.request(Method::GET, "/api/devices", None).await
    }

    /// Every device of this user, following `next` from page to page.
    pub async fn all_devices(&self) -> anyhow::Result<Vec<Value>> {
        let mut devices = Vec::new();
        let mut path = "/api/devices?limit=500".to_owned();
        loop {
            let (status, page) = self.request(Method::GET, &path, None).await?;
            if status != StatusCode::OK {
                bail!("GET {path} answered {status}: {page}");
            }
            devices.extend(page["devices"].as_array().cloned().unwrap_or_default());
            match page["next"].as_str() {
                Some(next) => path = format!("/api/devices?limit=500&cursor={next}"),
                None => return Ok(devices),
            }
        }
    }

    pub async fn device(&self, id: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.request(Method::GET, &format!("/api/devices/{id}"), None).await
    }

    pub async fn delete_device(&self, id: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.request(Method::DELETE, &format!("/api/devices/{id}"), None).await
    }

    /// `POST /api/devices/{id}/calls` with `{tool, input, timeoutMs?}`.
    pub async fn call(
        &self,
        id: &str,
        tool: &str,
        input: Value,
        timeout_ms: Option<u64>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut body = json!({"tool": tool, "input": input});
        if let Some(ms) = timeout_ms {
            body["timeoutMs"] = json!(ms);
        }
        self.call_raw(id, &body).await
    }

    /// `POST /api/devices/{id}/calls` with any body.
    pub async fn call_raw(&self, id: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        let wait =
            body["timeoutMs"].as_u64().unwrap_or(protocol::CALL_TIMEOUT_DEFAULT_MS).min(protocol::CALL_TIMEOUT_MAX_MS);
        let timeout = REQUEST_TIMEOUT + Duration::from_millis(wait);
        self.request_with_timeout(Method::POST, &format!("/api/devices/{id}/calls"), Some(body), timeout).await
    }

    /// `GET /api/proposals`, with `?status=` when given.
    pub async fn proposals(&self, status: Option<&str>) -> anyhow::Result<(StatusCode, Value)> {
        let path = match status {
            Some(status) => format!("/api/proposals?status={status}"),
            None => "/api/proposals".into(),
        };
        self.request(Method::GET, &path, None).await
    }

    pub async fn proposal(&self, id: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.request(Method::GET, &format!("/api/proposals/{id}"), None).await
    }

    pub async fn approve(&self, proposal_id: &str) -> anyhow::Result<(StatusCode, Value)> {
        let body = json!({"proposalId": proposal_id});
        self.request_with_timeout(Method::POST, "/api/host/approve", Some(&body), REQUEST_TIMEOUT * 2).await
    }

    pub async fn reject(&self, proposal_id: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.request(Method::POST, "/api/host/reject", Some(&json!({"proposalId": proposal_id}))).await
    }

    /// Polls `GET /api/devices/{id}` until `online` is `want`; returns the device.
    pub async fn wait_online(&self, id: &str, want: bool, timeout: Duration) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let (status, device) = self.device(id).await?;
            if status == StatusCode::OK && device["online"].as_bool() == Some(want) {
                return Ok(device);
            }
            if started.elapsed() > timeout {
                bail!("device {id} not online={want} after {timeout:?}: {status} {device}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `GET /api/devices` until one of this user's devices is online, while `agent` runs;
    /// returns its id. Panics (with the agent's log) when the agent exits or `timeout` passes.
    pub async fn first_online_device(&self, agent: &mut crate::process::Agent, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let (status, list) = self.devices().await.expect("list devices");
            assert_eq!(status, StatusCode::OK);
            if let Some(device) = list["devices"].as_array().and_then(|d| d.iter().find(|d| d["online"] == true)) {
                return device["id"].as_str().expect("id").to_owned();
            }
            assert!(agent.is_running(), "the agent exited before coming online\n{}", agent.log_tail(60));
            assert!(started.elapsed() < timeout, "no device online after {timeout:?}: {list}\n{}", agent.log_tail(60));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
