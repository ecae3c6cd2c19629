//! The operator CLI end to end: the real `dispatcher` binary's `pair`, `devices`, `call`,
//! `proposals`, `approve`, `reject` and `revoke` run as processes against a two-replica
//! cluster (NATS and PostgreSQL, [`LocalCluster`]), some commands on one replica and some on
//! the other, with a real `host-agent` enrolled by the command `pair` printed and with the
//! harness's [`TestDevice`]s for the answers a real agent does not give on demand (silence,
//! offline). Every command's stdout, stderr and exit code is checked, and every `--json`
//! output is parsed. Commands run with stdin not a terminal, except where a pseudo-terminal
//! (util-linux `script`) answers the confirmation question.
//!
//! Not here: the control API itself (tests/cluster.rs, dispatcher/tests/api.rs) and the
//! renderers' details (unit tests beside them in dispatcher/src/cli/).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::{Agent, Answer, LocalCluster, TestDevice};
use protocol::HostResult;
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);

/// What a finished command printed and how it exited.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// stdout as one JSON document (panics with the output otherwise).
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    fn assert_code(&self, want: i32, what: &str) -> &Self {
        assert_eq!(self.code, want, "{what}: {self:#?}");
        // No colours on a pipe, and no escape sequence from anywhere.
        assert!(!self.stdout.contains('\x1b') && !self.stderr.contains('\x1b'), "{what}: escapes in {self:#?}");
        self
    }
}

/// `dispatcher <args>` with `env` as its only settings (the host's DISPATCHER_* are cleared),
/// stdin not a terminal.
async fn dispatcher_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(e2e::bin::dispatcher());
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for name in ["DISPATCHER_URL", "DISPATCHER_TOKEN", "DISPATCHER_CA_CERT", "DATABASE_URL", "NO_COLOR"] {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .unwrap_or_else(|_| panic!("dispatcher {args:?} ran over 90 s"))
        .expect("running the dispatcher binary");
    Run {
        code: output.status.code().unwrap_or_else(|| panic!("dispatcher {args:?} ended by a signal")),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

/// `dispatcher <args> --server <server> --token <token>`.
async fn cli(server: &str, token: &str, args: &[&str]) -> Run {
    let mut argv = args.to_vec();
    argv.extend(["--server", server, "--token", token]);
    dispatcher_env(&argv, &[]).await
}

/// `dispatcher <args> --server <server> --token <token>` on a pseudo-terminal (util-linux
/// `script`), typing `answer` and a newline: the confirmation question is asked.
async fn cli_on_terminal(server: &str, token: &str, args: &[&str], answer: &str) -> Run {
    let mut words = vec![e2e::bin::dispatcher().display().to_string()];
    words.extend(args.iter().map(|a| (*a).to_owned()));
    words.extend(["--server".into(), server.to_owned(), "--token".into(), token.to_owned()]);
    // Every word is an id, a URL, a token or a subcommand: no quoting needed, checked here.
    assert!(words.iter().all(|w| w.chars().all(|c| c.is_ascii_alphanumeric() || "/:._-".contains(c))), "{words:?}");
    let mut command = tokio::process::Command::new("script");
    command
        .args(["-qec", &words.join(" "), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    for name in ["DISPATCHER_URL", "DISPATCHER_TOKEN", "DISPATCHER_CA_CERT"] {
        command.env_remove(name);
    }
    let mut child = command.spawn().expect("script(1) from util-linux runs");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{answer}\n").as_bytes()).await.unwrap();
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the terminal run ends")
        .expect("script output");
    drop(stdin);
    // A terminal turns \n into \r\n and mixes stdout and stderr.
    let text = String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n");
    Run { code: output.status.code().expect("an exit code"), stdout: text, stderr: String::new() }
}

/// The first UUID-shaped word after `marker` in `text`.
fn id_after(text: &str, marker: &str) -> String {
    let start = text.find(marker).unwrap_or_else(|| panic!("{marker:?} not in {text}")) + marker.len();
    let id: String = text[start..].trim_start().chars().take(36).collect();
    assert!(protocol::subject::is_uuid(&id), "no id after {marker:?} in {text}");
    id
}

/// The row of a table whose first column is `first`, split on runs of blanks.
fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row starting {first:?} in\n{table}"))
}

/// Every column of a table starts where its header starts.
fn assert_aligned(table: &str, headers: &[&str]) {
    let mut lines = table.lines();
    let header = lines.next().expect("a header line");
    let starts: Vec<usize> =
        headers.iter().map(|h| header.find(h).unwrap_or_else(|| panic!("{h} in {header}"))).collect();
    for line in lines {
        for &start in &starts[1..] {
            let before = line.as_bytes().get(start.saturating_sub(2)..start);
            assert!(
                before.is_none() || before == Some(b"  ") || line.len() < start,
                "column at {start} not aligned in {line:?}\n{table}"
            );
        }
    }
}

fn root_with_files() -> tempfile::TempDir {
    let root = tempfile::Builder::new().prefix("e2e-cli-root-").tempdir().expect("root");
    std::fs::write(root.path().join("hello.txt"), "hello\nworld\n").unwrap();
    std::fs::create_dir(root.path().join("docs")).unwrap();
    std::fs::write(root.path().join("docs/readme.md"), "# readme\n").unwrap();
    root
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A real agent enrolled with the command `pair` printed; reads, a mutation's diff and
/// proposal, approve (asked without a terminal: refused; with --yes: the file is written),
/// reject, and revoke (the agent exits 4); commands alternate between the two replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_driven_through_every_command() {
    let cluster = LocalCluster::start(2).await.expect("two replicas");
    let (a, b, token) = (cluster.url(0), cluster.url(1), cluster.token().to_owned());
    let root = root_with_files();

    // pair on A prints the code and the exact command; that command enrolls the agent.
    let paired = cli(&a, &token, &["pair"]).await;
    paired.assert_code(0, "pair");
    assert!(paired.stdout.starts_with("Pairing code: "), "{paired:?}");
    assert!(paired.stdout.contains("(in 10 min)"), "{paired:?}");
    let command = paired.stdout.lines().find(|l| l.trim_start().starts_with("host-agent run")).expect("command");
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words.len(), 6, "{command}");
    assert_eq!(words[..3], ["host-agent", "run", "--server"]);
    assert_eq!((words[3], words[4]), (a.as_str(), "--code"), "the URL is the --server value");
    assert!(paired.stdout.starts_with(&format!("Pairing code: {}\n", words[5])), "{paired:?}");
    let mut agent = Agent::builder(words[3]).code(words[5]).root(root.path()).name("laptop").spawn().expect("agent");

    // pair --json on B: the API's document; the TTL is the one asked for.
    let minted = cli(&b, &token, &["pair", "--json", "--ttl-secs", "120"]).await;
    let code = minted.assert_code(0, "pair --json").json();
    assert!(code["code"].as_str().is_some_and(|c| c.len() >= 12), "{code}");
    let expires: chrono::DateTime<chrono::Utc> = code["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = (expires - chrono::Utc::now()).num_seconds();
    assert!((100..=120).contains(&left), "expires in {left} s");

    // devices on B: the agent appears, online, by name, with its tools' manifest.
    let started = Instant::now();
    let listed = loop {
        let run = cli(&b, &token, &["devices", "--json"]).await;
        let listed = run.assert_code(0, "devices --json").json();
        if listed["devices"].as_array().is_some_and(|d| d.iter().any(|d| d["name"] == "laptop" && d["online"] == true))
        {
            break listed;
        }
        assert!(agent.is_running(), "the agent exited\n{}", agent.log_tail(40));
        assert!(started.elapsed() < 20 * SECOND, "the agent is not online after 20 s: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let id = listed["devices"][0]["id"].as_str().expect("id").to_owned();
    let table = cli(&b, &token, &["devices"]).await;
    table.assert_code(0, "devices");
    assert!(table.stdout.starts_with("NAME "), "{table:?}");
    assert_aligned(&table.stdout, &["NAME", "ID", "ONLINE", "REPLICA", "PLATFORM", "LAST SEEN"]);
    let cells = row(&table.stdout, "laptop");
    assert_eq!(cells[1], id, "{table:?}");
    assert_eq!(cells[2], "yes", "{table:?}");
    assert!(["replica-a", "replica-b"].contains(&cells[3]), "{table:?}");
    assert_eq!(cells.last(), Some(&"now"), "{table:?}");

    // call by unique name (B): the file's text, exactly.
    let hello = cli(&b, &token, &["call", "laptop", "read_file", r#"{"path":"hello.txt"}"#]).await;
    hello.assert_code(0, "read_file by name");
    assert_eq!(hello.stdout, "hello\nworld\n");
    assert_eq!(hello.stderr, "");
    // call by id (A): the listing as a table.
    let listing = cli(&a, &token, &["call", &id, "list_directory", r#"{"path":"."}"#]).await;
    listing.assert_code(0, "list_directory by id");
    assert!(listing.stdout.starts_with("TYPE  SIZE  PATH\n"), "{listing:?}");
    let hello_path = root.path().join("hello.txt").display().to_string();
    assert_eq!(row(&listing.stdout, "file")[1..], ["12", hello_path.as_str()], "{listing:?}");
    assert_eq!(row(&listing.stdout, "dir")[1], "-", "{listing:?}");
    // Another read: pretty JSON; --json: the API's answer.
    let stat = cli(&a, &token, &["call", "laptop", "stat", r#"{"path":"hello.txt"}"#, "--json"]).await;
    let stat = stat.assert_code(0, "stat --json").json();
    assert_eq!((stat["ok"].clone(), stat["result"]["size"].clone()), (json!(true), json!(12)), "{stat}");
    let hash = cli(&b, &token, &["call", "laptop", "hash_file", r#"{"path":"hello.txt"}"#]).await;
    hash.assert_code(0, "hash_file");
    assert_eq!(serde_json::from_str::<Value>(&hash.stdout).expect("pretty JSON")["algorithm"], "sha256");

    // The tool's own failures: ok:false is exit 1, in words.
    let missing = cli(&b, &token, &["call", "laptop", "read_file", r#"{"path":"missing.txt"}"#]).await;
    missing.assert_code(1, "read of a missing file");
    assert!(missing.stderr.starts_with("error: read_file failed: "), "{missing:?}");
    let outside = cli(&a, &token, &["call", &id, "read_file", r#"{"path":"../../../etc/passwd"}"#]).await;
    outside.assert_code(1, "read outside the roots");
    assert_eq!(outside.stdout, "");

    // A mutation (A): summary, diff and proposal id with the command to approve it; nothing
    // changes on disk.
    let notes = root.path().join("notes.txt");
    let proposed =
        cli(&a, &token, &["call", "laptop", "write_file", r#"{"path":"notes.txt","content":"hi there\n"}"#]).await;
    proposed.assert_code(0, "write_file proposal");
    assert!(proposed.stdout.starts_with("Proposed (nothing has changed yet): "), "{proposed:?}");
    assert!(proposed.stdout.contains("notes.txt"), "{proposed:?}");
    assert!(proposed.stdout.lines().any(|l| l == "+hi there"), "the diff: {proposed:?}");
    let first = id_after(&proposed.stdout, "Proposal: ");
    assert!(proposed.stdout.contains(&format!("dispatcher approve {first} --server {a}\n")), "{proposed:?}");
    assert_eq!(read(&notes), None, "a proposal changes nothing");

    // proposals (B): the pending one, its device by name.
    let pending = cli(&b, &token, &["proposals"]).await;
    pending.assert_code(0, "proposals");
    assert_aligned(&pending.stdout, &["ID", "DEVICE", "TOOL", "STATUS", "CREATED", "SUMMARY"]);
    assert_eq!(row(&pending.stdout, &first)[1..4], ["laptop", "write_file", "pending"], "{pending:?}");
    let pending_json = cli(&b, &token, &["proposals", "--json"]).await;
    let pending_json = pending_json.assert_code(0, "proposals --json").json();
    assert_eq!(pending_json["proposals"].as_array().map(Vec::len), Some(1), "{pending_json}");
    assert_eq!(pending_json["proposals"][0]["id"], first.as_str());

    // approve without --yes and no terminal: a usage error, nothing applied, never a hang.
    let asked = cli(&b, &token, &["approve", &first]).await;
    asked.assert_code(2, "approve without --yes");
    assert!(asked.stderr.contains("--yes"), "{asked:?}");
    assert_eq!(read(&notes), None);
    // approve --yes (B): the diff, then the outcome; the file is on disk.
    let approved = cli(&b, &token, &["approve", &first, "--yes"]).await;
    approved.assert_code(0, "approve --yes");
    assert!(
        approved.stdout.starts_with(&format!("Proposal {first} (pending)\nDevice:  laptop ({id})\n")),
        "{approved:?}"
    );
    assert!(approved.stdout.lines().any(|l| l == "+hi there"), "{approved:?}");
    assert!(approved.stdout.contains("Applied."), "{approved:?}");
    assert_eq!(read(&notes).as_deref(), Some("hi there\n"));
    // Again (A): the server's 409, exit 5, its words on stderr.
    let again = cli(&a, &token, &["approve", &first, "--yes"]).await;
    again.assert_code(5, "approve twice");
    assert!(again.stderr.contains("not pending") && again.stderr.contains("409"), "{again:?}");

    let none = cli(&a, &token, &["proposals"]).await;
    assert_eq!(none.assert_code(0, "no proposals").stdout, "No pending proposals.\n");
    let all = cli(&a, &token, &["proposals", "--all"]).await;
    all.assert_code(0, "proposals --all");
    assert_eq!(row(&all.stdout, &first)[3], "applied", "{all:?}");

    // A second proposal, proposed and rejected (A, then B); a third, approved with --json.
    let second =
        cli(&b, &token, &["call", &id, "append_file", r#"{"path":"notes.txt","content":"more\n"}"#, "--json"]).await;
    let second = second.assert_code(0, "append_file --json").json();
    assert_eq!(second["proposal"], true, "{second}");
    let second = second["proposalId"].as_str().expect("proposalId").to_owned();
    let rejected = cli(&a, &token, &["reject", &second]).await;
    rejected.assert_code(0, "reject");
    assert!(rejected.stdout.contains(&format!("Rejected proposal {second}")), "{rejected:?}");
    assert!(rejected.stdout.contains("status is now rejected"), "{rejected:?}");
    let twice = cli(&b, &token, &["reject", &second]).await;
    twice.assert_code(5, "reject twice");
    let approve_rejected = cli(&b, &token, &["approve", &second, "--yes"]).await;
    approve_rejected.assert_code(5, "approve a rejected proposal");
    assert_eq!(read(&notes).as_deref(), Some("hi there\n"));

    let third = cli(&a, &token, &["call", "laptop", "append_file", r#"{"path":"notes.txt","content":"end\n"}"#]).await;
    let third = id_after(&third.assert_code(0, "third proposal").stdout, "Proposal: ");
    let applied = cli(&b, &token, &["approve", &third, "--yes", "--json"]).await;
    let result = applied.assert_code(0, "approve --json").json();
    assert_eq!(result["ok"], true, "{result}");
    assert!(applied.stderr.contains("+end"), "the preview goes to stderr with --json: {applied:?}");
    assert_eq!(read(&notes).as_deref(), Some("hi there\nend\n"));
    let history = cli(&b, &token, &["proposals", "--all", "--json"]).await;
    let statuses: Vec<String> = history.assert_code(0, "proposals --all --json").json()["proposals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{}={}", p["id"].as_str().unwrap(), p["status"].as_str().unwrap()))
        .collect();
    for want in [format!("{first}=applied"), format!("{second}=rejected"), format!("{third}=applied")] {
        assert!(statuses.contains(&want), "{want} in {statuses:?}");
    }

    // revoke: asked without a terminal is refused; --yes revokes (B) and the agent exits 4.
    let asked = cli(&a, &token, &["revoke", "laptop"]).await;
    asked.assert_code(2, "revoke without --yes");
    assert!(agent.is_running(), "a refused revoke revokes nothing");
    let revoked = cli(&b, &token, &["revoke", "laptop", "--yes"]).await;
    revoked.assert_code(0, "revoke --yes");
    assert_eq!(revoked.stdout, format!("Revoked laptop ({id}).\n"));
    assert_eq!(agent.exit_code(10 * SECOND).await.expect("the agent exits"), 4, "{}", agent.log_tail(40));
    let gone = cli(&a, &token, &["devices"]).await;
    assert_eq!(gone.assert_code(0, "devices after revoke").stdout, "No devices yet. Pair one with: dispatcher pair\n");
    let again = cli(&a, &token, &["revoke", &id, "--yes", "--json"]).await;
    again.assert_code(5, "revoke twice");
    assert_eq!(again.stdout, "");
}

/// The exit codes: offline 3, timed out 4, a tool's failure 1, refusals 5 (bad token, unknown
/// device or proposal, another user's device), unreachable 6, usage 2 (ambiguous name, bad
/// JSON, no token); settings from the environment, the flag winning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_across_two_replicas() {
    let cluster = LocalCluster::start(2).await.expect("two replicas");
    let (a, b, token) = (cluster.url(0), cluster.url(1), cluster.token().to_owned());

    // A device that never answers, on A; called through B with a short timeout: 4.
    let silent = cluster.pair_device(0, "silent").await.unwrap();
    let _silent_conn = silent.connect(&a, Answer::Silent).await.unwrap();
    cluster.control_at(1).wait_online(&silent.device_id, true, 10 * SECOND).await.unwrap();
    let started = Instant::now();
    let timed_out = cli(&b, &token, &["call", "silent", "stat", r#"{"path":"."}"#, "--timeout-ms", "300"]).await;
    timed_out.assert_code(4, "silent device");
    assert!(timed_out.stderr.contains("device timed out") && timed_out.stderr.contains("300 ms"), "{timed_out:?}");
    assert!(started.elapsed() < 15 * SECOND, "answered at the timeout, took {:?}", started.elapsed());
    let timed_out = cli(&a, &token, &["call", &silent.device_id, "stat", "--timeout-ms", "200", "--json"]).await;
    assert_eq!(timed_out.assert_code(4, "silent --json").json()["error"], "device timed out");

    // Enrolled but never connected: offline, 3, at once.
    let sleeper = cluster.pair_device(1, "sleeper").await.unwrap();
    let offline = cli(&a, &token, &["call", "sleeper", "stat", r#"{"path":"."}"#]).await;
    offline.assert_code(3, "offline device");
    assert!(offline.stderr.contains("device offline"), "{offline:?}");
    let offline = cli(&b, &token, &["call", &sleeper.device_id, "stat", "--json"]).await;
    assert_eq!(offline.assert_code(3, "offline --json").json()["error"], "device offline");

    // A device whose tool answers ok:false: 1, with its words.
    let failing = cluster.pair_device(1, "failing").await.unwrap();
    let failing_answer =
        Answer::with(|call| Some(HostResult::failure(call.call_id.clone(), "path is outside the roots")));
    let failing_conn = failing.connect(&b, failing_answer).await.unwrap();
    cluster.control_at(0).wait_online(&failing.device_id, true, 10 * SECOND).await.unwrap();
    let failed = cli(&a, &token, &["call", "failing", "read_file", r#"{"path":"/etc/passwd"}"#]).await;
    failed.assert_code(1, "ok:false");
    assert_eq!(failed.stderr, "error: read_file failed: path is outside the roots\n");
    let failed = cli(&b, &token, &["call", "failing", "read_file", r#"{"path":"x"}"#, "--json"]).await;
    assert_eq!(failed.assert_code(1, "ok:false --json").json()["ok"], false);

    // Bad JSON input: 2, and nothing reaches the device.
    let pushed = failing_conn.total_received();
    for input in ["{path:", "not json", ""] {
        let bad = cli(&a, &token, &["call", "failing", "read_file", input]).await;
        bad.assert_code(2, "bad JSON input");
        assert!(bad.stderr.contains("not valid JSON"), "{bad:?}");
    }
    assert_eq!(failing_conn.total_received(), pushed, "bad input is never sent");

    // Two devices share a name: 2, the candidates listed; by id each is still reachable.
    let twin_a = cluster.pair_device(0, "twin").await.unwrap();
    let twin_b = cluster.pair_device(1, "twin").await.unwrap();
    for args in [&["call", "twin", "stat"][..], &["revoke", "twin", "--yes"]] {
        let ambiguous = cli(&b, &token, args).await;
        ambiguous.assert_code(2, "ambiguous name");
        assert!(ambiguous.stderr.contains("2 devices are named \"twin\""), "{ambiguous:?}");
        assert!(ambiguous.stderr.contains(&twin_a.device_id) && ambiguous.stderr.contains(&twin_b.device_id));
    }
    cli(&a, &token, &["call", &twin_a.device_id, "stat"]).await.assert_code(3, "a twin by id");

    // Unknown devices and proposals, another user's device: the server's 404, 5.
    let nobody = uuid::Uuid::new_v4().to_string();
    for (args, words) in [
        (vec!["call", "desktop", "stat"], "no device \"desktop\""),
        (vec!["call", nobody.as_str(), "stat"], "no device"),
        (vec!["call", "a/../b c", "stat"], "no device"),
        (vec!["revoke", "desktop", "--yes"], "no device \"desktop\""),
        (vec!["approve", nobody.as_str(), "--yes"], "no proposal"),
        (vec!["approve", "not-an-id", "--yes"], "no proposal"),
        (vec!["reject", nobody.as_str()], "no proposal"),
    ] {
        let unknown = cli(&b, &token, &args).await;
        unknown.assert_code(5, &format!("unknown: {args:?}"));
        assert!(unknown.stderr.contains(words) && unknown.stderr.contains("404"), "{args:?}: {unknown:?}");
    }
    let stranger = cluster.mint_token("user-b").await.unwrap();
    let foreign = cli(&a, &stranger, &["call", &failing.device_id, "stat"]).await;
    foreign.assert_code(5, "another user's device");
    let empty = cli(&a, &stranger, &["devices", "--json"]).await;
    assert_eq!(empty.assert_code(0, "another user's list").json(), json!({"devices": []}));

    // A bad token: 5 with the server's words, on every command.
    for args in [
        &["devices"][..],
        &["pair"],
        &["proposals", "--all"],
        &["call", &failing.device_id, "stat"],
        &["call", "failing", "stat"],
        &["reject", &nobody],
        &["approve", &nobody, "--yes"],
        &["revoke", &failing.device_id, "--yes"],
    ] {
        let refused = cli(&a, "not-a-token", args).await;
        refused.assert_code(5, &format!("bad token: {args:?}"));
        assert!(refused.stderr.contains("401"), "{args:?}: {refused:?}");
    }
    assert_eq!(failing_conn.total_received(), pushed, "no call with a bad token");

    // Nobody listening: 6, for every command.
    let closed = format!("http://127.0.0.1:{}", e2e::free_port());
    for args in [
        &["devices"][..],
        &["pair"],
        &["proposals"],
        &["call", "failing", "stat"],
        &["reject", &nobody],
        &["approve", &nobody, "--yes"],
        &["revoke", "failing", "--yes"],
    ] {
        let unreachable = cli(&closed, &token, args).await;
        unreachable.assert_code(6, &format!("unreachable: {args:?}"));
        assert!(unreachable.stderr.starts_with("error: cannot reach the server at "), "{unreachable:?}");
    }

    // Usage: no token, a server that is no URL, a confirmation with no terminal.
    let no_token = dispatcher_env(&["devices", "--server", &a], &[]).await;
    no_token.assert_code(2, "no token");
    assert!(no_token.stderr.contains("DISPATCHER_TOKEN"), "{no_token:?}");
    cli("localhost:8080", &token, &["devices"]).await.assert_code(2, "a server that is no URL");
    cli(&a, &token, &["pair", "--ttl-secs", "0"]).await.assert_code(2, "ttl out of range");

    // Settings from the environment; a flag wins over its variable.
    let env = [("DISPATCHER_URL", b.as_str()), ("DISPATCHER_TOKEN", token.as_str())];
    let from_env = dispatcher_env(&["devices"], &env).await;
    from_env.assert_code(0, "settings from the environment");
    for name in ["silent", "sleeper", "failing", "twin"] {
        row(&from_env.stdout, name);
    }
    assert_eq!(row(&from_env.stdout, "silent")[2], "yes", "{from_env:?}");
    assert_eq!(row(&from_env.stdout, "sleeper")[2..], ["no", "-", "-", "never"], "{from_env:?}");
    let env = [("DISPATCHER_URL", closed.as_str()), ("DISPATCHER_TOKEN", "not-a-token")];
    let flags_win = dispatcher_env(&["devices", "--json", "--server", &a, "--token", &token], &env).await;
    assert_eq!(flags_win.assert_code(0, "flags win").json()["devices"].as_array().map(Vec::len), Some(5));
}

/// Confirmation on a terminal (declined approve and revoke change nothing), and a proposal
/// whose device went offline: approve answers 3 and leaves it pending; once the device is back,
/// a yes applies it (the device gets `mode: apply` with the stored input, once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_on_a_terminal_and_approving_while_offline() {
    let cluster = LocalCluster::start(2).await.expect("two replicas");
    let (a, b, token) = (cluster.url(0), cluster.url(1), cluster.token().to_owned());
    let device: TestDevice = cluster.pair_device(0, "desk").await.unwrap();
    let applied = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<Value>::new()));
    let answer = {
        let applied = applied.clone();
        move || {
            let applied = applied.clone();
            Answer::with(move |call| {
                if call.is_apply() {
                    applied.lock().push(call.input.clone());
                    return Some(HostResult::success(call.call_id.clone(), json!({"written": 3})));
                }
                let plan = json!({"tool": call.tool, "summary": "Create a.txt (3 bytes)",
                    "diff": "--- a/a.txt\n+++ b/a.txt\n@@ -0,0 +1 @@\n+abc\n", "preconditions": {"absent": true}});
                Some(HostResult::proposal(call.call_id.clone(), plan))
            })
        }
    };
    let conn = device.connect(&a, answer()).await.unwrap();
    cluster.control_at(1).wait_online(&device.device_id, true, 10 * SECOND).await.unwrap();
    let proposed = cli(&b, &token, &["call", "desk", "write_file", r#"{"path":"a.txt","content":"abc"}"#]).await;
    let id = id_after(&proposed.assert_code(0, "proposal").stdout, "Proposal: ");
    assert!(proposed.stdout.contains("Create a.txt (3 bytes)\n--- a/a.txt\n+++ b/a.txt\n@@ -0,0 +1 @@\n+abc\n"));

    // On a terminal the question is asked: no keeps it pending, and nothing is pushed.
    let declined = cli_on_terminal(&a, &token, &["approve", &id], "n").await;
    declined.assert_code(0, "approve answered no");
    assert!(declined.stdout.contains("+abc\nApply? [y/N] "), "{declined:?}");
    assert!(declined.stdout.contains("Not applied; the proposal stays pending."), "{declined:?}");
    assert!(applied.lock().is_empty());
    let kept = cli_on_terminal(&b, &token, &["revoke", "desk"], "").await;
    kept.assert_code(0, "revoke answered nothing");
    assert!(kept.stdout.contains(&format!("Revoke desk ({})? ", device.device_id)), "{kept:?}");
    assert!(kept.stdout.contains("Not revoked."), "{kept:?}");
    cluster.control_at(0).wait_online(&device.device_id, true, SECOND).await.expect("still enrolled and online");

    drop(conn);
    cluster.wait_presence(&device.device_id, false, 10 * SECOND).await.unwrap();
    let offline = cli(&b, &token, &["approve", &id, "--yes"]).await;
    offline.assert_code(3, "approve while offline");
    assert!(offline.stderr.contains("stays pending"), "{offline:?}");
    let still = cli(&a, &token, &["proposals", "--json"]).await;
    assert_eq!(still.assert_code(0, "still pending").json()["proposals"][0]["status"], "pending");

    let _conn = device.connect(&b, answer()).await.unwrap();
    cluster.wait_presence(&device.device_id, true, 10 * SECOND).await.unwrap();
    let done = cli_on_terminal(&a, &token, &["approve", &id], "y").await;
    done.assert_code(0, "approve answered yes, once back");
    assert!(done.stdout.ends_with("Apply? [y/N] Applied.\n{\n  \"written\": 3\n}\n"), "{done:?}");
    assert_eq!(*applied.lock(), vec![json!({"path": "a.txt", "content": "abc"})], "applied once, stored input");
}
