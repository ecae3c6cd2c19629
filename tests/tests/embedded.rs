//! End to end against the real `dispatcher` binary in single-replica mode (no NATS): on its
//! embedded default, a SQLite file, and the same flows again on a fresh PostgreSQL database.
//! A [`TestDevice`] speaks the device side of the contract over HTTP; [`Control`] is the app
//! backend. Every test starts its own process on a free port, so they run in parallel.
//!
//! Not here: several replicas (the cluster suite) and the real `host-agent` (tests/agent.rs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::process::{revoke_token, DispatcherBuilder};
use e2e::{metric, Answer, Control, Dispatcher, TestDatabase, TestDevice};
use futures::StreamExt;
use protocol::{CallMode, HostCall, HostResult};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);

/// The database a test's replica runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// One replica with a user and its api token. Fields drop in order: the process first, then
/// its database.
struct Env {
    dispatcher: Dispatcher,
    control: Control,
    _db: Option<TestDatabase>,
}

impl Env {
    async fn start(backend: Backend) -> Env {
        Self::start_with(backend, |builder| builder).await
    }

    async fn start_with(backend: Backend, configure: impl FnOnce(DispatcherBuilder) -> DispatcherBuilder) -> Env {
        let db = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TestDatabase::create().await.expect("a fresh PostgreSQL database")),
        };
        let mut builder = Dispatcher::builder();
        if let Some(db) = &db {
            builder = builder.database_url(db.url());
        }
        let dispatcher = configure(builder).start().await.expect("dispatcher starts");
        let token = dispatcher.mint_token("user-a").await.expect("token create");
        let control = Control::new(dispatcher.base_url(), token);
        Env { dispatcher, control, _db: db }
    }

    fn base(&self) -> String {
        self.dispatcher.base_url()
    }

    /// A device enrolled with a code minted by this env's user.
    async fn device(&self, name: &str) -> TestDevice {
        TestDevice::pair(&self.base(), &self.control, name).await.expect("enroll")
    }

    /// The control API as another user.
    async fn other_user(&self, user: &str) -> Control {
        Control::new(self.base(), self.dispatcher.mint_token(user).await.expect("token create"))
    }
}

/// Asserts a contract error: the status and a non-empty `{"error": "…"}`.
fn assert_error(got: &(StatusCode, Value), want: StatusCode, context: &str) {
    let (status, body) = got;
    assert_eq!(*status, want, "{context}: body {body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{context}: {status} without an error text: {body}");
}

/// A raw request: status, headers and the body as JSON (or a JSON string when it is not).
async fn raw(
    client: &reqwest::Client,
    method: Method,
    url: &str,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = client.request(method, url).headers(headers).timeout(30 * SECOND);
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, headers, body)
}

fn json_headers(token: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(token) = token {
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).expect("header"));
    }
    headers
}

/// The `call` frame the connection receives next (skipping keepalives).
async fn next_call(conn: &mut e2e::DeviceConn) -> HostCall {
    let data = conn.wait_event(protocol::sse::EVENT_CALL, 10 * SECOND).await.expect("a call frame");
    serde_json::from_str(&data).expect("a HostCall")
}

// ---- flows run on both databases ------------------------------------------------------------

/// token create → pairing code → enroll → stream (`ready` first) → a read answered by the
/// device; the device is online on this replica; the pending table is empty afterwards.
async fn enroll_stream_and_dispatch(backend: Backend) {
    let env = Env::start(backend).await;
    let base = env.base();
    let (status, body) = env.control.create_pairing_code(&json!({"ttlSeconds": 120})).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let code = body["code"].as_str().expect("code").to_owned();
    let expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(body["expiresAt"].clone()).expect("expiresAt is RFC 3339");
    let ttl = expires - chrono::Utc::now();
    assert!(ttl > chrono::Duration::seconds(100) && ttl <= chrono::Duration::seconds(121), "expiresAt {expires}");

    let (status, enrolled) =
        TestDevice::enroll_raw(&base, &json!({"code": code, "name": "laptop", "platform": "linux"})).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{enrolled}");
    let device = TestDevice {
        device_id: enrolled["deviceId"].as_str().expect("deviceId").into(),
        token: enrolled["token"].as_str().expect("token").into(),
    };
    uuid::Uuid::parse_str(&device.device_id).expect("device ids are UUIDs");

    let (status, view) = env.control.device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["online"], false, "{view}");
    assert_eq!(view["name"], "laptop");
    assert_eq!(view["platform"], "linux");

    let conn = device.connect(&base, Answer::Echo).await.expect("stream");
    assert_eq!(conn.ready.device_id, device.device_id);
    assert_eq!(conn.ready.replica, env.dispatcher.replica_id());
    let view = env.control.wait_online(&device.device_id, true, 5 * SECOND).await.unwrap();
    assert_eq!(view["replica"], env.dispatcher.replica_id());
    let (status, list) = env.control.devices().await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let devices = list["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{list}");
    assert_eq!(devices[0]["id"], device.device_id.as_str());

    let input = json!({"path": "notes/today.md", "startLine": 1});
    let (status, result) = env.control.call(&device.device_id, "read_file", input.clone(), Some(5000)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result["ok"], true);
    assert_eq!(result["result"], json!({"tool": "read_file", "input": input, "mode": null}));
    assert!(result.get("proposalId").is_none(), "a read stores no proposal: {result}");
    let call_id = result["callId"].as_str().expect("callId");
    uuid::Uuid::parse_str(call_id).expect("call ids are UUIDs");
    assert_eq!(conn.times_received(call_id), 1);
    assert_eq!(conn.total_received(), 1);

    assert_eq!(metric(&base, "pending_calls").await, Some(0.0), "the pending table is back to zero");
}

/// Offline → 503 at once; silent → 504 by its timeout (+1 s at most); the late result → 404
/// `{"delivered": false}`; a result for another device's call → 403 and changes nothing.
async fn offline_timeout_forbidden_late(backend: Backend) {
    let env = Env::start(backend).await;
    let base = env.base();
    let a = env.device("a").await;
    let b = env.device("b").await;

    let started = Instant::now();
    let (status, body) = env.control.call(&a.device_id, "stat", json!({"path": "."}), Some(10_000)).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["ok"], false);
    assert_eq!(body["error"], protocol::ERROR_DEVICE_OFFLINE);
    assert!(body["callId"].is_string(), "a server-made failure is a HostResult: {body}");
    assert!(started.elapsed() < SECOND, "offline answered after {:?}", started.elapsed());

    let mut conn_a = a.connect(&base, Answer::Silent).await.unwrap();
    let _conn_b = b.connect(&base, Answer::Silent).await.unwrap();
    let started = Instant::now();
    let (status, body) = env.control.call(&a.device_id, "stat", json!({"path": "."}), Some(1000)).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"], protocol::ERROR_DEVICE_TIMED_OUT);
    assert_eq!(body["ok"], false);
    assert!(elapsed >= Duration::from_millis(950) && elapsed < 2 * SECOND, "timed out after {elapsed:?}");
    let late = next_call(&mut conn_a).await;
    assert_eq!(late.call_id, body["callId"].as_str().unwrap());
    assert!(late.deadline.is_some(), "calls carry their deadline: {late:?}");
    let (status, delivered) = a.post_result(&base, &HostResult::success(late.call_id.clone(), json!(1))).await.unwrap();
    assert_eq!((status, delivered), (StatusCode::NOT_FOUND, json!({"delivered": false})));
    let (status, delivered) = a.post_result(&base, &HostResult::success("never-dispatched", json!(1))).await.unwrap();
    assert_eq!((status, delivered), (StatusCode::NOT_FOUND, json!({"delivered": false})));

    // B answers A's call: refused, and A's own answer still lands.
    let control = env.control.clone();
    let a_id = a.device_id.clone();
    let pending = tokio::spawn(async move { control.call(&a_id, "stat", json!({"path": "x"}), Some(10_000)).await });
    let call = next_call(&mut conn_a).await;
    let forged = HostResult::success(call.call_id.clone(), json!({"from": "b"}));
    let got = b.post_result(&base, &forged).await.unwrap();
    assert_error(&got, StatusCode::FORBIDDEN, "a result from another device");
    let (status, delivered) =
        a.post_result(&base, &HostResult::success(call.call_id.clone(), json!({"from": "a"}))).await.unwrap();
    assert_eq!((status, delivered), (StatusCode::OK, json!({"delivered": true})));
    let (status, body) = pending.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"], json!({"from": "a"}));
    let (status, delivered) = a.post_result(&base, &HostResult::success(call.call_id, json!(2))).await.unwrap();
    assert_eq!((status, delivered), (StatusCode::NOT_FOUND, json!({"delivered": false})), "answered once only");
    assert_eq!(metric(&base, "pending_calls").await, Some(0.0), "the pending table is back to zero");
}

/// A second stream for the same device: the first gets `superseded` and closes; calls go to
/// the newest.
async fn newest_stream_wins(backend: Backend) {
    let env = Env::start(backend).await;
    let base = env.base();
    let device = env.device("twice").await;
    let mut first = device.connect(&base, Answer::Echo).await.unwrap();
    let second = device.connect(&base, Answer::Echo).await.unwrap();
    let (event, data) = first.next_event(5 * SECOND).await.expect("a frame on the older stream");
    assert_eq!(event, protocol::sse::EVENT_SUPERSEDED, "{data}");
    first.wait_closed(5 * SECOND).await.expect("the older stream closes");
    for n in 0..5 {
        let (status, body) = env.control.call(&device.device_id, "stat", json!({"n": n}), Some(5000)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(first.total_received(), 0);
    assert_eq!(second.total_received(), 5);
    assert!(!second.is_closed());
}

/// DELETE → 204, the stream gets `revoked` and closes, pending calls fail, and the token is
/// refused (stream and result 401).
async fn revoke_closes_stream(backend: Backend) {
    let env = Env::start(backend).await;
    let base = env.base();
    let device = env.device("doomed").await;
    let mut conn = device.connect(&base, Answer::Silent).await.unwrap();
    let control = env.control.clone();
    let id = device.device_id.clone();
    let pending = tokio::spawn(async move { control.call(&id, "stat", json!({}), Some(20_000)).await });
    let call = next_call(&mut conn).await;

    let started = Instant::now();
    let (status, body) = env.control.delete_device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (event, _) = conn.next_event(5 * SECOND).await.expect("a frame after revocation");
    assert_eq!(event, protocol::sse::EVENT_REVOKED);
    conn.wait_closed(5 * SECOND).await.expect("the stream closes");
    let (status, body) =
        tokio::time::timeout(5 * SECOND, pending).await.expect("the pending call resolves").unwrap().unwrap();
    assert!(started.elapsed() < 2 * SECOND, "pending call failed after {:?}", started.elapsed());
    assert_ne!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], false, "{body}");

    assert_eq!(device.stream_status(&base).await.unwrap(), StatusCode::UNAUTHORIZED);
    let got = device.post_result(&base, &HostResult::success(call.call_id, json!(1))).await.unwrap();
    assert_error(&got, StatusCode::UNAUTHORIZED, "result from a revoked device");
    let got = device.put_manifest(&base, &json!({"tools": [], "roots": [], "version": "1", "platform": "linux"})).await;
    assert_error(&got.unwrap(), StatusCode::UNAUTHORIZED, "manifest from a revoked device");
    let (status, _) = env.control.delete_device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "a revoked device cannot be revoked again");
}

/// `mode` in a call body is refused with 400, whatever its value, and nothing is pushed.
async fn mode_field_refused(backend: Backend) {
    let env = Env::start(backend).await;
    let device = env.device("m").await;
    let conn = device.connect(&env.base(), Answer::Echo).await.unwrap();
    for mode in [json!("apply"), json!("auto"), Value::Null] {
        let body = json!({"tool": "write_file", "input": {"path": "a", "content": "x"}, "mode": mode});
        let got = env.control.call_raw(&device.device_id, &body).await.unwrap();
        assert_error(&got, StatusCode::BAD_REQUEST, &format!("mode {mode}"));
    }
    assert_eq!(conn.total_received(), 0);
}

/// A device that proposes for `write*` tools in auto mode and applies in apply mode, counting
/// the applies it received.
fn proposing_device(applies: Arc<AtomicUsize>, seen: Arc<parking_lot::Mutex<Vec<HostCall>>>) -> Answer {
    Answer::with(move |call| {
        seen.lock().push(call.clone());
        if call.mode == Some(CallMode::Apply) {
            applies.fetch_add(1, Ordering::SeqCst);
            return Some(HostResult::success(call.call_id.clone(), json!({"applied": call.input})));
        }
        if call.tool.starts_with("write") {
            let plan = json!({
                "tool": call.tool,
                "summary": "write a file",
                "diff": "--- a\n+++ b\n",
                "preconditions": {"absent": true, "path": call.input["path"]},
            });
            return Some(HostResult::proposal(call.call_id.clone(), plan));
        }
        Some(Answer::echo_of(call))
    })
}

/// A proposal is stored, approved by 20 racing approvals, applied exactly once with the
/// stored input and preconditions; then it is no longer pending (409).
async fn proposal_applies_once(backend: Backend) {
    let env = Env::start(backend).await;
    let device = env.device("p").await;
    let applies = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let conn = device.connect(&env.base(), proposing_device(applies.clone(), seen.clone())).await.unwrap();

    let input = json!({"path": "out.txt", "content": "hello"});
    let (status, body) = env.control.call(&device.device_id, "write_file", input.clone(), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["proposal"], true);
    let proposal_id = body["proposalId"].as_str().expect("proposalId").to_owned();
    assert_eq!(seen.lock()[0].mode, None, "a dispatched call carries no mode: {:?}", seen.lock()[0]);

    let (status, list) = env.control.proposals(Some("pending")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["proposals"].as_array().unwrap().iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(ids, [proposal_id.as_str()]);
    let (status, stored) = env.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["status"], "pending");
    assert_eq!(stored["input"], input);
    assert_eq!(stored["tool"], "write_file");
    assert_eq!(stored["deviceId"], device.device_id.as_str());
    assert_eq!(stored["proposal"]["summary"], "write a file");

    let approvals = futures::future::join_all((0..20).map(|_| {
        let control = env.control.clone();
        let id = proposal_id.clone();
        async move { control.approve(&id).await.unwrap() }
    }))
    .await;
    let winners: Vec<&(StatusCode, Value)> = approvals.iter().filter(|(s, _)| *s == StatusCode::OK).collect();
    assert_eq!(winners.len(), 1, "exactly one approval applies: {approvals:?}");
    for got in approvals.iter().filter(|(s, _)| *s != StatusCode::OK) {
        assert_error(got, StatusCode::CONFLICT, "a losing approval");
    }
    assert_eq!(winners[0].1["result"], json!({"applied": input}));
    assert_eq!(applies.load(Ordering::SeqCst), 1, "the device got exactly one apply");
    let apply = seen.lock().iter().find(|c| c.is_apply()).cloned().expect("the apply call");
    assert_eq!(apply.input, input, "the stored input is applied");
    assert_eq!(apply.preconditions, Some(json!({"absent": true, "path": "out.txt"})), "with the plan's preconditions");
    assert_eq!(conn.times_received(&apply.call_id), 1);

    let (status, stored) = env.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["status"], "applied", "{stored}");
    assert_eq!(stored["result"]["ok"], true, "{stored}");
    assert!(stored["decidedAt"].is_string(), "{stored}");
    let got = env.control.approve(&proposal_id).await.unwrap();
    assert_error(&got, StatusCode::CONFLICT, "approving an applied proposal");
    let (_, list) = env.control.proposals(Some("pending")).await.unwrap();
    assert_eq!(list["proposals"], json!([]));
    assert_eq!(applies.load(Ordering::SeqCst), 1);
}

/// Reject → 200 with the rejected proposal; approve and reject afterwards → 409; nothing applied.
/// An approval while the device is offline answers 503 and leaves the proposal pending.
async fn proposal_rejected(backend: Backend) {
    let env = Env::start(backend).await;
    let device = env.device("r").await;
    let applies = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let conn = device.connect(&env.base(), proposing_device(applies.clone(), seen)).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..2 {
        let (status, body) =
            env.control.call(&device.device_id, "write_file", json!({"path": n.to_string()}), None).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(body["proposalId"].as_str().expect("proposalId").to_owned());
    }
    let (status, list) = env.control.proposals(Some("pending")).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<&str> = list["proposals"].as_array().unwrap().iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(listed, [ids[1].as_str(), ids[0].as_str()], "newest first");

    let (status, rejected) = env.control.reject(&ids[0]).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{rejected}");
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["id"], ids[0].as_str());
    assert_error(&env.control.approve(&ids[0]).await.unwrap(), StatusCode::CONFLICT, "approve after reject");
    assert_error(&env.control.reject(&ids[0]).await.unwrap(), StatusCode::CONFLICT, "reject twice");
    let (_, list) = env.control.proposals(Some("rejected")).await.unwrap();
    assert_eq!(list["proposals"].as_array().map(Vec::len), Some(1), "{list}");

    drop(conn);
    env.control.wait_online(&device.device_id, false, 5 * SECOND).await.unwrap();
    let (status, body) = env.control.approve(&ids[1]).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], protocol::ERROR_DEVICE_OFFLINE);
    let (_, stored) = env.control.proposal(&ids[1]).await.unwrap();
    assert_eq!(stored["status"], "pending", "an offline approval leaves it pending: {stored}");
    assert_eq!(applies.load(Ordering::SeqCst), 0);

    let missing = uuid::Uuid::new_v4().to_string();
    assert_error(&env.control.approve(&missing).await.unwrap(), StatusCode::NOT_FOUND, "approve unknown");
    assert_error(&env.control.reject(&missing).await.unwrap(), StatusCode::NOT_FOUND, "reject unknown");
}

/// A pairing code enrolls once; unknown and expired codes are refused; ttl bounds are checked.
async fn pairing_codes(backend: Backend) {
    let env = Env::start(backend).await;
    let base = env.base();
    let code = env.control.pairing_code().await.unwrap();
    TestDevice::enroll(&base, &code, "first").await.expect("the first use enrolls");
    let got = TestDevice::enroll_raw(&base, &json!({"code": code, "name": "second"})).await.unwrap();
    assert_error(&got, StatusCode::UNAUTHORIZED, "a used code");
    let got = TestDevice::enroll_raw(&base, &json!({"code": "NOPE-NOPE-NOPE", "name": "x"})).await.unwrap();
    assert_error(&got, StatusCode::UNAUTHORIZED, "an unknown code");

    let (status, body) = env.control.create_pairing_code(&json!({"ttlSeconds": 1})).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = TestDevice::enroll_raw(&base, &json!({"code": body["code"], "name": "late"})).await.unwrap();
    assert_error(&got, StatusCode::UNAUTHORIZED, "an expired code");

    for ttl in [json!(0), json!(86_401), json!(-5), json!("600")] {
        let got = env.control.create_pairing_code(&json!({"ttlSeconds": ttl})).await.unwrap();
        assert_error(&got, StatusCode::BAD_REQUEST, &format!("ttlSeconds {ttl}"));
    }
    let (status, _) = env.control.create_pairing_code(&json!({"ttlSeconds": 86_400})).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let (_, list) = env.control.devices().await.unwrap();
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(1), "only the first enrollment made a device: {list}");
}

/// A user sees and drives only the devices enrolled with codes that user minted: another
/// user's device is 404 everywhere, like one that does not exist.
async fn users_are_isolated(backend: Backend) {
    let env = Env::start(backend).await;
    let device = env.device("mine").await;
    let conn = device.connect(&env.base(), Answer::Echo).await.unwrap();
    let other = env.other_user("user-b").await;
    let (status, list) = other.devices().await.unwrap();
    assert_eq!((status, list), (StatusCode::OK, json!({"devices": []})));
    assert_error(&other.device(&device.device_id).await.unwrap(), StatusCode::NOT_FOUND, "another's device");
    let got = other.call(&device.device_id, "stat", json!({}), Some(1000)).await.unwrap();
    assert_error(&got, StatusCode::NOT_FOUND, "calling another's device");
    assert_error(&other.delete_device(&device.device_id).await.unwrap(), StatusCode::NOT_FOUND, "deleting another's");
    let missing = uuid::Uuid::new_v4().to_string();
    assert_error(&env.control.device(&missing).await.unwrap(), StatusCode::NOT_FOUND, "a device that never was");
    assert_eq!(conn.total_received(), 0, "nothing reached the device");
    let (status, _) = env.control.device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "still there for its owner");
}

/// `dispatcher token revoke <prefix>`: a token never used is refused at once; a token the
/// replica has cached is refused by a replica started after the revocation.
async fn api_token_revoke(backend: Backend) {
    let mut env = Env::start(backend).await;
    let url = env.dispatcher.database_url().to_owned();
    let unused = env.dispatcher.mint_token("user-a").await.unwrap();
    let (status, _) = env.control.devices().await.unwrap();
    assert_eq!(status, StatusCode::OK, "the token works before");
    assert_ne!(unused, env.control.token, "every token is new");

    revoke_token(&url, &unused[..12]).await.expect("revoke the unused token");
    let got = Control::new(env.base(), &unused).devices().await.unwrap();
    assert_error(&got, StatusCode::UNAUTHORIZED, "a revoked token");

    revoke_token(&url, &env.control.token[..12]).await.expect("revoke the used token");
    assert!(revoke_token(&url, &env.control.token[..12]).await.is_err(), "revoking twice fails");
    env.dispatcher.sigterm().unwrap();
    env.dispatcher.wait_exit(30 * SECOND).await.unwrap();
    env.dispatcher.restart().await.unwrap();
    assert_error(&env.control.devices().await.unwrap(), StatusCode::UNAUTHORIZED, "revoked, on a fresh replica");
    let got = env.control.create_pairing_code(&json!({})).await.unwrap();
    assert_error(&got, StatusCode::UNAUTHORIZED, "revoked, minting codes");
}

/// A cached api token revoked with `dispatcher token revoke` (no broker: the command only
/// writes the database) is refused within a second, and a pairing code it minted before, still
/// unused, no longer enrolls. (The cache alone kept it working for 30 s.)
async fn api_token_revoke_is_prompt(backend: Backend) {
    let env = Env::start(backend).await;
    let url = env.dispatcher.database_url().to_owned();
    let code = env.control.pairing_code().await.expect("a code minted before the revocation");
    let kept = env.other_user("user-b").await;
    let (status, _) = env.control.devices().await.unwrap();
    assert_eq!(status, StatusCode::OK, "the token works, and is cached now");
    // An events stream of the token: keepalives every 15 s, so it can only end sooner by hearing
    // of the revocation.
    let mut events = e2e::events::EventStream::open(&env.base(), &env.control.token).await.expect("events");
    let kept_events = e2e::events::EventStream::open(&env.base(), &kept.token).await.expect("events of user-b");

    revoke_token(&url, &env.control.token[..12]).await.expect("revoke");
    let revoked_at = Instant::now();
    events.wait_closed(5 * SECOND).await.expect("the revoked token's events stream ends");
    println!("{backend:?}: its events stream ended {:?} after the command's exit", revoked_at.elapsed());
    assert!(!kept_events.is_closed(), "another user's events stream stays open");
    let after = env.control.time_until_refused(40 * SECOND).await.unwrap();
    println!("{backend:?}: a revoked, cached api token was refused after {after:?} (from the command's exit)");
    let after = after.expect("the revoked token is refused within 40 s");
    assert!(after < 2 * SECOND, "the revoked token kept working for {after:?}");

    let got = TestDevice::enroll_raw(&env.base(), &json!({"code": code, "name": "late"})).await.unwrap();
    assert_error(&got, StatusCode::UNAUTHORIZED, "enrolling with a code the revoked token minted");
    let (status, _) = kept.devices().await.unwrap();
    assert_eq!(status, StatusCode::OK, "another user's token is untouched");
    let code = kept.pairing_code().await.expect("another user's token mints");
    TestDevice::enroll(&env.base(), &code, "theirs").await.expect("and its codes enroll");
}

/// Runs each flow once on SQLite and once on PostgreSQL.
macro_rules! on_both_databases {
    ($($flow:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $flow() {
                    super::$flow(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $flow() {
                    super::$flow(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_databases!(
    enroll_stream_and_dispatch,
    offline_timeout_forbidden_late,
    newest_stream_wins,
    revoke_closes_stream,
    mode_field_refused,
    proposal_applies_once,
    proposal_rejected,
    pairing_codes,
    users_are_isolated,
    api_token_revoke,
    api_token_revoke_is_prompt,
);

// ---- the embedded default only ----------------------------------------------------------------

/// 10,000 wrong codes from many concurrent tasks: none enrolls (401 or 429 only), the rate
/// limit kicks in, and the replica still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_codes_never_enroll() {
    let env = Env::start(Backend::Sqlite).await;
    let url = format!("{}/api/host/enroll", env.base());
    let client = reqwest::Client::new();
    let started = Instant::now();
    let statuses: Vec<StatusCode> = futures::stream::iter(0..10_000)
        .map(|n| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let body = json!({"code": format!("WRONG-{n:06}-{:08x}", rand::random::<u32>()), "name": "guess"});
                client.post(&url).json(&body).send().await.map(|r| r.status()).unwrap_or_else(|e| panic!("{e}"))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let refused = statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count();
    let limited = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    println!("10000 wrong codes in {:?}: {refused} x 401, {limited} x 429", started.elapsed());
    assert_eq!(
        refused + limited,
        10_000,
        "only 401 and 429: {:?}",
        statuses.iter().find(|s| s.as_u16() != 401 && s.as_u16() != 429)
    );
    assert!(limited > 0, "the rate limit never answered 429");
    let (_, list) = env.control.devices().await.unwrap();
    assert_eq!(list["devices"], json!([]));
    let health = reqwest::get(format!("{}/healthz", env.base())).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

/// One hostile request: method, path, bearer token, body.
type Case<'a> = (Method, String, Option<&'a str>, Option<Vec<u8>>);

/// Hostile input: malformed JSON, wrong types, oversized bodies, odd Authorization headers,
/// unknown routes and ids. Every answer is a 4xx with `{"error": …}` and the replica header;
/// the process still serves afterwards, and nothing was enrolled or pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx() {
    let env = Env::start_with(Backend::Sqlite, |b| b.max_body_bytes(4096)).await;
    let base = env.base();
    let device = env.device("target").await;
    // A small answer: an echo of a body at the limit would itself be over it.
    let small = Answer::with(|call| Some(HostResult::success(call.call_id.clone(), json!("small"))));
    let conn = device.connect(&base, small).await.unwrap();
    let api = Some(env.control.token.as_str());
    let dev = Some(device.token.as_str());
    let id = device.device_id.as_str();

    let b = |s: &str| Some(s.as_bytes().to_vec());
    let calls = format!("/api/devices/{id}/calls");
    let cases: Vec<Case> = vec![
        (Method::POST, "/api/host/enroll".into(), None, b("{")),
        (Method::POST, "/api/host/enroll".into(), None, b("[]")),
        (Method::POST, "/api/host/enroll".into(), None, b("{\"code\": 5, \"name\": \"x\"}")),
        (Method::POST, "/api/host/enroll".into(), None, b("{\"code\": \"abc\"}")),
        (Method::POST, "/api/host/enroll".into(), None, b("null")),
        (Method::POST, "/api/host/enroll".into(), None, b("\u{0}\u{1}garbage")),
        (Method::POST, "/api/host/result".into(), dev, b("{\"callId\": 1, \"ok\": \"yes\"}")),
        (Method::POST, "/api/host/result".into(), dev, b("{\"ok\": true}")),
        (Method::POST, "/api/host/result".into(), dev, b("not json")),
        (Method::PUT, "/api/host/manifest".into(), dev, b("{\"tools\": \"many\"}")),
        (Method::PUT, "/api/host/manifest".into(), dev, b("{\"tools\": [{\"name\": 1}], \"roots\": []}")),
        (Method::POST, calls.clone(), api, b("{")),
        (Method::POST, calls.clone(), api, b("{\"tool\": 7, \"input\": {}}")),
        (Method::POST, calls.clone(), api, b("{\"input\": {}}")),
        (Method::POST, calls.clone(), api, b("{\"tool\": \"\", \"input\": {}}")),
        (Method::POST, calls.clone(), api, b("{\"tool\": \"stat\", \"input\": {}, \"timeoutMs\": 0}")),
        (Method::POST, calls.clone(), api, b("{\"tool\": \"stat\", \"input\": {}, \"timeoutMs\": 300001}")),
        (Method::POST, calls.clone(), api, b("{\"tool\": \"stat\", \"input\": {}, \"timeoutMs\": -1}")),
        (Method::POST, calls.clone(), api, b("{\"tool\": \"stat\", \"input\": {}, \"timeoutMs\": \"fast\"}")),
        (Method::POST, calls.clone(), api, b(&format!("{{\"tool\": \"{}\", \"input\": {{}}}}", "t".repeat(3000)))),
        (Method::POST, "/api/devices/not-a-uuid/calls".into(), api, b("{\"tool\": \"stat\", \"input\": {}}")),
        (Method::GET, "/api/devices/..%2f..%2fetc".into(), api, None),
        (Method::GET, "/api/devices/%00".into(), api, None),
        (Method::POST, "/api/pairing-codes".into(), api, b("{\"ttlSeconds\": 1e99}")),
        (Method::POST, "/api/pairing-codes".into(), api, b("[1,2]")),
        (Method::POST, "/api/pairing-codes".into(), api, b("\n")),
        (Method::POST, "/api/host/approve".into(), api, b("{}")),
        (Method::POST, "/api/host/approve".into(), api, b("{\"proposalId\": 5}")),
        (Method::POST, "/api/host/approve".into(), api, b("{\"proposalId\": \"not-a-uuid\"}")),
        (Method::POST, "/api/host/reject".into(), api, b("oops")),
        (Method::GET, "/api/proposals?status=bogus".into(), api, None),
        (Method::GET, "/api/proposals/not-a-uuid".into(), api, None),
        (Method::GET, "/api/nowhere".into(), api, None),
        (Method::DELETE, "/api/host/enroll".into(), None, None),
        (Method::PATCH, "/api/devices".into(), api, None),
        // Credentials of the wrong kind.
        (Method::GET, "/api/devices".into(), dev, None),
        (Method::GET, "/api/host/stream".into(), api, None),
        (Method::POST, calls.clone(), dev, b("{\"tool\": \"stat\", \"input\": {}}")),
    ];
    // One connection per request: a refused body may leave its connection unusable (see
    // `oversized_body_keeps_the_connection_usable`), and each case stands alone here.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    for (method, path, token, body) in cases {
        let (status, headers, reply) =
            raw(&client, method.clone(), &format!("{base}{path}"), json_headers(token), body).await;
        let what = format!("{method} {path}");
        assert!(status.is_client_error(), "{what}: {status} {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {status} without an error: {reply}");
        assert_eq!(
            headers.get("x-replica-id").map(|v| v.as_bytes()),
            Some(env.dispatcher.replica_id().as_bytes()),
            "{what}"
        );
    }

    // Bodies over the limit: 413 with an error body, or the server closing the connection
    // while the client still uploads; never anything else.
    let huge = format!("{{\"tool\": \"stat\", \"input\": \"{}\"}}", "x".repeat(64 * 1024));
    for (path, token) in [(calls.as_str(), api), ("/api/host/result", dev), ("/api/host/enroll", None)] {
        let request = client.post(format!("{base}{path}")).headers(json_headers(token)).body(huge.clone());
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let reply: Value = response.json().await.unwrap_or(Value::Null);
                assert_error(&(status, reply), StatusCode::PAYLOAD_TOO_LARGE, &format!("64 KiB to {path}"));
            }
            Err(error) => println!("64 KiB to {path}: the connection was closed during the upload ({error})"),
        }
    }

    // Odd Authorization headers on a device route and a control route: all plain 401.
    let odd: Vec<HeaderValue> = vec![
        HeaderValue::from_static(""),
        HeaderValue::from_static("Bearer"),
        HeaderValue::from_static("Bearer "),
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        HeaderValue::from_static("Bearer a b c"),
        HeaderValue::from_static("Bearer\tabc"),
        HeaderValue::from_static("bearer nonsense"),
        HeaderValue::from_bytes(b"Bearer \xff\xfe\xfd").unwrap(),
        HeaderValue::from_str(&format!("Bearer {}", "A".repeat(16 * 1024))).unwrap(),
        HeaderValue::from_str(&format!("Bearer {}x", device.token)).unwrap(),
        HeaderValue::from_str(&format!("Token {}", env.control.token)).unwrap(),
    ];
    for value in odd {
        for (method, path) in [(Method::GET, "/api/host/stream"), (Method::GET, "/api/devices")] {
            let mut headers = json_headers(None);
            headers.insert(AUTHORIZATION, value.clone());
            let (status, headers, reply) = raw(&client, method, &format!("{base}{path}"), headers, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} with {value:?}: {reply}");
            assert!(reply["error"].is_string(), "{reply}");
            assert!(headers.contains_key("x-replica-id"));
        }
    }
    let mut two = json_headers(None);
    two.append(AUTHORIZATION, HeaderValue::from_static("Bearer nonsense"));
    two.append(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {}", env.control.token)).unwrap());
    let (status, _, reply) = raw(&client, Method::GET, &format!("{base}/api/devices"), two, None).await;
    assert!(status.is_client_error() || status == StatusCode::OK, "two Authorization headers: {status} {reply}");

    // A body of exactly the limit is served.
    let (head, tail) = ("{\"tool\": \"stat\", \"input\": {\"pad\": \"", "\"}}");
    let body = format!("{head}{}{tail}", "y".repeat(4096 - head.len() - tail.len()));
    assert_eq!(body.len(), 4096);
    let url = format!("{base}{calls}");
    let (status, _, reply) = raw(&client, Method::POST, &url, json_headers(api), Some(body.into_bytes())).await;
    assert_eq!(status, StatusCode::OK, "a body at the limit is served: {reply}");

    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "the process still serves");
    let (_, list) = env.control.devices().await.unwrap();
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(1), "nothing was enrolled");
    assert_eq!(conn.total_received(), 1, "only the valid call reached the device");
    assert!(!conn.is_closed(), "the device's stream survived");
}

/// A body over `--max-body-bytes` answers 413 with `{"error": …}`, and the client's kept-alive
/// connection stays usable: either the server reads past the body, or it says
/// `Connection: close` so no client sends its next request into a closing socket (the agent's
/// result POSTs share one pooled connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_keeps_the_connection_usable() {
    let env = Env::start_with(Backend::Sqlite, |b| b.max_body_bytes(4096)).await;
    let base = env.base();
    let device = env.device("big").await;
    let client = reqwest::Client::new();
    let huge = format!("{{\"callId\": \"c\", \"ok\": true, \"result\": \"{}\"}}", "x".repeat(256 * 1024));
    // Twenty rounds: a connection closed under the client fails some rounds, not all.
    let mut answered = 0;
    for round in 0..20 {
        let upload = client
            .post(format!("{base}/api/host/result"))
            .headers(json_headers(Some(&device.token)))
            .body(huge.clone())
            .send()
            .await;
        let response = match upload {
            Ok(response) => response,
            // Closed while still uploading: the pool drops that connection; nothing to check.
            Err(error) => {
                println!("round {round}: the connection was closed during the upload ({error})");
                continue;
            }
        };
        let closing = response.headers().get("connection").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_error(&(status, body), StatusCode::PAYLOAD_TOO_LARGE, &format!("round {round}"));
        answered += 1;
        let next = client
            .post(format!("{base}/api/host/result"))
            .bearer_auth(&device.token)
            .json(&json!({"callId": "small", "ok": true}))
            .send()
            .await;
        match next {
            Ok(response) => assert_eq!(response.status(), StatusCode::NOT_FOUND, "round {round}"),
            Err(error) => panic!(
                "round {round}: the request after a 413 failed on its connection ({error}); \
                 the 413 said connection: close = {closing}"
            ),
        }
    }
    assert!(answered > 0, "no oversized upload was ever answered 413");
}

/// Every kind of response carries `X-Replica-Id`: operations, 2xx of each family, the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_names_its_replica() {
    let env = Env::start(Backend::Sqlite).await;
    let base = env.base();
    let client = reqwest::Client::new();
    let replica = env.dispatcher.replica_id().to_owned();
    let check = |what: &str, status: StatusCode, headers: &HeaderMap| {
        assert_eq!(
            headers.get("x-replica-id").and_then(|v| v.to_str().ok()),
            Some(replica.as_str()),
            "{what}: {status}"
        );
    };
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, headers, body) = raw(&client, Method::GET, &format!("{base}{path}"), HeaderMap::new(), None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        check(path, status, &headers);
    }
    let (_, _, health) = raw(&client, Method::GET, &format!("{base}/healthz"), HeaderMap::new(), None).await;
    assert_eq!(health, json!({"ok": true}));
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("# TYPE") || metrics.contains("# HELP"), "Prometheus text: {metrics}");

    let api = Some(env.control.token.as_str());
    let (status, headers, code) =
        raw(&client, Method::POST, &format!("{base}/api/pairing-codes"), json_headers(api), Some(b"{}".to_vec())).await;
    check("pairing code", status, &headers);
    let enroll = json!({"code": code["code"], "name": "hdr"}).to_string().into_bytes();
    let (status, headers, enrolled) =
        raw(&client, Method::POST, &format!("{base}/api/host/enroll"), json_headers(None), Some(enroll)).await;
    assert_eq!(status, StatusCode::CREATED);
    check("enroll", status, &headers);
    let token = enrolled["token"].as_str().unwrap();
    let id = enrolled["deviceId"].as_str().unwrap();

    let stream = client.get(format!("{base}/api/host/stream")).bearer_auth(token).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(stream.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    check("stream", stream.status(), stream.headers());
    drop(stream);

    let manifest = json!({
        "tools": [{"name": "stat", "description": "d", "inputSchema": {"type": "object"}, "class": "read"}],
        "roots": ["/home/x"], "version": "1.2.3", "platform": "linux"
    });
    let (status, headers, _) = raw(
        &client,
        Method::PUT,
        &format!("{base}/api/host/manifest"),
        json_headers(Some(token)),
        Some(manifest.to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    check("manifest", status, &headers);
    let (status, view) = env.control.device(id).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["tools"][0]["name"], "stat", "{view}");
    assert_eq!(view["roots"], json!(["/home/x"]));

    let (status, headers, _) = raw(
        &client,
        Method::POST,
        &format!("{base}/api/host/result"),
        json_headers(Some(token)),
        Some(br#"{"callId":"x","ok":true}"#.to_vec()),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    check("result 404", status, &headers);
    let (status, headers, _) =
        raw(&client, Method::DELETE, &format!("{base}/api/devices/{id}"), json_headers(api), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    check("delete", status, &headers);
}

/// Keepalive comments arrive at the configured interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_comments() {
    let env = Env::start_with(Backend::Sqlite, |b| b.keepalive_secs(1)).await;
    let device = env.device("k").await;
    let mut conn = device.connect(&env.base(), Answer::Echo).await.unwrap();
    let started = Instant::now();
    for _ in 0..2 {
        let (event, data) = conn.next_frame(3 * SECOND).await.expect("a keepalive within 3 s");
        assert_eq!((event.as_str(), data.as_str()), (e2e::sse::KEEPALIVE, ""));
    }
    assert!(started.elapsed() < 4 * SECOND);
}

/// A device that stops reading its stream (a raw socket with a small buffer, never read) is sent
/// 100 calls of 1 MB. The stream's queue stays within its byte budget, the stream is dropped
/// (and its connection closed) after two keepalive intervals, every call is answered, and the
/// dispatcher's memory comes back near where it started. Prints the figures. (Keepalive 5 s: a
/// debug build parsing 100 MB of JSON on a busy machine can miss its stall watch's ticks for
/// seconds, and a shorter keepalive would make it give up its streams as if it had been frozen.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_read_is_bounded_and_dropped() {
    const CALLS: usize = 100;
    const CALL_BYTES: usize = 1 << 20;
    const BUDGET: f64 = 16.0 * 1024.0 * 1024.0;
    const KEEPALIVE: Duration = Duration::from_secs(5);
    let env = Env::start_with(Backend::Sqlite, |b| b.keepalive_secs(KEEPALIVE.as_secs()).rust_log("warn")).await;
    let pid = env.dispatcher.pid();
    let base = env.base();
    // Warm up the paths a call takes with a reading device, then measure the baseline.
    let reader = env.device("reader").await;
    let _reading = reader.connect(&base, Answer::Echo).await.unwrap();
    for _ in 0..5 {
        let (status, _) = env.control.call(&reader.device_id, "t", json!("x".repeat(CALL_BYTES)), None).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    tokio::time::sleep(SECOND).await;
    let baseline = e2e::process::rss_kib(pid).expect("VmRSS");

    let device = env.device("deaf").await;
    let mut socket = device.open_unread_stream(env.dispatcher.addr()).await.unwrap();
    env.control.wait_online(&device.device_id, true, 5 * SECOND).await.expect("the deaf device is online");
    let started = Instant::now();
    println!("dispatching at {}", chrono::Utc::now());
    // One body, encoded once: the test's own CPU goes to sending it, not to encoding it.
    let body = bytes::Bytes::from(
        serde_json::to_vec(
            &json!({"tool": "read_file", "input": {"data": "x".repeat(CALL_BYTES)}, "timeoutMs": 20000}),
        )
        .unwrap(),
    );
    let client = reqwest::Client::new();
    let url = format!("{base}/api/devices/{}/calls", device.device_id);
    let calls = futures::future::join_all((0..CALLS).map(|_| {
        let request = client
            .post(&url)
            .bearer_auth(&env.control.token)
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone());
        tokio::spawn(async move {
            let response = request.send().await?;
            let status = response.status();
            anyhow::Ok((status, response.json::<Value>().await?))
        })
    }));
    let done = std::sync::atomic::AtomicBool::new(false);
    let calls = async {
        let answers = calls.await;
        done.store(true, Ordering::Release);
        answers
    };
    let watch = async {
        let (mut peak_rss, mut peak_queued, mut dropped_after, mut queued_from) = (0u64, 0f64, None, None);
        loop {
            peak_rss = peak_rss.max(e2e::process::rss_kib(pid).unwrap_or(0));
            let queued = metric(&base, "stream_queue_bytes").await.unwrap_or(f64::NAN);
            peak_queued = peak_queued.max(queued);
            if queued_from.is_none() && queued > 0.0 {
                queued_from = Some(started.elapsed());
            }
            if dropped_after.is_none() && metric(&base, "stuck_streams_total").await.unwrap_or(0.0) >= 1.0 {
                dropped_after = Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if done.load(Ordering::Acquire) || started.elapsed() > 40 * SECOND {
                return (peak_rss, peak_queued, dropped_after, queued_from);
            }
        }
    };
    let (answers, (peak_rss, peak_queued, dropped_after, queued_from)) = tokio::join!(calls, watch);
    // Close the 100 connections the calls came on: their buffers are theirs, not the stream's.
    drop(client);
    let mut statuses = std::collections::BTreeMap::new();
    for answer in answers {
        let (status, body) = answer.expect("task").expect("an answer");
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
        assert!(
            matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT),
            "{status}: {body:.200}"
        );
    }
    // The server closed the connection: the device reads what was sent, then the end.
    let mut unread = 0usize;
    let closed = tokio::time::timeout(10 * SECOND, async {
        use tokio::io::AsyncReadExt;
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => unread += n,
            }
        }
    })
    .await
    .unwrap_or(false);
    // Memory comes back as the allocator returns freed pages: wait for it, 30 s at most. mimalloc
    // keeps some freed pages with idle threads' heaps: 0-90 MiB above the baseline were measured
    // after this burst (BENCHMARKS.md: glibc's malloc kept 585-738 MiB of a larger one), hence
    // the margin.
    const MARGIN_KIB: u64 = 128 * 1024;
    let settling = Instant::now();
    let after = loop {
        let rss = e2e::process::rss_kib(pid).expect("VmRSS");
        if rss < baseline + MARGIN_KIB || settling.elapsed() > 30 * SECOND {
            break rss;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let settled_in = settling.elapsed();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "deaf stream, {CALLS} calls of 1 MiB: answers {statuses:?}; calls queued from {queued_from:?}, stream dropped after {dropped_after:?}; peak queued \
         {:.1} MiB; RSS baseline {:.1} MiB, peak {:.1} MiB, after {:.1} MiB (within {:.1} s); {:.1} MiB sent before the close",
        peak_queued / 1048576.0,
        mib(baseline),
        mib(peak_rss),
        mib(after),
        settled_in.as_secs_f64(),
        unread as f64 / 1048576.0
    );
    for line in env.dispatcher.log().lines().filter(|line| line.contains("stream dropped")) {
        println!("{line}");
    }
    assert!(peak_queued <= BUDGET + CALL_BYTES as f64 * 1.1, "queued {peak_queued} bytes, over the budget");
    // Dropped two keepalives after its queue stopped draining, counted from the first queued
    // byte (sending 100 MiB of calls on a loaded machine takes a while) with room for a slow tick.
    let dropped_after = dropped_after.expect("the stream was dropped");
    let queued_from = queued_from.expect("calls were queued for the stream");
    assert!(
        dropped_after < queued_from + 2 * KEEPALIVE + 15 * SECOND,
        "dropped only after {dropped_after:?}, calls queued from {queued_from:?}"
    );
    assert!(closed, "the server closed the connection");
    assert!(after < baseline + MARGIN_KIB, "RSS {after} KiB after 30 s, baseline {baseline} KiB");
    assert_eq!(metric(&base, "stream_queue_bytes").await, Some(0.0));
    assert_eq!(metric(&base, "device_streams").await, Some(1.0), "the reading device's stream stays");
}

/// SIGTERM: a connected stream hears `reconnect` (reason shutdown) first, and the process
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_reconnect_and_exits_zero() {
    let mut env = Env::start_with(Backend::Sqlite, |b| b.shutdown_grace_secs(5)).await;
    let device = env.device("s").await;
    let mut conn = device.connect(&env.base(), Answer::Echo).await.unwrap();
    env.dispatcher.sigterm().unwrap();
    let (event, data) = conn.next_event(10 * SECOND).await.expect("a frame after SIGTERM");
    assert_eq!(event, protocol::sse::EVENT_RECONNECT, "{data}");
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap(), json!({"reason": "shutdown"}));
    conn.wait_closed(10 * SECOND).await.expect("the stream ends");
    let status = env.dispatcher.wait_exit(20 * SECOND).await.unwrap();
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

/// SIGKILL and a restart on the same port and SQLite file: the device's credentials, its
/// proposals and the api token survive; the device streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_keeps_the_registry() {
    let mut env = Env::start(Backend::Sqlite).await;
    let device = env.device("survivor").await;
    let applies = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut conn = device.connect(&env.base(), proposing_device(applies.clone(), seen.clone())).await.unwrap();
    let (_, body) = env.control.call(&device.device_id, "write_file", json!({"path": "a"}), None).await.unwrap();
    let proposal_id = body["proposalId"].as_str().expect("proposalId").to_owned();

    env.dispatcher.sigkill().unwrap();
    conn.wait_closed(5 * SECOND).await.expect("the stream breaks with the process");
    env.dispatcher.restart().await.unwrap();
    let (status, view) = env.control.device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["online"], false);
    let _conn = device.connect(&env.base(), proposing_device(applies.clone(), seen)).await.expect("streams again");
    let (status, body) = env.control.approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(applies.load(Ordering::SeqCst), 1);
}

/// Round trip of a dispatch through one replica and the test device: 500 sequential calls,
/// all answered 200 and each pushed once. Prints p50/p99; asserts no timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_latency() {
    let env = Env::start_with(Backend::Sqlite, |b| b.rust_log("warn")).await;
    let device = env.device("rtt").await;
    let conn = device.connect(&env.base(), Answer::Echo).await.unwrap();
    for _ in 0..20 {
        let (status, _) = env.control.call(&device.device_id, "stat", json!({}), Some(5000)).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let mut samples = Vec::with_capacity(500);
    for n in 0..500 {
        let started = Instant::now();
        let (status, body) = env.control.call(&device.device_id, "stat", json!({"n": n}), Some(5000)).await.unwrap();
        samples.push(started.elapsed());
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["result"]["input"]["n"], n);
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "round trip over one replica ({} sequential calls): p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        samples[samples.len() - 1]
    );
    assert_eq!(conn.total_received(), 520);
    assert!(conn.calls.lock().values().all(|&n| n == 1), "every call pushed once");
    assert_eq!(metric(&env.base(), "pending_calls").await, Some(0.0));
}

/// Bytes of a SQLite database on disk: the file and its write-ahead log.
fn sqlite_bytes(dir: &std::path::Path) -> u64 {
    ["dispatcher.db", "dispatcher.db-wal"]
        .iter()
        .filter_map(|name| std::fs::metadata(dir.join(name)).ok())
        .map(|meta| meta.len())
        .sum()
}

/// `GET {url}` with an api token: status, size of the body in bytes, and the body as JSON.
async fn get_sized(client: &reqwest::Client, url: &str, token: &str) -> (StatusCode, usize, Value) {
    let response = client.get(url).bearer_auth(token).timeout(60 * SECOND).send().await.expect("answered");
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    (status, bytes.len(), serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn mb(bytes: impl TryInto<u64>) -> f64 {
    bytes.try_into().unwrap_or(u64::MAX) as f64 / 1e6
}

/// The hostile review's storage cases against the binary, with its defaults: proposals of
/// 1 MiB input + 1 MiB plan, proposals of ~1 MB walked page by page, a 7.6 MB manifest and a
/// 1 MiB one, one user minting pairing codes as fast as it can. Prints the figures (database
/// growth, largest response, codes minted), then asserts the caps, the pages and the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_storage_is_capped_and_lists_are_paged() {
    const MIB: usize = 1 << 20;
    let env = Env::start_with(Backend::Sqlite, |b| b.rust_log("warn")).await;
    let base = env.base();
    let token = env.control.token.clone();
    let client = reqwest::Client::new();
    let device = env.device("hoarder").await;
    // Proposes every mutation, with a plan of `planBytes` bytes.
    let answer = Answer::with(|call| {
        let size = call.input["planBytes"].as_u64().unwrap_or(0) as usize;
        let plan = json!({"tool": call.tool, "summary": "write", "diff": "+".repeat(size), "preconditions": {}});
        Some(HostResult::proposal(call.call_id.clone(), plan))
    });
    let _conn = device.connect(&base, answer).await.unwrap();
    let propose = |content: usize, plan: usize| {
        let input = json!({"path": "f", "content": "a".repeat(content), "planBytes": plan});
        let (control, id) = (env.control.clone(), device.device_id.clone());
        async move { control.call(&id, "write_file", input, Some(30_000)).await.expect("call") }
    };

    // 1. Forty proposals of 1 MiB input + 1 MiB plan.
    let db_before = sqlite_bytes(env.dispatcher.dir());
    let mut hostile = std::collections::BTreeMap::<u16, usize>::new();
    let mut refusal = Value::Null;
    for _ in 0..40 {
        let (status, body) = propose(MIB, MIB).await;
        *hostile.entry(status.as_u16()).or_default() += 1;
        if status != StatusCode::OK {
            refusal = body;
        }
    }
    let db_growth = sqlite_bytes(env.dispatcher.dir()).saturating_sub(db_before);
    let (_, first_list, _) = get_sized(&client, &format!("{base}/api/proposals"), &token).await;
    println!(
        "40 proposals of 1 MiB + 1 MiB: {hostile:?}, database +{:.3} MB, GET /api/proposals {:.3} MB",
        mb(db_growth),
        mb(first_list)
    );

    // 2. Forty-one proposals of ~1 MB each, walked page by page.
    let mut made = Vec::new();
    for _ in 0..41 {
        let (status, body) = propose(500_000, 500_000).await;
        assert_eq!(status, StatusCode::OK, "{}", &body.to_string()[..body.to_string().len().min(300)]);
        made.push(body["proposalId"].as_str().expect("proposalId").to_owned());
    }
    let mut seen = Vec::new();
    let (mut pages, mut largest_page) = (0, 0);
    let mut url = format!("{base}/api/proposals");
    loop {
        let (status, bytes, page) = get_sized(&client, &url, &token).await;
        assert_eq!(status, StatusCode::OK);
        pages += 1;
        largest_page = largest_page.max(bytes);
        for proposal in page["proposals"].as_array().expect("proposals") {
            seen.push(proposal["id"].as_str().expect("id").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => url = format!("{base}/api/proposals?cursor={next}"),
            None => break,
        }
        assert!(pages < 100, "pages without end");
    }
    println!("41 proposals of ~1 MB: {} rows in {pages} pages, largest page {:.1} MB", seen.len(), mb(largest_page));

    // 3. A 7.6 MB manifest, then a 1 MiB one, then 513 small tools.
    let tool = |name: String, description: String| json!({"name": name, "description": description, "inputSchema": {"type": "object"}, "class": "read"});
    let manifest =
        |tools: Vec<Value>| json!({"tools": tools, "roots": ["/home/a"], "version": "1", "platform": "linux"});
    let huge = manifest((0..100).map(|i| tool(format!("t{i}"), "d".repeat(76_000))).collect());
    let (huge_status, huge_body) = device.put_manifest(&base, &huge).await.unwrap();
    let (_, huge_list, _) = get_sized(&client, &format!("{base}/api/devices"), &token).await;
    let mib = manifest((0..16).map(|i| tool(format!("t{i}"), "d".repeat(MIB / 16))).collect());
    let (mib_status, _) = device.put_manifest(&base, &mib).await.unwrap();
    let many = manifest((0..513).map(|i| tool(format!("t{i}"), "d".into())).collect());
    let (many_status, _) = device.put_manifest(&base, &many).await.unwrap();
    println!(
        "manifests: 7.6 MB {huge_status} (GET /api/devices then {:.3} MB), 1 MiB {mib_status}, 513 tools {many_status}",
        mb(huge_list)
    );
    let small = manifest(vec![tool("stat".into(), "d".into()), tool("read_file".into(), "d".into())]);
    let (status, _) = device.put_manifest(&base, &small).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);

    // 4. One user minting pairing codes as fast as it can.
    let started = Instant::now();
    let mut minted = std::collections::BTreeMap::<u16, usize>::new();
    let mut quota = Value::Null;
    for _ in 0..200 {
        let (status, body) = env.control.create_pairing_code(&json!({})).await.unwrap();
        *minted.entry(status.as_u16()).or_default() += 1;
        if status != StatusCode::CREATED {
            quota = body;
        }
    }
    println!("200 pairing codes asked by one user in {} ms: {minted:?} {quota}", started.elapsed().as_millis());

    // What must hold.
    assert_eq!(hostile.get(&413), Some(&40), "every 2 MiB proposal refused: {hostile:?}");
    assert!(refusal["error"].as_str().is_some_and(|e| e.contains("2097152")), "{refusal}");
    assert!(db_growth < 4_000_000, "database grew {db_growth} bytes for refused proposals");
    let mut walked = seen.clone();
    walked.sort();
    walked.dedup();
    assert_eq!(walked.len(), seen.len(), "a proposal listed twice");
    assert!(made.iter().all(|id| seen.contains(id)), "a proposal never listed");
    assert_eq!(seen[..41].iter().rev().cloned().collect::<Vec<_>>(), made, "newest first");
    assert!(pages >= 5, "{pages} pages");
    assert!(largest_page <= 8 * MIB + MIB, "a page of {largest_page} bytes");

    assert_error(&(huge_status, huge_body), StatusCode::PAYLOAD_TOO_LARGE, "a 7.6 MB manifest");
    assert_eq!((mib_status, many_status), (StatusCode::PAYLOAD_TOO_LARGE, StatusCode::PAYLOAD_TOO_LARGE));
    let (_, _, list) = get_sized(&client, &format!("{base}/api/devices"), &token).await;
    let listed = &list["devices"][0];
    assert!(listed.get("tools").is_none(), "{listed}");
    assert_eq!((listed["toolCount"].clone(), listed["roots"].clone()), (json!(2), json!(["/home/a"])), "{listed}");
    let (_, _, list) = get_sized(&client, &format!("{base}/api/devices?include=tools"), &token).await;
    assert_eq!(list["devices"][0]["tools"], small["tools"]);
    let (_, one) = env.control.device(&device.device_id).await.unwrap();
    assert_eq!(one["tools"], small["tools"]);

    assert_eq!((minted.get(&201), minted.get(&429)), (Some(&50), Some(&150)), "{minted:?}");
    assert!(quota["error"].as_str().is_some_and(|e| e.contains("50")), "{quota}");
    let bad = ["limit=0", "limit=501", "limit=ten", "limit=-1", "limit=1e3", "cursor=nonsense", "cursor=%FF%FE"];
    for path in bad
        .iter()
        .flat_map(|q| [format!("devices?{q}"), format!("proposals?{q}")])
        .chain(["devices?include=all".into()])
    {
        let (status, _, body) = get_sized(&client, &format!("{base}/api/{path}"), &token).await;
        assert_error(&(status, body), StatusCode::BAD_REQUEST, &path);
    }
}
