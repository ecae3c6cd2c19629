//! Capacity across a cluster of real processes ([`LocalCluster`]: `dispatcher` replicas on a
//! real `nats-server` and PostgreSQL): a replica at its `--max-streams` refuses new streams
//! with 503 and `Retry-After` and its devices end up on the others, none lost; a real
//! `host-agent` waits as long as it is told and moves on; and after a replica is added to a
//! loaded cluster, the others ask a few devices at a time to reconnect (`rebalance`) until the
//! new one holds near the average, while calls keep flowing, none lost or run twice.
//!
//! Devices are the harness's [`Swarm`] (each a real HTTP stream, reconnecting as `host-agent`
//! does) and one real agent. Figures are printed (`-- --nocapture`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::swarm::{enroll_many, Swarm, SwarmConfig};
use e2e::{metric, Agent, LocalCluster};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);

/// Device streams replica `index` holds, from its `/metrics`.
async fn streams_on(cluster: &LocalCluster, index: usize) -> usize {
    metric(&cluster.url(index), "dispatcher_device_streams").await.unwrap_or(0.0) as usize
}

async fn stream_counts(cluster: &LocalCluster, replicas: &[usize]) -> Vec<usize> {
    join_all(replicas.iter().map(|&i| streams_on(cluster, i))).await
}

/// One call as the backend saw it: its status (none without an answer), call id and error.
type CallRecord = (Option<StatusCode>, Option<String>, String);

/// Calls flowing to random devices through `replicas` until stopped.
struct Calls {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Vec<CallRecord>>>,
}

impl Calls {
    fn start(cluster: &LocalCluster, replicas: &[usize], workers: usize, devices: &[String]) -> Calls {
        let stop = CancellationToken::new();
        let devices = Arc::new(devices.to_vec());
        let mut tasks = Vec::new();
        for &replica in replicas {
            for worker in 0..workers {
                let control = cluster.control_at(replica);
                let (stop, devices) = (stop.clone(), devices.clone());
                tasks.push(tokio::spawn(async move {
                    let mut records = Vec::new();
                    let mut next = worker * 7 + replica;
                    while !stop.is_cancelled() {
                        let device = &devices[next % devices.len()];
                        next += 1 + (rand::random::<u32>() % 5) as usize;
                        let answer = control.call(device, "stat", json!({"path": "."}), Some(5000)).await;
                        match answer {
                            Ok((status, body)) => {
                                let id = body["callId"].as_str().map(str::to_owned);
                                let error = body["error"].as_str().unwrap_or_default().to_owned();
                                records.push((Some(status), id, error));
                            }
                            Err(error) => records.push((None, None, format!("{error:#}"))),
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    records
                }));
            }
        }
        Calls { stop, tasks }
    }

    async fn finish(self) -> Vec<CallRecord> {
        self.stop.cancel();
        let mut records = Vec::new();
        for task in self.tasks {
            records.extend(task.await.expect("caller"));
        }
        records
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_at_its_cap_sheds_new_streams_to_the_others() {
    const CAP: usize = 10;
    const DEVICES: usize = 40;
    let cluster = LocalCluster::builder()
        .replicas(2)
        .rebalance(true)
        .configure(|index, builder| if index == 0 { builder.flag("--max-streams", CAP) } else { builder })
        .start()
        .await
        .expect("cluster");
    let devices = enroll_many(&cluster.urls(), cluster.control(), DEVICES, 0, 8).await.expect("enroll");
    let ids: Vec<String> = devices.iter().map(|d| d.device_id.clone()).collect();
    // Round robin over both replicas: half of them try the capped one first.
    let swarm = Swarm::start(devices, SwarmConfig::new(cluster.urls())).expect("swarm");
    let took = swarm.wait_online(DEVICES, 60 * SECOND).await.expect("every device online");
    // Never over the cap; filled up to it as refused devices try again.
    let started = Instant::now();
    let counts = loop {
        let counts = stream_counts(&cluster, &[0, 1]).await;
        assert!(counts[0] <= CAP, "replica A holds {} streams over its cap of {CAP}", counts[0]);
        if counts[0] == CAP && counts.iter().sum::<usize>() == DEVICES {
            break counts;
        }
        assert!(started.elapsed() < 30 * SECOND, "not settled: {counts:?}, {:?}", swarm.stats());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stats = swarm.stats();
    assert!(stats.unavailable >= 1, "no stream was refused: {stats:?}");
    let refused = metric(&cluster.url(0), "dispatcher_stream_refusals_total").await.unwrap_or(0.0);
    assert_eq!(refused as u64, stats.unavailable, "every 503 the devices saw is counted");

    // A refusal is a 503 with Retry-After and a JSON error.
    let extra = cluster.pair_device(1, "one-too-many").await.expect("pair");
    let response = reqwest::Client::new()
        .get(format!("{}/api/host/stream", cluster.url(0)))
        .bearer_auth(&extra.token)
        .send()
        .await
        .expect("stream request");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert!(retry_after.as_deref().and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1), "{retry_after:?}");
    let body: serde_json::Value = response.json().await.expect("JSON error");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("--max-streams")), "{body}");

    // None lost: every device answers, wherever it is.
    let control = cluster.control_at(1);
    for id in &ids {
        let (status, body) = control.call(id, "stat", json!({}), Some(5000)).await.expect("call");
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
    }
    assert!(swarm.double_executions().is_empty());
    // Still at the cap afterwards: the rebalancer does not push devices at a full replica.
    tokio::time::sleep(3 * SECOND).await;
    let later = stream_counts(&cluster, &[0, 1]).await;
    assert_eq!(later, counts, "streams moved although the only replica under the average is full");
    println!(
        "cap of {CAP} on replica A, {DEVICES} devices: all online in {} ms, {counts:?} streams per replica, \
         {} refusals with Retry-After",
        took.as_millis(),
        stats.unavailable
    );
    swarm.stop(5 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_agent_waits_the_retry_after_of_a_full_replica_then_moves_on() {
    let cluster = LocalCluster::builder()
        .replicas(2)
        .configure(|index, builder| if index == 0 { builder.flag("--max-streams", 1) } else { builder })
        .start()
        .await
        .expect("cluster");
    // Replica A is full with one stream.
    let holder = cluster.pair_device(0, "holder").await.expect("pair");
    let _held = holder.connect(&cluster.url(0), e2e::Answer::Echo).await.expect("stream");
    let root = tempfile::tempdir().expect("root");
    let code = cluster.control().pairing_code().await.expect("code");
    let started = Instant::now();
    let mut agent = Agent::builder(cluster.url(0))
        .server(cluster.url(1))
        .code(code)
        .name("patient")
        .root(root.path())
        .spawn()
        .expect("agent");
    agent.wait_for_log("refused the stream", 30 * SECOND).await.expect("refused by the full replica");
    agent.wait_for_log("connected to", 30 * SECOND).await.expect("connected elsewhere");
    let log = agent.log();
    let line = log.lines().find(|l| l.contains("refused the stream")).expect("the refusal line");
    let waited_ms: u64 = line
        .rsplit_once("trying again in ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no delay in {line}"));
    assert!(waited_ms >= 2000, "the agent waited {waited_ms} ms, less than Retry-After: {line}");
    let devices = cluster.devices(1).await.expect("devices");
    let patient = devices.iter().find(|d| d["name"] == "patient").expect("the agent's device");
    assert_eq!(patient["online"], true);
    assert_eq!(patient["replica"], cluster.replica_id(1), "{patient}");
    println!(
        "host-agent refused by a full replica waited {waited_ms} ms, online elsewhere after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_to_a_loaded_cluster_takes_its_share_with_no_call_lost() {
    const DEVICES: usize = 120;
    let mut cluster = LocalCluster::builder().replicas(3).rebalance(true).start().await.expect("cluster");
    // Two replicas carry the load; the third joins later (same port, same id).
    cluster.stop(2, 15 * SECOND).await.expect("stop replica C");
    let devices = enroll_many(&cluster.urls()[..2], cluster.control(), DEVICES, 0, 8).await.expect("enroll");
    let ids: Vec<String> = devices.iter().map(|d| d.device_id.clone()).collect();
    let swarm = Swarm::start(devices, SwarmConfig::new(cluster.urls())).expect("swarm");
    swarm.wait_online(DEVICES, 60 * SECOND).await.expect("every device online");
    // Settled: every device on A or B, and no device asked to move for 3 s (the way devices
    // first spread may be uneven enough for A and B to even it out themselves).
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    let mut frames = swarm.stats().rebalance_frames;
    let before = loop {
        let counts = stream_counts(&cluster, &[0, 1]).await;
        let now = swarm.stats().rebalance_frames;
        if now != frames {
            frames = now;
            quiet_since = Instant::now();
        }
        if counts.iter().sum::<usize>() == DEVICES && quiet_since.elapsed() >= 3 * SECOND {
            break counts;
        }
        assert!(started.elapsed() < 30 * SECOND, "{counts:?}: {:?}", swarm.stats());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let settle_frames = frames;
    let calls = Calls::start(&cluster, &[0, 1], 3, &ids);
    tokio::time::sleep(2 * SECOND).await;
    let added = Instant::now();
    cluster.restart(2, 30 * SECOND).await.expect("replica C back");
    let average = DEVICES / 3;
    let near = average * 8 / 10;
    let mut counts;
    let took = loop {
        counts = stream_counts(&cluster, &[0, 1, 2]).await;
        if counts[2] >= near {
            break added.elapsed();
        }
        assert!(
            added.elapsed() < 60 * SECOND,
            "replica C holds {} streams after a minute (average {average}): {counts:?}\n{}",
            counts[2],
            cluster.log_tails(20)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Let it settle, calls still flowing.
    tokio::time::sleep(3 * SECOND).await;
    let records = calls.finish().await;
    let settled = stream_counts(&cluster, &[0, 1, 2]).await;
    swarm.wait_online(DEVICES, 30 * SECOND).await.expect("every device online at the end");

    let stats = swarm.stats();
    let moved = stats.rebalance_frames - settle_frames;
    assert!(moved > 0, "no device was asked to move: {stats:?}");
    assert!(moved <= (DEVICES as u64) * 2, "a herd: {moved} devices asked to move for {DEVICES} devices");
    assert_eq!(settled.iter().sum::<usize>(), DEVICES, "{settled:?}");
    assert!(
        settled.iter().all(|&n| n >= near && n <= average * 13 / 10),
        "not near the average {average}: {settled:?}"
    );
    // No call lost: every answer is the device's, `device offline` (caught between two streams,
    // nothing pushed) or nothing else; none timed out, none ran twice.
    let mut ok = 0;
    let mut offline = 0;
    for (status, call_id, error) in &records {
        match status.map(|s| s.as_u16()) {
            Some(200) => {
                ok += 1;
                let id = call_id.as_deref().expect("a 200 carries its call id");
                assert_eq!(swarm.times_executed(id), 1, "call {id} ran {} times", swarm.times_executed(id));
            }
            Some(503) if error == "device offline" => offline += 1,
            other => panic!("a call was lost: {other:?} {call_id:?} {error}"),
        }
    }
    assert!(swarm.double_executions().is_empty(), "{:?}", swarm.double_executions());
    assert!(ok > 100, "too few calls went through: {ok}");
    // A moved device's subscriptions linger until its new stream is up: calls meanwhile are
    // retried, not answered offline (a device slower than the linger to come back may be).
    assert!(offline * 100 <= ok, "{offline} calls answered offline against {ok} ok while devices moved");
    let urls = cluster.urls();
    let shed: f64 = join_all(urls.iter().map(|url| metric(url, "dispatcher_rebalance_reconnects_total")))
        .await
        .into_iter()
        .map(|m| m.unwrap_or(0.0))
        .sum();
    assert_eq!(shed as u64, stats.rebalance_frames, "every rebalance frame is counted");
    println!(
        "scale-out 2 -> 3 replicas with {DEVICES} devices: {before:?} before; replica C reached {} streams \
         ({}% of the average {average}) after {} ms; settled at {settled:?}; {} devices asked to move; \
         calls meanwhile: {ok} ok, {offline} device offline (between two streams), none timed out or run twice",
        counts[2],
        counts[2] * 100 / average,
        took.as_millis(),
        moved
    );
    swarm.stop(5 * SECOND).await;
}
