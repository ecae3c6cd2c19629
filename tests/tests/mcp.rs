//! MCP with the official SDKs as clients, unchanged: the Python `mcp` package on protocol
//! 2026-07-28 with its HTTP requests spread round-robin over three replicas, and the
//! TypeScript `@modelcontextprotocol/sdk` on a 2025 revision, both against a three-replica
//! cluster (NATS, PostgreSQL) with a real `host-agent`, plus the harness's test devices for the
//! answers a real agent does not give on demand (offline, silence).
//!
//! The client scripts live in tests/mcp/ (requirements.txt, package.json and its lock);
//! scripts/test.sh installs them. A missing Python or Node package fails the test, saying how
//! to install it: it never skips.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use e2e::{Agent, Answer, LocalCluster, TestDevice};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

fn clients_dir() -> PathBuf {
    e2e::bin::workspace_root().join("tests/mcp")
}

/// The venv's Python when scripts/test.sh made one, else `python3`.
fn python() -> PathBuf {
    let venv = clients_dir().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

struct Setup {
    cluster: LocalCluster,
    root: tempfile::TempDir,
    _agent: Agent,
    _silent: e2e::DeviceConn,
    env: Vec<(String, String)>,
}

const MANIFEST_TOOLS: &str =
    r#"[{"name": "read_file", "description": "Read a file", "inputSchema": {"type": "object"}, "class": "read"}]"#;

async fn setup() -> Setup {
    let cluster = LocalCluster::builder()
        .replicas(3)
        .configure(|_, builder| builder.flag("--mcp-call-timeout-ms", 1500))
        .start()
        .await
        .expect("three replicas");
    let root = tempfile::Builder::new().prefix("e2e-mcp-root-").tempdir().expect("root");
    std::fs::write(root.path().join("hello.txt"), "hello\nworld\n").unwrap();

    let code = cluster.control().pairing_code().await.unwrap();
    let agent =
        Agent::builder(cluster.url(1)).code(code).root(root.path()).name("laptop").spawn().expect("agent spawns");
    let mut device_id = None;
    for _ in 0..100 {
        let devices = cluster.devices(0).await.unwrap();
        if let Some(d) = devices
            .iter()
            .find(|d| d["name"] == "laptop" && d["online"] == true && d["toolCount"].as_u64().is_some_and(|n| n > 0))
        {
            device_id = d["id"].as_str().map(str::to_owned);
            break;
        }
        tokio::time::sleep(SECOND / 10).await;
    }
    let device_id = device_id.unwrap_or_else(|| panic!("the agent came online: {}", agent.log_tail(30)));

    let manifest = json!({"tools": serde_json::from_str::<serde_json::Value>(MANIFEST_TOOLS).unwrap(),
        "roots": ["/nowhere"], "version": "1", "platform": "linux"});
    let offline = cluster.pair_device(2, "sleeper").await.unwrap();
    offline.put_manifest(&cluster.url(2), &manifest).await.unwrap();
    let silent: TestDevice = cluster.pair_device(0, "silent").await.unwrap();
    silent.put_manifest(&cluster.url(0), &manifest).await.unwrap();
    let silent_conn = silent.connect(&cluster.url(0), Answer::Silent).await.unwrap();
    cluster.control_at(2).wait_online(&silent.device_id, true, 10 * SECOND).await.unwrap();

    let stranger = cluster.mint_token("mallory").await.unwrap();
    let env = vec![
        ("MCP_URLS".into(), cluster.urls().join(",")),
        ("MCP_TOKEN".into(), cluster.token().to_owned()),
        ("MCP_STRANGER_TOKEN".into(), stranger),
        ("MCP_DEVICE".into(), device_id),
        ("MCP_OFFLINE_DEVICE".into(), offline.device_id),
        ("MCP_SILENT_DEVICE".into(), silent.device_id.clone()),
        ("MCP_ROOT".into(), root.path().display().to_string()),
    ];
    Setup { cluster, root, _agent: agent, _silent: silent_conn, env }
}

/// Runs a client script; fails with its output unless it exits 0.
async fn run_client(program: &Path, args: &[&str], env: &[(String, String)], what: &str) -> String {
    let mut command = tokio::process::Command::new(program);
    command.args(args).current_dir(clients_dir()).stdin(Stdio::null()).kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(180), command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} ran over 180 s"))
        .unwrap_or_else(|e| panic!("{what}: cannot run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", output.status);
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_on_2026_07_28_round_robin() {
    let check = std::process::Command::new(python()).args(["-c", "import mcp, httpx2"]).output();
    let installed = check.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        installed,
        "the Python MCP SDK is missing: run scripts/test.sh, or python3 -m venv tests/mcp/.venv && \
         tests/mcp/.venv/bin/pip install -r tests/mcp/requirements.txt ({check:?})"
    );
    let s = setup().await;
    let out = run_client(&python(), &["python_client.py"], &s.env, "the Python client").await;
    assert!(out.contains("python client: all checks passed"), "{out}");
    // What the client saw is what is on disk.
    assert_eq!(std::fs::read_to_string(s.root.path().join("log.txt")).unwrap(), "once\n");
    assert_eq!(std::fs::read_to_string(s.root.path().join("twice.txt")).unwrap(), "x\n");
    assert!(!s.root.path().join("new.txt").exists() && !s.root.path().join("declined.txt").exists());
    let (_, pending) = s.cluster.control().proposals(Some("pending")).await.unwrap();
    assert_eq!(pending["proposals"].as_array().map(Vec::len), Some(2), "the unapproved write and the declined one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_on_2025() {
    let sdk = clients_dir().join("node_modules/@modelcontextprotocol/sdk/package.json");
    assert!(
        sdk.exists(),
        "the TypeScript MCP SDK is missing: run scripts/test.sh, or npm ci --prefix tests/mcp ({})",
        sdk.display()
    );
    let s = setup().await;
    let out = run_client(Path::new("node"), &["typescript_client.mjs"], &s.env, "the TypeScript client").await;
    assert!(out.contains("typescript client: all checks passed"), "{out}");
    assert!(!s.root.path().join("ts-new.txt").exists(), "a write proposes and changes nothing");
}
