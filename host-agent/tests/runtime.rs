//! The `host-agent` binary against a fake dispatcher: enrollment, calls and results, keepalive
//! silence, reconnects, and every exit code of the contract (0, 2, 3, 4, 5).
//!
//! Each test starts its own fake on a free port and its own agent process with temporary roots
//! and credentials, so the tests run in parallel. The in-process suites (slow tools, deadlines,
//! shutdown with a call in hand) are in `runtime_loop.rs`; TLS is in `runtime_tls.rs`.

mod runtime_support;

use std::time::Duration;

use axum::http::StatusCode;
use runtime_support::{run_args, seed_credentials, wait_until, AgentProcess, Fake};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

struct Dirs {
    root: tempfile::TempDir,
    creds: tempfile::TempDir,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().expect("root");
    std::fs::write(root.path().join("hello.txt"), "hello\n").expect("file");
    Dirs { root, creds: tempfile::tempdir().expect("creds") }
}

fn credential_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

/// Enrolls an agent with `code` and waits until it is connected.
async fn enrolled_agent(fake: &Fake, dirs: &Dirs, extra: &[&str]) -> AgentProcess {
    let mut args_extra = vec!["--code", "PAIR-1"];
    args_extra.extend_from_slice(extra);
    let agent = AgentProcess::spawn(&run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &args_extra), &[]);
    agent.wait_for_stderr("connected to", 1, WAIT).await;
    agent
}

#[tokio::test]
async fn enrolls_runs_calls_and_posts_results() {
    let fake = Fake::start(&["PAIR-1"]).await;
    let dirs = dirs();
    let agent = enrolled_agent(&fake, &dirs, &[]).await;

    // Enrollment: one request with the name and platform; a confirmation on stdout; the
    // credentials cached in a private file.
    let enrollments = fake.state.enrollments();
    assert_eq!(enrollments.len(), 1);
    assert_eq!(enrollments[0].name, "test device");
    assert!(enrollments[0].platform.as_deref().is_some_and(|p| !p.is_empty()));
    let device_id = fake.state.devices.lock().expect("lock").values().next().cloned().expect("device");
    wait_until("the enrollment confirmation", WAIT, || agent.stdout().contains(&device_id)).await;
    assert!(agent.stdout().contains("Enrolled this device") && agent.stdout().contains("test device"));
    let files = credential_files(dirs.creds.path());
    assert_eq!(files.len(), 1, "{files:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files[0]).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let token = fake.state.devices.lock().expect("lock").keys().next().cloned().expect("token");
    assert!(!agent.stderr().contains(&token) && !agent.stdout().contains(&token), "the token is never printed");
    assert!(agent.stderr().contains(&format!("connected to {} as device {device_id}", fake.url)), "{}", agent.stderr());

    // The manifest follows the ready frame.
    wait_until("the manifest", WAIT, || !fake.state.manifests().is_empty()).await;
    let manifest = fake.state.manifests()[0].clone();
    assert!(!manifest.tools.is_empty());
    assert_eq!(manifest.roots.len(), 1);
    assert_eq!(manifest.version, env!("CARGO_PKG_VERSION"));

    // A call: run, result posted with the call's traceparent.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    fake.state.send_call(&json!({
        "callId": "call-1", "tool": "stat", "input": {"path": "hello.txt"},
        "deadline": (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc3339(),
        "traceparent": traceparent, "someFutureField": true,
    }));
    wait_until("the result of call-1", WAIT, || fake.state.results().len() == 1).await;
    let posted = fake.state.results()[0].clone();
    assert_eq!(posted.result.call_id, "call-1");
    assert!(posted.result.ok, "{:?}", posted.result);
    assert_eq!(posted.traceparent.as_deref(), Some(traceparent));
    agent.wait_for_stderr("call call-1 stat ok", 1, WAIT).await;

    // The same call id again is not run; neither is an expired call, nor an unparsable frame.
    fake.state.send_call(&json!({"callId": "call-1", "tool": "stat", "input": {"path": "hello.txt"}}));
    agent.wait_for_stderr("call call-1 stat is a duplicate", 1, WAIT).await;
    fake.state.send_call(&json!({
        "callId": "call-2", "tool": "stat", "input": {"path": "."},
        "deadline": (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
    }));
    agent.wait_for_stderr("call call-2 stat arrived after its deadline", 1, WAIT).await;
    fake.state.send_raw("event: call\nid: junk\ndata: {this is not json\n\n");
    agent.wait_for_stderr("skipping a call frame", 1, WAIT).await;

    // A failing call is answered too, and the stream still works after all that.
    fake.state.send_call(&json!({"callId": "call-3", "tool": "no_such_tool", "input": {}}));
    wait_until("the result of call-3", WAIT, || fake.state.results().len() == 2).await;
    let failed = fake.state.results()[1].result.clone();
    assert_eq!(failed.call_id, "call-3");
    assert!(!failed.ok && failed.error.is_some(), "{failed:?}");
    assert_eq!(fake.state.results().len(), 2, "call-1 ran once, call-2 never");
    assert_eq!(fake.state.stream_count(), 1, "no reconnect was needed");
}

#[tokio::test]
async fn cached_credentials_need_no_code() {
    let fake = Fake::start(&[]).await;
    let dirs = dirs();
    fake.state.add_device("dev-cached", "tok-cached");
    seed_credentials(dirs.creds.path(), &fake.url, "dev-cached", "tok-cached");
    let agent = AgentProcess::spawn(&run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &[]), &[]);
    agent.wait_for_stderr("as device dev-cached", 1, WAIT).await;
    assert!(fake.state.enrollments().is_empty());
}

#[tokio::test]
async fn a_silent_stream_is_dropped_and_reconnected() {
    let fake = Fake::start(&["PAIR-1"]).await;
    fake.state.set_keepalive(None);
    let dirs = dirs();
    let agent = enrolled_agent(&fake, &dirs, &[]).await;
    // Keepalive 1 s: two seconds of silence and the agent opens a new stream.
    agent.wait_for_stderr("no keepalive for 2 s", 1, WAIT).await;
    wait_until("a second stream", WAIT, || fake.state.stream_count() >= 2).await;
    agent.wait_for_stderr("connected to", 2, WAIT).await;

    // With keepalives flowing, the stream stays up well past the silence limit.
    fake.state.set_keepalive(Some(Duration::from_millis(300)));
    let before = fake.state.stream_count();
    wait_until("a stream with keepalives", WAIT, || fake.state.stream_count() > before).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let streams = fake.state.stream_count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fake.state.stream_count(), streams, "a stream with keepalives is kept");
}

#[tokio::test]
async fn a_reconnect_frame_reconnects_at_once() {
    let fake = Fake::start(&["PAIR-1"]).await;
    let dirs = dirs();
    // A backoff whose very first window is 20 s: reconnecting within the 1.5 s allowed below
    // means the frame skipped the backoff.
    let mut args = run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &["--code", "PAIR-1"]);
    for (flag, value) in [("--backoff-base-ms", "20000"), ("--max-backoff-ms", "60000")] {
        let at = args.iter().position(|a| a == flag).expect("flag") + 1;
        args[at] = value.into();
    }
    let agent = AgentProcess::spawn(&args, &[]);
    agent.wait_for_stderr("connected to", 1, WAIT).await;
    fake.state.send_event("reconnect", r#"{"reason":"shutdown"}"#);
    agent.wait_for_stderr("asked this device to reconnect", 1, WAIT).await;
    wait_until("a second stream", Duration::from_millis(1500), || fake.state.stream_count() >= 2).await;
    agent.wait_for_stderr("connected to", 2, WAIT).await;
}

#[tokio::test]
async fn superseded_exits_5() {
    let fake = Fake::start(&["PAIR-1"]).await;
    let dirs = dirs();
    let mut agent = enrolled_agent(&fake, &dirs, &[]).await;
    fake.state.send_event("superseded", "{}");
    assert_eq!(agent.wait_exit(WAIT).await, 5);
    assert!(agent.stderr().contains("another process"), "{}", agent.stderr());
    assert_eq!(credential_files(dirs.creds.path()).len(), 1, "superseded keeps the credentials");
}

#[tokio::test]
async fn a_revoked_frame_exits_4_and_deletes_the_credentials() {
    let fake = Fake::start(&["PAIR-1"]).await;
    let dirs = dirs();
    let mut agent = enrolled_agent(&fake, &dirs, &[]).await;
    assert_eq!(credential_files(dirs.creds.path()).len(), 1);
    fake.state.send_event("revoked", "{}");
    assert_eq!(agent.wait_exit(WAIT).await, 4);
    assert!(credential_files(dirs.creds.path()).is_empty(), "credentials deleted");
    assert!(agent.stderr().contains("revoked"), "{}", agent.stderr());
}

#[tokio::test]
async fn unauthorized_on_connect_exits_4_and_deletes_the_credentials() {
    let fake = Fake::start(&[]).await;
    let dirs = dirs();
    let path = seed_credentials(dirs.creds.path(), &fake.url, "dev-gone", "tok-revoked");
    let mut agent = AgentProcess::spawn(&run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &[]), &[]);
    assert_eq!(agent.wait_exit(WAIT).await, 4);
    assert!(!path.exists(), "credentials deleted");
    assert_eq!(fake.state.refused_streams.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_refused_pairing_code_exits_3() {
    let fake = Fake::start(&["PAIR-1"]).await;
    let dirs = dirs();
    let args = run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &["--code", "WRONG"]);
    let mut agent = AgentProcess::spawn(&args, &[]);
    assert_eq!(agent.wait_exit(WAIT).await, 3);
    assert!(agent.stderr().contains("pairing code is unknown, expired or already used"), "{}", agent.stderr());
    assert!(credential_files(dirs.creds.path()).is_empty());
}

#[tokio::test]
async fn too_many_enrollment_attempts_exits_3_with_a_clear_message() {
    let fake = Fake::start(&["PAIR-1"]).await;
    fake.state.set_enroll_status(Some(StatusCode::TOO_MANY_REQUESTS));
    let dirs = dirs();
    let args = run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &["--code", "PAIR-1"]);
    let mut agent = AgentProcess::spawn(&args, &[]);
    assert_eq!(agent.wait_exit(WAIT).await, 3);
    assert!(agent.stderr().contains("too many enrollment attempts"), "{}", agent.stderr());
}

/// No credentials and no code: enrollment by link; a server that does not offer it (this fake
/// answers 404) is a refusal (exit 3) that names `--code`.
#[tokio::test]
async fn no_credentials_and_no_code_against_a_server_without_links_exits_3() {
    let fake = Fake::start(&[]).await;
    let dirs = dirs();
    let mut agent = AgentProcess::spawn(&run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &[]), &[]);
    assert_eq!(agent.wait_exit(WAIT).await, 3);
    assert!(agent.stderr().contains("does not offer enrollment by link"), "{}", agent.stderr());
    assert!(agent.stderr().contains("--code"), "{}", agent.stderr());
    assert_eq!(fake.state.stream_count(), 0);
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let dirs = dirs();
    for args in [
        vec!["run".to_owned()],
        vec![
            "run".into(),
            "--server".into(),
            "ftp://x".into(),
            "--root".into(),
            dirs.root.path().display().to_string(),
        ],
        vec!["run".into(), "--server".into(), "http://127.0.0.1:9".into(), "--root".into(), "/no/such/dir/here".into()],
        vec!["call".into(), "stat".into(), "{not json".into(), "--root".into(), dirs.root.path().display().to_string()],
        vec!["--bogus".into()],
    ] {
        let mut agent = AgentProcess::spawn(&args, &[]);
        assert_eq!(agent.wait_exit(WAIT).await, 2, "{args:?}");
    }
}

#[tokio::test]
async fn sigterm_exits_0() {
    let fake = Fake::start(&["PAIR-1"]).await;
    let dirs = dirs();
    let mut agent = enrolled_agent(&fake, &dirs, &[]).await;
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(WAIT).await, 0);
    assert!(agent.stderr().contains("SIGTERM received"), "{}", agent.stderr());
}

#[tokio::test]
async fn sigint_exits_0_even_while_reconnecting() {
    let dirs = dirs();
    let fake = Fake::start(&[]).await;
    fake.state.add_device("dev-1", "tok-1");
    let url = fake.url.clone();
    seed_credentials(dirs.creds.path(), &url, "dev-1", "tok-1");
    drop(fake);
    let mut agent = AgentProcess::spawn(&run_args(&[&url], dirs.root.path(), dirs.creds.path(), &[]), &[]);
    agent.wait_for_stderr("cannot open the stream", 1, WAIT).await;
    agent.signal("INT");
    assert_eq!(agent.wait_exit(WAIT).await, 0);
}

#[tokio::test]
async fn server_down_then_up_the_agent_reconnects() {
    let fake = Fake::start(&["PAIR-1"]).await;
    let dirs = dirs();
    let agent = enrolled_agent(&fake, &dirs, &[]).await;
    let (addr, state) = fake.stop().await;
    agent.wait_for_stderr("lost the stream to", 1, WAIT).await;
    agent.wait_for_stderr("cannot open the stream to", 2, WAIT).await;

    let fake = Fake::start_on(addr, state).await;
    agent.wait_for_stderr("connected to", 2, WAIT).await;
    fake.state.send_call(&json!({"callId": "after-restart", "tool": "stat", "input": {"path": "."}}));
    wait_until("a result after the restart", WAIT, || {
        fake.state.results().iter().any(|p| p.result.call_id == "after-restart")
    })
    .await;
}

#[tokio::test]
async fn servers_from_the_environment_are_tried_in_turn() {
    // The first server refuses connections; the second enrolls and holds the stream. Every
    // setting comes from the environment here.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let fake = Fake::start(&["PAIR-ENV"]).await;
    let dirs = dirs();
    let other_root = tempfile::tempdir().expect("root 2");
    let roots = std::env::join_paths([dirs.root.path(), other_root.path()]).expect("join");
    let servers = format!("{dead_url},{}", fake.url);
    let creds = dirs.creds.path().display().to_string();
    let env = [
        ("PULSN_URL", servers.as_str()),
        ("FUSION_HOST_ROOTS", roots.to_str().expect("utf-8")),
        ("FUSION_HOST_CODE", "PAIR-ENV"),
        ("FUSION_HOST_NAME", "from env"),
        ("FUSION_HOST_CREDENTIALS_DIR", creds.as_str()),
        ("FUSION_HOST_KEEPALIVE_SECS", "1"),
        ("FUSION_HOST_BACKOFF_BASE_MS", "50"),
        ("FUSION_HOST_MAX_BACKOFF_MS", "200"),
    ];
    let agent = AgentProcess::spawn(&["run".to_owned()], &env);
    agent.wait_for_stderr("connected to", 1, WAIT).await;
    assert_eq!(fake.state.enrollments()[0].name, "from env");
    assert!(agent.stderr().contains("enrollment with"), "the dead server was tried first");
    wait_until("the manifest", WAIT, || !fake.state.manifests().is_empty()).await;
    assert_eq!(fake.state.manifests()[0].roots.len(), 2, "FUSION_HOST_ROOTS split at the OS separator");
    // Credentials are cached under both origins: they are valid cluster-wide.
    assert_eq!(credential_files(dirs.creds.path()).len(), 2);
}

#[tokio::test]
async fn result_posts_are_retried_on_server_errors() {
    let fake = Fake::start(&["PAIR-1"]).await;
    let dirs = dirs();
    let agent = enrolled_agent(&fake, &dirs, &[]).await;
    fake.state.failing_results.store(2, std::sync::atomic::Ordering::SeqCst);
    fake.state.send_call(&json!({"callId": "retried", "tool": "stat", "input": {"path": "."}}));
    wait_until("the retried result", WAIT, || fake.state.results().len() == 1).await;
    assert_eq!(fake.state.result_attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
    agent.wait_for_stderr("result of call retried delivered", 1, WAIT).await;
}

#[tokio::test]
async fn tools_and_call_work_without_a_server() {
    let dirs = dirs();
    let root = dirs.root.path().display().to_string();
    let mut tools = AgentProcess::spawn(&["tools".into(), "--root".into(), root.clone()], &[]);
    assert_eq!(tools.wait_exit(WAIT).await, 0);
    let descriptors: Vec<protocol::ToolDescriptor> = serde_json::from_str(&tools.stdout()).expect("descriptors JSON");
    assert!(descriptors.iter().any(|d| d.name == "stat"));

    let mut call = AgentProcess::spawn(
        &["call".into(), "stat".into(), r#"{"path":"hello.txt"}"#.into(), "--root".into(), root.clone()],
        &[],
    );
    assert_eq!(call.wait_exit(WAIT).await, 0);
    let result: protocol::HostResult = serde_json::from_str(&call.stdout()).expect("result JSON");
    assert!(result.ok, "{result:?}");

    // A mutation proposes without --apply, and applies with it (planned and applied at once).
    let write = r#"{"path":"new.txt","content":"written\n"}"#;
    let mut plan =
        AgentProcess::spawn(&["call".into(), "write_file".into(), write.into(), "--root".into(), root.clone()], &[]);
    assert_eq!(plan.wait_exit(WAIT).await, 0);
    let result: protocol::HostResult = serde_json::from_str(&plan.stdout()).expect("result JSON");
    assert!(result.ok && result.is_proposal(), "{result:?}");
    assert!(!dirs.root.path().join("new.txt").exists(), "a proposal changes nothing");
    let mut apply = AgentProcess::spawn(
        &["call".into(), "write_file".into(), write.into(), "--root".into(), root.clone(), "--apply".into()],
        &[],
    );
    assert_eq!(apply.wait_exit(WAIT).await, 0);
    let result: protocol::HostResult = serde_json::from_str(&apply.stdout()).expect("result JSON");
    assert!(result.ok && !result.is_proposal(), "{result:?}");
    assert_eq!(std::fs::read_to_string(dirs.root.path().join("new.txt")).expect("written"), "written\n");

    let mut bad = AgentProcess::spawn(&["call".into(), "no_such_tool".into(), "{}".into(), "--root".into(), root], &[]);
    assert_eq!(bad.wait_exit(WAIT).await, 1);
    let result: protocol::HostResult = serde_json::from_str(&bad.stdout()).expect("result JSON");
    assert!(!result.ok);
}

/// A credentials directory left open (0755) and a file made readable (0644) are tightened to
/// 0700 and 0600 when the agent starts.
#[cfg(unix)]
#[tokio::test]
async fn an_open_credentials_directory_is_tightened_on_start() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| std::fs::metadata(path).expect("meta").permissions().mode() & 0o777;
    let fake = Fake::start(&[]).await;
    let dirs = dirs();
    fake.state.add_device("dev-open", "tok-open");
    let file = seed_credentials(dirs.creds.path(), &fake.url, "dev-open", "tok-open");
    std::fs::set_permissions(dirs.creds.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod file");
    let before = (mode(dirs.creds.path()), mode(&file));
    let agent = AgentProcess::spawn(&run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &[]), &[]);
    agent.wait_for_stderr("as device dev-open", 1, WAIT).await;
    let after = (mode(dirs.creds.path()), mode(&file));
    println!(
        "credentials directory and file modes: before {:o}/{:o}, after {:o}/{:o}",
        before.0, before.1, after.0, after.1
    );
    assert_eq!(after, (0o700, 0o600));
}

/// CPU seconds the process has used so far (user + system), from `/proc/<pid>/stat`.
#[cfg(target_os = "linux")]
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // USER_HZ is 100 on every Linux this runs on.
    ticks / 100.0
}

/// Ten hash_file calls on an 8 GiB file with a one-second deadline: the agent answers nothing
/// (the caller has gone) and, once the deadline has passed, stops burning CPU on them.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn abandoned_calls_stop_using_cpu_after_their_deadline() {
    let fake = Fake::start(&[]).await;
    let dirs = dirs();
    let big = std::fs::File::create(dirs.root.path().join("big.bin")).expect("create");
    big.set_len(8 << 30).expect("sparse 8 GiB");
    fake.state.add_device("dev-cpu", "tok-cpu");
    seed_credentials(dirs.creds.path(), &fake.url, "dev-cpu", "tok-cpu");
    let agent = AgentProcess::spawn(&run_args(&[&fake.url], dirs.root.path(), dirs.creds.path(), &[]), &[]);
    agent.wait_for_stderr("as device dev-cpu", 1, WAIT).await;
    let deadline = chrono::Utc::now() + chrono::Duration::seconds(1);
    for n in 0..10 {
        fake.state.send_call(&json!({
            "callId": format!("hash-{n}"), "tool": "hash_file", "input": {"path": "big.bin"},
            "deadline": deadline.to_rfc3339(),
        }));
    }
    agent.wait_for_stderr("call hash-9 hash_file received", 1, WAIT).await;
    // From half a second after the deadline, measure for two seconds.
    let settle = (deadline - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(500);
    tokio::time::sleep(settle).await;
    let start = cpu_seconds(agent.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let burnt = cpu_seconds(agent.pid()) - start;
    println!("CPU used by the agent in the 2 s from 0.5 s after the deadline: {burnt:.2} s");
    assert!(burnt < 0.3, "the agent kept working on abandoned calls: {burnt:.2} CPU seconds in 2 s");
    assert!(fake.state.results().is_empty(), "nothing is posted for calls past their deadline");
}
