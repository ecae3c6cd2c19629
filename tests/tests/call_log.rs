//! The call log end to end, through the real `dispatcher` binary: every outcome recorded with
//! its fields (ok, error, offline, timed out, a proposal and its apply), filters and pages,
//! owner scoping and bad queries; in cluster mode, a record completed by a result posted to
//! another replica after its dispatching replica was killed, and a record marked `unknown`
//! when no result ever came back; and a database outage that loses records (counted in
//! `/metrics`) but no call.
//!
//! Not here: the table's merge rules on each engine (dispatcher/tests/call_log.rs).

use std::time::{Duration, Instant};

use e2e::{metric, Answer, Control, Dispatcher, LocalCluster, TestDatabase, TestDevice};
use protocol::{CallMode, HostResult};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// `GET /api/calls/{id}` until `done` holds for the record (the writer batches: records appear
/// within a fraction of a second), or panics after `within`.
async fn wait_record(control: &Control, call_id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (status, record) = control.request(Method::GET, &format!("/api/calls/{call_id}"), None).await.expect("get");
        if status == StatusCode::OK && done(&record) {
            return record;
        }
        assert!(started.elapsed() < within, "record of {call_id} not as expected after {within:?}: {status} {record}");
        tokio::time::sleep(50 * MS).await;
    }
}

async fn final_record(control: &Control, call_id: &str) -> Value {
    wait_record(control, call_id, 10 * SECOND, |record| record["outcome"] != "pending").await
}

async fn list(control: &Control, query: &str) -> (StatusCode, Value) {
    control.request(Method::GET, &format!("/api/calls{query}"), None).await.expect("list")
}

fn manifest() -> Value {
    let tool = |name: &str, class: &str| json!({"name": name, "description": name, "inputSchema": {}, "class": class});
    json!({
        "tools": [tool("stat", "read"), tool("boom", "read"), tool("slow", "read"), tool("write_file", "mutate")],
        "roots": ["/r"], "version": "test", "platform": "linux"
    })
}

/// Reads answer, `boom` fails, `slow` never answers, `write_file` proposes, and its apply
/// answers `{"written": 2}`.
fn device_answers() -> Answer {
    Answer::with(|call| match call.tool.as_str() {
        "slow" => None,
        "boom" => Some(HostResult::failure(call.call_id.clone(), "no such file")),
        "write_file" if call.mode == Some(CallMode::Apply) => {
            Some(HostResult::success(call.call_id.clone(), json!({"written": 2})))
        }
        "write_file" => Some(HostResult::proposal(
            call.call_id.clone(),
            json!({"tool": "write_file", "summary": "write f", "preconditions": {"absent": true}}),
        )),
        _ => Some(Answer::echo_of(call)),
    })
}

async fn every_outcome_is_logged(database: Option<&TestDatabase>) {
    let mut builder = Dispatcher::builder();
    if let Some(database) = database {
        builder = builder.database_url(database.url());
    }
    let dispatcher = builder.start().await.expect("dispatcher");
    let base = dispatcher.base_url();
    let control = Control::new(&base, dispatcher.mint_token("alice").await.expect("token"));
    let device = TestDevice::pair(&base, &control, "laptop").await.expect("enroll");
    let (status, _) = device.put_manifest(&base, &manifest()).await.expect("manifest");
    assert_eq!(status, StatusCode::NO_CONTENT);
    let _conn = device.connect(&base, device_answers()).await.expect("stream");
    let asleep = TestDevice::pair(&base, &control, "asleep").await.expect("enroll");

    let call = |tool: &'static str, timeout_ms: Option<u64>, on: &TestDevice| {
        let (control, id) = (control.clone(), on.device_id.clone());
        async move { control.call(&id, tool, json!({"path": "secret.txt"}), timeout_ms).await.expect("call") }
    };
    let (status, ok) = call("stat", None, &device).await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    let (_, failed) = call("boom", None, &device).await;
    let (status, timed_out) = call("slow", Some(300), &device).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let (status, offline) = call("stat", None, &asleep).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (_, proposed) = call("write_file", None, &device).await;
    let proposal_id = proposed["proposalId"].as_str().expect("a proposal").to_owned();
    let (status, applied) = control.approve(&proposal_id).await.expect("approve");
    assert_eq!(status, StatusCode::OK, "{applied}");

    let id = |body: &Value| body["callId"].as_str().expect("callId").to_owned();
    let ok = final_record(&control, &id(&ok)).await;
    assert_eq!(ok["outcome"], "ok", "{ok}");
    assert_eq!(
        (ok["tool"].as_str(), ok["mode"].as_str(), ok["class"].as_str()),
        (Some("stat"), Some("auto"), Some("read"))
    );
    assert_eq!(ok["deviceId"], device.device_id.as_str());
    assert_eq!(ok["dispatchedBy"], dispatcher.replica_id(), "{ok}");
    assert_eq!(ok["pushedBy"], dispatcher.replica_id(), "{ok}");
    for field in ["dispatchedAt", "pushedAt", "finishedAt"] {
        assert!(ok[field].is_string(), "{field}: {ok}");
    }
    assert!(ok["durationMs"].as_u64().is_some(), "{ok}");
    assert!(ok["resultBytes"].as_u64().is_some_and(|n| n > 20), "{ok}");
    assert!(ok.get("error").is_none() && ok.get("proposalId").is_none(), "{ok}");
    let text = ok.to_string();
    assert!(!text.contains("secret.txt"), "the input is not stored: {text}");

    let failed = final_record(&control, &id(&failed)).await;
    assert_eq!(
        (failed["outcome"].as_str(), failed["error"].as_str()),
        (Some("error"), Some("no such file")),
        "{failed}"
    );

    let timed_out = final_record(&control, &id(&timed_out)).await;
    assert_eq!(timed_out["outcome"], "timed out", "{timed_out}");
    assert_eq!(timed_out["error"], "device timed out", "{timed_out}");
    assert!(timed_out["pushedAt"].is_string() && timed_out.get("resultBytes").is_none(), "{timed_out}");

    let offline = final_record(&control, &id(&offline)).await;
    assert_eq!(offline["outcome"], "offline", "{offline}");
    assert_eq!(offline["deviceId"], asleep.device_id.as_str());
    assert!(offline.get("pushedAt").is_none(), "nothing was pushed: {offline}");

    let proposed = final_record(&control, &id(&proposed)).await;
    assert_eq!(
        (proposed["outcome"].as_str(), proposed["class"].as_str(), proposed["proposalId"].as_str()),
        (Some("ok"), Some("mutate"), Some(proposal_id.as_str())),
        "{proposed}"
    );
    let applied = final_record(&control, &id(&applied)).await;
    assert_eq!(
        (applied["mode"].as_str(), applied["outcome"].as_str(), applied["proposalId"].as_str()),
        (Some("apply"), Some("ok"), Some(proposal_id.as_str())),
        "{applied}"
    );
    assert_eq!(applied["class"], "mutate");

    // The list shows the same records, newest first.
    let (status, page) = list(&control, "").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let calls = page["calls"].as_array().expect("calls");
    let ids: Vec<&str> = calls.iter().filter_map(|c| c["callId"].as_str()).collect();
    let want: Vec<String> = [&applied, &proposed, &offline, &timed_out, &failed, &ok].iter().map(|r| id(r)).collect();
    assert_eq!(ids, want, "{page}");
    assert_eq!(calls[5], ok);
    assert!(page.get("next").is_none(), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_logged_on_sqlite() {
    every_outcome_is_logged(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_logged_on_postgres() {
    let database = TestDatabase::create().await.expect("database");
    every_outcome_is_logged(Some(&database)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_page_and_stay_with_their_owner() {
    let dispatcher = Dispatcher::start().await.expect("dispatcher");
    let base = dispatcher.base_url();
    let alice = Control::new(&base, dispatcher.mint_token("alice").await.expect("token"));
    let bob = Control::new(&base, dispatcher.mint_token("bob").await.expect("token"));
    let laptop = TestDevice::pair(&base, &alice, "laptop").await.expect("enroll");
    let desktop = TestDevice::pair(&base, &alice, "desktop").await.expect("enroll");
    let _a = laptop.connect(&base, device_answers()).await.expect("stream");
    let _b = desktop.connect(&base, device_answers()).await.expect("stream");

    let mut made = Vec::new();
    for i in 0..7 {
        let (device, tool) = if i % 2 == 0 { (&laptop, "stat") } else { (&desktop, "boom") };
        let (_, body) = alice.call(&device.device_id, tool, json!({}), None).await.expect("call");
        made.push(body["callId"].as_str().expect("callId").to_owned());
    }
    final_record(&alice, made.last().expect("calls")).await;
    for id in &made {
        final_record(&alice, id).await;
    }

    // Pages of 3 through `before`, newest first, every call once.
    let mut seen = Vec::new();
    let mut query = "?limit=3".to_owned();
    loop {
        let (status, page) = list(&alice, &query).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let calls = page["calls"].as_array().expect("calls");
        assert!(calls.len() <= 3);
        seen.extend(calls.iter().map(|c| c["callId"].as_str().expect("id").to_owned()));
        match page["next"].as_str() {
            Some(next) => query = format!("?limit=3&before={next}"),
            None => break,
        }
    }
    made.reverse();
    assert_eq!(seen, made);

    let count = |page: &Value| page["calls"].as_array().map_or(0, Vec::len);
    let (_, on_laptop) = list(&alice, &format!("?deviceId={}", laptop.device_id)).await;
    assert_eq!(count(&on_laptop), 4, "{on_laptop}");
    assert!(on_laptop["calls"].as_array().expect("calls").iter().all(|c| c["deviceId"] == laptop.device_id.as_str()));
    let (_, booms) = list(&alice, "?tool=boom").await;
    assert_eq!(count(&booms), 3, "{booms}");
    let (_, errors) = list(&alice, "?outcome=error").await;
    assert_eq!(count(&errors), 3, "{errors}");
    let (_, oks) = list(&alice, &format!("?outcome=ok&deviceId={}&tool=stat", laptop.device_id)).await;
    assert_eq!(count(&oks), 4, "{oks}");
    let (_, none) = list(&alice, "?outcome=timed%20out").await;
    assert_eq!(count(&none), 0, "{none}");

    // Another user sees none of it, even naming the device or a call.
    let (status, theirs) = list(&bob, "").await;
    assert_eq!((status, count(&theirs)), (StatusCode::OK, 0), "{theirs}");
    let (_, theirs) = list(&bob, &format!("?deviceId={}", laptop.device_id)).await;
    assert_eq!(count(&theirs), 0, "{theirs}");
    let (status, body) = bob.request(Method::GET, &format!("/api/calls/{}", made[0]), None).await.expect("get");
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body["error"].is_string());

    // Bad queries are 400 with a message; no token is 401; an unknown id is 404.
    for query in [
        "?limit=0",
        "?limit=501",
        "?limit=ten",
        "?outcome=fine",
        "?outcome=timed_out",
        "?deviceId=laptop",
        "?before=garbage",
        &format!("?tool={}", "t".repeat(129)),
    ] {
        let (status, body) = list(&alice, query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{query}: {body}");
    }
    let (status, page) = list(&alice, "?limit=500&deviceId=&tool=&outcome=&before=").await;
    assert_eq!((status, count(&page)), (StatusCode::OK, 7), "empty values are no filter: {page}");
    let anonymous = reqwest::get(format!("{base}/api/calls")).await.expect("get");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    for id in ["not-a-call", "0a000001-0000-4000-8000-000000000001"] {
        let (status, _) = alice.request(Method::GET, &format!("/api/calls/{id}"), None).await.expect("get");
        assert_eq!(status, StatusCode::NOT_FOUND, "{id}");
    }
}

/// A replica SIGKILLed while the device works on its call: the device's result, posted to
/// another replica, still completes the record (`ok`, pushed by the holder, finished); a call
/// whose result never comes back anywhere becomes `unknown` shortly after its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_outlive_their_dispatching_replica() {
    const STALE: Duration = Duration::from_secs(1);
    let mut cluster = LocalCluster::builder()
        .replicas(3)
        .configure(|_, builder| builder.env("DISPATCHER_STALE_APPLY_SECS", STALE.as_secs().to_string()))
        .start()
        .await
        .expect("cluster");
    let (a, b, c) = (0, 1, 2);
    let device = cluster.pair_device(b, "worker").await.expect("enroll");
    // The device works 3 s on `hash_file`, then posts to C; it never answers `slow`.
    let answer = Answer::with(|call| match call.tool.as_str() {
        "slow" => None,
        _ => Some(HostResult::success(call.call_id.clone(), json!({"hash": "ab".repeat(32)}))),
    });
    let answer = Answer::PostTo(cluster.url(c), Box::new(Answer::Delayed(3 * SECOND, Box::new(answer))));
    let mut conn = device.connect(&cluster.url(b), answer).await.expect("stream on B");
    cluster.wait_presence(&device.device_id, true, 5 * SECOND).await.expect("online");

    let on_a = cluster.control_at(a);
    let on_c = cluster.control_at(c);
    let calls = tokio::spawn({
        let (on_a, id) = (on_a.clone(), device.device_id.clone());
        async move {
            let hashed = on_a.call(&id, "hash_file", json!({"path": "big.iso"}), Some(20_000));
            let silent = on_a.call(&id, "slow", json!({}), Some(2_000));
            futures::future::join(hashed, silent).await
        }
    });
    let mut pushed = Vec::new();
    while pushed.len() < 2 {
        let data = conn.wait_event("call", 5 * SECOND).await.expect("the calls reached B's stream");
        let call: protocol::HostCall = serde_json::from_str(&data).expect("call");
        pushed.push(call);
    }
    let hashed = pushed.iter().find(|c| c.tool == "hash_file").expect("hash_file").call_id.clone();
    let silent = pushed.iter().find(|c| c.tool == "slow").expect("slow").call_id.clone();
    // Both records are stored (pending, pushed by B) before A dies.
    for id in [&hashed, &silent] {
        wait_record(&on_c, id, 5 * SECOND, |r| r["outcome"] == "pending" && r["pushedBy"].is_string()).await;
    }
    let killed_at = Instant::now();
    cluster.kill(a).await;
    let (hashed_answer, silent_answer) = calls.await.expect("task");
    assert!(hashed_answer.is_err() && silent_answer.is_err(), "the dispatches died with A");

    let record = wait_record(&on_c, &hashed, 15 * SECOND, |r| r["outcome"] != "pending").await;
    println!("record completed {} ms after the kill: {record}", killed_at.elapsed().as_millis());
    assert_eq!(record["outcome"], "ok", "{record}");
    assert_eq!(record["dispatchedBy"], cluster.replica_id(a), "{record}");
    assert_eq!(record["pushedBy"], cluster.replica_id(b), "{record}");
    assert!(record["finishedAt"].is_string(), "{record}");
    assert!(record["resultBytes"].as_u64().is_some_and(|n| n > 64), "{record}");
    assert!(record["durationMs"].as_u64().is_some_and(|ms| ms >= 2_500), "{record}");
    let posted = conn.posted.lock().clone();
    assert!(
        posted.iter().any(|(id, status)| *id == hashed && *status == StatusCode::NOT_FOUND),
        "nobody waited for the result (404), yet it was logged: {posted:?}"
    );

    let record = wait_record(&on_c, &silent, 15 * SECOND, |r| r["outcome"] != "pending").await;
    println!("unanswered call marked {} {} ms after the kill", record["outcome"], killed_at.elapsed().as_millis());
    assert_eq!(record["outcome"], "unknown", "{record}");
    assert!(record["pushedAt"].is_string() && record.get("finishedAt").is_none(), "{record}");

    // The same records from B, and the list.
    let (status, page) = cluster.control_at(b).request(Method::GET, "/api/calls", None).await.expect("list");
    assert_eq!(status, StatusCode::OK);
    let outcomes: Vec<&str> =
        page["calls"].as_array().expect("calls").iter().filter_map(|c| c["outcome"].as_str()).collect();
    assert_eq!(outcomes.len(), 2, "{page}");
    assert!(outcomes.contains(&"ok") && outcomes.contains(&"unknown"), "{page}");
}

/// The database behind a replica refuses connections for a while: calls go on answering, the
/// records of that time are lost and counted in `/metrics`, and logging resumes afterwards.
/// The outage is a dedicated database that stops accepting connections (`ALLOW_CONNECTIONS
/// false` and its backends terminated), so no other test's database is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_records_not_calls() {
    let database = TestDatabase::create().await.expect("database");
    let dispatcher = Dispatcher::builder().database_url(database.url()).start().await.expect("dispatcher");
    let base = dispatcher.base_url();
    let control = Control::new(&base, dispatcher.mint_token("alice").await.expect("token"));
    let device = TestDevice::pair(&base, &control, "laptop").await.expect("enroll");
    let _conn = device.connect(&base, Answer::Echo).await.expect("stream");
    // Warm: the tokens and the device's owner are cached now, as on any busy replica.
    let (status, body) = control.call(&device.device_id, "stat", json!({}), None).await.expect("call");
    assert_eq!(status, StatusCode::OK);
    final_record(&control, body["callId"].as_str().expect("id")).await;
    let dropped_before = metric(&base, "call_log_dropped_total").await.unwrap_or(0.0);

    let admin_url = format!("{}/postgres", e2e::postgres::server_url());
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.expect("admin connection");
    let name = database.name().to_owned();
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).execute(&mut admin).await.expect("alter");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .execute(&mut admin)
    .await
    .expect("terminate");

    let mut lost = Vec::new();
    let started = Instant::now();
    for i in 0..20 {
        let (status, body) = control.call(&device.device_id, "stat", json!({"i": i}), Some(5_000)).await.expect("call");
        assert_eq!(status, StatusCode::OK, "call {i} during the outage: {body}");
        assert_eq!(body["ok"], true, "{body}");
        lost.push(body["callId"].as_str().expect("id").to_owned());
    }
    println!("20 calls during the outage in {} ms", started.elapsed().as_millis());
    let counted = loop {
        let dropped = metric(&base, "call_log_dropped_total").await.unwrap_or(0.0) - dropped_before;
        if dropped >= 20.0 {
            break dropped;
        }
        assert!(started.elapsed() < 60 * SECOND, "dropped records not counted: {dropped}");
        tokio::time::sleep(200 * MS).await;
    };
    println!("records dropped and counted: {counted}");

    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).execute(&mut admin).await.expect("alter");
    let _ = admin.close().await;
    // Logging resumes: a new call is recorded; those of the outage are not.
    let recovered = Instant::now();
    let after = loop {
        let (status, body) = control.call(&device.device_id, "stat", json!({}), Some(5_000)).await.expect("call");
        assert_eq!(status, StatusCode::OK, "{body}");
        let id = body["callId"].as_str().expect("id").to_owned();
        tokio::time::sleep(500 * MS).await;
        let (status, record) = control.request(Method::GET, &format!("/api/calls/{id}"), None).await.expect("get");
        if status == StatusCode::OK && record["outcome"] == "ok" {
            break record;
        }
        assert!(recovered.elapsed() < 60 * SECOND, "logging did not resume: {status} {record}");
    };
    println!("logging resumed {} ms after the database came back", recovered.elapsed().as_millis());
    assert_eq!(after["outcome"], "ok");
    for id in &lost {
        let (status, _) = control.request(Method::GET, &format!("/api/calls/{id}"), None).await.expect("get");
        assert_eq!(status, StatusCode::NOT_FOUND, "a record written during the outage: {id}");
    }
}

/// What a finished `dispatcher` command printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `dispatcher <args> --server <base> --token <token>`, stdin not a terminal, no colours.
async fn cli(base: &str, token: &str, args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(e2e::bin::dispatcher());
    command.args(args).args(["--server", base, "--token", token]).stdin(std::process::Stdio::null());
    for name in ["DISPATCHER_URL", "DISPATCHER_TOKEN", "DISPATCHER_CA_CERT"] {
        command.env_remove(name);
    }
    let output = tokio::time::timeout(60 * SECOND, command.output()).await.expect("in time").expect("runs");
    Run {
        code: output.status.code().expect("an exit code"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `dispatcher calls`: the table with device names, filters, `--json`, one call's record, and
/// the usage errors and refusals with their exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_lists_and_shows_calls() {
    let dispatcher = Dispatcher::start().await.expect("dispatcher");
    let base = dispatcher.base_url();
    let token = dispatcher.mint_token("alice").await.expect("token");
    let control = Control::new(&base, token.clone());
    let device = TestDevice::pair(&base, &control, "laptop").await.expect("enroll");
    let _conn = device.connect(&base, device_answers()).await.expect("stream");
    let mut ids = Vec::new();
    for (tool, timeout) in [("stat", None), ("boom", None), ("slow", Some(200)), ("stat", None)] {
        let (_, body) = control.call(&device.device_id, tool, json!({}), timeout).await.expect("call");
        ids.push(body["callId"].as_str().expect("id").to_owned());
    }
    for id in &ids {
        final_record(&control, id).await;
    }

    let run = cli(&base, &token, &["calls"]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let mut lines = run.stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header, ["WHEN", "DEVICE", "TOOL", "MODE", "OUTCOME", "DURATION", "RESULT", "CALL", "ID"]);
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 4, "{}", run.stdout);
    assert!(rows[0].contains("laptop") && rows[0].contains(&ids[3]) && rows[0].contains(" ok "), "{}", run.stdout);
    assert!(rows[1].contains("timed out") && rows[2].contains("error"), "{}", run.stdout);

    let json_of = |run: &Run| -> Value {
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        serde_json::from_str(&run.stdout).expect("one JSON document")
    };
    let count = |value: &Value| value["calls"].as_array().map_or(0, Vec::len);
    for (args, want) in [
        (vec!["calls", "--json"], 4),
        (vec!["calls", "--json", "--limit", "3"], 3),
        (vec!["calls", "--json", "--outcome", "timed out"], 1),
        (vec!["calls", "--json", "--outcome", "timed-out"], 1),
        (vec!["calls", "--json", "--device", "laptop", "--tool", "stat"], 2),
        (vec!["calls", "--json", "--device", &device.device_id, "--outcome", "error"], 1),
    ] {
        let value = json_of(&cli(&base, &token, &args).await);
        assert_eq!(count(&value), want, "{args:?}: {value}");
    }

    let run = cli(&base, &token, &["calls", &ids[1]]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    for line in ["Outcome:     error", "Error:       no such file", "Tool:        boom", "Device:      laptop ("] {
        assert!(run.stdout.contains(line), "{line:?} in\n{}", run.stdout);
    }
    let one = json_of(&cli(&base, &token, &["calls", &ids[0], "--json"]).await);
    assert_eq!((one["callId"].as_str(), one["outcome"].as_str()), (Some(ids[0].as_str()), Some("ok")));

    let unknown = cli(&base, &token, &["calls", "0a000001-0000-4000-8000-000000000001"]).await;
    assert_eq!(unknown.code, 5, "{}", unknown.stderr);
    assert!(unknown.stderr.contains("no call"), "{}", unknown.stderr);
    for args in
        [vec!["calls", &ids[0], "--tool", "stat"], vec!["calls", "--outcome", "fine"], vec!["calls", "--limit", "0"]]
    {
        let run = cli(&base, &token, &args).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
    }
    let nobody = cli(&base, &token, &["calls", "--device", "nowhere"]).await;
    assert_eq!(nobody.code, 5, "{}", nobody.stderr);
}
