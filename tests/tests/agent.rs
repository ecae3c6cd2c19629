//! End to end with both real binaries: a `dispatcher` (embedded default, SQLite file) and a
//! `host-agent` serving a temporary root. Enrollment and cached credentials, reads, a
//! write's proposal and its approval, the scope seen from the server, revocation (exit 4), a
//! bad code (exit 3), being superseded (exit 5), a killed server coming back on the same port,
//! and SIGTERM (exit 0).
//!
//! Not here: the tools' own edge cases (host-agent's suites) and several replicas.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{metric, Agent, Control, Dispatcher};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);

/// A replica, its user's control API, and a root with a few files.
struct Env {
    dispatcher: Dispatcher,
    control: Control,
    root: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        let dispatcher = Dispatcher::start().await.expect("dispatcher starts");
        let token = dispatcher.mint_token("agent-user").await.expect("token create");
        let control = Control::new(dispatcher.base_url(), token);
        let root = tempfile::Builder::new().prefix("e2e-root-").tempdir().expect("root");
        std::fs::write(root.path().join("hello.txt"), "hello\nworld\n").unwrap();
        std::fs::create_dir(root.path().join("docs")).unwrap();
        std::fs::write(root.path().join("docs/readme.md"), "# readme\n").unwrap();
        Env { dispatcher, control, root }
    }

    /// An agent for this replica and root, enrolling with a fresh code.
    async fn enrolling_agent(&self) -> Agent {
        let code = self.control.pairing_code().await.expect("pairing code");
        Agent::builder(self.dispatcher.base_url()).root(self.root.path()).code(code).spawn().expect("agent spawns")
    }

    /// The id of the one device of this user, once it is online.
    async fn online_device(&self, agent: &mut Agent) -> String {
        self.control.first_online_device(agent, 20 * SECOND).await
    }

    async fn call(&self, id: &str, tool: &str, input: Value) -> (StatusCode, Value) {
        self.control.call(id, tool, input, Some(10_000)).await.expect("call")
    }
}

fn file_names(entries: &Value) -> Vec<String> {
    let mut names: Vec<String> =
        entries.as_array().expect("entries").iter().filter_map(|e| e["name"].as_str().map(str::to_owned)).collect();
    names.sort();
    names
}

#[cfg(unix)]
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// Enroll with a code, serve reads, SIGTERM → 0; run again without a code on the cached
/// credentials (mode 0600) as the same device, and serve again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_serve_and_restart_from_cached_credentials() {
    let env = Env::start().await;
    let mut agent = env.enrolling_agent().await;
    let id = env.online_device(&mut agent).await;

    let (status, listing) = env.call(&id, "list_directory", json!({"path": "."})).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert_eq!(listing["ok"], true, "{listing}");
    assert_eq!(file_names(&listing["result"]["entries"]), ["docs", "hello.txt"]);
    assert_eq!(listing["result"]["truncated"], false);
    let (status, read) = env.call(&id, "read_file", json!({"path": "hello.txt"})).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["result"]["content"], "hello\nworld\n");
    assert_eq!(read["result"]["totalLines"], 2);
    let (_, read) = env.call(&id, "read_file", json!({"path": "hello.txt", "startLine": 2, "endLine": 2})).await;
    assert_eq!(read["result"]["content"], "world\n", "{read}");
    let (_, listing) = env.call(&id, "list_directory", json!({"path": ".", "recursive": true})).await;
    let paths: Vec<&str> =
        listing["result"]["entries"].as_array().unwrap().iter().filter_map(|e| e["path"].as_str()).collect();
    assert!(paths.iter().any(|p| p.ends_with("readme.md")), "{listing}");

    // The manifest reached the server.
    let device = env.control.wait_online(&id, true, 5 * SECOND).await.unwrap();
    let started = Instant::now();
    let mut device = device;
    while device["tools"].is_null() && started.elapsed() < 5 * SECOND {
        tokio::time::sleep(Duration::from_millis(50)).await;
        device = env.control.device(&id).await.unwrap().1;
    }
    let tools: Vec<&str> =
        device["tools"].as_array().expect("tools").iter().filter_map(|t| t["name"].as_str()).collect();
    for tool in ["list_directory", "read_file", "write_file", "grep"] {
        assert!(tools.contains(&tool), "{tool} missing from {tools:?}");
    }

    let files = agent.credential_files();
    assert_eq!(files.len(), 1, "one credentials file per server origin: {files:?}");
    #[cfg(unix)]
    assert_eq!(mode_of(&files[0]), 0o600, "credentials readable by the user only");
    let credentials = agent.credentials_dir().to_owned();

    agent.sigterm().unwrap();
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 0, "{}", agent.log_tail(40));
    env.control.wait_online(&id, false, 5 * SECOND).await.unwrap();

    let mut again = Agent::builder(env.dispatcher.base_url())
        .root(env.root.path())
        .credentials_dir(&credentials)
        .spawn()
        .expect("agent spawns");
    assert_eq!(env.online_device(&mut again).await, id, "the same device, from the cached credentials");
    let (status, read) = env.call(&id, "read_file", json!({"path": "docs/readme.md"})).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["result"]["content"], "# readme\n");
    let (_, list) = env.control.devices().await.unwrap();
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(1), "no second enrollment: {list}");
    // Each stream host-agent opened came first on a connection of its own, so the dispatcher
    // served it without hyper's per-connection buffers (its memory per idle device).
    let base = env.dispatcher.base_url();
    let opened = metric(&base, "dispatcher_stream_opens_total").await.expect("metrics");
    let unbuffered = metric(&base, "dispatcher_stream_requests_unbuffered_total").await.expect("metrics");
    assert!(opened >= 2.0, "two runs, at least two streams: {opened}");
    assert_eq!(unbuffered, opened, "every stream of host-agent on its own HTTP/1.1 connection");
    again.sigterm().unwrap();
    assert_eq!(again.exit_code(20 * SECOND).await.unwrap(), 0);
}

/// A write is proposed (nothing on disk), approved (written once), and a stale proposal is
/// refused by its preconditions; paths outside the root are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_proposal_approve_and_scope() {
    let env = Env::start().await;
    let mut agent = env.enrolling_agent().await;
    let id = env.online_device(&mut agent).await;
    let target = env.root.path().join("new.txt");

    let (status, proposed) = env.call(&id, "write_file", json!({"path": "new.txt", "content": "fresh\n"})).await;
    assert_eq!(status, StatusCode::OK, "{proposed}");
    assert_eq!(proposed["proposal"], true, "{proposed}");
    assert_eq!(proposed["result"]["tool"], "write_file");
    assert!(proposed["result"]["summary"].is_string(), "{proposed}");
    assert!(!target.exists(), "a proposal changes nothing on disk");
    let proposal_id = proposed["proposalId"].as_str().expect("proposalId").to_owned();

    let (status, applied) = env.control.approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{applied}");
    assert_eq!(applied["ok"], true, "{applied}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "fresh\n");
    let (_, stored) = env.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(stored["status"], "applied", "{stored}");
    let (status, _) = env.control.approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);

    // A proposal whose target changes before approval is refused on apply.
    let (_, proposed) = env.call(&id, "write_file", json!({"path": "hello.txt", "content": "replaced\n"})).await;
    assert_eq!(proposed["proposal"], true, "{proposed}");
    assert!(proposed["result"]["diff"].is_string(), "a text change has a diff: {proposed}");
    let stale = proposed["proposalId"].as_str().unwrap().to_owned();
    std::fs::write(env.root.path().join("hello.txt"), "changed meanwhile\n").unwrap();
    let (status, refused) = env.control.approve(&stale).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{refused}");
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("changed")), "{refused}");
    assert_eq!(std::fs::read_to_string(env.root.path().join("hello.txt")).unwrap(), "changed meanwhile\n");
    let (_, stored) = env.control.proposal(&stale).await.unwrap();
    assert_eq!(stored["status"], "failed", "{stored}");

    // Outside the root, by any route: refused with ok false.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "secret").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.path(), env.root.path().join("escape")).unwrap();
    let secret = outside.path().join("secret.txt").display().to_string();
    let mut attempts = vec![
        ("read_file", json!({"path": "../secret.txt"})),
        ("read_file", json!({"path": secret})),
        ("list_directory", json!({"path": ".."})),
        ("write_file", json!({"path": "../planted.txt", "content": "x"})),
    ];
    if cfg!(unix) {
        attempts.push(("read_file", json!({"path": "escape/secret.txt"})));
        attempts.push(("write_file", json!({"path": "escape/planted.txt", "content": "x"})));
    }
    for (tool, input) in attempts {
        let (status, result) = env.call(&id, tool, input.clone()).await;
        assert_eq!(status, StatusCode::OK, "{tool} {input}: {result}");
        assert_eq!(result["ok"], false, "{tool} {input} must be refused: {result}");
        assert!(result.get("proposalId").is_none(), "{result}");
        assert!(!result.to_string().contains("\"secret\""), "{result}");
    }
    assert!(!outside.path().join("planted.txt").exists());
    agent.sigterm().unwrap();
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 0);
}

/// DELETE the device: the agent exits 4 and deletes its cached credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_exits_4() {
    let env = Env::start().await;
    let mut agent = env.enrolling_agent().await;
    let id = env.online_device(&mut agent).await;
    assert_eq!(agent.credential_files().len(), 1);
    let (status, _) = env.control.delete_device(&id).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(agent.exit_code(10 * SECOND).await.unwrap(), 4, "{}", agent.log_tail(40));
    assert_eq!(agent.credential_files(), Vec::<std::path::PathBuf>::new(), "credentials deleted");
}

/// A bad pairing code: exit 3. No code and no credentials: enrollment by link starts (a link
/// is printed, nothing is enrolled until it is approved; tests/tests/grant.rs goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_code_exits_3_and_no_code_starts_enrollment_by_link() {
    let env = Env::start().await;
    let mut bad = Agent::builder(env.dispatcher.base_url())
        .root(env.root.path())
        .code("WRONG-CODE-1234")
        .spawn()
        .expect("agent spawns");
    assert_eq!(bad.exit_code(20 * SECOND).await.unwrap(), 3, "{}", bad.log_tail(40));
    assert!(bad.credential_files().is_empty());
    let mut none = Agent::builder(env.dispatcher.base_url()).root(env.root.path()).spawn().expect("agent spawns");
    none.wait_for_log("/ui/activate?code=", 20 * SECOND).await.unwrap();
    none.sigterm().unwrap();
    assert_eq!(none.exit_code(20 * SECOND).await.unwrap(), 0, "{}", none.log_tail(40));
    let (_, list) = env.control.devices().await.unwrap();
    assert_eq!(list["devices"], json!([]));
}

/// Two agents on the same credentials: the newer stream wins, the older agent exits 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_agent_exits_5() {
    let env = Env::start().await;
    let mut first = env.enrolling_agent().await;
    let id = env.online_device(&mut first).await;
    let mut second = Agent::builder(env.dispatcher.base_url())
        .root(env.root.path())
        .credentials_dir(first.credentials_dir())
        .spawn()
        .expect("agent spawns");
    assert_eq!(first.exit_code(20 * SECOND).await.unwrap(), 5, "{}", first.log_tail(40));
    assert!(second.is_running(), "the newer agent keeps serving\n{}", second.log_tail(40));
    let (status, read) = env.call(&id, "read_file", json!({"path": "hello.txt"})).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    second.sigterm().unwrap();
    assert_eq!(second.exit_code(20 * SECOND).await.unwrap(), 0);
}

/// The server is SIGKILLed and restarted on the same port and SQLite file; later it shuts down
/// gracefully and comes back again. The agent reconnects each time and serves; it never exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_survives_server_restarts() {
    let mut env = Env::start().await;
    let mut agent = env.enrolling_agent().await;
    let id = env.online_device(&mut agent).await;

    env.dispatcher.sigkill().unwrap();
    env.dispatcher.wait_exit(10 * SECOND).await.unwrap();
    tokio::time::sleep(SECOND).await;
    assert!(agent.is_running(), "a dropped connection is never an exit\n{}", agent.log_tail(40));
    env.dispatcher.restart().await.unwrap();
    env.control.wait_online(&id, true, 15 * SECOND).await.expect("the agent is back after a SIGKILL");
    let (status, read) = env.call(&id, "read_file", json!({"path": "hello.txt"})).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["result"]["content"], "hello\nworld\n");

    env.dispatcher.sigterm().unwrap();
    assert_eq!(env.dispatcher.wait_exit(20 * SECOND).await.unwrap().code(), Some(0));
    assert!(agent.is_running(), "a reconnect frame is not an exit\n{}", agent.log_tail(40));
    env.dispatcher.restart().await.unwrap();
    env.control.wait_online(&id, true, 15 * SECOND).await.expect("the agent is back after a graceful restart");
    let (status, listing) = env.call(&id, "list_directory", json!({"path": "docs"})).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert_eq!(file_names(&listing["result"]["entries"]), ["readme.md"]);

    agent.sigterm().unwrap();
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 0, "{}", agent.log_tail(40));
}
