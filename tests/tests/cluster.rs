//! End to end across a cluster of real processes: three `dispatcher` replicas on a real
//! `nats-server` (or a three-node NATS cluster) and a real PostgreSQL database
//! ([`LocalCluster`]), with the harness's [`TestDevice`]s, devices of this file that reconnect
//! like an agent does ([`Roamer`]), and real `host-agent` processes.
//!
//! Each test tries to break one of ARCHITECTURE.md's invariants across replicas: a call routed
//! through three replicas, presence and offline answers everywhere, exactly-once delivery
//! under 1,000 concurrent calls, takeover, revocation and approvals across replicas, and
//! failover: a replica SIGKILLed or SIGSTOPped under load, the NATS server restarted, one node
//! of a NATS cluster lost, and a result that outlives its dispatching replica. Assertions are
//! about the invariants (every dispatch resolves by its timeout plus one second, no call is
//! pushed twice, every device comes back), never about speed; the measured figures are
//! printed (`cargo test -p e2e --test cluster -- --nocapture`).
//!
//! Not here: one replica on its own (tests/embedded.rs) and the agent's tools
//! (tests/agent.rs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use e2e::{metric, Agent, Answer, Control, LocalCluster, TestDevice};
use futures::future::join_all;
use parking_lot::Mutex;
use protocol::{CallMode, HostResult};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------------------------
// Helpers: timed calls, load, figures.

/// One dispatch as the app backend saw it.
#[derive(Debug, Clone)]
struct Record {
    /// The replica it was sent to.
    replica: usize,
    device: String,
    /// When it was sent, since the load started.
    start: Duration,
    elapsed: Duration,
    timeout: Duration,
    /// `None`: no HTTP answer at all (the replica died).
    status: Option<StatusCode>,
    body: Value,
}

impl Record {
    fn end(&self) -> Duration {
        self.start + self.elapsed
    }

    fn call_id(&self) -> Option<&str> {
        self.body["callId"].as_str()
    }

    fn ok(&self) -> bool {
        self.status == Some(StatusCode::OK)
    }
}

/// Every line of every replica's log that mentions `needle`, for a failure message.
fn mentions(cluster: &LocalCluster, needle: &str) -> String {
    (0..cluster.len())
        .flat_map(|i| {
            let log = cluster.replica(i).log();
            let id = cluster.replica_id(i).to_owned();
            log.lines().filter(|line| line.contains(needle)).map(|line| format!("{id}: {line}")).collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `POST /api/devices/{id}/calls` with the time it took.
async fn timed_call(control: &Control, device_id: &str, tool: &str, input: Value, timeout: Duration) -> Record {
    let started = Instant::now();
    let timeout_ms = u64::try_from(timeout.as_millis()).expect("timeout in ms");
    let answer = control.call(device_id, tool, input, Some(timeout_ms)).await;
    let elapsed = started.elapsed();
    let (status, body) = match answer {
        Ok((status, body)) => (Some(status), body),
        Err(error) => (None, Value::String(format!("{error:#}"))),
    };
    Record { replica: usize::MAX, device: device_id.to_owned(), start: Duration::ZERO, elapsed, timeout, status, body }
}

/// Calls flowing from some replicas to some devices until stopped.
struct Load {
    epoch: Instant,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<Vec<Record>>>,
}

impl Load {
    /// `workers` callers per replica in `replicas`, each calling a random device of `devices`
    /// with `tool`/`input` and `timeout`, one call after another.
    fn start(
        cluster: &LocalCluster,
        replicas: &[usize],
        workers: usize,
        devices: &[String],
        (tool, input): (&str, Value),
        timeout: Duration,
    ) -> Load {
        let epoch = Instant::now();
        let stop = CancellationToken::new();
        let devices = Arc::new(devices.to_vec());
        let mut tasks = Vec::new();
        for &replica in replicas {
            for worker in 0..workers {
                let control = cluster.control_at(replica);
                let (stop, devices, tool, input) = (stop.clone(), devices.clone(), tool.to_owned(), input.clone());
                tasks.push(tokio::spawn(async move {
                    let mut records = Vec::new();
                    let mut next = worker;
                    while !stop.is_cancelled() {
                        let device = &devices[next % devices.len()];
                        next += 1 + (rand::random::<u32>() % 3) as usize;
                        let start = epoch.elapsed();
                        let mut record = timed_call(&control, device, &tool, input.clone(), timeout).await;
                        record.replica = replica;
                        record.start = start;
                        let pause = if record.status.is_none() { 50 * MS } else { 10 * MS };
                        records.push(record);
                        tokio::time::sleep(pause).await;
                    }
                    records
                }));
            }
        }
        Load { epoch, stop, tasks }
    }

    /// Time since the load started.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Stops the workers (each finishes its call in flight) and returns every record.
    async fn finish(self) -> Vec<Record> {
        self.stop.cancel();
        let mut records = Vec::new();
        for task in self.tasks {
            records.extend(task.await.expect("load worker"));
        }
        records.sort_by_key(|r| r.start);
        records
    }
}

/// Invariant 1 over a load's records: every dispatch answered by `timeout` plus one second,
/// with 200, or 503 `device offline`, or 504 `device timed out`. Records sent to a replica in
/// `dead` may have no answer at all (it died under them); any other missing answer fails.
fn assert_resolved_in_time(records: &[Record], dead: &[usize], context: &str) {
    for record in records {
        let Some(status) = record.status else {
            assert!(
                dead.contains(&record.replica),
                "{context}: no answer from live replica {}: {record:?}",
                record.replica
            );
            continue;
        };
        assert!(
            record.elapsed <= record.timeout + SECOND,
            "{context}: dispatch answered after {:?} (timeout {:?}): {record:?}",
            record.elapsed,
            record.timeout
        );
        match status.as_u16() {
            200 => assert!(record.call_id().is_some(), "{context}: 200 without a callId: {record:?}"),
            503 => assert_eq!(record.body["error"], "device offline", "{context}: {record:?}"),
            504 => assert_eq!(record.body["error"], "device timed out", "{context}: {record:?}"),
            _ => panic!("{context}: unexpected answer {record:?}"),
        }
    }
}

/// "200: n, 503: n, …" for a set of records.
fn tally(records: &[Record]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for record in records {
        let key = record.status.map_or_else(|| "no answer".to_owned(), |s| s.as_u16().to_string());
        *counts.entry(key).or_default() += 1;
    }
    counts.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
}

/// The `p`-th percentile (0..=100) of `values`.
fn percentile(values: &[Duration], p: usize) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted[(sorted.len() - 1) * p / 100]
}

fn ms(duration: Duration) -> u128 {
    duration.as_millis()
}

/// Waits until replica `index` waits for no dispatch any more (its pending table is empty).
async fn assert_pending_drains(cluster: &LocalCluster, index: usize, within: Duration) {
    let started = Instant::now();
    loop {
        let pending = metric(&cluster.url(index), "pending_calls").await;
        if pending == Some(0.0) {
            return;
        }
        assert!(started.elapsed() < within, "{}: pending calls stuck at {pending:?}", cluster.replica_id(index));
        tokio::time::sleep(100 * MS).await;
    }
}

/// Asserts that every replica in `replicas` reaches every device with a 200.
async fn assert_all_reachable(
    cluster: &LocalCluster,
    replicas: &[usize],
    devices: &[String],
    tool: &str,
    input: Value,
) {
    let calls = replicas.iter().flat_map(|&replica| {
        let input = input.clone();
        devices.iter().map(move |device| {
            let control = cluster.control_at(replica);
            let input = input.clone();
            async move { (replica, timed_call(&control, device, tool, input, 10 * SECOND).await) }
        })
    });
    for (replica, record) in join_all(calls).await {
        assert!(record.ok(), "device {} not reachable from {}: {record:?}", record.device, cluster.replica_id(replica));
    }
}

// ---------------------------------------------------------------------------------------------
// Roamer: a test device that reconnects like an agent does, counting every push.

#[derive(Debug, Default)]
struct RoamState {
    /// Call id → how many times it was pushed, over every stream this device opened.
    pushes: HashMap<String, u32>,
    /// The replica of the live stream, `None` between streams.
    replica: Option<String>,
    /// Every `ready`: when, and which replica.
    connected: Vec<(Instant, String)>,
    /// A frame that ended the roaming (`superseded`, `revoked`).
    ended_by: Option<String>,
}

/// A [`TestDevice`] holding a stream somewhere in the cluster: it opens one on its first URL,
/// and when the stream closes, asks to reconnect or falls silent for `silence`, it opens one on
/// the next URL. It answers every call with [`Answer::echo_of`], POSTed to the replica of the
/// stream. `superseded` and `revoked` stop it, as they stop an agent.
struct Roamer {
    device: TestDevice,
    state: Arc<Mutex<RoamState>>,
    task: JoinHandle<()>,
}

impl Roamer {
    fn start(device: TestDevice, urls: Vec<String>, first: usize, silence: Duration) -> Roamer {
        let state: Arc<Mutex<RoamState>> = Arc::default();
        let task = tokio::spawn(roam(device.clone(), urls, first, silence, state.clone()));
        Roamer { device, state, task }
    }

    fn id(&self) -> &str {
        &self.device.device_id
    }

    fn replica(&self) -> Option<String> {
        self.state.lock().replica.clone()
    }

    /// When this device's stream last became ready on a replica, after `since`.
    fn connected_after(&self, since: Instant) -> Option<(Instant, String)> {
        self.state.lock().connected.iter().find(|(at, _)| *at > since).cloned()
    }
}

impl Drop for Roamer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn roam(device: TestDevice, urls: Vec<String>, first: usize, silence: Duration, state: Arc<Mutex<RoamState>>) {
    let mut next = first;
    loop {
        let url = urls[next % urls.len()].clone();
        next += 1;
        let counter = state.clone();
        let answer = Answer::with(move |call| {
            *counter.lock().pushes.entry(call.call_id.clone()).or_default() += 1;
            Some(Answer::echo_of(call))
        });
        // A paused replica accepts the connection and never answers: give up on it.
        let mut conn = match tokio::time::timeout(3 * SECOND, device.connect(&url, answer)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(_)) | Err(_) => {
                tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 200)).await;
                continue;
            }
        };
        {
            let mut state = state.lock();
            state.replica = Some(conn.ready.replica.clone());
            state.connected.push((Instant::now(), conn.ready.replica.clone()));
        }
        loop {
            match conn.next_frame(silence).await {
                None => break,
                Some((event, _)) if event == "reconnect" => break,
                Some((event, _)) if event == "superseded" || event == "revoked" => {
                    let mut state = state.lock();
                    state.replica = None;
                    state.ended_by = Some(event);
                    return;
                }
                Some(_) => {}
            }
        }
        state.lock().replica = None;
        drop(conn);
        tokio::time::sleep(Duration::from_millis(20 + rand::random::<u64>() % 80)).await;
    }
}

/// `count` roamers enrolled on the cluster; roamer `i` starts on replica `i % replicas`.
async fn roamers(cluster: &LocalCluster, count: usize, silence: Duration) -> Vec<Roamer> {
    let urls = cluster.urls();
    let mut roamers = Vec::new();
    for i in 0..count {
        let first = i % cluster.len();
        let device = cluster.pair_device(first, &format!("roamer-{i}")).await.expect("enroll");
        roamers.push(Roamer::start(device, urls.clone(), first, silence));
    }
    wait_roamers_online(cluster, &roamers, &[], 20 * SECOND).await;
    roamers
}

/// Waits until every roamer has a live stream on a replica not in `avoid`, and every running
/// replica agrees on where. Returns how long it took.
async fn wait_roamers_online(
    cluster: &LocalCluster,
    roamers: &[Roamer],
    avoid: &[usize],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let avoided: Vec<&str> = avoid.iter().map(|&i| cluster.replica_id(i)).collect();
    for roamer in roamers {
        loop {
            let left = within.saturating_sub(started.elapsed());
            let holder = cluster.wait_presence(roamer.id(), true, left).await.unwrap_or_else(|error| {
                panic!("{error:#}\nroamer state: {:?}\n{}", roamer.state.lock().ended_by, cluster.log_tails(30))
            });
            let here = roamer.replica();
            if holder.is_some() && holder == here && !avoided.contains(&holder.as_deref().unwrap_or("")) {
                break;
            }
            assert!(
                started.elapsed() < within,
                "roamer {} not settled: presence says {holder:?}, the device says {here:?} (ended by {:?})",
                roamer.id(),
                roamer.state.lock().ended_by
            );
            tokio::time::sleep(100 * MS).await;
        }
    }
    started.elapsed()
}

/// Invariant 2 over roamers: no call was pushed twice, and no roamer was told `superseded` or
/// `revoked`. Returns the number of pushes.
fn assert_pushed_once(roamers: &[Roamer]) -> usize {
    let mut total = 0;
    for roamer in roamers {
        let state = roamer.state.lock();
        assert_eq!(state.ended_by, None, "roamer {} was stopped", roamer.id());
        for (call_id, count) in &state.pushes {
            assert_eq!(*count, 1, "call {call_id} was pushed {count} times to device {}", roamer.id());
        }
        total += state.pushes.len();
    }
    total
}

/// Every 200 answer's call id was pushed exactly once to its device.
fn assert_answers_pushed(records: &[Record], roamers: &[Roamer]) {
    let by_id: HashMap<&str, &Roamer> = roamers.iter().map(|r| (r.id(), r)).collect();
    for record in records.iter().filter(|r| r.ok()) {
        let call_id = record.call_id().expect("call id");
        let pushes = by_id[record.device.as_str()].state.lock().pushes.get(call_id).copied();
        assert_eq!(pushes, Some(1), "answered call {call_id} was not pushed exactly once to {}", record.device);
    }
}

// ---------------------------------------------------------------------------------------------
// Agents.

/// Pushes of each call id, from an agent's log: the calls it ran, refused as duplicates, or
/// refused as expired.
fn agent_pushes(log: &str) -> HashMap<String, u32> {
    let mut pushes = HashMap::new();
    for line in log.lines() {
        let counted = line.contains(" received")
            || line.contains("is a duplicate")
            || line.contains("arrived after its deadline");
        if !counted {
            continue;
        }
        let Some(at) = line.find("call ") else { continue };
        if let Some(id) = line[at + 5..].split_whitespace().next() {
            if id.len() == 36 {
                *pushes.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    pushes
}

/// When the agent's log says it connected to a replica after `since` (its first such line),
/// and which replica: the agent's own view of its failover.
fn agent_connected_after(log: &str, since: DateTime<Utc>) -> Option<(DateTime<Utc>, String)> {
    log.lines().filter(|line| line.contains(" connected to ")).find_map(|line| {
        let at = DateTime::parse_from_rfc3339(line.split_whitespace().next()?).ok()?.with_timezone(&Utc);
        let replica = line.rsplit_once("(replica ")?.1.trim_end_matches(')').to_owned();
        (at > since).then_some((at, replica))
    })
}

/// The agents' failover times after `since`: for each agent in `ids`, the time until its log
/// says it connected again (waiting up to 15 s for it).
async fn agent_failover_times(agents: &[AgentDevice], ids: &[String], since: DateTime<Utc>) -> Vec<Duration> {
    let mut times = Vec::new();
    for agent in agents.iter().filter(|agent| ids.contains(&agent.id)) {
        let started = Instant::now();
        let at = loop {
            if let Some((at, _)) = agent_connected_after(&agent.agent.log(), since) {
                break at;
            }
            assert!(started.elapsed() < 15 * SECOND, "{} never reconnected\n{}", agent.name, agent.agent.log_tail(20));
            tokio::time::sleep(50 * MS).await;
        };
        times.push((at - since).to_std().unwrap_or_default());
    }
    times
}

/// A real `host-agent` enrolled as `name`, its roots and its device id.
struct AgentDevice {
    agent: Agent,
    name: String,
    id: String,
    _root: tempfile::TempDir,
}

/// Spawns `count` agents with a temporary root holding `hello.txt`. Agent `i` lists the
/// replicas starting from `first(i)`; every agent's keepalive is `keepalive_secs`.
async fn spawn_agents(
    cluster: &LocalCluster,
    count: usize,
    keepalive_secs: u64,
    first: impl Fn(usize) -> usize,
) -> Vec<AgentDevice> {
    let urls = cluster.urls();
    let mut pending = Vec::new();
    for i in 0..count {
        let root = tempfile::Builder::new().prefix("e2e-cluster-root-").tempdir().expect("temp root");
        std::fs::write(root.path().join("hello.txt"), format!("hello from agent {i}\nsecond line\n")).expect("write");
        let start = first(i);
        let code = cluster.control().pairing_code().await.expect("pairing code");
        let mut builder = Agent::builder(urls[start % urls.len()].clone());
        for k in 1..urls.len() {
            builder = builder.server(urls[(start + k) % urls.len()].clone());
        }
        let name = format!("agent-{i:02}");
        let agent = builder
            .code(code)
            .name(&name)
            .root(root.path())
            .keepalive_secs(keepalive_secs)
            .spawn()
            .expect("spawn host-agent");
        pending.push((agent, name, root));
    }
    // Every agent enrolled and online.
    let started = Instant::now();
    let ids: HashMap<String, String> = loop {
        let devices = cluster.devices(0).await.expect("device list");
        let online: HashMap<String, String> = devices
            .iter()
            .filter(|d| d["online"] == true)
            .filter_map(|d| Some((d["name"].as_str()?.to_owned(), d["id"].as_str()?.to_owned())))
            .collect();
        if pending.iter().all(|(_, name, _)| online.contains_key(name)) {
            break online;
        }
        assert!(
            started.elapsed() < 30 * SECOND,
            "agents not all online after 30 s: {} of {count}\n{}",
            online.len(),
            pending.iter().map(|(a, _, _)| a.log_tail(20)).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(100 * MS).await;
    };
    pending
        .into_iter()
        .map(|(agent, name, root)| AgentDevice { id: ids[&name].clone(), agent, name, _root: root })
        .collect()
}

/// Invariant 2 over agents: no call id pushed to an agent twice. Returns every pushed id.
fn assert_agents_pushed_once(agents: &[AgentDevice]) -> HashMap<String, HashMap<String, u32>> {
    let mut all = HashMap::new();
    for agent in agents {
        let pushes = agent_pushes(&agent.agent.log());
        for (call_id, count) in &pushes {
            assert_eq!(
                *count,
                1,
                "call {call_id} was pushed {count} times to {}\n{}",
                agent.name,
                agent.agent.log_tail(40)
            );
        }
        all.insert(agent.id.clone(), pushes);
    }
    all
}

// ---------------------------------------------------------------------------------------------
// Routing, presence, exactly-once.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_crosses_three_replicas_and_a_thousand_run_exactly_once() {
    let cluster = LocalCluster::start(3).await.expect("cluster");
    let (a, b, c) = (0, 1, 2);

    // Stream on B, dispatch from A, result POSTed to C.
    let device = cluster.pair_device(b, "crossing").await.expect("enroll");
    let conn = device
        .connect(&cluster.url(b), Answer::PostTo(cluster.url(c), Box::new(Answer::Echo)))
        .await
        .expect("stream on B");
    assert_eq!(conn.ready.replica, "replica-b");
    let holder = cluster.wait_presence(&device.device_id, true, 5 * SECOND).await.expect("presence");
    assert_eq!(holder.as_deref(), Some("replica-b"));
    let record = timed_call(&cluster.control_at(a), &device.device_id, "probe", json!({"n": 1}), 10 * SECOND).await;
    assert!(record.ok(), "{record:?}");
    assert_eq!(record.body["result"]["input"], json!({"n": 1}));
    let call_id = record.call_id().expect("call id").to_owned();
    assert_eq!(conn.times_received(&call_id), 1);
    // The device records its POST once C answered it, which may come after the dispatch did.
    let started = Instant::now();
    while conn.posted.lock().is_empty() && started.elapsed() < 5 * SECOND {
        tokio::time::sleep(10 * MS).await;
    }
    assert_eq!(conn.posted.lock().as_slice(), &[(call_id.clone(), StatusCode::OK)], "result POSTed to C, delivered");
    println!("crossing: stream on B, dispatch on A, result via C: {} ms", ms(record.elapsed));

    // Presence: the same on every replica, in the device and in the list.
    for view in cluster.presence(&device.device_id).await.expect("presence") {
        assert_eq!((view.1, view.2.as_deref()), (true, Some("replica-b")), "replica {}", view.0);
    }
    for index in 0..3 {
        let listed = cluster.devices(index).await.expect("list");
        let entry = listed.iter().find(|d| d["id"] == device.device_id.as_str()).expect("listed");
        assert_eq!((entry["online"].clone(), entry["replica"].clone()), (json!(true), json!("replica-b")));
    }

    // Offline: answered at once from every replica.
    let offline = cluster.pair_device(a, "never-connected").await.expect("enroll");
    for index in 0..3 {
        let record = timed_call(&cluster.control_at(index), &offline.device_id, "probe", json!({}), 20 * SECOND).await;
        assert_eq!(record.status, Some(StatusCode::SERVICE_UNAVAILABLE), "{record:?}");
        assert_eq!(record.body["error"], "device offline");
        assert!(
            record.elapsed < SECOND,
            "offline answered after {:?} from {}",
            record.elapsed,
            cluster.replica_id(index)
        );
        println!("offline from {}: {} ms", cluster.replica_id(index), ms(record.elapsed));
    }
    let views = cluster.presence(&offline.device_id).await.expect("presence");
    assert!(views.iter().all(|(_, online, replica)| !online && replica.is_none()), "{views:?}");

    // 1,000 concurrent calls from all replicas to 20 devices spread over the replicas, each
    // device POSTing its results to the next replica.
    let mut devices = Vec::new();
    for i in 0..20 {
        let home = i % 3;
        let paired = cluster.pair_device(home, &format!("load-{i}")).await.expect("enroll");
        let answer = Answer::PostTo(cluster.url((home + 1) % 3), Box::new(Answer::Echo));
        let conn = paired.connect(&cluster.url(home), answer).await.expect("stream");
        devices.push((paired, conn));
    }
    for (paired, conn) in &devices {
        let holder = cluster.wait_presence(&paired.device_id, true, 5 * SECOND).await.expect("presence");
        assert_eq!(holder.as_deref(), Some(conn.ready.replica.as_str()));
    }
    let started = Instant::now();
    let calls = (0..1000).map(|k| {
        let control = cluster.control_at(k % 3);
        let device_id = devices[k % 20].0.device_id.clone();
        async move {
            let mut record = timed_call(&control, &device_id, "probe", json!({"k": k}), 30 * SECOND).await;
            record.replica = k % 3;
            (k, record)
        }
    });
    let records = join_all(calls).await;
    let wall = started.elapsed();
    let mut answered_ids = HashSet::new();
    for (k, record) in &records {
        assert_eq!(record.status, Some(StatusCode::OK), "call {k}: {record:?}");
        assert_eq!(record.body["result"]["input"], json!({"k": k}), "call {k} got another call's result");
        assert!(answered_ids.insert(record.call_id().expect("call id").to_owned()), "a call id answered twice");
    }
    let mut pushed_total = 0;
    for (index, (_, conn)) in devices.iter().enumerate() {
        let calls = conn.calls.lock();
        for (call_id, count) in calls.iter() {
            assert_eq!(
                *count,
                1,
                "device {index}: call {call_id} pushed {count} times\n{}",
                mentions(&cluster, call_id)
            );
            assert!(answered_ids.contains(call_id), "device {index} got a call nobody answered: {call_id}");
        }
        assert_eq!(calls.len(), 50, "device {index} got {} calls, not 50", calls.len());
        pushed_total += calls.values().sum::<u32>();
        let refused: Vec<_> =
            conn.posted.lock().iter().filter(|(_, status)| *status != StatusCode::OK).cloned().collect();
        assert!(refused.is_empty(), "device {index}: POSTs refused: {refused:?}");
    }
    assert_eq!(pushed_total, 1000);
    let latencies: Vec<Duration> = records.iter().map(|(_, r)| r.elapsed).collect();
    println!(
        "1000 concurrent calls over 3 replicas and 20 devices: all 200, each id pushed once (total {pushed_total}); \
         wall {} ms, latency p50 {} ms, p99 {} ms, max {} ms",
        ms(wall),
        ms(percentile(&latencies, 50)),
        ms(percentile(&latencies, 99)),
        ms(percentile(&latencies, 100))
    );
    for index in 0..3 {
        assert_pending_drains(&cluster, index, 5 * SECOND).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_agents_answer_from_every_replica() {
    let cluster = LocalCluster::start(3).await.expect("cluster");
    let agents = spawn_agents(&cluster, 3, 2, |i| i).await;
    for (i, agent) in agents.iter().enumerate() {
        let holder = cluster.wait_presence(&agent.id, true, 10 * SECOND).await.expect("presence");
        assert_eq!(holder.as_deref(), Some(cluster.replica_id(i)), "agent {i} sits on its first server");
    }
    let mut answered = Vec::new();
    for replica in 0..3 {
        let control = cluster.control_at(replica);
        for (i, agent) in agents.iter().enumerate() {
            let listing = timed_call(&control, &agent.id, "list_directory", json!({"path": "."}), 10 * SECOND).await;
            assert!(listing.ok() && listing.body["ok"] == true, "{listing:?}");
            let names: Vec<&str> = listing.body["result"]["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .filter_map(|e| e["name"].as_str())
                .collect();
            assert_eq!(names, ["hello.txt"], "agent {i} from {}", cluster.replica_id(replica));
            let read = timed_call(&control, &agent.id, "read_file", json!({"path": "hello.txt"}), 10 * SECOND).await;
            assert!(read.ok() && read.body["ok"] == true, "{read:?}");
            assert_eq!(read.body["result"]["content"], format!("hello from agent {i}\nsecond line\n"));
            answered.extend([listing, read]);
        }
    }
    // And concurrently: 90 reads from all replicas at once.
    let calls = (0..90).map(|k| {
        let control = cluster.control_at(k % 3);
        let agent = &agents[(k / 3) % agents.len()];
        async move {
            timed_call(&control, &agent.id, "read_file", json!({"path": "hello.txt", "startLine": 2}), 20 * SECOND)
                .await
        }
    });
    let concurrent = join_all(calls).await;
    for record in &concurrent {
        assert!(record.ok() && record.body["result"]["content"] == "second line\n", "{record:?}");
    }
    answered.extend(concurrent);
    let pushes = assert_agents_pushed_once(&agents);
    for record in &answered {
        let call_id = record.call_id().expect("call id");
        assert_eq!(pushes[&record.device].get(call_id), Some(&1), "call {call_id} not run once by its agent");
    }
    let latencies: Vec<Duration> = answered.iter().map(|r| r.elapsed).collect();
    println!(
        "host-agents: {} calls from 3 replicas to 3 agents, each run once; p50 {} ms, max {} ms",
        answered.len(),
        ms(percentile(&latencies, 50)),
        ms(percentile(&latencies, 100))
    );
}

// ---------------------------------------------------------------------------------------------
// Takeover, revocation, approvals.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_stream_wins_across_replicas() {
    let cluster = LocalCluster::start(3).await.expect("cluster");
    let (a, b, c) = (0, 1, 2);
    let device = cluster.pair_device(a, "twice").await.expect("enroll");
    let mut on_a = device.connect(&cluster.url(a), Answer::Echo).await.expect("stream on A");
    cluster.wait_presence(&device.device_id, true, 5 * SECOND).await.expect("online");
    let opened = Instant::now();
    let on_c = device.connect(&cluster.url(c), Answer::Echo).await.expect("stream on C");
    on_a.wait_event("superseded", 2 * SECOND).await.expect("A's stream is superseded");
    let superseded_after = opened.elapsed();
    on_a.wait_closed(SECOND).await.expect("A's stream closes");
    let holder = cluster.wait_presence(&device.device_id, true, 2 * SECOND).await.expect("presence agrees");
    assert_eq!(holder.as_deref(), Some("replica-c"));
    let record = timed_call(&cluster.control_at(b), &device.device_id, "probe", json!({}), 5 * SECOND).await;
    assert!(record.ok(), "{record:?}");
    let call_id = record.call_id().expect("id");
    assert_eq!((on_a.times_received(call_id), on_c.times_received(call_id)), (0, 1));
    println!("takeover: A's stream superseded {} ms after the stream on C opened", ms(superseded_after));
    drop(on_c);

    // Racing opens on all three replicas at once: one stream survives, and it gets the call.
    for round in 0..5 {
        let opens = (0..3).map(|replica| {
            let url = cluster.url(replica);
            let device = device.clone();
            async move { device.connect(&url, Answer::Echo).await.expect("stream") }
        });
        let conns = join_all(opens).await;
        let started = Instant::now();
        let live = loop {
            let live: Vec<&e2e::DeviceConn> = conns.iter().filter(|conn| !conn.is_closed()).collect();
            if live.len() <= 1 {
                break live;
            }
            assert!(started.elapsed() < 2 * SECOND, "round {round}: {} streams still open after 2 s", live.len());
            tokio::time::sleep(20 * MS).await;
        };
        assert_eq!(live.len(), 1, "round {round}: every stream was closed");
        let survivor = live[0].ready.replica.clone();
        let holder = cluster.wait_presence(&device.device_id, true, 2 * SECOND).await.expect("presence");
        assert_eq!(holder.as_deref(), Some(survivor.as_str()), "round {round}");
        let record =
            timed_call(&cluster.control_at(round % 3), &device.device_id, "probe", json!({}), 5 * SECOND).await;
        assert!(record.ok(), "round {round}: {record:?}");
        let call_id = record.call_id().expect("id");
        let received: Vec<u32> = conns.iter().map(|conn| conn.times_received(call_id)).collect();
        assert_eq!(received.iter().sum::<u32>(), 1, "round {round}: {received:?}");
        println!("racing opens, round {round}: {survivor} kept the stream after {} ms", ms(started.elapsed()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_on_every_replica_within_a_second() {
    let cluster = LocalCluster::start(3).await.expect("cluster");
    let (a, b, c) = (0, 1, 2);
    let device = cluster.pair_device(a, "doomed").await.expect("enroll");
    let mut conn = device.connect(&cluster.url(a), Answer::Silent).await.expect("stream on A");
    cluster.wait_presence(&device.device_id, true, 5 * SECOND).await.expect("online");
    // The token is cached on every replica.
    for index in 0..3 {
        let (status, _) =
            device.post_result(&cluster.url(index), &HostResult::success(uuid(), json!(null))).await.expect("post");
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let on_b = cluster.control_at(b);
    let device_id = device.device_id.clone();
    let pending = tokio::spawn(async move { timed_call(&on_b, &device_id, "slow", json!({}), 20 * SECOND).await });
    conn.wait_event("call", 5 * SECOND).await.expect("the call reached A's stream");

    let revoked_at = Instant::now();
    let (status, body) = cluster.control_at(c).delete_device(&device.device_id).await.expect("delete");
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    conn.wait_event("revoked", SECOND).await.expect("A's stream gets revoked within a second");
    conn.wait_closed(SECOND).await.expect("A's stream closes");
    let stream_closed = revoked_at.elapsed();
    let record = tokio::time::timeout(2 * SECOND, pending).await.expect("the pending dispatch resolves").expect("task");
    let failed_after = revoked_at.elapsed();
    assert_eq!(record.status, Some(StatusCode::SERVICE_UNAVAILABLE), "{record:?}");
    assert_eq!(record.body["error"], "device offline");
    assert!(failed_after <= SECOND + 200 * MS, "pending dispatch on B failed {failed_after:?} after the revocation");
    for index in 0..3 {
        assert_eq!(device.stream_status(&cluster.url(index)).await.expect("stream"), StatusCode::UNAUTHORIZED);
        let (status, _) =
            device.post_result(&cluster.url(index), &HostResult::success(uuid(), json!(null))).await.expect("post");
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{}", cluster.replica_id(index));
        let (status, _) = cluster.control_at(index).device(&device.device_id).await.expect("get");
        assert_eq!(status, StatusCode::NOT_FOUND, "a revoked device is gone on {}", cluster.replica_id(index));
    }
    let refused_after = revoked_at.elapsed();
    assert!(refused_after < 2 * SECOND, "token still accepted somewhere {refused_after:?} after the revocation");
    println!(
        "revocation on C: stream on A closed after {} ms, pending dispatch on B failed after {} ms, token refused \
         on all replicas by {} ms",
        ms(stream_closed),
        ms(failed_after),
        ms(refused_after)
    );
}

/// `dispatcher token revoke`, run as an operator runs it in a replica's pod (with `NATS_URL`
/// and the subject prefix set): an api token cached on every replica is refused on every one
/// within a second. Run without the broker (a missed publish), the replicas learn it from the
/// database within a second too. A pairing code the revoked token minted, still unused, does not
/// enroll on any replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_revocation_reaches_every_replica_within_a_second() {
    let cluster = LocalCluster::start(2).await.expect("cluster");
    let nats_env = [("NATS_URL", cluster.nats_urls()), ("DISPATCHER_SUBJECT_PREFIX", "pulsn.host".to_owned())];
    let nats_env: Vec<(&str, &str)> = nats_env.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let bystander = cluster.control().clone();
    for (what, env) in [("published on NATS", nats_env.as_slice()), ("database only", &[][..])] {
        let token = cluster.mint_token("revokee").await.expect("mint");
        let controls: Vec<Control> = (0..cluster.len()).map(|i| Control::new(cluster.url(i), token.clone())).collect();
        let code = controls[1].pairing_code().await.expect("a code minted on replica 1 before the revocation");
        for control in &controls {
            let (status, _) = control.devices().await.expect("devices");
            assert_eq!(status, StatusCode::OK, "the token works (and is cached) on {}", control.base_url);
        }
        e2e::process::revoke_token_with_env(cluster.database_url(), &token[..12], env).await.expect("revoke");
        let refused = join_all(controls.iter().map(|control| control.time_until_refused(40 * SECOND))).await;
        let refused: Vec<Option<Duration>> = refused.into_iter().map(|r| r.expect("request")).collect();
        let shown: Vec<String> =
            refused.iter().map(|r| r.map_or("still accepted".into(), |d| format!("{} ms", ms(d)))).collect();
        println!("api token revoked ({what}): refused on the replicas after {shown:?} (from the command's exit)");
        for (index, after) in refused.iter().enumerate() {
            let after = after.unwrap_or_else(|| panic!("{what}: still accepted on replica {index} after 40 s"));
            assert!(after < 2 * SECOND, "{what}: replica {index} accepted the revoked token for {after:?}");
        }
        for index in 0..cluster.len() {
            let (status, body) = TestDevice::enroll_raw(&cluster.url(index), &json!({"code": code, "name": "late"}))
                .await
                .expect("enroll");
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: a code of the revoked token enrolled: {body}");
        }
        let (status, _) = bystander.devices().await.expect("devices");
        assert_eq!(status, StatusCode::OK, "another token is untouched");
    }
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_raced_on_three_replicas_apply_once() {
    let cluster = LocalCluster::start(3).await.expect("cluster");
    let device = cluster.pair_device(1, "approver").await.expect("enroll");
    let applies = Arc::new(AtomicUsize::new(0));
    let counter = applies.clone();
    let answer = Answer::with(move |call| {
        if call.mode == Some(CallMode::Apply) {
            counter.fetch_add(1, Ordering::SeqCst);
            Some(HostResult::success(call.call_id.clone(), json!({"applied": call.input})))
        } else {
            let plan = json!({"tool": call.tool, "summary": "write", "preconditions": {"absent": true}});
            Some(HostResult::proposal(call.call_id.clone(), plan))
        }
    });
    let _conn = device.connect(&cluster.url(1), answer).await.expect("stream on B");
    cluster.wait_presence(&device.device_id, true, 5 * SECOND).await.expect("online");
    for round in 0..5 {
        let record = timed_call(
            cluster.control(),
            &device.device_id,
            "write_file",
            json!({"path": "f", "content": round}),
            10 * SECOND,
        )
        .await;
        assert!(record.ok() && record.body["proposal"] == true, "{record:?}");
        let proposal_id = record.body["proposalId"].as_str().expect("proposalId").to_owned();
        let before = applies.load(Ordering::SeqCst);
        let approvals = (0..3).map(|replica| {
            let control = cluster.control_at(replica);
            let proposal_id = proposal_id.clone();
            async move { control.approve(&proposal_id).await.expect("approve") }
        });
        let answers = join_all(approvals).await;
        let statuses: Vec<u16> = answers.iter().map(|(status, _)| status.as_u16()).collect();
        assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 1, "round {round}: {answers:?}");
        assert_eq!(statuses.iter().filter(|&&s| s == 409).count(), 2, "round {round}: {answers:?}");
        assert_eq!(applies.load(Ordering::SeqCst) - before, 1, "round {round}: applied more than once");
        let applied = answers.iter().find(|(status, _)| *status == StatusCode::OK).expect("one").1.clone();
        assert_eq!(applied["result"]["applied"], json!({"path": "f", "content": round}), "the stored input");
        for replica in 0..3 {
            let (status, proposal) = cluster.control_at(replica).proposal(&proposal_id).await.expect("proposal");
            assert_eq!((status, proposal["status"].as_str()), (StatusCode::OK, Some("applied")));
        }
        println!("approvals raced on 3 replicas, round {round}: statuses {statuses:?}, one apply");
    }
}

// ---------------------------------------------------------------------------------------------
// Failover.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_under_load_loses_nothing_twice_and_devices_come_back() {
    let mut cluster = LocalCluster::start(3).await.expect("cluster");
    let victim = 0;
    // Half of the agents start on replica A, the rest on B and C.
    let agents = spawn_agents(&cluster, 16, 2, |i| if i < 8 { 0 } else { 1 + i % 2 }).await;
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let mut on_victim = Vec::new();
    for agent in &agents {
        let holder = cluster.wait_presence(&agent.id, true, 10 * SECOND).await.expect("presence");
        if holder.as_deref() == Some(cluster.replica_id(victim)) {
            on_victim.push(agent.id.clone());
        }
    }
    assert_eq!(on_victim.len(), 8, "half the agents on A");

    let timeout = 3 * SECOND;
    let load = Load::start(&cluster, &[0, 1, 2], 2, &ids, ("list_directory", json!({"path": "."})), timeout);
    tokio::time::sleep(2 * SECOND).await;
    let killed_at = Instant::now();
    let killed_at_wall = Utc::now();
    let killed_at_load = load.now();
    cluster.kill(victim).await;

    // Until every agent is back on a survivor, as the survivors see it.
    let mut back: HashMap<String, Duration> = HashMap::new();
    while back.len() < ids.len() {
        assert!(killed_at.elapsed() < 30 * SECOND, "agents not back after 30 s: {} of {}", back.len(), ids.len());
        for device in cluster.devices(1).await.expect("list on B") {
            let (Some(id), Some(replica)) = (device["id"].as_str(), device["replica"].as_str()) else { continue };
            if device["online"] == true && replica != cluster.replica_id(victim) {
                back.entry(id.to_owned()).or_insert_with(|| killed_at.elapsed());
            }
        }
        tokio::time::sleep(100 * MS).await;
    }
    tokio::time::sleep(2 * SECOND).await;
    let records = load.finish().await;

    assert_resolved_in_time(&records, &[victim], "kill -9 of replica A");
    let pushes = assert_agents_pushed_once(&agents);
    for record in records.iter().filter(|r| r.ok()) {
        let call_id = record.call_id().expect("id");
        assert_eq!(pushes[&record.device].get(call_id), Some(&1), "answered call {call_id} not run once by its agent");
    }
    assert_all_reachable(&cluster, &[1, 2], &ids, "list_directory", json!({"path": "."})).await;
    for index in [1, 2] {
        assert_pending_drains(&cluster, index, 10 * SECOND).await;
    }

    let seen: Vec<Duration> = on_victim.iter().map(|id| back[id]).collect();
    let moved = agent_failover_times(&agents, &on_victim, killed_at_wall).await;
    let after: Vec<Record> = records.iter().filter(|r| r.start >= killed_at_load).cloned().collect();
    let survivors: Vec<Record> = records.iter().filter(|r| r.replica != victim).cloned().collect();
    let executed: usize = pushes.values().map(HashMap::len).sum();
    println!(
        "kill -9 of replica A (8 of 16 agents): {} dispatches ({}), {} on survivors ({}), {} after the kill ({}); \
         {executed} calls pushed, none twice; agents reconnected after p50 {} ms, max {} ms; seen online on \
         replica B (polling) after p50 {} ms, max {} ms",
        records.len(),
        tally(&records),
        survivors.len(),
        tally(&survivors),
        after.len(),
        tally(&after),
        ms(percentile(&moved, 50)),
        ms(percentile(&moved, 100)),
        ms(percentile(&seen, 50)),
        ms(percentile(&seen, 100))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_call() {
    let mut cluster = LocalCluster::start(3).await.expect("cluster");
    let agents = spawn_agents(&cluster, 9, 2, |i| i % 3).await;
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let timeout = 5 * SECOND;
    let load = Load::start(&cluster, &[0, 1, 2], 2, &ids, ("list_directory", json!({"path": "."})), timeout);
    tokio::time::sleep(SECOND).await;

    // Each replica in turn: SIGTERM (fail readiness, close streams with `reconnect`, drain its
    // pending calls), start it again on its port, wait until it is ready.
    let mut windows = Vec::new();
    let mut moved = Vec::new();
    for index in 0..3 {
        let mut on_replica = Vec::new();
        for id in &ids {
            let holder = cluster.wait_presence(id, true, 10 * SECOND).await.expect("presence");
            if holder.as_deref() == Some(cluster.replica_id(index)) {
                on_replica.push(id.clone());
            }
        }
        let stopped_at = load.now();
        let stopped_wall = Utc::now();
        cluster.stop(index, 15 * SECOND).await.expect("graceful stop");
        cluster.restart(index, 30 * SECOND).await.expect("restart");
        windows.push((index, stopped_at, load.now()));
        moved.extend(agent_failover_times(&agents, &on_replica, stopped_wall).await);
        tokio::time::sleep(SECOND).await;
    }
    let records = load.finish().await;

    // A replica under restart may refuse connections (nothing was accepted); nothing else may
    // go unanswered.
    for record in records.iter().filter(|r| r.status.is_none()) {
        let restarting = windows
            .iter()
            .any(|&(index, from, to)| record.replica == index && record.start >= from && record.start <= to);
        let refused = record.body.as_str().is_some_and(|e| e.contains("connect") || e.contains("Connection refused"));
        assert!(restarting && refused, "a dispatch went unanswered: {record:?}");
    }
    let answered: Vec<Record> = records.iter().filter(|r| r.status.is_some()).cloned().collect();
    assert_resolved_in_time(&answered, &[], "rolling restart");
    let pushes = assert_agents_pushed_once(&agents);
    // No call was lost: every call an agent received was answered with its result.
    let outcome: HashMap<&str, &Record> = answered.iter().filter_map(|r| Some((r.call_id()?, r))).collect();
    for (device, calls) in &pushes {
        for call_id in calls.keys() {
            if let Some(record) = outcome.get(call_id.as_str()) {
                assert!(record.ok(), "call {call_id} reached device {device} but was answered {record:?}");
            }
        }
    }
    let timed_out: Vec<&Record> = answered.iter().filter(|r| r.status == Some(StatusCode::GATEWAY_TIMEOUT)).collect();
    assert!(timed_out.is_empty(), "calls lost in the rolling restart: {timed_out:?}");
    assert_all_reachable(&cluster, &[0, 1, 2], &ids, "list_directory", json!({"path": "."})).await;
    println!(
        "rolling restart of 3 replicas (SIGTERM, restart, ready): {} dispatches ({}); {} calls pushed, none twice, \
         none lost; {} agent moves, reconnected after p50 {} ms, max {} ms",
        records.len(),
        tally(&records),
        pushes.values().map(HashMap::len).sum::<usize>(),
        moved.len(),
        ms(percentile(&moved, 50)),
        ms(percentile(&moved, 100))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_pushes_nothing_stale_when_it_resumes() {
    let mut cluster = LocalCluster::builder().keepalive_secs(1).start().await.expect("cluster");
    let paused = 1;
    let devices = roamers(&cluster, 9, 2 * SECOND).await;
    let ids: Vec<String> = devices.iter().map(|r| r.id().to_owned()).collect();
    let on_paused: Vec<usize> =
        (0..devices.len()).filter(|&i| devices[i].replica().as_deref() == Some(cluster.replica_id(paused))).collect();
    assert_eq!(on_paused.len(), 3);

    let timeout = 4 * SECOND;
    let load = Load::start(&cluster, &[0, 2], 2, &ids, ("probe", json!({})), timeout);
    tokio::time::sleep(SECOND).await;
    let paused_at = Instant::now();
    cluster.pause(paused).expect("SIGSTOP");
    let moved_in = wait_roamers_online(&cluster, &devices, &[paused], 15 * SECOND).await;
    let moved: Vec<Duration> = on_paused
        .iter()
        .map(|&i| devices[i].connected_after(paused_at).expect("reconnected").0.duration_since(paused_at))
        .collect();
    // Stay paused well past the devices' patience, then resume.
    tokio::time::sleep((5 * SECOND).saturating_sub(paused_at.elapsed())).await;
    let paused_for = paused_at.elapsed();
    cluster.resume(paused).expect("SIGCONT");
    let resumed_at = Instant::now();
    let during = load.finish().await;
    cluster.wait_ready(paused, 10 * SECOND).await.expect("the resumed replica is ready again");
    let ready_after = resumed_at.elapsed();

    // After resuming: every dispatch from every replica succeeds, nothing is pushed twice.
    let load = Load::start(&cluster, &[0, 1, 2], 2, &ids, ("probe", json!({})), timeout);
    tokio::time::sleep(3 * SECOND).await;
    let afterwards = load.finish().await;

    assert_resolved_in_time(&during, &[], "while replica B was paused");
    assert_resolved_in_time(&afterwards, &[], "after replica B resumed");
    let failed: Vec<&Record> = afterwards.iter().filter(|r| !r.ok()).collect();
    assert!(failed.is_empty(), "dispatches failed after the resume: {failed:?}");
    let pushed = assert_pushed_once(&devices);
    assert_answers_pushed(&during, &devices);
    assert_answers_pushed(&afterwards, &devices);
    // One stream per device: every replica agrees, nobody is on B, and B holds no stream.
    wait_roamers_online(&cluster, &devices, &[paused], 5 * SECOND).await;
    assert_eq!(metric(&cluster.url(paused), "device_streams").await, Some(0.0), "B still holds streams");
    assert_all_reachable(&cluster, &[0, 1, 2], &ids, "probe", json!({})).await;

    println!(
        "SIGSTOP of replica B for {} ms (3 of 9 devices): moved in p50 {} ms, max {} ms (all settled after {} ms); \
         while paused {} dispatches ({}); B ready {} ms after SIGCONT; afterwards {} dispatches ({}); {pushed} calls \
         pushed, none twice",
        ms(paused_for),
        ms(percentile(&moved, 50)),
        ms(percentile(&moved, 100)),
        ms(moved_in),
        during.len(),
        tally(&during),
        ms(ready_after),
        afterwards.len(),
        tally(&afterwards)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_passes_over_a_frozen_replica_and_keeps_its_stream_when_it_wakes() {
    let mut cluster = LocalCluster::builder().keepalive_secs(1).start().await.expect("cluster");
    let (a, b, c) = (0, 1, 2);
    // The agent lists A, B, C: when A dies it tries B first, which is frozen.
    let agents = spawn_agents(&cluster, 1, 1, |_| a).await;
    let agent = &agents[0];
    assert_eq!(cluster.wait_presence(&agent.id, true, 5 * SECOND).await.expect("online").as_deref(), Some("replica-a"));
    cluster.pause(b).expect("SIGSTOP B");
    let killed_wall = Utc::now();
    cluster.kill(a).await;
    let started = Instant::now();
    let holder = loop {
        let (status, device) = cluster.control_at(c).device(&agent.id).await.expect("device on C");
        if status == StatusCode::OK && device["online"] == true {
            break device["replica"].as_str().unwrap_or_default().to_owned();
        }
        assert!(
            started.elapsed() < 15 * SECOND,
            "the agent did not get past frozen replica B within 15 s\n{}",
            agent.agent.log_tail(20)
        );
        tokio::time::sleep(100 * MS).await;
    };
    assert_eq!(holder, "replica-c");
    let moved = agent_failover_times(&agents, std::slice::from_ref(&agent.id), killed_wall).await;

    // B wakes up (frozen for 5 s, past every keepalive) with the agent's abandoned stream
    // request in its socket buffer: it must not take the device away from its stream on C.
    tokio::time::sleep((5 * SECOND).saturating_sub(started.elapsed())).await;
    cluster.resume(b).expect("SIGCONT B");
    cluster.wait_ready(b, 10 * SECOND).await.expect("B ready");
    tokio::time::sleep(3 * SECOND).await;
    let mut agents = agents;
    let agent = &mut agents[0];
    assert!(agent.agent.is_running(), "the agent exited after B woke up\n{}", agent.agent.log_tail(20));
    let holder = cluster.wait_presence(&agent.id, true, 5 * SECOND).await.expect("presence agrees");
    assert_eq!(holder.as_deref(), Some("replica-c"), "the stream moved off C\n{}", agent.agent.log_tail(20));
    for index in [b, c] {
        let record =
            timed_call(&cluster.control_at(index), &agent.id, "list_directory", json!({"path": "."}), 5 * SECOND).await;
        assert!(record.ok(), "{record:?}");
    }
    println!(
        "an agent on A (killed) with B frozen: on C after {} ms (its stream request to B given up); B woke up and \
         left the stream on C",
        ms(moved[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_nats_server_under_load() {
    let mut cluster = LocalCluster::start(3).await.expect("cluster");
    let devices = roamers(&cluster, 9, 4 * SECOND).await;
    let ids: Vec<String> = devices.iter().map(|r| r.id().to_owned()).collect();
    let timeout = 2 * SECOND;
    let load = Load::start(&cluster, &[0, 1, 2], 2, &ids, ("probe", json!({})), timeout);
    tokio::time::sleep(1500 * MS).await;

    let down_at = Instant::now();
    let down_at_load = load.now();
    cluster.kill_nats(0);
    // Readiness fails everywhere while NATS is down.
    let mut unready_after = Duration::ZERO;
    for index in 0..3 {
        loop {
            if matches!(cluster.readyz(index).await, Ok(StatusCode::SERVICE_UNAVAILABLE)) {
                unready_after = unready_after.max(down_at.elapsed());
                break;
            }
            assert!(down_at.elapsed() < 5 * SECOND, "{} still ready 5 s after NATS died", cluster.replica_id(index));
            tokio::time::sleep(50 * MS).await;
        }
    }
    tokio::time::sleep((3 * SECOND).saturating_sub(down_at.elapsed())).await;
    for index in 0..3 {
        assert_eq!(cluster.readyz(index).await.expect("readyz"), StatusCode::SERVICE_UNAVAILABLE);
    }
    let down_for = down_at.elapsed();
    cluster.restart_nats(0).await.expect("nats-server restarts on its port");
    let up_at = Instant::now();
    let up_at_load = load.now();
    for index in 0..3 {
        cluster.wait_ready(index, 10 * SECOND).await.expect("ready again");
    }
    let ready_after = up_at.elapsed();
    let settled_after = wait_roamers_online(&cluster, &devices, &[], 20 * SECOND).await + ready_after;
    tokio::time::sleep(2 * SECOND).await;
    let records = load.finish().await;

    assert_resolved_in_time(&records, &[], "NATS restart");
    let pushed = assert_pushed_once(&devices);
    assert_answers_pushed(&records, &devices);
    assert_all_reachable(&cluster, &[0, 1, 2], &ids, "probe", json!({})).await;
    let first_ok = records.iter().filter(|r| r.ok() && r.start >= up_at_load).map(|r| r.end() - up_at_load).min();
    let first_ok = first_ok.expect("a dispatch succeeded after the restart");
    let outage: Vec<Record> =
        records.iter().filter(|r| r.end() >= down_at_load && r.start < up_at_load).cloned().collect();
    println!(
        "NATS killed for {} ms: every replica unready within {} ms; after the restart replicas ready in {} ms, first \
         dispatch answered 200 after {} ms, all 9 devices back after {} ms; {} dispatches ({}), during the outage \
         ({}); {pushed} calls pushed, none twice",
        ms(down_for),
        ms(unready_after),
        ms(ready_after),
        ms(first_ok),
        ms(settled_after),
        records.len(),
        tally(&records),
        tally(&outage)
    );
}

/// Which NATS node serves most replicas (by the client names on its `/connz`), and their names.
async fn busiest_nats_node(cluster: &LocalCluster) -> (usize, Vec<String>) {
    let mut best = (0, Vec::new());
    for index in 0..cluster.nats_len() {
        let url = format!("{}/connz", cluster.nats_node(index).monitor_url());
        let connz: Value = reqwest::get(url).await.expect("connz").json().await.expect("connz json");
        let names: Vec<String> = connz["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .filter(|name| name.starts_with("replica-"))
            .map(str::to_owned)
            .collect();
        if names.len() > best.1.len() {
            best = (index, names);
        }
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_node_of_a_nats_cluster_under_load() {
    let mut cluster = LocalCluster::builder().nats_nodes(3).start().await.expect("cluster");
    let devices = roamers(&cluster, 9, 4 * SECOND).await;
    let ids: Vec<String> = devices.iter().map(|r| r.id().to_owned()).collect();
    let timeout = 2 * SECOND;
    let load = Load::start(&cluster, &[0, 1, 2], 2, &ids, ("probe", json!({})), timeout);
    tokio::time::sleep(1500 * MS).await;

    let (node, clients) = busiest_nats_node(&cluster).await;
    let killed_at_load = load.now();
    let killed_at = Instant::now();
    cluster.kill_nats(node);
    tokio::time::sleep(6 * SECOND).await;
    let records = load.finish().await;
    for index in 0..3 {
        cluster.wait_ready(index, 5 * SECOND).await.expect("ready on the surviving NATS nodes");
    }

    assert_resolved_in_time(&records, &[], "NATS node loss");
    let pushed = assert_pushed_once(&devices);
    assert_answers_pushed(&records, &devices);
    let after: Vec<Record> = records.iter().filter(|r| r.start >= killed_at_load).cloned().collect();
    let failures: Vec<&Record> = after.iter().filter(|r| !r.ok()).collect();
    let recovered_after = failures.iter().map(|r| r.end() - killed_at_load).max().unwrap_or(Duration::ZERO);
    let late: Vec<&&Record> = failures.iter().filter(|r| r.start >= killed_at_load + 4 * SECOND).collect();
    assert!(late.is_empty(), "dispatches still failing 4 s after the node died: {late:?}");
    assert!(after.iter().filter(|r| r.ok()).count() > 10, "calls kept working after the node died");
    wait_roamers_online(&cluster, &devices, &[], 10 * SECOND).await;
    assert_all_reachable(&cluster, &[0, 1, 2], &ids, "probe", json!({})).await;
    println!(
        "NATS node {node} killed (serving {clients:?}) {} ms into the load: {} dispatches after it ({}), {} failed \
         during the transition, last failure answered {} ms after the kill; {pushed} calls pushed, none twice \
         (observed for {} ms)",
        ms(killed_at_load),
        after.len(),
        tally(&after),
        failures.len(),
        ms(recovered_after),
        ms(killed_at.elapsed())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_after_its_dispatching_replica_died_is_404() {
    let mut cluster = LocalCluster::start(3).await.expect("cluster");
    let (a, b, c) = (0, 1, 2);
    let device = cluster.pair_device(b, "late").await.expect("enroll");
    let mut conn = device.connect(&cluster.url(b), Answer::Silent).await.expect("stream on B");
    cluster.wait_presence(&device.device_id, true, 5 * SECOND).await.expect("online");
    let on_a = cluster.control_at(a);
    let device_id = device.device_id.clone();
    let dispatch = tokio::spawn(async move { timed_call(&on_a, &device_id, "slow", json!({}), 20 * SECOND).await });
    let data = conn.wait_event("call", 5 * SECOND).await.expect("the call reached B's stream");
    let call: protocol::HostCall = serde_json::from_str(&data).expect("call");
    cluster.kill(a).await;
    let record = dispatch.await.expect("task");
    assert_eq!(record.status, None, "the dispatch died with A: {record:?}");

    let result = HostResult::success(call.call_id.clone(), json!({"late": true}));
    for index in [c, b] {
        let started = Instant::now();
        let (status, body) = device.post_result(&cluster.url(index), &result).await.expect("post");
        assert_eq!(
            (status, body),
            (StatusCode::NOT_FOUND, json!({"delivered": false})),
            "{}",
            cluster.replica_id(index)
        );
        println!("late result via {}: 404 in {} ms", cluster.replica_id(index), ms(started.elapsed()));
    }
    // A restarted A takes a new route tag: still nobody waits for that call.
    cluster.restart(a, 20 * SECOND).await.expect("A restarts");
    let (status, _) = device.post_result(&cluster.url(a), &result).await.expect("post");
    assert_eq!(status, StatusCode::NOT_FOUND, "the restarted replica knows nothing of the old call");

    // Nothing crashed: every replica still serves calls.
    for index in [b, c] {
        assert!(cluster.replica_mut(index).is_running(), "{} exited", cluster.replica_id(index));
    }
    let other = cluster.pair_device(c, "alive").await.expect("enroll");
    let _other_conn = other.connect(&cluster.url(c), Answer::Echo).await.expect("stream on C");
    cluster.wait_presence(&other.device_id, true, 5 * SECOND).await.expect("online");
    for index in [a, b, c] {
        let record = timed_call(&cluster.control_at(index), &other.device_id, "probe", json!({}), 5 * SECOND).await;
        assert!(record.ok(), "{}: {record:?}", cluster.replica_id(index));
    }
    assert_eq!(conn.times_received(&call.call_id), 1);
}

/// A replica SIGKILLed while it waits on an apply leaves no proposal stuck in `applying`: the
/// surviving replica's sweep fails it with `device timed out` shortly after the apply's
/// deadline (it is never pushed again), and the device's late result, POSTed to the survivor,
/// completes it with the real outcome, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_during_an_apply_leaves_no_proposal_stuck() {
    const APPLY_TIMEOUT: Duration = Duration::from_secs(2);
    const STALE_APPLY: Duration = Duration::from_secs(1);
    let mut cluster = LocalCluster::builder()
        .replicas(2)
        .configure(|_, builder| {
            builder
                .env("DISPATCHER_APPLY_TIMEOUT_SECS", APPLY_TIMEOUT.as_secs().to_string())
                .env("DISPATCHER_STALE_APPLY_SECS", STALE_APPLY.as_secs().to_string())
        })
        .start()
        .await
        .expect("cluster");
    let (a, b) = (0, 1);
    let device = cluster.pair_device(b, "held").await.expect("enroll");
    // Proposes in auto mode; holds the apply (no answer) and keeps it for the test.
    let held: Arc<Mutex<Option<protocol::HostCall>>> = Arc::default();
    let answer = Answer::with({
        let held = held.clone();
        move |call| {
            if call.mode == Some(CallMode::Apply) {
                *held.lock() = Some(call.clone());
                None
            } else {
                let plan = json!({"tool": call.tool, "summary": "write f", "preconditions": {"absent": true}});
                Some(HostResult::proposal(call.call_id.clone(), plan))
            }
        }
    });
    let conn = device.connect(&cluster.url(b), answer).await.expect("stream on B");
    cluster.wait_presence(&device.device_id, true, 5 * SECOND).await.expect("online");
    let record =
        timed_call(&cluster.control_at(a), &device.device_id, "write_file", json!({"path": "f"}), 10 * SECOND).await;
    assert!(record.ok() && record.body["proposal"] == true, "{record:?}");
    let proposal_id = record.body["proposalId"].as_str().expect("proposalId").to_owned();

    // A waits on the apply; the device holds it; A dies.
    let approving = tokio::spawn({
        let (control, id) = (cluster.control_at(a), proposal_id.clone());
        async move { control.approve(&id).await }
    });
    let approved_at = Instant::now();
    let apply = loop {
        if let Some(call) = held.lock().clone() {
            break call;
        }
        assert!(approved_at.elapsed() < 5 * SECOND, "the apply never reached the device");
        tokio::time::sleep(10 * MS).await;
    };
    cluster.kill(a).await;
    assert!(approving.await.expect("task").is_err(), "the approval died with A");

    let on_b = cluster.control_at(b);
    let (status, stored) = on_b.proposal(&proposal_id).await.expect("proposal");
    assert_eq!((status, stored["status"].as_str()), (StatusCode::OK, Some("applying")), "{stored}");
    for (what, (status, body)) in [
        ("approve", on_b.approve(&proposal_id).await.expect("approve")),
        ("reject", on_b.reject(&proposal_id).await.expect("reject")),
    ] {
        assert_eq!(status, StatusCode::CONFLICT, "{what} while applying: {body}");
    }

    // The sweep on B fails it after the deadline plus the margin.
    let limit = APPLY_TIMEOUT + 2 * STALE_APPLY + 3 * SECOND;
    let swept = loop {
        let (_, stored) = on_b.proposal(&proposal_id).await.expect("proposal");
        if stored["status"] != "applying" {
            break stored;
        }
        if approved_at.elapsed() > 20 * SECOND {
            panic!("proposal still applying {} ms after the approval: {stored}", ms(approved_at.elapsed()));
        }
        tokio::time::sleep(100 * MS).await;
    };
    let failed_after = approved_at.elapsed();
    println!("stuck apply: failed by the sweep {} ms after the approval", ms(failed_after));
    assert_eq!(swept["status"], "failed", "{swept}");
    assert_eq!(swept["result"]["error"], "device timed out", "{swept}");
    assert_eq!(swept["result"]["callId"], apply.call_id.as_str(), "{swept}");
    assert!(failed_after <= limit, "failed after {failed_after:?}, want at most {limit:?}");
    let (status, _) = on_b.approve(&proposal_id).await.expect("approve");
    assert_eq!(status, StatusCode::CONFLICT, "a failed apply is never approved again");

    // The device's late result completes it with the real outcome, once.
    let late = HostResult::success(apply.call_id.clone(), json!({"written": 7}));
    let (status, body) = device.post_result(&cluster.url(b), &late).await.expect("post");
    assert_eq!((status, body.clone()), (StatusCode::OK, json!({"delivered": true})), "late result: {body}");
    let (_, completed) = on_b.proposal(&proposal_id).await.expect("proposal");
    assert_eq!(completed["status"], "applied", "{completed}");
    assert_eq!(completed["result"], serde_json::to_value(&late).expect("json"), "{completed}");
    let (status, body) = device.post_result(&cluster.url(b), &late).await.expect("post again");
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"delivered": false})), "recorded once");
    let (_, still) = on_b.proposal(&proposal_id).await.expect("proposal");
    assert_eq!(still, completed, "a second POST changes nothing");
    tokio::time::sleep(500 * MS).await;
    assert_eq!(conn.times_received(&apply.call_id), 1, "the apply was pushed once");
    assert_eq!(conn.total_received(), 2, "the proposal and the apply, nothing else");
}
