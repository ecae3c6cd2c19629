//! The admin page in a real browser: Debian's headless Chromium driven by `playwright-core`
//! (`tests/ui/admin.mjs`) against a two-replica cluster (NATS and PostgreSQL) and a real
//! `host-agent`. The page is loaded from replica A; the agent connects to replica B. The
//! script signs in, pairs, waits for the device to appear live, runs tools through the form,
//! sees a proposal made through the API appear with its diff, approves it, revokes the device;
//! this side starts the agent, makes the proposal, and checks the disk and the agent's exit.
//! Screenshots (1280 and 400 px wide) go to `target/ui-artifacts/`.
//!
//! Missing node, Chromium or playwright-core is a failure that says what to install, never a
//! skip: `scripts/test.sh` installs them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use e2e::{Agent, LocalCluster};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CHROMIUM: &str = "/usr/bin/chromium";
const WRITTEN: &str = "written from the page test\n";

/// `tests/ui`, after checking that what the script needs is installed.
fn ui_dir() -> PathBuf {
    let dir = e2e::bin::workspace_root().join("tests/ui");
    let node = std::process::Command::new("node").arg("--version").output();
    let version = match node {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        _ => panic!("node is not installed: the page test needs Node.js 20 or newer (scripts/test.sh installs it)"),
    };
    let major: u32 = version.trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    assert!(major >= 20, "node {version} is too old: playwright-core needs Node.js 20 or newer");
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; scripts/test.sh does)"
    );
    assert!(
        dir.join("node_modules/playwright-core/package.json").is_file(),
        "playwright-core is not installed: run `npm ci` in {} (scripts/test.sh does)",
        dir.display()
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_drives_a_real_agent_across_replicas() {
    let dir = ui_dir();
    let cluster = LocalCluster::start(2).await.expect("two replicas");
    let root = tempfile::Builder::new().prefix("e2e-ui-root-").tempdir().unwrap();
    std::fs::write(root.path().join("hello.txt"), "hello\nworld\n").unwrap();
    let artifacts = e2e::bin::target_dir().join("ui-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let mut script = tokio::process::Command::new("node")
        .arg(dir.join("admin.mjs"))
        .current_dir(&dir)
        .env("UI_BASE", cluster.url(0))
        .env("UI_OTHER_REPLICA", cluster.replica_id(1))
        .env("UI_TOKEN", cluster.token())
        .env("UI_ARTIFACTS", &artifacts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut to_script = script.stdin.take().expect("stdin");
    let mut from_script = BufReader::new(script.stdout.take().expect("stdout")).lines();

    let mut agent: Option<Agent> = None;
    let mut device_id = String::new();
    let mut steps = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(line) = from_script.next_line().await.expect("reading the script") {
            eprintln!("[ui.rs] script: {line}");
            let words: Vec<&str> = line.split_whitespace().collect();
            let answer = match words.as_slice() {
                ["DONE"] => return Ok(()),
                ["FAILED"] => return Err("the script failed".to_owned()),
                ["STEP", "agent", code] => {
                    // The page was loaded from A; the agent goes to B.
                    let spawned = Agent::builder(cluster.url(1))
                        .code(*code)
                        .root(root.path())
                        .name("ui-laptop")
                        .spawn()
                        .expect("agent starts");
                    agent = Some(spawned);
                    "ok".to_owned()
                }
                ["STEP", "propose"] => {
                    let devices = cluster.devices(1).await.expect("devices");
                    let device = devices.iter().find(|d| d["name"] == "ui-laptop").expect("the agent's device");
                    device_id = device["id"].as_str().expect("id").to_owned();
                    let input = json!({"path": "notes.txt", "content": WRITTEN});
                    let (status, body) =
                        cluster.control_at(1).call(&device_id, "write_file", input, Some(10_000)).await.unwrap();
                    assert_eq!(status, StatusCode::OK, "{body}");
                    assert!(!root.path().join("notes.txt").exists(), "a proposal changes nothing");
                    format!("ok {}", body["proposalId"].as_str().expect("proposalId"))
                }
                ["STEP", "applied"] => match std::fs::read_to_string(root.path().join("notes.txt")) {
                    Ok(text) if text == WRITTEN => "ok".to_owned(),
                    other => format!("fail notes.txt is {other:?}"),
                },
                ["STEP", "revoked"] => {
                    let agent = agent.as_mut().expect("an agent");
                    match agent.exit_code(Duration::from_secs(10)).await {
                        Ok(4) => "ok".to_owned(),
                        other => format!("fail the agent ended with {other:?}"),
                    }
                }
                ["STEP", other, ..] => format!("fail unknown step {other}"),
                _ => continue,
            };
            steps.push(words[1].to_owned());
            to_script.write_all(format!("{answer}\n").as_bytes()).await.expect("answering the script");
        }
        Err("the script ended without DONE".to_owned())
    })
    .await;

    drop(to_script);
    let status = tokio::time::timeout(Duration::from_secs(30), script.wait()).await;
    let agent_log = agent.as_ref().map(|a| a.log_tail(40)).unwrap_or_default();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            panic!("{why} after steps {steps:?}\nagent:\n{agent_log}\nreplicas:\n{}", cluster.log_tails(20))
        }
        Err(_) => panic!("the page test ran over 240 s after steps {steps:?}\nagent:\n{agent_log}"),
    }
    let status = status.expect("the script exits").expect("its status");
    assert!(status.success(), "the script exited with {status}");
    assert_eq!(steps, ["agent", "propose", "applied", "revoked"]);
    for name in ["admin-1280.png", "admin-400.png", "admin-revoked-1280.png"] {
        let size = std::fs::metadata(artifacts.join(name)).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "screenshot {name} is missing or empty");
    }
    assert!(!device_id.is_empty());
}
