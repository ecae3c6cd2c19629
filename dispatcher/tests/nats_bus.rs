//! The NATS bus against real `nats-server` processes: two or three replicas in one process,
//! each a [`Hub`] with its own route tag, a [`NatsBus`] and a [`Dispatcher`], meeting on a
//! server (or a three-server cluster) this file starts on free ports, kills and restarts.
//!
//! Devices are played by the tests: they read `Frame::Call` from a [`DeviceStream`] and post
//! results through any replica's `deliver`. No mocks.
//!
//! The registry's part in cluster mode, the record of where each device's newest stream opened
//! (a column the same UPDATE that issues the epoch writes), is played by [`Directory`], one per
//! test process: what `Registry::next_stream_epoch` and `Registry::last_stream` do against a
//! database, as a map. The registry's own suite tests those two against SQLite and PostgreSQL.
//!
//! Not here: HTTP, the registry, the host agent (end-to-end suites in `tests/`).

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use dispatcher::bus::nats::{NatsBus, NatsOptions};
use dispatcher::bus::{Bus, BusError, Health, Routed, StreamDirectory, StreamRoute};
use dispatcher::core::{Close, DeviceStream, DispatchRequest, Dispatcher, Frame, Hub};
use futures::StreamExt;
use parking_lot::Mutex;
use protocol::sse::ReconnectReason;
use protocol::subject::{new_call_id, route_tag, DeliverAck, Subjects};
use protocol::{HostCall, HostResult};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

// ---- the record of stream opens ----

/// Where each device's newest stream opened, as the registry's `devices` table keeps it.
#[derive(Default)]
struct Directory(Mutex<HashMap<String, StreamRoute>>);

impl Directory {
    /// A stream of `device` opened with `epoch` on the replica of `route`. The registry's
    /// counter makes the newest epoch the last written; here the largest epoch is kept.
    fn opened(&self, device: &str, route: u32, epoch: u64) {
        let mut streams = self.0.lock();
        let entry = streams.entry(device.to_owned()).or_insert(StreamRoute { route, epoch });
        if entry.epoch <= epoch {
            *entry = StreamRoute { route, epoch };
        }
    }
}

#[async_trait::async_trait]
impl StreamDirectory for Directory {
    async fn last_stream(&self, device_id: &str) -> Result<Option<StreamRoute>, BusError> {
        Ok(self.0.lock().get(device_id).copied())
    }
}

static DIRECTORY: LazyLock<Arc<Directory>> = LazyLock::new(Arc::default);

// ---- nats-server processes ----

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// One `nats-server` process on a fixed port, killed on drop.
struct NatsServer {
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    async fn start() -> Self {
        Self::start_with(free_port(), Vec::new()).await
    }

    async fn start_with(port: u16, extra: Vec<String>) -> Self {
        let mut server = Self { port, extra, child: None };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on the PATH");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "nats-server on port {} did not start", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, no goodbye to its clients.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three servers routed into one cluster, mesh checked before returning.
async fn start_cluster() -> Vec<NatsServer> {
    let cluster_ports = [free_port(), free_port(), free_port()];
    let mut servers = Vec::new();
    for (i, port) in cluster_ports.iter().enumerate() {
        let routes: Vec<String> = cluster_ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, other)| format!("nats://127.0.0.1:{other}"))
            .collect();
        let extra = vec![
            "--cluster_name".into(),
            "pulsn-test".into(),
            "--cluster".into(),
            format!("nats://127.0.0.1:{port}"),
            "--routes".into(),
            routes.join(","),
        ];
        servers.push(NatsServer::start_with(free_port(), extra).await);
    }
    // Every server must see subscriptions made on every other one.
    let clients: Vec<async_nats::Client> =
        futures::future::join_all(servers.iter().map(|s| async_nats::connect(s.url())))
            .await
            .into_iter()
            .map(|client| client.expect("probe client"))
            .collect();
    let mut probes = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let mut sub = client.subscribe(format!("probe.{i}")).await.expect("probe subscription");
        let client = client.clone();
        probes.push(tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                if let Some(reply) = message.reply {
                    let _ = client.publish(reply, "ok".into()).await;
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for (i, client) in clients.iter().enumerate() {
        for j in 0..clients.len() {
            if i == j {
                continue;
            }
            loop {
                let asked =
                    tokio::time::timeout(Duration::from_millis(200), client.request(format!("probe.{j}"), "?".into()));
                if let Ok(Ok(_)) = asked.await {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not form");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    for probe in probes {
        probe.abort();
    }
    servers
}

// ---- replicas and devices ----

/// One dispatcher replica: hub, NATS bus, core. Stops its tasks on drop.
struct Replica {
    name: String,
    hub: Arc<Hub>,
    bus: Arc<NatsBus>,
    dispatcher: Dispatcher,
    cancel: CancellationToken,
}

impl Replica {
    async fn start(name: &str, urls: &str, options: NatsOptions) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let cancel = CancellationToken::new();
        let name = format!("{name}-{:04x}", rand::random::<u16>());
        let hub = Hub::new(name.clone(), rand::random());
        hub.clone().spawn_stall_watch(Duration::from_secs(60), cancel.child_token()).expect("stall watch");
        let directory = DIRECTORY.clone();
        let bus = NatsBus::connect(urls, Subjects::default(), hub.clone(), directory, options, cancel.child_token())
            .await
            .expect("NATS bus");
        assert!(bus.wait_connected(Duration::from_secs(10)).await, "{name} did not connect");
        let dispatcher = Dispatcher::new(hub.clone(), bus.clone());
        Self { name, hub, bus, dispatcher, cancel }
    }

    /// A stream of `device` opens here with `epoch`, recorded first as the stream handler does.
    async fn connect(&self, device: &str, epoch: u64) -> DeviceStream {
        DIRECTORY.opened(device, self.hub.route_tag(), epoch);
        self.dispatcher.connect(device, epoch).await.expect("stream registered")
    }

    fn dispatch(&self, device: &str, request: DispatchRequest) -> JoinHandle<HostResult> {
        let dispatcher = self.dispatcher.clone();
        let device = device.to_owned();
        tokio::spawn(async move { dispatcher.dispatch(&device, request).await })
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn three(urls: &str) -> (Replica, Replica, Replica) {
    let options = NatsOptions::default();
    (
        Replica::start("a", urls, options.clone()).await,
        Replica::start("b", urls, options.clone()).await,
        Replica::start("c", urls, options).await,
    )
}

fn device_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn request(n: u64, timeout: Duration) -> DispatchRequest {
    DispatchRequest::new("echo", json!({ "n": n }), timeout)
}

fn echo(call: &HostCall) -> HostResult {
    HostResult::success(call.call_id.clone(), json!({ "echo": call.input }))
}

async fn next_frame(stream: &mut DeviceStream, within: Duration) -> Frame {
    tokio::time::timeout(within, stream.frames.recv()).await.expect("a frame in time").expect("stream open")
}

async fn next_call(stream: &mut DeviceStream) -> HostCall {
    match next_frame(stream, Duration::from_secs(5)).await {
        Frame::Call(call) => call.decode().expect("a call's JSON"),
        other => panic!("expected a call, got {other:?}"),
    }
}

async fn no_frame(stream: &mut DeviceStream, within: Duration) {
    if let Ok(frame) = tokio::time::timeout(within, stream.frames.recv()).await {
        panic!("expected no frame, got {frame:?}");
    }
}

/// Plays a device: answers every call with an echo, posting through the replicas in turn,
/// each post on its own task as an agent runs calls side by side. Returns the call ids it saw
/// and the delivery acks it got.
fn answer(stream: DeviceStream, device: String, via: Vec<Dispatcher>) -> JoinHandle<(Vec<String>, Vec<DeliverAck>)> {
    tokio::spawn(async move {
        // Move the whole stream in (not just its frames): its guard keeps it registered.
        let stream = stream;
        let mut seen = Vec::new();
        let mut posts = tokio::task::JoinSet::new();
        while let Some(frame) = stream.frames.recv().await {
            match frame {
                Frame::Call(call) => {
                    seen.push(call.call_id.clone());
                    let call = call.decode().expect("a call's JSON");
                    let (poster, device) = (via[seen.len() % via.len()].clone(), device.clone());
                    posts.spawn(async move { poster.deliver(&device, echo(&call)).await });
                }
                Frame::Close(_) => break,
            }
        }
        let acks = posts.join_all().await;
        (seen, acks)
    })
}

async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_crosses_replicas_and_its_result_routes_home() {
    let server = NatsServer::start().await;
    let (a, b, c) = three(&server.url()).await;
    let device = device_id();
    let mut stream = b.connect(&device, 1).await;

    let mut round_trips = Vec::new();
    for n in 0..20 {
        let started = Instant::now();
        let pending = a.dispatch(&device, request(n, Duration::from_secs(5)));
        let call = next_call(&mut stream).await;
        assert_eq!(call.input, json!({ "n": n }));
        assert!(call.deadline.is_some(), "the deadline travels with the call");
        if n == 0 {
            // The wrong device: refused, and the call still waits for the right one.
            let other = device_id();
            assert_eq!(c.dispatcher.deliver(&other, echo(&call)).await, DeliverAck::Forbidden);
        }
        assert_eq!(c.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Delivered);
        let result = pending.await.expect("dispatch task");
        round_trips.push(started.elapsed());
        assert!(result.ok, "{result:?}");
        assert_eq!(result.result, Some(json!({ "echo": { "n": n } })));
        // Answered already: a second post is unknown, from any replica.
        assert_eq!(b.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Unknown);
    }
    round_trips.sort();
    eprintln!(
        "cross-replica dispatch round trip (A -> B's stream -> C -> A): median {:.2} ms, max {:.2} ms",
        ms(round_trips[round_trips.len() / 2]),
        ms(round_trips[round_trips.len() - 1])
    );

    // A call id with a route tag nobody has: unknown, at once (no responders).
    let stranger = HostResult::success(new_call_id(rand::random(), rand::random()), json!(1));
    let started = Instant::now();
    assert_eq!(c.dispatcher.deliver(&device, stranger).await, DeliverAck::Unknown);
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());

    // A replica that dispatched a call and went away: its results are unknown, at once.
    let d = Replica::start("d", &server.url(), NatsOptions::default()).await;
    let d_tag = route_tag(d.hub.route_tag());
    let orphan = d.dispatch(&device, request(99, Duration::from_secs(30)));
    let call = next_call(&mut stream).await;
    assert!(call.call_id.starts_with(&d_tag));
    orphan.abort();
    drop(d);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(c.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Unknown);
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());

    for replica in [&a, &b, &c] {
        assert_eq!(replica.hub.pending_calls(), 0, "{}", replica.name);
        assert_eq!(replica.bus.pending_requests(), 0, "{}", replica.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_learnt_from_takeovers_or_the_directory_and_corrected_by_the_holder() {
    let server = NatsServer::start().await;
    let (a, b, _c) = three(&server.url()).await;
    let device = device_id();
    let mut on_a = a.connect(&device, 1).await;
    // B heard A's takeover: it knows where the device is without asking the directory.
    eventually("B hears the takeover", Duration::from_secs(2), || b.bus.remembered_routes() == 1).await;

    // D starts after the takeover: it finds the device through the directory, and remembers.
    let d = Replica::start("d", &server.url(), NatsOptions::default()).await;
    assert_eq!(d.bus.remembered_routes(), 0);
    let holder = d.dispatcher.is_online(&device).await.expect("presence").expect("online");
    assert_eq!((holder.replica, holder.epoch), (a.name.clone(), 1));
    assert_eq!(d.bus.remembered_routes(), 1);
    let pending = d.dispatch(&device, request(1, Duration::from_secs(5)));
    let call = next_call(&mut on_a).await;
    assert_eq!(b.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Delivered);
    assert!(pending.await.expect("dispatch").ok);

    // The stream ends; D still remembers A. A answers that it has no stream of the device,
    // the directory names no newer one: offline at once, and D forgets the route.
    drop(on_a);
    eventually("A lets go of the device", Duration::from_secs(2), || a.bus.held_device_count() == 0).await;
    assert_eq!(d.bus.remembered_routes(), 1);
    let started = Instant::now();
    let result = d.dispatcher.dispatch(&device, request(2, Duration::from_secs(10))).await;
    assert!(result.is_offline(), "{result:?}");
    assert!(started.elapsed() < Duration::from_millis(500), "offline took {:?}", started.elapsed());
    assert_eq!(d.bus.remembered_routes(), 0);
    assert_eq!(d.dispatcher.is_online(&device).await.expect("presence"), None);

    // A newer stream on B: D hears it and calls go there.
    let mut on_b = b.connect(&device, 2).await;
    eventually("D hears the takeover", Duration::from_secs(2), || d.bus.remembered_routes() == 1).await;
    let pending = d.dispatch(&device, request(3, Duration::from_secs(5)));
    let call = next_call(&mut on_b).await;
    assert_eq!(a.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Delivered);
    assert!(pending.await.expect("dispatch").ok);

    // (A replica that is gone, found by "no responders", is the cluster suite's kill tests:
    // here a dropped replica's connection lingers a moment.)
    drop(on_b);
    assert_eq!(d.bus.pending_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_is_answered_at_once_from_every_replica() {
    let server = NatsServer::start().await;
    let (a, b, c) = three(&server.url()).await;
    let never_seen = device_id();
    let gone = device_id();
    let stream = b.connect(&gone, 1).await;
    drop(stream);
    eventually("the released device's subscriptions go", Duration::from_secs(2), || b.bus.held_device_count() == 0)
        .await;

    for replica in [&a, &b, &c] {
        for device in [&never_seen, &gone] {
            let started = Instant::now();
            let result = replica.dispatcher.dispatch(device, request(1, Duration::from_secs(10))).await;
            let elapsed = started.elapsed();
            assert!(result.is_offline(), "{result:?}");
            assert!(elapsed < Duration::from_millis(500), "offline took {elapsed:?}");
            eprintln!("offline answer from {} in {:.2} ms", replica.name, ms(elapsed));
        }
        assert_eq!(replica.dispatcher.is_online(&never_seen).await.expect("presence"), None);
        assert_eq!(replica.hub.pending_calls(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_stream_wins_across_replicas_in_either_order() {
    let server = NatsServer::start().await;
    let (a, b, c) = three(&server.url()).await;

    // In order: A (epoch 1), then B (epoch 2).
    let device = device_id();
    let mut on_a = a.connect(&device, 1).await;
    let started = Instant::now();
    let mut on_b = b.connect(&device, 2).await;
    assert!(matches!(next_frame(&mut on_a, Duration::from_secs(2)).await, Frame::Close(Close::Superseded)));
    eprintln!("takeover closed the older stream in {:.2} ms", ms(started.elapsed()));
    eventually("A lets go of the device", Duration::from_secs(2), || a.bus.held_device_count() == 0).await;
    for n in 0..10 {
        let pending = c.dispatch(&device, request(n, Duration::from_secs(5)));
        let call = next_call(&mut on_b).await;
        assert_eq!(a.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Delivered);
        assert!(pending.await.expect("dispatch").ok);
    }
    assert!(on_a.frames.try_recv().is_none(), "nothing more reaches the superseded stream");
    assert_eq!(
        c.dispatcher.is_online(&device).await.expect("presence").map(|h| (h.replica, h.epoch)),
        Some((b.name.clone(), 2))
    );

    // Announcements in the reverse order: B (epoch 2) is there first, then A announces epoch 1.
    let device = device_id();
    let mut on_b = b.connect(&device, 2).await;
    let mut on_a = a.connect(&device, 1).await;
    assert!(matches!(next_frame(&mut on_a, Duration::from_secs(2)).await, Frame::Close(Close::Superseded)));
    no_frame(&mut on_b, Duration::from_millis(200)).await;
    eventually("A lets go of the device", Duration::from_secs(2), || a.bus.held_device_count() == 0).await;
    for n in 0..10 {
        let pending = c.dispatch(&device, request(n, Duration::from_secs(5)));
        let call = next_call(&mut on_b).await;
        assert_eq!(c.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Delivered);
        assert!(pending.await.expect("dispatch").ok);
    }
    assert!(on_a.frames.try_recv().is_none());
    for replica in [&a, &b, &c] {
        let holder = replica.dispatcher.is_online(&device).await.expect("presence").expect("online");
        assert_eq!((holder.replica, holder.epoch), (b.name.clone(), 2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_the_same_from_every_replica() {
    let server = NatsServer::start().await;
    let (a, b, c) = three(&server.url()).await;
    let mut expected = Vec::new();
    let mut streams = Vec::new();
    for (i, holder) in [&a, &a, &b, &c].into_iter().enumerate() {
        let device = device_id();
        streams.push(holder.connect(&device, i as u64 + 1).await);
        expected.push((device, holder.name.clone()));
    }
    expected.sort();
    let offline = device_id();

    for replica in [&a, &b, &c] {
        let started = Instant::now();
        let online = replica.dispatcher.online_devices().await.expect("online devices");
        eprintln!("online_devices from {}: {} devices in {:.2} ms", replica.name, online.len(), ms(started.elapsed()));
        assert_eq!(online, expected, "from {}", replica.name);
        for (device, holder) in &expected {
            let started = Instant::now();
            let found = replica.dispatcher.is_online(device).await.expect("presence").expect("online");
            assert!(started.elapsed() < Duration::from_millis(400), "{:?}", started.elapsed());
            assert_eq!(&found.replica, holder);
        }
        let started = Instant::now();
        assert_eq!(replica.dispatcher.is_online(&offline).await.expect("presence"), None);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "no responders answers at once: {:?}",
            started.elapsed()
        );
    }
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_stream_and_fails_pending_calls_within_a_second() {
    let server = NatsServer::start().await;
    let (a, b, c) = three(&server.url()).await;
    let device = device_id();
    let mut stream = b.connect(&device, 1).await;
    let pending = a.dispatch(&device, request(1, Duration::from_secs(10)));
    let call = next_call(&mut stream).await;

    let started = Instant::now();
    c.dispatcher.drop_device(&device).await.expect("revoke");
    assert!(matches!(next_frame(&mut stream, Duration::from_secs(1)).await, Frame::Close(Close::Revoked)));
    let closed = started.elapsed();
    let result = tokio::time::timeout(Duration::from_secs(1), pending).await.expect("within a second").expect("task");
    let failed = started.elapsed();
    assert!(result.is_offline(), "{result:?}");
    eprintln!("revocation: stream closed in {:.2} ms, pending call failed in {:.2} ms", ms(closed), ms(failed));

    // The late result finds nothing; the device is offline everywhere.
    assert_eq!(b.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Unknown);
    eventually("B lets go of the device", Duration::from_secs(2), || b.bus.held_device_count() == 0).await;
    for replica in [&a, &b, &c] {
        assert!(replica.dispatcher.dispatch(&device, request(2, Duration::from_secs(5))).await.is_offline());
        assert_eq!(replica.hub.pending_calls(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_dispatches_each_resolve_exactly_once() {
    let server = NatsServer::start().await;
    let (a, b, c) = three(&server.url()).await;
    let replicas = [&a, &b, &c];
    let via: Vec<Dispatcher> = replicas.iter().map(|r| r.dispatcher.clone()).collect();
    let devices: Vec<String> = (0..10).map(|_| device_id()).collect();
    let mut answerers = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let stream = replicas[i % 3].connect(device, 1).await;
        answerers.push(answer(stream, device.clone(), via.clone()));
    }

    let started = Instant::now();
    let dispatches: Vec<JoinHandle<HostResult>> = (0..1000u64)
        .map(|n| replicas[n as usize % 3].dispatch(&devices[n as usize % 10], request(n, Duration::from_secs(20))))
        .collect();
    for (n, dispatch) in dispatches.into_iter().enumerate() {
        let result = dispatch.await.expect("dispatch task");
        assert!(result.ok, "dispatch {n}: {result:?}");
        assert_eq!(result.result, Some(json!({ "echo": { "n": n } })), "dispatch {n}");
    }
    let elapsed = started.elapsed();
    eprintln!("1000 concurrent dispatches from 3 replicas to 10 devices: {:.0} ms", ms(elapsed));

    for replica in replicas {
        for device in &devices {
            replica.hub.revoke(device);
        }
    }
    let mut seen = Vec::new();
    for answerer in answerers {
        let (calls, acks) =
            tokio::time::timeout(Duration::from_secs(5), answerer).await.expect("answerer ends").expect("task");
        assert!(acks.iter().all(|ack| *ack == DeliverAck::Delivered), "{acks:?}");
        seen.extend(calls);
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 1000, "every call pushed once");
    assert_eq!(unique.len(), 1000, "no call pushed twice");
    for replica in replicas {
        assert_eq!(replica.hub.pending_calls(), 0);
        assert_eq!(replica.bus.pending_requests(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_nats_closes_streams_after_the_grace_and_a_restart_recovers() {
    let mut server = NatsServer::start().await;
    let options = NatsOptions { broker_grace: Duration::from_secs(1), ..NatsOptions::default() };
    let a = Replica::start("a", &server.url(), options.clone()).await;
    let b = Replica::start("b", &server.url(), options).await;
    let device = device_id();
    let mut stream = b.connect(&device, 1).await;

    let killed = Instant::now();
    server.kill();
    let to_down = eventually("B goes down", Duration::from_secs(5), || b.bus.health() == Health::Down).await;
    eventually("A goes down", Duration::from_secs(5), || a.bus.health() == Health::Down).await;

    // Within the grace the stream stays; a dispatch meanwhile times out, it is not lost as offline.
    let during = a.dispatcher.dispatch(&device, request(1, Duration::from_millis(300))).await;
    assert!(during.is_timed_out(), "{during:?}");
    assert!(matches!(
        next_frame(&mut stream, Duration::from_secs(4)).await,
        Frame::Close(Close::Reconnect(ReconnectReason::BrokerLost))
    ));
    let to_close = killed.elapsed();
    assert!(to_close >= Duration::from_millis(900), "closed before the grace: {to_close:?}");
    assert_eq!(b.hub.connected(), 0);
    assert_eq!(b.bus.held_device_count(), 0);
    assert!(matches!(b.dispatcher.connect(&device, 2).await, Err(BusError::Unavailable(_))), "no stream while down");

    let restarted = Instant::now();
    server.restart().await;
    let to_up_b = eventually("B comes back", Duration::from_secs(10), || b.bus.health() == Health::Up).await;
    let to_up_a = eventually("A comes back", Duration::from_secs(10), || a.bus.health() == Health::Up).await;
    let mut stream = b.connect(&device, 3).await;
    let pending = a.dispatch(&device, request(2, Duration::from_secs(5)));
    let call = next_call(&mut stream).await;
    assert_eq!(b.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Delivered);
    assert!(pending.await.expect("dispatch").ok);
    eprintln!(
        "NATS killed: Down after {:.1} ms, streams closed after {:.0} ms (grace 1 s); restarted: Up after {:.0} ms (B) / {:.0} ms (A), first dispatch ok {:.0} ms after restart",
        ms(to_down),
        ms(to_close),
        ms(to_up_b),
        ms(to_up_a),
        ms(restarted.elapsed())
    );
    assert_eq!(a.hub.pending_calls(), 0);
    assert_eq!(a.bus.pending_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_server_cluster_keeps_dispatching_when_one_server_dies() {
    let mut servers = start_cluster().await;
    let urls = servers.iter().map(NatsServer::url).collect::<Vec<_>>().join(",");
    let (a, b, c) = three(&urls).await;
    let replicas = [&a, &b, &c];
    let via: Vec<Dispatcher> = replicas.iter().map(|r| r.dispatcher.clone()).collect();
    let devices: Vec<String> = (0..6).map(|_| device_id()).collect();
    let mut answerers = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        let stream = replicas[i % 3].connect(device, 1).await;
        answerers.push(answer(stream, device.clone(), via.clone()));
    }
    // Interest crosses the routes asynchronously: wait until everyone sees every device.
    for replica in replicas {
        for device in &devices {
            let deadline = Instant::now() + Duration::from_secs(5);
            while replica.dispatcher.is_online(device).await.ok().flatten().is_none() {
                assert!(Instant::now() < deadline, "{device} not visible from {}", replica.name);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    // Kill the server B (a holder) is connected to, in the middle of a load of dispatches.
    let b_port = b.bus.client().server_info().port;
    let victim = servers.iter().position(|s| s.port == b_port).expect("B's server is one of ours");
    let timeout = Duration::from_secs(2);
    let outcomes: Arc<Mutex<HashMap<&'static str, usize>>> = Arc::default();
    let stop = CancellationToken::new();
    let mut loads = Vec::new();
    for (w, replica) in replicas.iter().enumerate() {
        for k in 0..8 {
            let (dispatcher, devices, outcomes, stop) =
                (replica.dispatcher.clone(), devices.clone(), outcomes.clone(), stop.clone());
            loads.push(tokio::spawn(async move {
                let mut n = (w * 1000 + k * 100) as u64;
                while !stop.is_cancelled() {
                    n += 1;
                    let started = Instant::now();
                    let result = dispatcher.dispatch(&devices[n as usize % devices.len()], request(n, timeout)).await;
                    assert!(
                        started.elapsed() < timeout + Duration::from_secs(1),
                        "resolved late: {:?}",
                        started.elapsed()
                    );
                    let outcome = if result.ok {
                        assert_eq!(result.result, Some(json!({ "echo": { "n": n } })));
                        "ok"
                    } else if result.is_offline() {
                        "offline"
                    } else if result.is_timed_out() {
                        "timed out"
                    } else {
                        "other"
                    };
                    *outcomes.lock().entry(outcome).or_default() += 1;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: usize = outcomes.lock().values().sum();
    servers[victim].kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.cancel();
    for load in loads {
        load.await.expect("load task");
    }
    let counts = outcomes.lock().clone();
    eprintln!(
        "cluster: killed server {victim} (B's) after {before} dispatches; outcomes over the run: {counts:?}; B health {:?}",
        b.bus.health()
    );
    assert_eq!(counts.get("other"), None);
    assert!(counts.get("ok").copied().unwrap_or(0) > before, "dispatches went on after the kill");

    // Afterwards every device answers from every replica.
    let recovered = Instant::now();
    for replica in replicas {
        for (i, device) in devices.iter().enumerate() {
            let result = replica.dispatcher.dispatch(device, request(i as u64, Duration::from_secs(5))).await;
            assert!(result.ok, "{device} from {} after the kill: {result:?}", replica.name);
        }
    }
    eprintln!(
        "cluster: all devices reachable from all replicas {:.0} ms after the kill (checked in {:.0} ms)",
        ms(killed.elapsed()),
        ms(recovered.elapsed())
    );
    assert_eq!(b.bus.held_device_count(), 2, "B kept its streams through the reconnect");
    for answerer in answerers {
        answerer.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_tables_return_to_zero_after_timeouts_and_dropped_dispatches() {
    let server = NatsServer::start().await;
    let a = Replica::start("a", &server.url(), NatsOptions::default()).await;
    let b = Replica::start("b", &server.url(), NatsOptions::default()).await;
    let device = device_id();
    let silent = b.connect(&device, 1).await;

    let timed_out = futures::future::join_all(
        (0..200).map(|n| a.dispatcher.dispatch(&device, request(n, Duration::from_millis(200)))),
    )
    .await;
    assert!(timed_out.iter().all(HostResult::is_timed_out));
    let dropped = futures::future::join_all((0..200).map(|n| {
        tokio::time::timeout(
            Duration::from_millis(20),
            a.dispatcher.dispatch(&device, request(n, Duration::from_secs(30))),
        )
    }))
    .await;
    assert!(dropped.iter().all(Result::is_err), "every dispatch was dropped mid-flight");
    let offline = device_id();
    for n in 0..100 {
        assert!(a.dispatcher.dispatch(&offline, request(n, Duration::from_secs(5))).await.is_offline());
    }
    while silent.frames.try_recv().is_some() {}

    eventually("pending tables drain", Duration::from_secs(2), || {
        a.hub.pending_calls() == 0 && a.bus.pending_requests() == 0 && b.bus.pending_requests() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_unanswered_requests_leave_no_state_behind() {
    let server = NatsServer::start().await;
    let a = Replica::start("a", &server.url(), NatsOptions::default()).await;
    // A holder that never answers: every call to it times out.
    let silent_device = device_id();
    let silent_route = rand::random::<u32>() | 1;
    DIRECTORY.opened(&silent_device, silent_route, 1);
    let raw = async_nats::connect(server.url()).await.expect("raw client");
    let _silent =
        raw.subscribe(Subjects::default().holder_requests(&route_tag(silent_route))).await.expect("silent holder");
    raw.flush().await.expect("flush");
    let call = || HostCall {
        call_id: new_call_id(a.hub.route_tag(), rand::random()),
        tool: "echo".into(),
        input: json!({}),
        mode: None,
        preconditions: None,
        deadline: None,
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    };

    let started = Instant::now();
    let bus = a.bus.clone();
    let offline: Vec<Routed> = futures::stream::iter(0..2000)
        .map(|_| {
            let (bus, call) = (bus.clone(), call());
            async move { bus.send_call(&device_id(), &call, Duration::from_secs(1)).await }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    assert!(offline.iter().all(|routed| *routed == Routed::Offline));
    let unacked: Vec<Routed> = futures::stream::iter(0..2000)
        .map(|_| {
            let (bus, call, device) = (bus.clone(), call(), silent_device.clone());
            async move { bus.send_call(&device, &call, Duration::from_millis(20)).await }
        })
        .buffer_unordered(500)
        .collect()
        .await;
    assert!(unacked.iter().all(|routed| *routed == Routed::Unreachable));
    let unknown: Vec<DeliverAck> = futures::stream::iter(0..500)
        .map(|_| {
            let bus = bus.clone();
            let result = HostResult::success(new_call_id(rand::random(), rand::random()), json!(1));
            async move { bus.send_result(&result.call_id[..8], &device_id(), &result).await }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    assert!(unknown.iter().all(|ack| *ack == DeliverAck::Unknown));
    let abandoned: Vec<_> = futures::stream::iter(0..500)
        .map(|_| {
            let (bus, call, device) = (bus.clone(), call(), silent_device.clone());
            async move {
                tokio::time::timeout(Duration::from_millis(5), bus.send_call(&device, &call, Duration::from_secs(10)))
                    .await
            }
        })
        .buffer_unordered(500)
        .collect()
        .await;
    assert!(abandoned.iter().all(Result::is_err));
    eprintln!("5000 unanswered requests (no responders, timeouts, dropped) in {:.0} ms", ms(started.elapsed()));

    assert_eq!(a.bus.pending_requests(), 0, "every request left the inbox table");
    assert_eq!(a.hub.pending_calls(), 0);
    // The bus still works.
    let device = device_id();
    let mut stream = a.connect(&device, 1).await;
    let pending = a.dispatch(&device, request(7, Duration::from_secs(5)));
    let call = next_call(&mut stream).await;
    assert_eq!(a.dispatcher.deliver(&device, echo(&call)).await, DeliverAck::Delivered);
    assert!(pending.await.expect("dispatch").ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_ids_that_are_not_uuids_never_reach_a_subject() {
    let server = NatsServer::start().await;
    let a = Replica::start("a", &server.url(), NatsOptions::default()).await;
    for bad in ["not-a-uuid", "a.b.>", "*", "deadbeef-0000-4000-8000-00000000000g"] {
        assert!(matches!(a.dispatcher.connect(bad, 1).await, Err(BusError::Malformed(_))), "{bad:?}");
        assert!(a.dispatcher.dispatch(bad, request(1, Duration::from_secs(5))).await.is_offline());
        assert_eq!(a.bus.holder(bad).await.expect("presence"), None);
    }
    assert_eq!(a.hub.connected(), 0);
    assert_eq!(a.bus.held_device_count(), 0);
}

#[tokio::test]
async fn unusable_settings_are_refused() {
    let hub = Hub::new("r", 1);
    let cancel = CancellationToken::new();
    for (urls, prefix) in
        [("", "pulsn.host"), (" , ", "pulsn.host"), ("nats://127.0.0.1:4222", "a.*"), ("nats://[::1", "p")]
    {
        let directory = DIRECTORY.clone();
        let bus = NatsBus::connect(
            urls,
            Subjects::new(prefix),
            hub.clone(),
            directory,
            NatsOptions::default(),
            cancel.clone(),
        )
        .await;
        assert!(matches!(bus, Err(BusError::Unavailable(_))), "{urls:?} {prefix:?}");
    }
}
