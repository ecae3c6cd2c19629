//! The dispatcher embedded in an app: the workspace's `embedded-app` example (its own users,
//! sign-in and routes around the dispatcher's device-facing routes) with a real `host-agent`.
//! A user signs in, mints a pairing code through the app, the agent enrolls with the app and
//! the user reads a file on the device through the app's own route; another user cannot, a
//! path outside the roots is refused, an offline device answers 503, and SIGTERM stops the app.
//!
//! The binary comes from `cargo build --workspace` (scripts/test.sh builds it first).

use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::Agent;
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);

/// A running `embedded-app`, killed on drop.
struct EmbeddedApp {
    url: String,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl EmbeddedApp {
    async fn start() -> EmbeddedApp {
        let binary = e2e::bin::locate("embedded-app");
        assert!(binary.is_file(), "{} is missing: run `cargo build --workspace` first", binary.display());
        let dir = tempfile::Builder::new().prefix("e2e-embedded-app-").tempdir().expect("dir");
        let address = e2e::free_addr();
        let database = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
        let log = std::fs::File::create(dir.path().join("app.log")).expect("log");
        let child = tokio::process::Command::new(binary)
            .args(["--listen", &address.to_string(), "--database-url", &database])
            .args(["--user", "alice:correct-horse", "--user", "bob:battery-staple"])
            .env_remove("EMBEDDED_APP_USERS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("embedded-app starts");
        let app = EmbeddedApp { url: format!("http://{address}"), child, _dir: dir };
        let started = Instant::now();
        loop {
            if let Ok(answer) = reqwest::get(format!("{}/healthz", app.url)).await {
                if answer.status() == StatusCode::OK {
                    return app;
                }
            }
            assert!(started.elapsed() < 20 * SECOND, "embedded-app not healthy after 20 s\n{}", app.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("app.log")).unwrap_or_default()
    }

    async fn login(&self, user: &str, password: &str) -> (StatusCode, Value) {
        let answer = reqwest::Client::new()
            .post(format!("{}/login", self.url))
            .json(&json!({"user": user, "password": password}))
            .send()
            .await
            .expect("login");
        (answer.status(), answer.json().await.unwrap_or(Value::Null))
    }

    async fn session(&self, user: &str, password: &str) -> String {
        let (status, body) = self.login(user, password).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["session"].as_str().expect("session").to_owned()
    }

    async fn request(&self, method: reqwest::Method, path: &str, session: Option<&str>) -> (StatusCode, Value) {
        let mut request = reqwest::Client::new().request(method, format!("{}{path}", self.url));
        if let Some(session) = session {
            request = request.bearer_auth(session);
        }
        let answer = request.send().await.expect("request");
        (answer.status(), answer.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, session: &str) -> (StatusCode, Value) {
        self.request(reqwest::Method::GET, path, Some(session)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_embeds_the_dispatcher_with_its_own_auth_and_routes() {
    let mut app = EmbeddedApp::start().await;

    // The app's own sign-in.
    let (status, body) = app.login("alice", "wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let alice = app.session("alice", "correct-horse").await;
    let bob = app.session("bob", "battery-staple").await;
    let (status, _) = app.request(reqwest::Method::POST, "/pair", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the app's routes need a session");
    let (status, _) = app.get("/devices", "not-a-session").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Alice pairs a device through the app; the agent enrolls with the app itself.
    let (status, pairing) = app.request(reqwest::Method::POST, "/pair", Some(&alice)).await;
    assert_eq!(status, StatusCode::CREATED, "{pairing}");
    let code = pairing["code"].as_str().expect("code");
    assert!(pairing["command"].as_str().is_some_and(|c| c.contains(code) && c.contains(&app.url)), "{pairing}");
    let root = tempfile::Builder::new().prefix("e2e-root-").tempdir().expect("root");
    std::fs::write(root.path().join("notes.txt"), "first\nsecond\n").unwrap();
    let mut agent = Agent::builder(app.url.clone()).root(root.path()).code(code).spawn().expect("agent spawns");

    let started = Instant::now();
    let id = loop {
        let (status, list) = app.get("/devices", &alice).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        if let Some(device) = list["devices"].as_array().and_then(|d| d.iter().find(|d| d["online"] == true)) {
            assert_eq!(device["name"], "e2e-agent", "{list}");
            break device["id"].as_str().expect("id").to_owned();
        }
        assert!(agent.is_running(), "the agent exited\n{}", agent.log_tail(40));
        assert!(started.elapsed() < 20 * SECOND, "no device online: {list}\n{}\n{}", agent.log_tail(40), app.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The app's own route reaches the device through the dispatcher's service layer.
    let (status, read) = app.get(&format!("/devices/{id}/file?path=notes.txt"), &alice).await;
    assert_eq!(status, StatusCode::OK, "{read}\n{}", agent.log_tail(40));
    assert_eq!(read["content"], "first\nsecond\n", "{read}");
    assert_eq!(read["totalLines"], 2, "{read}");

    // Owner scoped: Bob neither sees nor reaches Alice's device.
    let (status, list) = app.get("/devices", &bob).await;
    assert_eq!((status, list), (StatusCode::OK, json!({"devices": []})));
    let (status, body) = app.get(&format!("/devices/{id}/file?path=notes.txt"), &bob).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // The device's scope holds whatever route the call came through.
    let (status, body) = app.get(&format!("/devices/{id}/file?path=../../../../etc/passwd"), &alice).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");

    // Offline answers at once.
    agent.sigterm().unwrap();
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 0, "{}", agent.log_tail(40));
    let asked = Instant::now();
    let (status, body) = app.get(&format!("/devices/{id}/file?path=notes.txt"), &alice).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "device offline");
    assert!(asked.elapsed() < 5 * SECOND, "offline is known at once, took {:?}", asked.elapsed());

    // SIGTERM stops the app.
    let pid = app.child.id().expect("pid");
    e2e::process::send_signal(pid, libc::SIGTERM).expect("SIGTERM");
    let exited = tokio::time::timeout(20 * SECOND, app.child.wait()).await.expect("exits").expect("status");
    assert_eq!(exited.code(), Some(0), "{}", app.log());
}
