//! The dispatch loop in-process ([`host_agent::runtime::run`]) with test tools that sleep and
//! count their runs, against the fake dispatcher: slow tools never block the stream, calls run
//! concurrently, a call still running at its deadline is abandoned, duplicates are refused
//! across reconnects, shutdown answers the call in hand first, revocation abandons it.

mod runtime_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use host_agent::runtime::{self, AgentConfig, Outcome, ToolRunner};
use protocol::{HostCall, HostResult, ToolClass, ToolDescriptor};
use runtime_support::{wait_until, Fake};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// `sleep {ms}` sleeps, `echo` answers its input; every run is counted by call id.
#[derive(Default)]
struct TestTools {
    runs: Mutex<HashMap<String, usize>>,
}

impl TestTools {
    fn runs_of(&self, call_id: &str) -> usize {
        self.runs.lock().expect("lock").get(call_id).copied().unwrap_or(0)
    }
}

impl ToolRunner for TestTools {
    fn descriptors(&self) -> Vec<ToolDescriptor> {
        ["sleep", "echo"]
            .map(|name| ToolDescriptor {
                name: name.into(),
                description: format!("test tool {name}"),
                input_schema: json!({"type": "object"}),
                class: ToolClass::Read,
            })
            .to_vec()
    }

    fn roots(&self) -> Vec<String> {
        vec!["/test-root".into()]
    }

    fn run(&self, call: &HostCall) -> HostResult {
        *self.runs.lock().expect("lock").entry(call.call_id.clone()).or_default() += 1;
        match call.tool.as_str() {
            "sleep" => {
                let ms = call.input["ms"].as_u64().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                HostResult::success(&call.call_id, json!({"slept": ms}))
            }
            "echo" => HostResult::success(&call.call_id, call.input.clone()),
            other => HostResult::failure(&call.call_id, format!("unknown tool {other}")),
        }
    }
}

struct Running {
    fake: Fake,
    tools: Arc<TestTools>,
    shutdown: CancellationToken,
    agent: JoinHandle<Result<Outcome, runtime::RunError>>,
    creds: tempfile::TempDir,
}

async fn start() -> Running {
    let fake = Fake::start(&["PAIR-1"]).await;
    let creds = tempfile::tempdir().expect("creds");
    let config = AgentConfig {
        servers: vec![fake.url.parse().expect("url")],
        name: "loop test".into(),
        code: Some("PAIR-1".into()),
        credentials_dir: creds.path().to_owned(),
        credentials_store: host_agent::credentials::StoreChoice::File,
        ca_cert: None,
        keepalive: Duration::from_secs(1),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(300),
        shutdown_grace: Duration::from_secs(5),
    };
    let tools = Arc::new(TestTools::default());
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(runtime::run(config, tools.clone(), shutdown.clone()));
    wait_until("the first stream", WAIT, || fake.state.stream_count() == 1).await;
    Running { fake, tools, shutdown, agent, creds }
}

fn result_of(fake: &Fake, call_id: &str) -> Option<HostResult> {
    fake.state.results().into_iter().map(|p| p.result).find(|r| r.call_id == call_id)
}

fn order_of(fake: &Fake) -> Vec<String> {
    fake.state.results().into_iter().map(|p| p.result.call_id).collect()
}

fn in_secs(secs: f64) -> String {
    (chrono::Utc::now() + chrono::Duration::milliseconds((secs * 1000.0) as i64)).to_rfc3339()
}

#[tokio::test]
async fn a_slow_tool_never_blocks_the_stream_and_calls_run_concurrently() {
    let run = start().await;
    run.fake.state.send_call(&json!({"callId": "slow", "tool": "sleep", "input": {"ms": 1500}}));
    run.fake.state.send_call(&json!({"callId": "fast", "tool": "echo", "input": {"x": 1}}));
    wait_until("the fast result", WAIT, || result_of(&run.fake, "fast").is_some()).await;
    assert!(result_of(&run.fake, "slow").is_none(), "the fast call was answered while the slow one ran");
    assert_eq!(result_of(&run.fake, "fast").and_then(|r| r.result), Some(json!({"x": 1})));
    wait_until("the slow result", WAIT, || result_of(&run.fake, "slow").is_some()).await;
    assert_eq!(order_of(&run.fake), ["fast", "slow"]);

    // Ten calls of 500 ms each finish in far less than five seconds.
    let started = std::time::Instant::now();
    for n in 0..10 {
        run.fake.state.send_call(&json!({"callId": format!("par-{n}"), "tool": "sleep", "input": {"ms": 500}}));
    }
    wait_until("ten results", WAIT, || run.fake.state.results().len() == 12).await;
    assert!(started.elapsed() < Duration::from_millis(2500), "ran concurrently: {:?}", started.elapsed());
}

#[tokio::test]
async fn a_call_still_running_at_its_deadline_is_abandoned() {
    let run = start().await;
    run.fake.state.send_call(&json!({
        "callId": "late", "tool": "sleep", "input": {"ms": 1200}, "deadline": in_secs(0.4),
    }));
    run.fake
        .state
        .send_call(&json!({"callId": "in-time", "tool": "sleep", "input": {"ms": 100}, "deadline": in_secs(10.0)}));
    wait_until("the late call to start", WAIT, || run.tools.runs_of("late") == 1).await;
    wait_until("the in-time result", WAIT, || result_of(&run.fake, "in-time").is_some()).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(result_of(&run.fake, "late").is_none(), "nothing is posted after the deadline");
    assert_eq!(run.fake.state.result_attempts.load(std::sync::atomic::Ordering::SeqCst), 1);

    // An expired call is not even started.
    run.fake.state.send_call(&json!({"callId": "expired", "tool": "echo", "input": {}, "deadline": in_secs(-1.0)}));
    run.fake.state.send_call(&json!({"callId": "after", "tool": "echo", "input": {}}));
    wait_until("the call after", WAIT, || result_of(&run.fake, "after").is_some()).await;
    assert_eq!(run.tools.runs_of("expired"), 0);
}

#[tokio::test]
async fn duplicates_are_refused_across_reconnects() {
    let run = start().await;
    run.fake.state.send_call(&json!({"callId": "once", "tool": "echo", "input": {}}));
    run.fake.state.send_call(&json!({"callId": "once", "tool": "echo", "input": {}}));
    wait_until("the first result", WAIT, || result_of(&run.fake, "once").is_some()).await;
    run.fake.state.send_event("reconnect", r#"{"reason":"shutdown"}"#);
    wait_until("a second stream", WAIT, || run.fake.state.stream_count() == 2).await;
    run.fake.state.send_call(&json!({"callId": "once", "tool": "echo", "input": {}}));
    run.fake.state.send_call(&json!({"callId": "twice", "tool": "echo", "input": {}}));
    wait_until("the next result", WAIT, || result_of(&run.fake, "twice").is_some()).await;
    assert_eq!(run.tools.runs_of("once"), 1);
    assert_eq!(order_of(&run.fake), ["once", "twice"]);
}

#[tokio::test]
async fn shutdown_answers_the_call_in_hand_first() {
    let run = start().await;
    run.fake.state.send_call(&json!({"callId": "in-hand", "tool": "sleep", "input": {"ms": 800}}));
    wait_until("the call to start", WAIT, || run.tools.runs_of("in-hand") == 1).await;
    run.shutdown.cancel();
    let outcome = tokio::time::timeout(WAIT, run.agent).await.expect("ends").expect("joins").expect("runs");
    assert_eq!(outcome, Outcome::Shutdown);
    assert!(result_of(&run.fake, "in-hand").is_some_and(|r| r.ok), "answered before the run ended");
}

#[tokio::test]
async fn revocation_abandons_the_calls_in_hand() {
    let run = start().await;
    run.fake.state.send_call(&json!({"callId": "doomed", "tool": "sleep", "input": {"ms": 1500}}));
    wait_until("the call to start", WAIT, || run.tools.runs_of("doomed") == 1).await;
    let started = std::time::Instant::now();
    run.fake.state.send_event("revoked", "{}");
    let outcome = tokio::time::timeout(WAIT, run.agent).await.expect("ends").expect("joins").expect("runs");
    assert_eq!(outcome, Outcome::Revoked);
    assert!(started.elapsed() < Duration::from_millis(1200), "did not wait for the tool");
    assert!(result_of(&run.fake, "doomed").is_none());
    let left = std::fs::read_dir(run.creds.path()).expect("dir").count();
    assert_eq!(left, 0, "credentials deleted");
}

#[tokio::test]
async fn the_manifest_names_the_tools_and_roots() {
    let run = start().await;
    wait_until("the manifest", WAIT, || !run.fake.state.manifests().is_empty()).await;
    let manifest = run.fake.state.manifests()[0].clone();
    let names: Vec<String> = manifest.tools.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, ["sleep", "echo"]);
    assert_eq!(manifest.roots, ["/test-root"]);
    assert_eq!(manifest.platform, std::env::consts::OS);
    run.shutdown.cancel();
    let outcome = tokio::time::timeout(WAIT, run.agent).await.expect("ends").expect("joins").expect("runs");
    assert_eq!(outcome, Outcome::Shutdown);
}
