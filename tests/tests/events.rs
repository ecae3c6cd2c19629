//! `GET /api/events` end to end: the real `dispatcher` binary as a two-replica cluster (NATS and
//! PostgreSQL, [`LocalCluster`]), listeners on replica A, every change made on replica B: a
//! real `host-agent` enrolling and connecting, its proposal created through B and approved
//! through A, its revocation; and the harness's devices for a latency figure over many stream
//! openings and closings. Another user's listener hears none of it.
//!
//! Not here: the event rules in detail (dispatcher/tests/events.rs, both buses in process).

use std::time::{Duration, Instant};

use e2e::events::EventStream;
use e2e::{Agent, Answer, LocalCluster};
use reqwest::StatusCode;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(1);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_on_b_is_heard_on_a() {
    let cluster = LocalCluster::start(2).await.expect("two replicas");
    let (a, b) = (cluster.url(0), cluster.url(1));
    let mallory_token = cluster.mint_token("mallory").await.unwrap();
    let mut alice = EventStream::open(&a, cluster.token()).await.expect("listener on A");
    let mut mallory = EventStream::open(&a, &mallory_token).await.expect("another user's listener on A");
    assert_eq!(alice.snapshot, json!({"devices": [], "proposals": []}));
    for header in [None, Some("Bearer nope".to_owned()), Some(format!("Basic {}", cluster.token()))] {
        assert_eq!(EventStream::status(&a, header.as_deref()).await.unwrap(), StatusCode::UNAUTHORIZED, "{header:?}");
    }

    // A real agent enrolls and connects on B.
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("notes.txt"), "one\n").unwrap();
    let code = cluster.control_at(1).pairing_code().await.unwrap();
    let started = Instant::now();
    let mut agent = Agent::builder(&b).code(code).root(root.path()).name("workstation").spawn().expect("agent");
    let online = alice
        .wait_for("device", Duration::from_secs(20), |d| d["name"] == "workstation" && d["online"] == true)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail(30)));
    assert_eq!(online.data["replica"], cluster.replica_id(1));
    let id = online.data["id"].as_str().expect("id").to_owned();
    eprintln!("events e2e: agent start to online on A: {} ms", (online.at - started).as_millis());
    // Its manifest follows: tools and roots.
    alice
        .wait_for("device", Duration::from_secs(10), |d| d["id"] == id.as_str() && d["tools"].is_array())
        .await
        .expect("the manifest is told");

    // A proposal created through B, approved through A: created, then applied.
    let started = Instant::now();
    let (status, body) = cluster
        .control_at(1)
        .call(&id, "write_file", json!({"path": "notes.txt", "content": "two\n"}), Some(10_000))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let proposal_id = body["proposalId"].as_str().expect("proposalId").to_owned();
    let created = alice.wait_for("proposal", WITHIN, |p| p["id"] == proposal_id.as_str()).await.unwrap();
    assert_eq!(created.data["status"], "pending");
    assert!(created.data["proposal"]["diff"].as_str().is_some_and(|d| d.contains("+two")), "{}", created.data);
    let created_ms = (created.at - started).as_millis();
    let started = Instant::now();
    let (status, applied) = cluster.control_at(0).approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{applied}");
    let done = alice
        .wait_for("proposal", WITHIN, |p| p["id"] == proposal_id.as_str() && p["status"] != "applying")
        .await
        .unwrap();
    assert_eq!(done.data["status"], "applied", "{:#?}", alice.history);
    assert_eq!(std::fs::read_to_string(root.path().join("notes.txt")).unwrap(), "two\n");
    eprintln!(
        "events e2e: proposal created (B) heard on A in {created_ms} ms; approved (A) applied in {} ms",
        (done.at - started).as_millis()
    );

    // Revoked through B: told on A; the agent exits 4.
    let (status, _) = cluster.control_at(1).delete_device(&id).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    alice.wait_for("device", WITHIN, |d| d["id"] == id.as_str() && d["revoked"] == true).await.unwrap();
    assert_eq!(agent.exit_code(Duration::from_secs(10)).await.unwrap(), 4);

    mallory.expect_only_keepalives(Duration::from_secs(1)).await.expect("another user hears nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_changes_on_b_reach_a_within_a_second() {
    let cluster = LocalCluster::start(2).await.expect("two replicas");
    let (a, b) = (cluster.url(0), cluster.url(1));
    let mut alice = EventStream::open(&a, cluster.token()).await.expect("listener on A");
    let device = cluster.pair_device(1, "laptop").await.unwrap();
    let id = device.device_id.clone();
    alice.wait_for("device", WITHIN, |d| d["id"] == id.as_str()).await.expect("enrollment told");

    let mut opened = Vec::new();
    let mut closed = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let conn = device.connect(&b, Answer::Echo).await.unwrap();
        let heard = alice.wait_for("device", WITHIN, |d| d["id"] == id.as_str() && d["online"] == true).await.unwrap();
        opened.push(heard.at - started);
        let started = Instant::now();
        drop(conn);
        let heard = alice.wait_for("device", WITHIN, |d| d["id"] == id.as_str() && d["online"] == false).await.unwrap();
        closed.push(heard.at - started);
    }
    opened.sort();
    closed.sort();
    eprintln!(
        "events e2e latency B→A over 20 cycles: stream opened p50 {} ms, max {} ms; stream closed p50 {} ms, max {} ms",
        percentile(&opened, 0.5).as_millis(),
        opened[opened.len() - 1].as_millis(),
        percentile(&closed, 0.5).as_millis(),
        closed[closed.len() - 1].as_millis(),
    );
    assert!(opened.iter().chain(&closed).all(|d| *d < WITHIN));
}
