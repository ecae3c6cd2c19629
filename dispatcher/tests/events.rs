//! The control API's front doors in process: `GET /api/events` against replicas on port 0, on
//! the in-memory bus (SQLite and PostgreSQL, one replica) and on the NATS bus (two replicas on
//! PostgreSQL, where every change is made on replica B and heard on replica A), and the admin
//! page's HTTP surface (`/ui`, its assets and headers).
//!
//! Not here: the page in a browser (tests/tests/ui.rs) and the real binaries
//! (tests/tests/events.rs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatcher::config::Settings;
use dispatcher::http::AppState;
use e2e::device::{Answer, Control, TestDevice};
use e2e::events::EventStream;
use e2e::nats::NatsServer;
use e2e::postgres::TestDatabase;
use protocol::{CallMode, HostResult};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How fast a change must reach a listener on another replica.
const WITHIN: Duration = Duration::from_secs(1);
const QUIET: Duration = Duration::from_millis(1500);

struct Replica {
    base: String,
    state: AppState,
    shutdown: CancellationToken,
    background: CancellationToken,
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
}

struct Cluster {
    replicas: Vec<Replica>,
    alice: String,
    mallory: String,
    setup: Setup,
    _nats: Option<NatsServer>,
    _db: Option<TestDatabase>,
}

async fn start_replica(mut settings: Settings, name: &str) -> Replica {
    settings.replica_id = name.to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let background = CancellationToken::new();
    let state = dispatcher::server::build_state(settings, background.clone()).await.expect("replica starts");
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let (state, shutdown) = (state.clone(), shutdown.clone());
        async move { dispatcher::server::serve(state, listener, shutdown).await.expect("serves") }
    });
    Replica { base, state, shutdown, background }
}

impl Cluster {
    async fn start(setup: Setup) -> Cluster {
        Self::with_keepalive(setup, Duration::from_secs(15)).await
    }

    async fn with_keepalive(setup: Setup, keepalive: Duration) -> Cluster {
        let (database_url, db) = match setup {
            Setup::MemorySqlite => ("sqlite::memory:".to_owned(), None),
            Setup::MemoryPostgres | Setup::NatsPostgres => {
                let db = TestDatabase::create().await.expect("postgres database");
                (db.url().to_owned(), Some(db))
            }
        };
        let nats = match setup {
            Setup::NatsPostgres => Some(NatsServer::start().await.expect("nats-server")),
            _ => None,
        };
        let mut settings = Settings::for_tests(database_url);
        settings.nats_url = nats.as_ref().map(NatsServer::url);
        settings.keepalive = keepalive;
        let count = if nats.is_some() { 2 } else { 1 };
        let mut replicas = Vec::new();
        for i in 0..count {
            replicas.push(start_replica(settings.clone(), &format!("replica-{i}")).await);
        }
        let registry = &replicas[0].state.registry;
        let alice = registry.create_api_token("alice", Some("tests")).await.expect("token");
        let mallory = registry.create_api_token("mallory", None).await.expect("token");
        Cluster { replicas, alice, mallory, setup, _nats: nats, _db: db }
    }

    /// Where listeners listen.
    fn a(&self) -> &str {
        &self.replicas[0].base
    }

    /// Where changes are made: the other replica when there are two.
    fn b(&self) -> &str {
        &self.replicas[self.replicas.len() - 1].base
    }

    fn control_at(&self, base: &str) -> Control {
        Control::new(base, self.alice.clone())
    }

    async fn listen(&self, token: &str) -> EventStream {
        EventStream::open(self.a(), token).await.expect("events stream opens")
    }
}

macro_rules! suite {
    ($($scenario:ident),* $(,)?) => {
        mod memory_sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(super::Setup::MemorySqlite).await } )* }
        mod memory_postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(super::Setup::MemoryPostgres).await } )* }
        mod nats_postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(super::Setup::NatsPostgres).await } )* }
    };
}

suite!(
    devices_are_told_as_they_change,
    proposals_are_told_created_decided_applied,
    revocation_is_told_once,
    tokens_are_checked_and_rechecked,
    a_slow_listener_is_dropped_alone,
);

fn ms(duration: Duration) -> u128 {
    duration.as_millis()
}

async fn devices_are_told_as_they_change(setup: Setup) {
    let c = Cluster::start(setup).await;
    let mut alice = c.listen(&c.alice).await;
    let mut mallory = c.listen(&c.mallory).await;
    assert_eq!(alice.snapshot, json!({"devices": [], "proposals": []}));

    // Enrolled on B: told on A, offline.
    let started = Instant::now();
    let device = TestDevice::pair(c.b(), &c.control_at(c.b()), "laptop").await.unwrap();
    let id = device.device_id.clone();
    let enrolled =
        alice.wait_for("device", WITHIN, |d| d["id"] == id.as_str()).await.expect("enrollment told within a second");
    assert_eq!(enrolled.data["name"], "laptop");
    assert_eq!(enrolled.data["online"], false);
    let enroll_ms = ms(enrolled.at - started);

    // Stream opened on B: online on B, told on A.
    let started = Instant::now();
    let conn = device.connect(c.b(), Answer::Echo).await.unwrap();
    let online = alice.wait_for("device", WITHIN, |d| d["id"] == id.as_str() && d["online"] == true).await.unwrap();
    let online_ms = ms(online.at - started);
    assert_eq!(online.data["replica"], conn.ready.replica.as_str());
    assert!(online.data["createdAt"].is_string(), "{}", online.data);

    // Manifest on B: its tools and roots.
    let manifest = json!({"tools": [{"name": "stat", "description": "d", "inputSchema": {"type": "object"}, "class": "read"}],
                          "roots": ["/home/me"], "version": "1", "platform": "linux"});
    let started = Instant::now();
    assert_eq!(device.put_manifest(c.b(), &manifest).await.unwrap().0, StatusCode::NO_CONTENT);
    let changed = alice.wait_for("device", WITHIN, |d| d["roots"] == json!(["/home/me"])).await.unwrap();
    let manifest_ms = ms(changed.at - started);
    assert_eq!(changed.data["tools"][0]["name"], "stat");
    assert_eq!(changed.data["online"], true);

    // Stream closed on B: offline, told on A.
    let started = Instant::now();
    drop(conn);
    let offline = alice.wait_for("device", WITHIN, |d| d["id"] == id.as_str() && d["online"] == false).await.unwrap();
    let offline_ms = ms(offline.at - started);
    assert!(offline.data.get("replica").is_none(), "{}", offline.data);

    // A listener opened now sees the device in its snapshot, as GET /api/devices shows it.
    let later = c.listen(&c.alice).await;
    let (_, listed) = c.control_at(c.a()).devices().await.unwrap();
    assert_eq!(later.snapshot["devices"], listed["devices"]);
    assert_eq!(later.snapshot["devices"][0]["id"], id.as_str());

    mallory.expect_only_keepalives(QUIET).await.expect("another user hears nothing");
    eprintln!(
        "events[{:?}]: enroll {enroll_ms} ms, online {online_ms} ms, manifest {manifest_ms} ms, offline {offline_ms} ms \
         (change on {}, heard on {})",
        c.setup,
        c.b(),
        c.a()
    );
}

/// A device whose `write_file` proposes in auto mode and applies in apply mode.
fn proposing_device(applies: Arc<AtomicUsize>) -> Answer {
    Answer::with(move |call| {
        if call.mode == Some(CallMode::Apply) {
            applies.fetch_add(1, Ordering::SeqCst);
            Some(HostResult::success(&call.call_id, json!({"written": true})))
        } else {
            let plan = json!({"tool": call.tool, "summary": "write x", "diff": "--- a/x\n+++ b/x\n@@ -0,0 +1 @@\n+y\n", "preconditions": {}});
            Some(HostResult::proposal(&call.call_id, plan))
        }
    })
}

async fn proposals_are_told_created_decided_applied(setup: Setup) {
    let c = Cluster::start(setup).await;
    let (on_a, on_b) = (c.control_at(c.a()), c.control_at(c.b()));
    let device = TestDevice::pair(c.b(), &on_b, "writer").await.unwrap();
    let applies = Arc::new(AtomicUsize::new(0));
    let _conn = device.connect(c.b(), proposing_device(applies.clone())).await.unwrap();
    let mut alice = c.listen(&c.alice).await;
    let mut mallory = c.listen(&c.mallory).await;

    // Created through B.
    let started = Instant::now();
    let (status, body) =
        on_b.call(&device.device_id, "write_file", json!({"path": "x", "content": "y"}), Some(5000)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["proposalId"].as_str().expect("proposalId").to_owned();
    let created = alice.wait_for("proposal", WITHIN, |p| p["id"] == id.as_str()).await.unwrap();
    let created_ms = ms(created.at - started);
    assert_eq!(created.data["status"], "pending");
    assert_eq!(created.data["proposal"]["diff"], "--- a/x\n+++ b/x\n@@ -0,0 +1 @@\n+y\n");
    assert_eq!(created.data["deviceId"], device.device_id.as_str());

    // Approved through A: applying, then applied with the device's result, in that order.
    let started = Instant::now();
    let (status, applied) = on_a.approve(&id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{applied}");
    let applying = alice.wait_for("proposal", WITHIN, |p| p["id"] == id.as_str()).await.unwrap();
    assert_eq!(applying.data["status"], "applying");
    let done = alice.wait_for("proposal", WITHIN, |p| p["id"] == id.as_str()).await.unwrap();
    assert_eq!(done.data["status"], "applied", "{:#?}", alice.history);
    assert_eq!(done.data["result"]["ok"], true);
    assert!(done.data["decidedAt"].is_string());
    let applied_ms = ms(done.at - started);
    assert_eq!(applies.load(Ordering::SeqCst), 1);

    // Another, rejected through B.
    let (_, body) =
        on_b.call(&device.device_id, "write_file", json!({"path": "z", "content": "w"}), None).await.unwrap();
    let second = body["proposalId"].as_str().expect("proposalId").to_owned();
    alice.wait_for("proposal", WITHIN, |p| p["id"] == second.as_str() && p["status"] == "pending").await.unwrap();
    let (status, _) = on_b.reject(&second).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    alice.wait_for("proposal", WITHIN, |p| p["id"] == second.as_str() && p["status"] == "rejected").await.unwrap();

    // The third stays pending: a new snapshot has it alone.
    let (_, body) =
        on_b.call(&device.device_id, "write_file", json!({"path": "p", "content": "q"}), None).await.unwrap();
    let third = body["proposalId"].as_str().expect("proposalId").to_owned();
    let snapshot = c.listen(&c.alice).await.snapshot.clone();
    let pending: Vec<&Value> = snapshot["proposals"].as_array().expect("proposals").iter().collect();
    assert_eq!(pending.len(), 1, "{snapshot}");
    assert_eq!(pending[0]["id"], third.as_str());

    mallory.expect_only_keepalives(QUIET).await.expect("another user hears nothing");
    assert_eq!(c.listen(&c.mallory).await.snapshot, json!({"devices": [], "proposals": []}));
    eprintln!("events[{:?}]: proposal created {created_ms} ms, applied {applied_ms} ms", c.setup);
}

async fn revocation_is_told_once(setup: Setup) {
    let c = Cluster::start(setup).await;
    let device = TestDevice::pair(c.b(), &c.control_at(c.b()), "stolen").await.unwrap();
    let mut conn = device.connect(c.b(), Answer::Silent).await.unwrap();
    let mut alice = c.listen(&c.alice).await;
    assert_eq!(alice.snapshot["devices"][0]["online"], true);

    let started = Instant::now();
    let (status, _) = c.control_at(c.a()).delete_device(&device.device_id).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let revoked = alice.wait_for("device", WITHIN, |d| d["revoked"] == true).await.unwrap();
    assert_eq!(revoked.data["id"], device.device_id.as_str());
    assert_eq!(revoked.data["online"], false);
    assert_eq!(revoked.data["name"], "stolen");
    conn.wait_event("revoked", WITHIN).await.unwrap();
    // The stream's end is not told after the revocation: the device is gone.
    alice.expect_only_keepalives(QUIET).await.expect("nothing after the revocation");
    assert_eq!(c.listen(&c.alice).await.snapshot["devices"], json!([]));
    eprintln!("events[{:?}]: revoked {} ms", c.setup, ms(revoked.at - started));
}

async fn tokens_are_checked_and_rechecked(setup: Setup) {
    let c = Cluster::with_keepalive(setup, Duration::from_secs(2)).await;
    for header in [None, Some("Bearer nope"), Some("Basic abc"), Some("Bearer ")] {
        assert_eq!(EventStream::status(c.a(), header).await.unwrap(), StatusCode::UNAUTHORIZED, "{header:?}");
    }
    // Keepalives at the interval.
    let mut alice = c.listen(&c.alice).await;
    let first = alice.next(Duration::from_secs(4)).await.expect("a keepalive");
    assert_eq!(first.event, "keepalive");

    // The token is revoked and the replicas' credential caches forget it (as revocation does):
    // the stream ends at its next keepalive.
    let token = c.replicas[0].state.registry.create_api_token("alice", None).await.unwrap();
    let mut doomed = c.listen(&token).await;
    let revoked = c.replicas[0].state.registry.revoke_api_token(&token[..12]).await.unwrap();
    assert_eq!(revoked.len(), 1);
    for replica in &c.replicas {
        replica.state.dispatcher.hub().flush_credentials();
    }
    doomed.wait_closed(Duration::from_secs(5)).await.expect("a revoked token's stream ends");
    assert!(!alice.is_closed(), "other tokens' streams go on");
    assert_eq!(EventStream::status(c.a(), Some(&format!("Bearer {token}"))).await.unwrap(), StatusCode::UNAUTHORIZED);
}

async fn a_slow_listener_is_dropped_alone(setup: Setup) {
    let c = Cluster::start(setup).await;
    let state = &c.replicas[c.replicas.len() - 1].state;
    // A listener on A that never reads, and one that does.
    let slow = c.replicas[0].state.events.listen("alice");
    let mut quick = c.listen(&c.alice).await;
    let proposal = |n: usize| protocol::Proposal {
        id: format!("00000000-0000-4000-8000-{n:012}"),
        device_id: "d".into(),
        tool: "write_file".into(),
        input: json!({"n": n}),
        proposal: json!({"summary": format!("change {n}")}),
        status: protocol::ProposalStatus::Pending,
        created_at: chrono::Utc::now(),
        decided_at: None,
        result: None,
    };
    let count = dispatcher::events::listeners::LISTENER_QUEUE + 44;
    // Published in chunks, the reading listener taking each chunk before the next: it never
    // falls a queue behind however loaded the machine is, while the one that never reads
    // overflows all the same. Only the publishing is timed.
    const CHUNK: usize = 32;
    let mut published = Duration::ZERO;
    for first in (0..count).step_by(CHUNK) {
        let chunk = first..(first + CHUNK).min(count);
        let started = Instant::now();
        for n in chunk.clone() {
            dispatcher::events::proposal_changed(state, "alice", &proposal(n)).await;
        }
        published += started.elapsed();
        for n in chunk {
            let heard = quick.wait_for("proposal", Duration::from_secs(5), |_| true).await.unwrap();
            assert_eq!(heard.data["input"]["n"], n, "in order");
        }
    }
    assert!(published < Duration::from_secs(3), "publishing {count} events took {published:?}");
    assert!(slow.listener.dropped.is_cancelled(), "the listener that fell behind was dropped");
    assert!(!quick.is_closed());
    eprintln!("events[{:?}]: {count} events published in {} ms", c.setup, ms(published));
}

// ---- the page's HTTP surface ----

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_served_locked_down() {
    let c = Cluster::start(Setup::MemorySqlite).await;
    let client = reqwest::Client::new();
    let mut page = String::new();
    for path in ["/ui", "/ui/", "/ui/activate", "/ui/activate?code=ABCD-EFGH"] {
        let response = client.get(format!("{}{path}", c.a())).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&response, "content-type"), "text/html; charset=utf-8", "{path}");
        assert_eq!(header(&response, "content-security-policy"), CSP, "{path}");
        assert_eq!(header(&response, "x-content-type-options"), "nosniff");
        assert_eq!(header(&response, "referrer-policy"), "no-referrer");
        assert_eq!(header(&response, "cache-control"), "no-cache");
        assert!(!header(&response, "x-replica-id").is_empty());
        page = response.text().await.unwrap();
    }
    assert!(page.contains("<script type=\"module\" src=\"/ui/assets/app.js\"></script>"), "{page}");

    // Every asset the page and its modules name is served with its type, policy and ETag; a
    // revalidation is a 304; nothing anywhere points at another origin.
    let mut names = vec!["style.css".to_owned(), "app.js".to_owned()];
    let mut seen = Vec::new();
    let mut etags = Vec::new();
    while let Some(name) = names.pop() {
        if seen.contains(&name) {
            continue;
        }
        let url = format!("{}/ui/assets/{name}", c.a());
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        let want = if name.ends_with(".js") { "text/javascript; charset=utf-8" } else { "text/css; charset=utf-8" };
        assert_eq!(header(&response, "content-type"), want, "{name}");
        assert_eq!(header(&response, "content-security-policy"), CSP, "{name}");
        let etag = header(&response, "etag").to_owned();
        assert!(etag.len() == 26 && etag.starts_with('"') && etag.ends_with('"'), "{name}: {etag:?}");
        assert!(!etags.contains(&etag), "{name}: {etag} is another asset's");
        etags.push(etag.clone());
        let text = response.text().await.unwrap();
        for line in text.lines().filter(|l| l.starts_with("import ")) {
            let module = line.rsplit_once("'./").expect("a relative import").1.trim_end_matches("';");
            names.push(module.to_owned());
        }
        for needle in ["http://", "https://", "//cdn", "@import", "innerHTML", "eval("] {
            assert!(!text.contains(needle), "{name} contains {needle:?}");
        }
        let again = client.get(&url).header("if-none-match", &etag).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{name}");
        assert!(again.bytes().await.unwrap().is_empty());
        seen.push(name);
    }
    seen.sort();
    assert_eq!(seen, ["activate.js", "app.js", "form.js", "result.js", "sse.js", "style.css"]);
    for needle in ["http://", "https://"] {
        assert!(!page.contains(needle), "the page contains {needle:?}");
    }

    for path in ["/ui/assets/index.html", "/ui/assets/nope.js", "/ui/assets/..%2Fapp.js", "/ui/nope"] {
        let response = client.get(format!("{}{path}", c.a())).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(response.json::<Value>().await.unwrap()["error"].is_string(), "{path}");
    }
    let response = client.post(format!("{}/ui", c.a())).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}
