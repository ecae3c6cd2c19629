//! The contract over HTTP, against replicas running in this process on port 0, driven by the
//! harness's test device and control client.
//!
//! One suite, four setups: the in-memory bus on SQLite and on PostgreSQL (one replica), and
//! the NATS bus with three replicas on PostgreSQL and on one SQLite file. With three replicas
//! the device's stream sits on the first, results are POSTed to the second and the control
//! API is called on the third, so every scenario crosses replicas. Scenarios that concern one
//! replica's HTTP surface only (bad input, limits, shutdown) run on the embedded default.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher::config::Settings;
use dispatcher::http::AppState;
use e2e::device::{Answer, Control, TestDevice};
use e2e::nats::NatsServer;
use e2e::postgres::TestDatabase;
use protocol::{CallMode, HostResult};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);
/// How long an approval waits for the device's apply in these tests.
const APPLY_TIMEOUT: Duration = Duration::from_secs(2);

struct Replica {
    base: String,
    state: AppState,
    shutdown: CancellationToken,
    background: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.background.cancel();
    }
}

#[derive(Debug, Clone, Copy)]
enum Setup {
    MemorySqlite,
    MemoryPostgres,
    NatsPostgres,
    NatsSqliteFile,
}

struct Cluster {
    replicas: Vec<Replica>,
    control: Control,
    stranger: Control,
    _nats: Option<NatsServer>,
    _db: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

async fn start_replica(mut settings: Settings, name: &str) -> Replica {
    settings.replica_id = name.to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let background = CancellationToken::new();
    let state = dispatcher::server::build_state(settings, background.clone()).await.expect("replica starts");
    let shutdown = CancellationToken::new();
    let served = tokio::spawn({
        let (state, shutdown) = (state.clone(), shutdown.clone());
        async move {
            dispatcher::server::serve(state, listener, shutdown).await.expect("serves");
        }
    });
    Replica { base, state, shutdown, background, served }
}

impl Cluster {
    async fn start(setup: Setup) -> Cluster {
        Self::start_with(setup, |_| {}).await
    }

    /// A cluster whose replicas' settings `adjust` changes first.
    async fn start_with(setup: Setup, adjust: impl FnOnce(&mut Settings)) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let (database_url, db) = match setup {
            Setup::MemorySqlite => ("sqlite::memory:".to_owned(), None),
            Setup::NatsSqliteFile => (format!("sqlite://{}/registry.db?mode=rwc", dir.path().display()), None),
            Setup::MemoryPostgres | Setup::NatsPostgres => {
                let db = TestDatabase::create().await.expect("postgres database");
                (db.url().to_owned(), Some(db))
            }
        };
        let nats = match setup {
            Setup::NatsPostgres | Setup::NatsSqliteFile => Some(NatsServer::start().await.expect("nats-server")),
            _ => None,
        };
        let mut settings = Settings::for_tests(database_url);
        settings.nats_url = nats.as_ref().map(NatsServer::url);
        settings.broker_grace = Duration::from_secs(2);
        settings.storage.apply_timeout = APPLY_TIMEOUT;
        adjust(&mut settings);
        let count = if nats.is_some() { 3 } else { 1 };
        let mut replicas = Vec::new();
        for i in 0..count {
            replicas.push(start_replica(settings.clone(), &format!("replica-{i}")).await);
        }
        let registry = &replicas[0].state.registry;
        let token = registry.create_api_token("alice", Some("tests")).await.expect("token");
        let other = registry.create_api_token("mallory", None).await.expect("token");
        let last = replicas[count - 1].base.clone();
        Cluster {
            control: Control::new(last.clone(), token),
            stranger: Control::new(last, other),
            replicas,
            _nats: nats,
            _db: db,
            _dir: dir,
        }
    }

    /// The cluster a scenario of the suite runs on: the defaults, except small caps and quotas
    /// for the scenario that tests them.
    async fn for_scenario(setup: Setup, scenario: &str) -> Cluster {
        if scenario != "lists_are_paged_and_storage_is_capped" {
            return Self::start(setup).await;
        }
        Self::start_with(setup, |settings| {
            let limits = &mut settings.storage.limits;
            limits.max_live_pairing_codes = 3;
            limits.max_devices_per_user = 2;
            limits.max_proposal_bytes = 4096;
            limits.max_manifest_bytes = 2048;
        })
        .await
    }

    /// Where device streams open.
    fn stream_url(&self) -> &str {
        &self.replicas[0].base
    }

    /// Where devices POST results.
    fn result_url(&self) -> &str {
        &self.replicas[1 % self.replicas.len()].base
    }

    /// The answer, POSTed to the result replica.
    fn answer(&self, answer: Answer) -> Answer {
        Answer::PostTo(self.result_url().to_owned(), Box::new(answer))
    }

    async fn pair(&self, name: &str) -> TestDevice {
        TestDevice::pair(self.stream_url(), &self.control, name).await.expect("pairs")
    }

    fn pending_calls(&self) -> usize {
        self.replicas.iter().map(|r| r.state.dispatcher.hub().pending_calls()).sum()
    }
}

macro_rules! suite {
    ($($scenario:ident),* $(,)?) => {
        mod memory_sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(super::Cluster::for_scenario(super::Setup::MemorySqlite, stringify!($scenario)).await).await } )* }
        mod memory_postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(super::Cluster::for_scenario(super::Setup::MemoryPostgres, stringify!($scenario)).await).await } )* }
        mod nats_postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(super::Cluster::for_scenario(super::Setup::NatsPostgres, stringify!($scenario)).await).await } )* }
        mod nats_sqlite_file { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(super::Cluster::for_scenario(super::Setup::NatsSqliteFile, stringify!($scenario)).await).await } )* }
    };
}

suite!(
    round_trip_and_presence,
    offline_is_answered_at_once,
    silent_device_times_out,
    results_only_from_the_called_device,
    newest_stream_wins,
    revocation_closes_fails_and_refuses,
    mode_from_a_client_is_refused,
    proposals_apply_once,
    approval_while_offline_stays_pending,
    another_users_devices_do_not_exist,
    pending_table_returns_to_zero,
    large_results_arrive_or_fail_clearly,
    late_apply_results_complete_timed_out_proposals,
    lists_are_paged_and_storage_is_capped,
);

async fn round_trip_and_presence(c: Cluster) {
    let device = c.pair("laptop").await;
    let conn = device.connect(c.stream_url(), c.answer(Answer::Echo)).await.expect("stream");
    assert_eq!(conn.ready.device_id, device.device_id);
    assert_eq!(conn.ready.replica, "replica-0");

    let (status, body) = c.control.call(&device.device_id, "stat", json!({"path": "."}), Some(5000)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], true);
    assert_eq!(body["result"], json!({"tool": "stat", "input": {"path": "."}, "mode": null}));
    assert!(body.get("proposalId").is_none());
    let call_id = body["callId"].as_str().expect("callId");
    assert_eq!(conn.times_received(call_id), 1);

    for replica in &c.replicas {
        let (status, seen) = c.control.at(&replica.base).device(&device.device_id).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(seen["online"], true, "presence on {}", replica.base);
        assert_eq!(seen["replica"], "replica-0", "presence on {}", replica.base);
        assert!(seen["lastSeenAt"].is_string(), "{seen}");
        let (_, list) = c.control.at(&replica.base).devices().await.unwrap();
        assert_eq!(list["devices"][0]["online"], true);
    }
    drop(conn);
    c.control.wait_online(&device.device_id, false, WAIT).await.expect("goes offline");
}

async fn offline_is_answered_at_once(c: Cluster) {
    let device = c.pair("asleep").await;
    for replica in &c.replicas {
        let started = Instant::now();
        let (status, body) =
            c.control.at(&replica.base).call(&device.device_id, "stat", json!({}), Some(10_000)).await.unwrap();
        let took = started.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["ok"], false);
        assert_eq!(body["error"], "device offline");
        assert!(took < Duration::from_secs(1), "offline took {took:?} on {}", replica.base);
    }
}

async fn silent_device_times_out(c: Cluster) {
    let device = c.pair("mute").await;
    let conn = device.connect(c.stream_url(), Answer::Silent).await.expect("stream");
    let started = Instant::now();
    let (status, body) = c.control.call(&device.device_id, "stat", json!({}), Some(400)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"], "device timed out");
    assert!(took >= Duration::from_millis(400) && took < Duration::from_millis(1400), "took {took:?}");
    assert_eq!(conn.total_received(), 1, "the call was pushed once");
    assert_eq!(c.pending_calls(), 0);
}

async fn results_only_from_the_called_device(c: Cluster) {
    let called = c.pair("called").await;
    let other = c.pair("other").await;
    let mut conn = called.connect(c.stream_url(), Answer::Silent).await.expect("stream");
    let call = tokio::spawn({
        let (control, id) = (c.control.clone(), called.device_id.clone());
        async move { control.call(&id, "stat", json!({}), Some(5000)).await }
    });
    let data = conn.wait_event("call", WAIT).await.expect("call pushed");
    let pushed: protocol::HostCall = serde_json::from_str(&data).expect("HostCall");

    let (status, body) =
        other.post_result(c.result_url(), &HostResult::success(&pushed.call_id, json!("forged"))).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].is_string());

    let (status, body) =
        called.post_result(c.result_url(), &HostResult::success(&pushed.call_id, json!("real"))).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"delivered": true}));
    let (status, answered) = call.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answered["result"], "real");

    // Late, unknown and malformed ids: 404, delivered false.
    let ids = [pushed.call_id.clone(), uuid::Uuid::new_v4().to_string(), "not-a-call".into(), "../../etc".into()];
    for id in ids {
        let (status, body) = called.post_result(c.result_url(), &HostResult::success(&id, json!(1))).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{id}");
        assert_eq!(body, json!({"delivered": false}));
    }
}

async fn newest_stream_wins(c: Cluster) {
    let device = c.pair("twice").await;
    let mut first = device.connect(c.stream_url(), c.answer(Answer::Echo)).await.expect("first stream");
    let newest_url = &c.replicas[c.replicas.len() - 1].base;
    let second =
        device.connect(newest_url, Answer::PostTo(newest_url.clone(), Box::new(Answer::Echo))).await.expect("second");
    first.wait_event("superseded", WAIT).await.expect("the first stream is superseded");
    first.wait_closed(WAIT).await.expect("and closed");
    let (status, body) = c.control.call(&device.device_id, "stat", json!({}), Some(5000)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(second.total_received(), 1);
    assert_eq!(first.total_received(), 0);
    let seen = c.control.wait_online(&device.device_id, true, WAIT).await.unwrap();
    assert_eq!(seen["replica"], second.ready.replica);
}

async fn revocation_closes_fails_and_refuses(c: Cluster) {
    let device = c.pair("stolen").await;
    let mut conn = device.connect(c.stream_url(), Answer::Silent).await.expect("stream");
    let call = tokio::spawn({
        let (control, id) = (c.control.clone(), device.device_id.clone());
        async move { control.call(&id, "stat", json!({}), Some(20_000)).await }
    });
    conn.wait_event("call", WAIT).await.expect("call pushed");

    let started = Instant::now();
    let (status, _) = c.control.delete_device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    conn.wait_event("revoked", Duration::from_secs(1)).await.expect("revoked within a second");
    conn.wait_closed(Duration::from_secs(1)).await.expect("stream closed");
    let (status, body) = call.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "pending call failed after {:?}", started.elapsed());
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "device offline");

    for replica in &c.replicas {
        assert_eq!(device.stream_status(&replica.base).await.unwrap(), StatusCode::UNAUTHORIZED);
        let (status, _) = device
            .post_result(&replica.base, &HostResult::success(uuid::Uuid::new_v4().to_string(), json!(1)))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _) = c.control.device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = c.control.delete_device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn mode_from_a_client_is_refused(c: Cluster) {
    let device = c.pair("strict").await;
    let conn = device.connect(c.stream_url(), c.answer(Answer::Echo)).await.expect("stream");
    for mode in [json!("apply"), json!("auto"), json!(null), json!(1)] {
        let body = json!({"tool": "write_file", "input": {"path": "x", "content": "y"}, "mode": mode});
        let (status, reply) = c.control.call_raw(&device.device_id, &body).await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{mode}: {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| e.contains("mode")), "{reply}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(conn.total_received(), 0, "nothing reached the device");
}

/// A device whose mutation `write_file` proposes in auto mode and counts applies.
fn proposing_device(applies: Arc<AtomicUsize>, applied_inputs: Arc<parking_lot::Mutex<Vec<(Value, Value)>>>) -> Answer {
    Answer::with(move |call| {
        if call.mode == Some(CallMode::Apply) {
            applies.fetch_add(1, Ordering::SeqCst);
            applied_inputs.lock().push((call.input.clone(), call.preconditions.clone().unwrap_or(Value::Null)));
            Some(HostResult::success(&call.call_id, json!({"written": true})))
        } else {
            let plan = json!({"tool": call.tool, "summary": "write x", "diff": "+y", "preconditions": {"x": {"absent": true}}});
            Some(HostResult::proposal(&call.call_id, plan))
        }
    })
}

async fn proposals_apply_once(c: Cluster) {
    let device = c.pair("writer").await;
    let applies = Arc::new(AtomicUsize::new(0));
    let inputs = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let _conn =
        device.connect(c.stream_url(), c.answer(proposing_device(applies.clone(), inputs.clone()))).await.unwrap();
    let input = json!({"path": "x", "content": "y"});
    let (status, body) = c.control.call(&device.device_id, "write_file", input.clone(), Some(5000)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["proposal"], true);
    let proposal_id = body["proposalId"].as_str().expect("proposalId").to_owned();

    let (status, stored) = c.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["status"], "pending");
    assert_eq!(stored["input"], input);
    assert_eq!(stored["deviceId"], device.device_id.as_str());
    let (_, pending) = c.control.proposals(Some("pending")).await.unwrap();
    assert_eq!(pending["proposals"].as_array().map(Vec::len), Some(1));

    // Twenty approvals race, spread over every replica, one carrying a forged input.
    let approvals = (0..20).map(|i| {
        let control = c.control.at(&c.replicas[i % c.replicas.len()].base);
        let id = proposal_id.clone();
        tokio::spawn(async move {
            let body = json!({"proposalId": id, "input": {"path": "/etc/passwd", "content": "evil"}});
            control.request(reqwest::Method::POST, "/api/host/approve", Some(&body)).await
        })
    });
    let mut codes = Vec::new();
    for approval in futures::future::join_all(approvals).await {
        let (status, body) = approval.unwrap().unwrap();
        codes.push(status);
        if status == StatusCode::OK {
            assert_eq!(body["ok"], true, "{body}");
        } else {
            assert!(body["error"].as_str().is_some_and(|e| e.contains("not pending")), "{status} {body}");
        }
    }
    assert_eq!(codes.iter().filter(|s| **s == StatusCode::OK).count(), 1, "{codes:?}");
    assert!(codes.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::CONFLICT), "{codes:?}");
    assert_eq!(applies.load(Ordering::SeqCst), 1, "applied exactly once");
    let (applied_input, preconditions) = inputs.lock()[0].clone();
    assert_eq!(applied_input, input, "the stored input is the one applied");
    assert_eq!(preconditions, json!({"x": {"absent": true}}));

    let (_, after) = c.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(after["status"], "applied");
    assert_eq!(after["result"]["ok"], true);
    assert!(after["decidedAt"].is_string());
    let (status, _) = c.control.reject(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);

    // Rejected proposals cannot be approved.
    let (_, body) = c.control.call(&device.device_id, "write_file", input, Some(5000)).await.unwrap();
    let second = body["proposalId"].as_str().expect("proposalId").to_owned();
    let (status, rejected) = c.control.reject(&second).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{rejected}");
    assert_eq!(rejected["status"], "rejected");
    let (status, _) = c.control.approve(&second).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(applies.load(Ordering::SeqCst), 1);
    let (_, list) = c.control.proposals(None).await.unwrap();
    assert_eq!(list["proposals"][0]["id"], second.as_str(), "newest first");
    let (status, _) = c.control.proposals(Some("bogus")).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn approval_while_offline_stays_pending(c: Cluster) {
    let device = c.pair("flaky").await;
    let applies = Arc::new(AtomicUsize::new(0));
    let answer = c.answer(proposing_device(applies.clone(), Arc::default()));
    let conn = device.connect(c.stream_url(), answer.clone()).await.unwrap();
    let (_, body) =
        c.control.call(&device.device_id, "write_file", json!({"path": "x", "content": "y"}), None).await.unwrap();
    let proposal_id = body["proposalId"].as_str().expect("proposalId").to_owned();
    drop(conn);
    c.control.wait_online(&device.device_id, false, WAIT).await.unwrap();

    let (status, body) = c.control.approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "device offline");
    let (_, stored) = c.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(stored["status"], "pending");

    let _conn = device.connect(c.stream_url(), answer).await.unwrap();
    let (status, body) = c.control.approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(applies.load(Ordering::SeqCst), 1);
}

async fn another_users_devices_do_not_exist(c: Cluster) {
    let device = c.pair("private").await;
    let _conn =
        device.connect(c.stream_url(), c.answer(proposing_device(Arc::default(), Arc::default()))).await.unwrap();
    let (_, body) =
        c.control.call(&device.device_id, "write_file", json!({"path": "x", "content": "y"}), None).await.unwrap();
    let proposal_id = body["proposalId"].as_str().expect("proposalId").to_owned();
    let id = &device.device_id;
    let stranger = &c.stranger;

    let (status, body) = stranger.devices().await.unwrap();
    assert_eq!((status, body), (StatusCode::OK, json!({"devices": []})));
    for (status, body) in [
        stranger.device(id).await.unwrap(),
        stranger.call(id, "stat", json!({}), Some(1000)).await.unwrap(),
        stranger.delete_device(id).await.unwrap(),
        stranger.proposal(&proposal_id).await.unwrap(),
        stranger.approve(&proposal_id).await.unwrap(),
        stranger.reject(&proposal_id).await.unwrap(),
    ] {
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body["error"].is_string());
    }
    let (_, list) = stranger.proposals(None).await.unwrap();
    assert_eq!(list, json!({"proposals": []}));
    let (status, _) = c.control.device(id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "the owner still sees it");
}

async fn pending_table_returns_to_zero(c: Cluster) {
    let device = c.pair("void").await;
    let _conn = device.connect(c.stream_url(), Answer::Silent).await.unwrap();
    // Calls that time out on the server.
    let timeouts = (0..30).map(|_| {
        let (control, id) = (c.control.clone(), device.device_id.clone());
        tokio::spawn(async move { control.call(&id, "stat", json!({}), Some(200)).await })
    });
    // Calls whose HTTP caller goes away long before their timeout.
    let client = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let abandoned = (0..30).map(|_| {
        let request = client
            .post(format!("{}/api/devices/{}/calls", c.control.base_url, device.device_id))
            .bearer_auth(&c.control.token)
            .json(&json!({"tool": "stat", "input": {}, "timeoutMs": 60_000}));
        tokio::spawn(async move { request.send().await.is_err() })
    });
    for timed_out in futures::future::join_all(timeouts).await {
        assert_eq!(timed_out.unwrap().unwrap().0, StatusCode::GATEWAY_TIMEOUT);
    }
    for gone in futures::future::join_all(abandoned).await {
        assert!(gone.unwrap(), "the client gave up");
    }
    let started = Instant::now();
    while c.pending_calls() > 0 && started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.pending_calls(), 0, "pending entries left after timeouts and cancelled callers");
}

/// A 1.5 MiB result: delivered whole in memory; in cluster mode larger than NATS's default
/// 1 MB `max_payload`, so the dispatch answers a clear failure at once instead of timing out.
async fn large_results_arrive_or_fail_clearly(c: Cluster) {
    let device = c.pair("verbose").await;
    let big = "z".repeat(1_500_000);
    let answer = Answer::with(move |call| Some(HostResult::success(&call.call_id, json!({"content": big}))));
    let _conn = device.connect(c.stream_url(), c.answer(answer)).await.unwrap();
    let started = Instant::now();
    let (status, body) =
        c.control.call(&device.device_id, "read_file", json!({"path": "big"}), Some(10_000)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
    assert_eq!(status, StatusCode::OK);
    let bus_limit = c.replicas[0].state.dispatcher.bus().max_message_bytes();
    match bus_limit {
        Some(limit) if limit < 1_600_000 => {
            assert_eq!(body["ok"], false, "{}", &body.to_string()[..200]);
            assert!(body["error"].as_str().is_some_and(|e| e.contains("max_payload")), "{body}");
            // And a call too large for the bus is refused before it is sent.
            let (status, body) = c
                .control
                .call(&device.device_id, "write_file", json!({"content": "y".repeat(limit)}), None)
                .await
                .unwrap();
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        }
        _ => assert_eq!(body["result"]["content"].as_str().map(str::len), Some(1_500_000)),
    }
}

// ---- one replica's HTTP surface ----

async fn embedded() -> Cluster {
    Cluster::start(Setup::MemorySqlite).await
}

/// (method, path, headers, body, expected status) of one hostile request.
type BadRequest<'a> = (&'a str, String, Vec<(&'a str, String)>, String, u16);

#[tokio::test]
async fn bad_input_is_a_clear_4xx() {
    let c = embedded().await;
    let base = c.stream_url().to_owned();
    let device = c.pair("target").await;
    let id = device.device_id.clone();
    let http = reqwest::Client::new();
    let token = c.control.token.clone();
    let huge = "x".repeat(8_388_608 + 10);
    let cases: Vec<BadRequest> = vec![
        ("POST", "/api/host/enroll".into(), vec![], "{not json".into(), 400),
        ("POST", "/api/host/enroll".into(), vec![], r#"{"code": 5, "name": "x"}"#.into(), 400),
        ("POST", "/api/host/enroll".into(), vec![], r#"{"code": "x"}"#.into(), 400),
        ("POST", "/api/host/enroll".into(), vec![], r#"{"code": "AAAA-BBBB-CCCC", "name": ""}"#.into(), 400),
        ("POST", "/api/host/enroll".into(), vec![], r#"[1,2,3]"#.into(), 400),
        ("POST", "/api/host/enroll".into(), vec![], huge.clone(), 413),
        (
            "POST",
            format!("/api/devices/{id}/calls"),
            vec![("authorization", format!("Bearer {token}"))],
            "{".into(),
            400,
        ),
        (
            "POST",
            format!("/api/devices/{id}/calls"),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"tool": 1, "input": {}}"#.into(),
            400,
        ),
        (
            "POST",
            format!("/api/devices/{id}/calls"),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"tool": "t"}"#.into(),
            400,
        ),
        (
            "POST",
            format!("/api/devices/{id}/calls"),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"tool": "t", "input": {}, "timeoutMs": 0}"#.into(),
            400,
        ),
        (
            "POST",
            format!("/api/devices/{id}/calls"),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"tool": "t", "input": {}, "timeoutMs": 300001}"#.into(),
            400,
        ),
        (
            "POST",
            format!("/api/devices/{id}/calls"),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"tool": "t", "input": {}, "timeoutMs": -5}"#.into(),
            400,
        ),
        (
            "POST",
            format!("/api/devices/{id}/calls"),
            vec![("authorization", format!("Bearer {token}"))],
            r#""just a string""#.into(),
            400,
        ),
        (
            "POST",
            format!("/api/devices/{id}/calls"),
            vec![("authorization", format!("Bearer {token}"))],
            huge.clone(),
            413,
        ),
        (
            "POST",
            "/api/devices/not-a-uuid/calls".into(),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"tool": "t", "input": {}}"#.into(),
            404,
        ),
        ("GET", "/api/devices/%2e%2e".into(), vec![("authorization", format!("Bearer {token}"))], String::new(), 404),
        (
            "POST",
            "/api/pairing-codes".into(),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"ttlSeconds": 0}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/pairing-codes".into(),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"ttlSeconds": 86401}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/pairing-codes".into(),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"ttlSeconds": "soon"}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/host/result".into(),
            vec![("authorization", format!("Bearer {}", device.token))],
            r#"{"callId": 1}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/host/result".into(),
            vec![("authorization", format!("Bearer {}", device.token))],
            r#"{"ok": true}"#.into(),
            400,
        ),
        ("POST", "/api/host/result".into(), vec![("authorization", format!("Bearer {}", device.token))], huge, 413),
        (
            "PUT",
            "/api/host/manifest".into(),
            vec![("authorization", format!("Bearer {}", device.token))],
            r#"{"tools": "none"}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/host/approve".into(),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"proposalId": 7}"#.into(),
            400,
        ),
        (
            "POST",
            "/api/host/approve".into(),
            vec![("authorization", format!("Bearer {token}"))],
            r#"{"proposalId": "nope"}"#.into(),
            404,
        ),
        ("GET", "/api/devices".into(), vec![], String::new(), 401),
        ("GET", "/api/devices".into(), vec![("authorization", "Bearer".into())], String::new(), 401),
        ("GET", "/api/devices".into(), vec![("authorization", "Basic YWxpY2U6cGFzcw==".into())], String::new(), 401),
        ("GET", "/api/devices".into(), vec![("authorization", format!("Bearer {}", device.token))], String::new(), 401),
        ("GET", "/api/devices".into(), vec![("authorization", format!("Bearer {}x", token))], String::new(), 401),
        (
            "GET",
            "/api/devices".into(),
            vec![("authorization", format!("Bearer {}", "a".repeat(5000)))],
            String::new(),
            401,
        ),
        ("GET", "/api/host/stream".into(), vec![("authorization", format!("Bearer {token}"))], String::new(), 401),
        ("GET", "/api/host/stream".into(), vec![("authorization", "Bearer dev_".into())], String::new(), 401),
        ("DELETE", "/api/devices".into(), vec![("authorization", format!("Bearer {token}"))], String::new(), 405),
        ("GET", "/no/such/route".into(), vec![], String::new(), 404),
    ];
    for (method, path, headers, body, want) in cases {
        let mut request = http.request(method.parse().unwrap(), format!("{base}{path}")).body(body.clone());
        if !body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("answered");
        let status = response.status().as_u16();
        assert!(response.headers().contains_key("x-replica-id"), "{method} {path}");
        let text = response.text().await.unwrap();
        assert_eq!(status, want, "{method} {path} {}: {text}", &body.chars().take(60).collect::<String>());
        let json: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
        assert!(json["error"].is_string(), "{method} {path}: {text}");
    }
    // Odd bytes in the Authorization header.
    let response = http
        .get(format!("{base}/api/devices"))
        .header("authorization", reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Nothing changed, and the server still serves.
    let (status, list) = c.control.devices().await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(1));
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_codes_are_single_use_and_guessing_fails() {
    let c = embedded().await;
    let base = c.stream_url().to_owned();
    let code = c.control.pairing_code().await.unwrap();
    TestDevice::enroll(&base, &code, "first").await.expect("the code enrolls once");
    let (status, body) = TestDevice::enroll_raw(&base, &json!({"code": code, "name": "again"})).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    let _live = c.control.pairing_code().await.unwrap();
    let statuses = Arc::new(parking_lot::Mutex::new(std::collections::HashMap::<u16, usize>::new()));
    let tasks = (0..16).map(|task| {
        let (base, statuses) = (base.clone(), statuses.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..625 {
                let guess = format!("{:04}-{:04}-{:04}", task, i, (task * 7 + i) % 10_000);
                let response = client
                    .post(format!("{base}/api/host/enroll"))
                    .json(&json!({"code": guess, "name": "guess"}))
                    .send()
                    .await
                    .expect("answered");
                *statuses.lock().entry(response.status().as_u16()).or_default() += 1;
            }
        })
    });
    futures::future::join_all(tasks).await;
    let statuses = statuses.lock().clone();
    assert_eq!(statuses.values().sum::<usize>(), 10_000);
    assert!(statuses.keys().all(|s| *s == 401 || *s == 429), "{statuses:?}");
    assert!(statuses.get(&429).copied().unwrap_or(0) > 9_000, "guessing is rate-limited: {statuses:?}");
    let (_, devices) = c.control.devices().await.unwrap();
    assert_eq!(devices["devices"].as_array().map(Vec::len), Some(1), "no guess enrolled");
}

#[tokio::test]
async fn operations_endpoints() {
    let c = embedded().await;
    let http = reqwest::Client::new();
    let base = c.stream_url();
    let health: Value = http.get(format!("{base}/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health, json!({"ok": true}));
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let device = c.pair("metered").await;
    let _conn = device.connect(base, Answer::Echo).await.unwrap();
    c.control.call(&device.device_id, "stat", json!({}), None).await.unwrap();
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("dispatcher_dispatches_total{outcome=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("dispatcher_device_streams 1"), "{metrics}");
}

#[tokio::test]
async fn manifest_is_stored_and_shown() {
    let c = embedded().await;
    let device = c.pair("described").await;
    let manifest = json!({
        "tools": [{"name": "stat", "description": "d", "inputSchema": {"type": "object"}, "class": "read"}],
        "roots": ["/home/a"], "version": "1.2.3", "platform": "linux"
    });
    let (status, _) = device.put_manifest(c.stream_url(), &manifest).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, seen) = c.control.device(&device.device_id).await.unwrap();
    assert_eq!(seen["tools"], manifest["tools"]);
    assert_eq!(seen["roots"], manifest["roots"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_reconnect_and_drains() {
    let c = embedded().await;
    let device = c.pair("leaving").await;
    let mut conn = device
        .connect(c.stream_url(), Answer::Delayed(Duration::from_millis(300), Box::new(Answer::Echo)))
        .await
        .unwrap();
    let in_flight = tokio::spawn({
        let (control, id) = (c.control.clone(), device.device_id.clone());
        async move { control.call(&id, "stat", json!({}), Some(5000)).await }
    });
    conn.wait_event("call", WAIT).await.unwrap();
    let replica = &c.replicas[0];
    replica.shutdown.cancel();
    let data = conn.wait_event("reconnect", WAIT).await.expect("reconnect frame");
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap(), json!({"reason": "shutdown"}));
    let (status, body) = in_flight.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "the call in flight was answered: {body}");
    tokio::time::timeout(WAIT, async {
        while !replica.served.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the server stopped");
}

/// A device that proposes in auto mode and holds every apply (answers none), handing it to the
/// test.
fn holding_device(held: Arc<parking_lot::Mutex<Vec<protocol::HostCall>>>) -> Answer {
    Answer::with(move |call| {
        if call.mode == Some(CallMode::Apply) {
            held.lock().push(call.clone());
            None
        } else {
            let plan = json!({"tool": call.tool, "summary": "write x", "preconditions": {"x": {"absent": true}}});
            Some(HostResult::proposal(&call.call_id, plan))
        }
    })
}

/// An approval answered 504 marks the proposal `failed` with `device timed out`; the device's
/// result that comes after completes it with the real outcome, once, and only from that device.
async fn late_apply_results_complete_timed_out_proposals(c: Cluster) {
    let device = c.pair("slow").await;
    let stranger = c.pair("stranger").await;
    let held = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let conn = device.connect(c.stream_url(), c.answer(holding_device(held.clone()))).await.unwrap();
    let (_, body) =
        c.control.call(&device.device_id, "write_file", json!({"path": "x", "content": "y"}), None).await.unwrap();
    let proposal_id = body["proposalId"].as_str().expect("proposalId").to_owned();

    let started = Instant::now();
    let (status, body) = c.control.approve(&proposal_id).await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(took >= APPLY_TIMEOUT && took < APPLY_TIMEOUT + Duration::from_secs(1), "answered after {took:?}");
    let apply = held.lock().first().cloned().expect("the apply reached the device");
    assert_eq!(body["callId"], apply.call_id.as_str());
    let (_, failed) = c.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(
        (failed["status"].as_str(), failed["result"]["error"].as_str()),
        (Some("failed"), Some("device timed out"))
    );

    let late = HostResult::success(&apply.call_id, json!({"written": true}));
    let (status, body) = stranger.post_result(c.result_url(), &late).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "another device's late result: {body}");
    let (status, body) = device.post_result(c.result_url(), &late).await.unwrap();
    assert_eq!((status, body), (StatusCode::OK, json!({"delivered": true})));
    let (_, completed) = c.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(completed["status"], "applied", "{completed}");
    assert_eq!(completed["result"], serde_json::to_value(&late).unwrap());
    let (status, body) = device.post_result(c.result_url(), &late).await.unwrap();
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"delivered": false})), "recorded once");
    let (status, _) = c.control.approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(conn.times_received(&apply.call_id), 1, "pushed once");
    assert_eq!(c.pending_calls(), 0);
}

/// Small caps and quotas (set per test): lists in pages with `next`, oversized proposals and
/// manifests 413 with nothing stored, the device list without tools unless asked, and the
/// quotas of live pairing codes and devices 429 with the limit named.
async fn lists_are_paged_and_storage_is_capped(c: Cluster) {
    // c has max 3 live codes, 2 devices, 4 KiB proposals, 2 KiB manifests (see the suite).
    let device = c.pair("first").await;
    let plan = |call: &protocol::HostCall| {
        let size = call.input["planBytes"].as_u64().unwrap_or(0) as usize;
        json!({"tool": call.tool, "summary": "w", "diff": "+".repeat(size), "preconditions": {}})
    };
    let answer = Answer::with(move |call| Some(HostResult::proposal(&call.call_id, plan(call))));
    let _conn = device.connect(c.stream_url(), c.answer(answer)).await.unwrap();
    let propose = |content: usize, plan: usize| {
        let input = json!({"path": "x", "content": "a".repeat(content), "planBytes": plan});
        c.control.call(&device.device_id, "write_file", input, Some(5000))
    };
    let mut made = Vec::new();
    for _ in 0..7 {
        let (status, body) = propose(100, 100).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        made.push(body["proposalId"].as_str().expect("proposalId").to_owned());
    }
    let (status, body) = propose(3000, 3000).await.unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("4096") && e.contains("nothing was stored")), "{body}");

    // Pages of three, newest first, each proposal once.
    let mut seen = Vec::new();
    let mut path = "/api/proposals?limit=3".to_owned();
    loop {
        let (status, page) = c.control.request(reqwest::Method::GET, &path, None).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["proposals"].as_array().expect("proposals");
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|p| p["id"].as_str().unwrap().to_owned()));
        match page["next"].as_str() {
            Some(next) => path = format!("/api/proposals?limit=3&status=pending&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(seen, made.iter().rev().cloned().collect::<Vec<_>>());
    let (_, all) = c.control.proposals(Some("pending")).await.unwrap();
    assert_eq!(all["proposals"].as_array().map(Vec::len), Some(7));
    assert!(all.get("next").is_none(), "{all}");
    for query in ["limit=0", "limit=501", "limit=x", "cursor=bogus"] {
        let (status, body) =
            c.control.request(reqwest::Method::GET, &format!("/api/proposals?{query}"), None).await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    }

    // Manifests: over the cap refused, the list without tools unless asked.
    let tool = |name: &str, description: usize| json!({"name": name, "description": "d".repeat(description), "inputSchema": {"type": "object"}, "class": "read"});
    let manifest = |tools: Vec<Value>| json!({"tools": tools, "roots": ["/r"], "version": "1", "platform": "linux"});
    let (status, body) = device.put_manifest(c.stream_url(), &manifest(vec![tool("big", 3000)])).await.unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("2048")), "{body}");
    let small = manifest(vec![tool("stat", 5), tool("grep", 5), tool("glob", 5)]);
    assert_eq!(device.put_manifest(c.stream_url(), &small).await.unwrap().0, StatusCode::NO_CONTENT);
    let (_, list) = c.control.devices().await.unwrap();
    let listed = &list["devices"][0];
    assert!(listed.get("tools").is_none(), "{listed}");
    assert_eq!((&listed["toolCount"], &listed["roots"]), (&json!(3), &json!(["/r"])));
    let (_, list) = c.control.request(reqwest::Method::GET, "/api/devices?include=tools", None).await.unwrap();
    assert_eq!(list["devices"][0]["tools"], small["tools"]);
    let (_, one) = c.control.device(&device.device_id).await.unwrap();
    assert_eq!((&one["tools"], &one["toolCount"]), (&small["tools"], &json!(3)));

    // Quotas: three live codes; two devices, the refused code kept.
    let second = c.pair("second").await;
    let codes = [c.control.pairing_code().await.unwrap(), c.control.pairing_code().await.unwrap()];
    c.control.pairing_code().await.expect("a third live code");
    let (status, body) = c.control.create_pairing_code(&json!({})).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("pairing codes") && e.contains('3')), "{body}");
    let (status, body) =
        TestDevice::enroll_raw(c.stream_url(), &json!({"code": codes[0], "name": "third"})).await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("device limit") && e.contains('2')), "{body}");
    let (status, _) = c.control.delete_device(&second.device_id).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    TestDevice::enroll(c.stream_url(), &codes[0], "third").await.expect("the refused code still enrolls");
    let (_, list) = c.control.request(reqwest::Method::GET, "/api/devices?limit=1", None).await.unwrap();
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(1));
    let next = list["next"].as_str().expect("a next page");
    let (_, rest) =
        c.control.request(reqwest::Method::GET, &format!("/api/devices?limit=1&cursor={next}"), None).await.unwrap();
    assert_eq!(rest["devices"][0]["name"], "third");
    assert!(rest.get("next").is_none(), "{rest}");
}

/// What Schemathesis found against `/openapi.json`, fixed: bodies must be JSON objects (serde
/// would read a struct from an array of its fields), whole numbers may be written `5.0`, a
/// `null` pairing body takes the defaults, and lengths are counted in characters.
#[tokio::test]
async fn bodies_as_the_openapi_document_describes() {
    let c = embedded().await;
    let base = c.stream_url().to_owned();
    let http = reqwest::Client::new();
    let token = c.control.token.clone();
    let unknown = "00000000-0000-4000-8000-000000000000";
    let post = |path: String, body: &'static str| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(String, &str, u16)> = vec![
        ("/api/pairing-codes".into(), "[]", 400),
        ("/api/pairing-codes".into(), "[60]", 400),
        ("/api/pairing-codes".into(), "null", 201),
        ("/api/pairing-codes".into(), r#"{"ttlSeconds": 60.0}"#, 201),
        ("/api/pairing-codes".into(), r#"{"ttlSeconds": 60.5}"#, 400),
        ("/api/host/enroll".into(), r#"["AAAA-BBBB-CCCC", "laptop"]"#, 400),
        ("/api/host/approve".into(), r#"["00000000-0000-4000-8000-000000000000"]"#, 400),
        ("/api/host/reject".into(), "[]", 400),
        (format!("/api/devices/{unknown}/calls"), r#"{"tool": "t", "input": {}, "timeoutMs": 1000.0}"#, 404),
        (format!("/api/devices/{unknown}/calls"), r#"{"tool": "t", "input": {}, "timeoutMs": 1000.5}"#, 400),
    ];
    for (path, body, want) in cases {
        let response = post(path.clone(), body).await.expect("request");
        assert_eq!(response.status().as_u16(), want, "POST {path} {body}");
        if want == 400 {
            let error: Value = response.json().await.expect("JSON error body");
            assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()), "{error}");
        }
    }
    // 200 characters of two bytes each: within the documented maxLength of the name.
    let code = c.control.pairing_code().await.expect("code");
    let name = "é".repeat(200);
    let (status, body) = TestDevice::enroll_raw(&base, &json!({"code": code, "name": name})).await.expect("enroll");
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let code = c.control.pairing_code().await.expect("code");
    let (status, _) =
        TestDevice::enroll_raw(&base, &json!({"code": code, "name": "é".repeat(201)})).await.expect("enroll");
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
