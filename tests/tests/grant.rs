//! Enrollment by link (RFC 8628) with the real binaries: a `dispatcher` (SQLite file, and
//! PostgreSQL where a test says so) and a `host-agent run` with neither credentials nor
//! `--code`. The agent prints a link; the test approves it through the control API (once
//! through the admin page in Chromium: tests/ui/activate.mjs), denies it, lets it expire.
//! The OAuth endpoints are spoken raw: form bodies, the RFC's error codes, `slow_down` adding
//! 5 s, single use, racing polls, unknown codes, guessing answered 429, `--public-url`, and
//! every step on any replica of a cluster.
//!
//! Not here: the registry's state machine in detail (dispatcher/tests/grant_registry.rs).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::{Agent, Control, Dispatcher, TestDatabase};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const SECOND: Duration = Duration::from_secs(1);
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// A form that is refused, and how: status and OAuth error code.
type BadForm<'a> = (&'a [(&'a str, &'a str)], StatusCode, &'a str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A replica (polling interval 1 s unless `flags` say otherwise), a user's control API, a root.
struct Env {
    dispatcher: Dispatcher,
    control: Control,
    root: tempfile::TempDir,
    _db: Option<TestDatabase>,
}

impl Env {
    async fn start(backend: Backend, flags: &[(&str, &str)]) -> Env {
        let db = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TestDatabase::create().await.expect("a fresh PostgreSQL database")),
        };
        let mut builder = Dispatcher::builder().flag("--device-code-interval-secs", 1);
        if let Some(db) = &db {
            builder = builder.database_url(db.url());
        }
        for (name, value) in flags {
            builder = builder.flag(name, value);
        }
        let dispatcher = builder.start().await.expect("dispatcher starts");
        let token = dispatcher.mint_token("alice").await.expect("token create");
        let control = Control::new(dispatcher.base_url(), token);
        let root = tempfile::Builder::new().prefix("e2e-grant-root-").tempdir().expect("root");
        std::fs::write(root.path().join("hello.txt"), "hello\n").unwrap();
        Env { dispatcher, control, root, _db: db }
    }

    /// A `host-agent run` with no code and no credentials: it starts enrollment by link.
    fn agent(&self, name: &str) -> Agent {
        Agent::builder(self.dispatcher.base_url()).root(self.root.path()).name(name).spawn().expect("agent spawns")
    }

    /// POSTs a form to one of the OAuth endpoints; status, JSON body and `Cache-Control`.
    async fn form(&self, path: &str, form: &[(&str, &str)]) -> (StatusCode, Value, String) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.dispatcher.base_url()))
            .form(form)
            .send()
            .await
            .expect("request");
        let status = response.status();
        let cache = response.headers().get("cache-control").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body, cache)
    }

    async fn authorize(&self, name: &str) -> Value {
        let roots = serde_json::to_string(&[self.root.path().display().to_string()]).unwrap();
        let form = [("client_id", "host-agent"), ("name", name), ("platform", "linux"), ("roots", roots.as_str())];
        let (status, body, cache) = self.form("/api/host/device-authorization", &form).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(cache, "no-store");
        body
    }

    async fn poll(&self, device_code: &str) -> (StatusCode, Value) {
        let form = [("grant_type", GRANT_TYPE), ("device_code", device_code), ("client_id", "host-agent")];
        let (status, body, _) = self.form("/api/host/token", &form).await;
        (status, body)
    }

    async fn decide(&self, control: &Control, user_code: &str, verb: &str) -> (StatusCode, Value) {
        let path = match verb {
            "get" => format!("/api/device-authorizations/{user_code}"),
            verb => format!("/api/device-authorizations/{user_code}/{verb}"),
        };
        let method = if verb == "get" { Method::GET } else { Method::POST };
        control.request(method, &path, None).await.expect("request")
    }

    /// The one device of this user once it is online.
    async fn online_device(&self, agent: &mut Agent) -> Value {
        let started = Instant::now();
        loop {
            let devices = self.control.all_devices().await.expect("devices");
            if let Some(device) = devices.iter().find(|d| d["online"] == true) {
                return device.clone();
            }
            assert!(agent.is_running(), "the agent exited before coming online\n{}", agent.log_tail(60));
            assert!(started.elapsed() < 30 * SECOND, "no device online after 30 s\n{}", agent.log_tail(60));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The link the agent printed, and the user code in it.
async fn printed_link(agent: &mut Agent) -> (String, String) {
    agent.wait_for_log("/ui/activate?code=", 30 * SECOND).await.expect("the agent prints a link");
    let log = agent.log();
    let start = log.find("/ui/activate?code=").expect("link");
    let line_start = log[..start].rfind(char::is_whitespace).map_or(0, |i| i + 1);
    let link: String = log[line_start..].chars().take_while(|c| !c.is_whitespace()).collect();
    let code = link.rsplit_once("code=").expect("code").1.to_owned();
    (link, code)
}

fn is_user_code(code: &str) -> bool {
    let alphabet = "BCDFGHJKLMNPQRSTVWXZ";
    code.len() == 9 && code.chars().enumerate().all(|(i, c)| if i == 4 { c == '-' } else { alphabet.contains(c) })
}

/// The agent prints one link and the code; the user approves through the API; the agent
/// stores its credentials, confirms, connects, and later runs from its cached credentials.
async fn approve_through_the_api(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    let mut agent = env.agent("grant-laptop");
    let (link, code) = printed_link(&mut agent).await;
    assert!(is_user_code(&code), "{code}");
    assert_eq!(link, format!("{}/ui/activate?code={code}", env.dispatcher.base_url()), "made from the request's Host");
    assert!(agent.log().contains(&format!("enter the code {code}")), "{}", agent.log_tail(20));

    let (status, seen) = env.decide(&env.control, &code.to_lowercase().replace('-', ""), "get").await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["name"], "grant-laptop");
    assert_eq!(seen["platform"], std::env::consts::OS);
    assert_eq!(seen["roots"], json!([env.root.path().display().to_string()]));
    assert_eq!(seen["status"], "pending");
    assert_eq!(seen["userCode"], code.as_str());

    let (status, approved) = env.decide(&env.control, &code, "approve").await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    let device = env.online_device(&mut agent).await;
    assert_eq!(device["id"], approved["deviceId"]);
    assert_eq!(device["name"], "grant-laptop");
    agent.wait_for_log("Enrolled this device.", 10 * SECOND).await.unwrap();
    agent.wait_for_log("connected to", 10 * SECOND).await.unwrap();
    assert_eq!(agent.credential_files().len(), 1, "credentials cached like a pairing enrollment");
    let (status, after) = env.decide(&env.control, &code, "get").await;
    assert_eq!((status, after["status"].as_str()), (StatusCode::OK, Some("used")));

    // A call reaches it.
    let id = device["id"].as_str().unwrap();
    let (status, result) = env.control.call(id, "read_file", json!({"path": "hello.txt"}), Some(10_000)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result["result"]["content"], "hello\n");

    agent.sigterm().unwrap();
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 0);
    let mut again = Agent::builder(env.dispatcher.base_url())
        .root(env.root.path())
        .name("grant-laptop")
        .credentials_dir(agent.credentials_dir())
        .spawn()
        .unwrap();
    again.wait_for_log("using the cached credentials", 20 * SECOND).await.unwrap();
    env.control.wait_online(id, true, 20 * SECOND).await.expect("back online from the cache");
    assert!(!again.log().contains("/ui/activate"), "no second link");
    again.sigterm().unwrap();
    assert_eq!(again.exit_code(20 * SECOND).await.unwrap(), 0);
    assert_eq!(env.control.all_devices().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_through_the_api_sqlite() {
    approve_through_the_api(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_through_the_api_postgres() {
    approve_through_the_api(Backend::Postgres).await;
}

/// Denied: the agent's next poll answers `access_denied` and it exits 3, enrolling nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_link_exits_3() {
    let env = Env::start(Backend::Sqlite, &[]).await;
    let mut agent = env.agent("denied-laptop");
    let (_, code) = printed_link(&mut agent).await;
    let (status, body) = env.decide(&env.control, &code, "deny").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 3, "{}", agent.log_tail(30));
    assert!(agent.log().contains("not approved"), "{}", agent.log_tail(20));
    assert!(agent.credential_files().is_empty());
    assert!(env.control.all_devices().await.unwrap().is_empty());
    let (status, _) = env.decide(&env.control, &code, "approve").await;
    assert_eq!(status, StatusCode::CONFLICT, "decided");
}

/// Nobody approves within the (test-short) lifetime: `expired_token`, exit 3; the code can no
/// longer be approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_link_exits_3() {
    let env = Env::start(Backend::Sqlite, &[("--device-code-ttl-secs", "3")]).await;
    let mut agent = env.agent("late-laptop");
    let (_, code) = printed_link(&mut agent).await;
    assert_eq!(agent.exit_code(30 * SECOND).await.unwrap(), 3, "{}", agent.log_tail(30));
    assert!(agent.log().contains("expired"), "{}", agent.log_tail(20));
    let (status, seen) = env.decide(&env.control, &code, "get").await;
    assert_eq!((status, seen["status"].as_str()), (StatusCode::OK, Some("expired")));
    let (status, refused) = env.decide(&env.control, &code, "approve").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("expired"), "{refused}");
}

/// The two OAuth endpoints as RFC 8628 words them, the control endpoints around them, and a
/// pairing code that still works beside them. Default interval (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth_endpoints_speak_rfc_8628() {
    let env = Env::start(Backend::Sqlite, &[("--device-code-interval-secs", "5")]).await;
    let base = env.dispatcher.base_url();

    // Bad requests: not a form, no client, another client, no name, bad roots.
    let json = reqwest::Client::new()
        .post(format!("{base}/api/host/device-authorization"))
        .json(&json!({"client_id": "host-agent", "name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json.json::<Value>().await.unwrap()["error"], "invalid_request");
    let bad: &[BadForm] = &[
        (&[("name", "x")], StatusCode::BAD_REQUEST, "invalid_request"),
        (&[("client_id", "other"), ("name", "x")], StatusCode::BAD_REQUEST, "invalid_client"),
        (&[("client_id", "host-agent")], StatusCode::BAD_REQUEST, "invalid_request"),
        (&[("client_id", "host-agent"), ("name", "x"), ("roots", "/home")], StatusCode::BAD_REQUEST, "invalid_request"),
        (
            &[("client_id", "host-agent"), ("client_id", "host-agent"), ("name", "x")],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (form, want_status, want_error) in bad {
        let (status, body, _) = env.form("/api/host/device-authorization", form).await;
        assert_eq!((status, body["error"].as_str()), (*want_status, Some(*want_error)), "{form:?}: {body}");
        assert!(body["error_description"].is_string(), "{body}");
    }

    let granted = env.authorize("raw-device").await;
    let user_code = granted["user_code"].as_str().unwrap();
    let device_code = granted["device_code"].as_str().unwrap();
    assert!(is_user_code(user_code), "{granted}");
    assert_eq!(granted["verification_uri"], format!("{base}/ui/activate"));
    assert_eq!(granted["verification_uri_complete"], format!("{base}/ui/activate?code={user_code}"));
    assert_eq!((granted["expires_in"].as_u64(), granted["interval"].as_u64()), (Some(600), Some(5)));

    // Token requests that are not right.
    let bad: &[BadForm] = &[
        (
            &[("grant_type", "password"), ("device_code", device_code), ("client_id", "host-agent")],
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (&[("device_code", device_code), ("client_id", "host-agent")], StatusCode::BAD_REQUEST, "invalid_request"),
        (&[("grant_type", GRANT_TYPE), ("client_id", "host-agent")], StatusCode::BAD_REQUEST, "invalid_request"),
        (
            &[("grant_type", GRANT_TYPE), ("device_code", device_code), ("client_id", "web")],
            StatusCode::BAD_REQUEST,
            "invalid_client",
        ),
    ];
    for (form, want_status, want_error) in bad {
        let (status, body, _) = env.form("/api/host/token", form).await;
        assert_eq!((status, body["error"].as_str()), (*want_status, Some(*want_error)), "{form:?}: {body}");
    }

    // Pending; polling faster than the interval answers slow_down and adds 5 s each time.
    let (status, body) = env.poll(device_code).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("authorization_pending")), "{body}");
    for want in [10, 15] {
        let (status, body) = env.poll(device_code).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("slow_down")), "{body}");
        assert_eq!(body["interval"], want, "{body}");
    }

    // Another user sees it while pending; once alice approves, only alice.
    let bob = Control::new(base.clone(), env.dispatcher.mint_token("bob").await.unwrap());
    let (status, seen) = env.decide(&bob, user_code, "get").await;
    assert_eq!((status, seen["name"].as_str()), (StatusCode::OK, Some("raw-device")));
    let (status, approved) = env.decide(&env.control, user_code, "approve").await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    for verb in ["get", "approve", "deny"] {
        let (status, body) = env.decide(&bob, user_code, verb).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "bob {verb}: {body}");
    }
    for verb in ["approve", "deny"] {
        let (status, body) = env.decide(&env.control, user_code, verb).await;
        assert_eq!(status, StatusCode::CONFLICT, "alice {verb} again: {body}");
    }

    // The token, once; the device code is spent after.
    let (status, token) = env.poll(device_code).await;
    assert_eq!(status, StatusCode::OK, "{token}");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["device_id"], approved["deviceId"]);
    let access = token["access_token"].as_str().unwrap();
    let stream =
        reqwest::Client::new().get(format!("{base}/api/host/stream")).bearer_auth(access).send().await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK, "the token is a device token");
    drop(stream);
    let (status, reused) = env.poll(device_code).await;
    assert_eq!((status, reused["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{reused}");
    let (_, device) = env.control.device(token["device_id"].as_str().unwrap()).await.unwrap();
    assert_eq!(device["name"], "raw-device");

    // Unknown codes.
    let (status, body) = env.poll(&format!("dac_{}", "x".repeat(43))).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{body}");
    let (status, _) = env.decide(&env.control, "BCDF-GHJK", "get").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env.decide(&env.control, "not-a-code", "approve").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Pairing codes keep working beside it.
    let code = env.control.pairing_code().await.unwrap();
    let (status, enrolled) =
        e2e::TestDevice::enroll_raw(&base, &json!({"code": code, "name": "paired"})).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{enrolled}");
    assert_eq!(env.control.all_devices().await.unwrap().len(), 2);
}

/// Of racing token polls after approval, exactly one gets the token (PostgreSQL, the cluster's
/// database, and SQLite).
async fn racing_polls(backend: Backend) {
    let env = Env::start(backend, &[]).await;
    let granted = env.authorize("racer").await;
    let (status, _) = env.decide(&env.control, granted["user_code"].as_str().unwrap(), "approve").await;
    assert_eq!(status, StatusCode::OK);
    let env = std::sync::Arc::new(env);
    let polls = (0..8).map(|_| {
        let (env, code) = (env.clone(), granted["device_code"].as_str().unwrap().to_owned());
        tokio::spawn(async move { env.poll(&code).await })
    });
    let answers: Vec<(StatusCode, Value)> =
        futures::future::join_all(polls).await.into_iter().map(|joined| joined.expect("poll")).collect();
    let tokens = answers.iter().filter(|(status, _)| *status == StatusCode::OK).count();
    assert_eq!(tokens, 1, "{answers:?}");
    for (status, body) in answers.iter().filter(|(status, _)| *status != StatusCode::OK) {
        assert_eq!((*status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{body}");
    }
    assert_eq!(env.control.all_devices().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_polls_sqlite() {
    racing_polls(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_polls_postgres() {
    racing_polls(Backend::Postgres).await;
}

/// Guessing: wrong user codes are charged to the user (10 at once, then 429), wrong device
/// codes to the address (then 429, with new authorizations from that address too). Links
/// follow `--public-url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_is_answered_429_and_links_follow_the_public_url() {
    let env = Env::start(Backend::Sqlite, &[("--public-url", "https://dispatch.example.com/pulsn/")]).await;
    let granted = env.authorize("guessed").await;
    assert_eq!(granted["verification_uri"], "https://dispatch.example.com/pulsn/ui/activate");
    let user_code = granted["user_code"].as_str().unwrap().to_owned();

    // Ten wrong codes are 404; the next ones 429 (a slow machine may see one refill first).
    let mut statuses = Vec::new();
    for guess in ["BBBB-BBBB", "CCCC-CCCC", "DDDD-DDDD", "FFFF-FFFF", "GGGG-GGGG", "HHHH-HHHH"]
        .iter()
        .cycle()
        .filter(|guess| **guess != user_code)
        .take(14)
    {
        let verb = ["get", "approve", "deny"][statuses.len() % 3];
        let status = env.decide(&env.control, guess, verb).await.0;
        statuses.push(status);
        if status == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
    }
    assert!(statuses[..10].iter().all(|s| *s == StatusCode::NOT_FOUND), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    let (status, _) = env.decide(&env.control, &user_code, "get").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "the guesser waits, right code or not");
    let bob = Control::new(env.dispatcher.base_url(), env.dispatcher.mint_token("bob").await.unwrap());
    let (status, _) = env.decide(&bob, &user_code, "get").await;
    assert_eq!(status, StatusCode::OK, "another user is not held back");

    let mut answers = Vec::new();
    for i in 0..12 {
        let (status, body) = env.poll(&format!("dac_{:043}", i)).await;
        answers.push((status, body["error"].as_str().unwrap_or_default().to_owned()));
    }
    let refused = answers.iter().filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS).count();
    assert!(refused >= 2, "{answers:?}");
    assert!(
        answers.iter().all(|(s, e)| (*s == StatusCode::BAD_REQUEST && e == "invalid_grant")
            || (*s == StatusCode::TOO_MANY_REQUESTS && e == "slow_down")),
        "{answers:?}"
    );
    let form = [("client_id", "host-agent"), ("name", "more")];
    let (status, body, _) = env.form("/api/host/device-authorization", &form).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
}

/// `/ui/activate?code=…` in Debian's headless Chromium: the page shows the device's name,
/// platform and roots to the signed-in user, who approves it; the agent connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_activate_page_approves_a_device_in_chromium() {
    let dir = ui_dir();
    let env = Env::start(Backend::Sqlite, &[]).await;
    let mut agent = env.agent("page-laptop");
    let (link, _) = printed_link(&mut agent).await;
    let artifacts = e2e::bin::target_dir().join("ui-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut script = tokio::process::Command::new("node")
        .arg(dir.join("activate.mjs"))
        .current_dir(&dir)
        .env("UI_LINK", &link)
        .env("UI_TOKEN", &env.control.token)
        .env("UI_NAME", "page-laptop")
        .env("UI_ROOT", env.root.path().display().to_string())
        .env("UI_ARTIFACTS", &artifacts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut to_script = script.stdin.take().expect("stdin");
    let mut from_script = BufReader::new(script.stdout.take().expect("stdout")).lines();
    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = from_script.next_line().await.expect("reading the script") {
            eprintln!("[grant.rs] script: {line}");
            match line.trim() {
                "DONE" => return Ok(()),
                "FAILED" => return Err("the script failed".to_owned()),
                "STEP connected" => {
                    let device = env.online_device(&mut agent).await;
                    assert_eq!(device["name"], "page-laptop");
                    to_script.write_all(b"ok\n").await.expect("answering the script");
                }
                _ => {}
            }
        }
        Err("the script ended without DONE".to_owned())
    })
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(why)) => panic!("{why}\n{}", agent.log_tail(40)),
        Err(_) => panic!("the activate page test ran over 120 s\n{}", agent.log_tail(40)),
    }
    let status = tokio::time::timeout(Duration::from_secs(30), script.wait()).await.expect("exits").expect("status");
    assert!(status.success(), "the script exited with {status}");
    agent.wait_for_log("Enrolled this device.", 10 * SECOND).await.unwrap();
    let size = std::fs::metadata(artifacts.join("activate-400.png")).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "screenshot activate-400.png is missing or empty");
}

/// `tests/ui`, after checking that what the page script needs is installed (as tests/tests/ui.rs).
fn ui_dir() -> std::path::PathBuf {
    let dir = e2e::bin::workspace_root().join("tests/ui");
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.map(|o| o.status.success()).unwrap_or(false),
        "node is not installed: the page test needs Node.js 20 or newer (scripts/test.sh installs it)"
    );
    assert!(Path::new("/usr/bin/chromium").is_file(), "/usr/bin/chromium is missing (scripts/test.sh installs it)");
    assert!(
        dir.join("node_modules/playwright-core/package.json").is_file(),
        "playwright-core is not installed: run `npm ci` in {} (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// Behind a load balancer each request may land on another replica: the authorization is asked
/// for on A, looked up and approved on B, polled on both (PostgreSQL and NATS shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_serves_any_step_of_the_flow() {
    let cluster = e2e::LocalCluster::start(2).await.expect("two replicas");
    let client = reqwest::Client::new();
    let form = [("client_id", "host-agent"), ("name", "roaming"), ("roots", r#"["/srv"]"#)];
    let response = client.post(format!("{}/api/host/device-authorization", cluster.url(0))).form(&form).send().await;
    let granted: Value = response.unwrap().json().await.unwrap();
    let user_code = granted["user_code"].as_str().expect("user_code");
    let device_code = granted["device_code"].as_str().expect("device_code");
    let poll = |index: usize| {
        let form = [("grant_type", GRANT_TYPE), ("device_code", device_code), ("client_id", "host-agent")];
        let request = client.post(format!("{}/api/host/token", cluster.url(index))).form(&form);
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = poll(1).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("authorization_pending")), "{body}");

    let on_b = cluster.control_at(1);
    let (status, seen) =
        on_b.request(Method::GET, &format!("/api/device-authorizations/{user_code}"), None).await.unwrap();
    assert_eq!((status, seen["name"].as_str()), (StatusCode::OK, Some("roaming")), "{seen}");
    let (status, approved) =
        on_b.request(Method::POST, &format!("/api/device-authorizations/{user_code}/approve"), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{approved}");

    let (status, token) = poll(0).await;
    assert_eq!(status, StatusCode::OK, "{token}");
    assert_eq!(token["device_id"], approved["deviceId"]);
    let (status, reused) = poll(1).await;
    assert_eq!((status, reused["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{reused}");
    let (status, device) = cluster.control_at(0).device(approved["deviceId"].as_str().unwrap()).await.unwrap();
    assert_eq!((status, device["name"].as_str()), (StatusCode::OK, Some("roaming")), "{device}");
}
