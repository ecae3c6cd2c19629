//! A replica's life as Kubernetes sees it, with the real binaries: `dispatcher migrate` (the
//! Job), a clear one-line error when the database is unreachable at start, a graceful shutdown
//! bounded by the drain delay plus the grace period under load (what
//! `terminationGracePeriodSeconds` is sized by), and readiness that rides out short outages of
//! a shared dependency but not long ones (NATS, and the database).
//!
//! Not here: a 3 s NATS blip under load with every replica polled (tests/cluster.rs), the
//! manifests themselves (tests/deploy.rs).

use std::time::{Duration, Instant};

use e2e::process::dispatcher_command;
use e2e::{Answer, Control, Dispatcher, LocalCluster, NatsServer, TestDatabase, TestDevice};
use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

async fn readyz(base: &str) -> (Option<StatusCode>, String) {
    match reqwest::Client::new().get(format!("{base}/readyz")).timeout(2 * SECOND).send().await {
        Ok(response) => {
            let status = response.status();
            (Some(status), response.text().await.unwrap_or_default())
        }
        Err(error) => (None, error.to_string()),
    }
}

/// Runs `psql -c <sql>` as user postgres on the test server's `postgres` database.
fn psql(sql: &str) {
    let server = e2e::postgres::server_url();
    let output = std::process::Command::new("psql")
        .args([&format!("{server}/postgres"), "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql runs");
    assert!(output.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_once_and_exits() {
    let database = TestDatabase::create().await.expect("database");
    for round in 0..2 {
        let output = dispatcher_command(&["migrate", "--database-url", database.url()]).await.expect("migrate");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "migrate, round {round}: {stderr}");
        assert!(stderr.contains("migrations applied"), "round {round}: {stderr}");
        assert!(output.stdout.is_empty(), "migrate prints nothing on stdout");
    }
    // The schema is there: a token can be minted without a replica ever having run.
    let token = e2e::mint_token(database.url(), "alice").await.expect("token create on the migrated database");
    assert!(token.starts_with("pat_"), "{token}");
    database.cleanup().await.expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_one_clear_line() {
    let port = e2e::free_port();
    let url = format!("postgres://app:s3cret@127.0.0.1:{port}/app");
    let listen = e2e::free_addr().to_string();
    for args in [
        vec!["migrate", "--database-url", url.as_str()],
        vec!["serve", "--database-url", url.as_str(), "--listen", listen.as_str()],
    ] {
        let started = Instant::now();
        let output = dispatcher_command(&args).await.expect("dispatcher runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(started.elapsed() < 30 * SECOND, "{args:?} took {:?} to give up", started.elapsed());
        let lines: Vec<&str> = stderr.lines().filter(|line| !line.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got:\n{stderr}");
        let line = lines[0];
        assert!(line.contains(&format!("postgres://app:***@127.0.0.1:{port}/app")), "{line}");
        assert!(line.contains("check --database-url (DATABASE_URL)"), "{line}");
        assert!(line.to_lowercase().contains("refused"), "the cause is named: {line}");
        assert!(!line.contains("s3cret"), "the password stays out of the log: {line}");
    }
}

/// The shutdown under load: the replica being stopped waits for a call to a device that never
/// answers (so the whole grace period is used) while its other calls and another replica's
/// keep flowing. It must be gone within drain + grace + 1 s: never a second grace period for
/// the requests still in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_ends_within_drain_plus_grace() {
    let (drain, grace) = (2 * SECOND, 4 * SECOND);
    let mut cluster = LocalCluster::builder()
        .replicas(2)
        .configure(move |_, builder| builder.drain_delay_secs(drain.as_secs()).shutdown_grace_secs(grace.as_secs()))
        .start()
        .await
        .expect("cluster");
    let (a, b) = (cluster.url(0), cluster.url(1));
    // Echo devices on both replicas, and a silent one on the replica that will stop.
    let mut conns = Vec::new();
    let mut echo = Vec::new();
    for i in 0..4 {
        let device = cluster.pair_device(0, &format!("echo-{i}")).await.expect("pair");
        let base = if i % 2 == 0 { &a } else { &b };
        conns.push(device.connect(base, Answer::Echo).await.expect("connect"));
        echo.push(device.device_id.clone());
    }
    let silent = cluster.pair_device(0, "silent").await.expect("pair");
    let _silent_conn = silent.connect(&a, Answer::Silent).await.expect("connect");

    // Load: calls from replica B to every echo device, until stopped.
    let stop = CancellationToken::new();
    let control_b = cluster.control_at(1);
    let load = {
        let (stop, echo, control) = (stop.clone(), echo.clone(), control_b.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut next = 0;
            while !stop.is_cancelled() {
                let device = &echo[next % echo.len()];
                next += 1;
                let started = Instant::now();
                let answer = control.call(device, "probe", json!({}), Some(3000)).await;
                answers.push((started.elapsed(), answer.map(|(status, _)| status).map_err(|e| e.to_string())));
                tokio::time::sleep(20 * MS).await;
            }
            answers
        })
    };
    // The call that keeps replica A's grace busy: to the silent device, through A, 60 s.
    let control_a = cluster.control_at(0);
    let silent_id = silent.device_id.clone();
    let stuck = tokio::spawn(async move { control_a.call(&silent_id, "probe", json!({}), Some(60_000)).await });
    tokio::time::sleep(SECOND).await;

    let stopped_at = Instant::now();
    cluster.replica(0).sigterm().expect("SIGTERM");
    // Readiness fails at once, and A still answers calls through the drain delay.
    tokio::time::sleep(200 * MS).await;
    let (status, body) = readyz(&a).await;
    assert_eq!(status, Some(StatusCode::SERVICE_UNAVAILABLE), "{body}");
    assert!(body.contains("draining"), "{body}");
    let (status, answer) = cluster.control_at(0).call(&echo[0], "probe", json!({}), Some(3000)).await.expect("call");
    assert_eq!(status, StatusCode::OK, "A serves calls while draining: {answer}");

    let exit = cluster.replica_mut(0).wait_exit(drain + grace + 10 * SECOND).await.expect("A exits");
    let took = stopped_at.elapsed();
    assert!(exit.success(), "a graceful shutdown exits 0: {exit}");
    let _ = stuck.await;
    stop.cancel();
    let answers = load.await.expect("load");

    assert!(
        took <= drain + grace + SECOND,
        "shutdown took {took:?}: more than drain {drain:?} + grace {grace:?} + 1 s\n{}",
        cluster.replica(0).log_tail(30)
    );
    assert!(took >= drain + grace - 500 * MS, "the pending call kept the grace busy, yet shutdown took only {took:?}");
    // No call through B was lost: each answered 200, or 503 while a device moved off A.
    for (elapsed, answer) in &answers {
        let status = answer.as_ref().expect("B answers every call");
        assert!(matches!(status.as_u16(), 200 | 503), "call through B answered {status} after {elapsed:?}");
        assert!(*elapsed <= 4 * SECOND, "call through B answered after {elapsed:?} (timeout 3 s)");
    }
    let ok = answers.iter().filter(|(_, a)| matches!(a, Ok(StatusCode::OK))).count();
    assert!(ok > 10, "the load ran: {ok} calls answered 200");
    println!(
        "shutdown under load: drain {} s + grace {} s, gone after {} ms; {} calls through the other replica, {ok} \
         answered 200",
        drain.as_secs(),
        grace.as_secs(),
        took.as_millis(),
        answers.len()
    );
}

/// NATS down longer than the readiness grace: the replica leaves the load balancer (and its
/// streams went elsewhere at the broker grace); before the grace it stays in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_nats_outage_takes_the_replica_out_after_the_readiness_grace() {
    let grace = 3 * SECOND;
    let mut nats = NatsServer::start().await.expect("nats");
    let database = TestDatabase::create().await.expect("database");
    let replica = Dispatcher::builder()
        .nats_url(nats.url())
        .database_url(database.url())
        .broker_grace_secs(1)
        .flag("--readiness-grace-secs", grace.as_secs())
        .start()
        .await
        .expect("replica");
    let base = replica.base_url();
    let token = replica.mint_token("alice").await.expect("token");
    let device = TestDevice::pair(&base, &Control::new(&base, &token), "laptop").await.expect("pair");
    let mut conn = device.connect(&base, Answer::Echo).await.expect("connect");
    wait_status(&base, StatusCode::OK, 10 * SECOND).await;
    // The readiness watch samples NATS every 250 ms: let it see the connection up first (an
    // outage is timed from the first failed sample, which may be from before the connection).
    tokio::time::sleep(SECOND).await;

    let down_at = Instant::now();
    nats.kill();
    // Ready all through the grace (the outage is timed from its first failed sample, which is
    // after the kill) ...
    let mut first_unready = None;
    while down_at.elapsed() < grace + 5 * SECOND {
        let (status, body) = readyz(&base).await;
        if status != Some(StatusCode::OK) {
            assert!(
                down_at.elapsed() > grace,
                "unready {:?} after NATS died: {status:?} {body}\n{}",
                down_at.elapsed(),
                replica.log_tail(40)
            );
            assert!(body.contains("message broker unreachable"), "{body}");
            first_unready = Some(down_at.elapsed());
            break;
        }
        tokio::time::sleep(100 * MS).await;
    }
    // ... and out after it.
    let first_unready = first_unready.expect("still ready 5 s past the readiness grace");
    // The device was sent elsewhere at the broker grace.
    let reconnect = conn.wait_event("reconnect", 5 * SECOND).await.expect("reconnect frame");
    assert!(reconnect.contains("broker"), "{reconnect}");

    nats.restart().await.expect("nats restarts");
    let ready_after = wait_status(&base, StatusCode::OK, 15 * SECOND).await;
    println!(
        "NATS down past a {} s readiness grace: unready after {} ms, ready {} ms after NATS came back",
        grace.as_secs(),
        first_unready.as_millis(),
        ready_after.as_millis()
    );
    drop(replica);
    database.cleanup().await.expect("cleanup");
}

/// The database refusing connections for longer than the grace: the replica leaves the load
/// balancer; a shorter refusal leaves it in; when the database is back, it is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_past_the_readiness_grace_fails_readiness() {
    let grace = 4 * SECOND;
    let database = TestDatabase::create().await.expect("database");
    let replica = Dispatcher::builder()
        .database_url(database.url())
        .flag("--readiness-grace-secs", grace.as_secs())
        .start()
        .await
        .expect("replica");
    let base = replica.base_url();
    wait_status(&base, StatusCode::OK, 10 * SECOND).await;
    let name = database.name().to_owned();
    let cut = |allow: bool| {
        psql(&format!("ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {allow}"));
        if !allow {
            psql(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            ));
        }
    };

    // A 2 s blip: ready throughout.
    cut(false);
    let blip = Instant::now();
    while blip.elapsed() < 2 * SECOND {
        let (status, body) = readyz(&base).await;
        assert_eq!(status, Some(StatusCode::OK), "unready {:?} into a 2 s database blip: {body}", blip.elapsed());
        tokio::time::sleep(100 * MS).await;
    }
    cut(true);
    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(readyz(&base).await.0, Some(StatusCode::OK));

    // A long outage: out after the grace.
    cut(false);
    let down_at = Instant::now();
    let unready_after = wait_status(&base, StatusCode::SERVICE_UNAVAILABLE, grace + 6 * SECOND).await;
    assert!(unready_after > grace, "unready after {unready_after:?}, before the grace");
    let (_, body) = readyz(&base).await;
    assert!(body.contains("database unreachable"), "{body}");
    cut(true);
    let ready_after = wait_status(&base, StatusCode::OK, 10 * SECOND).await;
    println!(
        "database refused connections past a {} s grace: unready after {} ms ({} ms since the cut), ready {} ms after \
         it was back",
        grace.as_secs(),
        unready_after.as_millis(),
        down_at.elapsed().as_millis(),
        ready_after.as_millis()
    );
    drop(replica);
    database.cleanup().await.expect("cleanup");
}

/// Polls `/readyz` every 100 ms until it answers `want`; returns how long that took.
async fn wait_status(base: &str, want: StatusCode, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = readyz(base).await;
        if status == Some(want) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "/readyz not {want} after {within:?}: {status:?} {body}");
        tokio::time::sleep(100 * MS).await;
    }
}
