//! Domain tools end to end, with the real binaries: a `dispatcher` (embedded default) and a
//! `host-agent run --tools-file F` serving a temporary root, driven through the control API as
//! an app backend would. Also the example crate's own agent binary (`examples/ifc-agent`, a
//! domain tool written in Rust), and `host-agent tools --tools-file` on good and bad files.
//!
//! What is tried: path arguments inside, outside, through `..` and through a symlink out (and
//! the resolved absolute path the program gets); shell metacharacters passed as literal text;
//! undeclared, missing, mistyped and out-of-bounds arguments refused; a timeout and a caller's
//! deadline each leaving no process of the group behind (read from /proc); output cut at the
//! cap with `truncated`; a non-zero exit with its code and stderr; a mutating shell-out proposed
//! (nothing runs), applied exactly once, and refused when its output changed meanwhile; bad
//! tools files refused with exit 2 by `tools` and by `run` before it connects.
//!
//! Not here: the file's validation rules one by one (table tests in
//! host-agent/src/tools/domain/file.rs).

#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::{Agent, Control, Dispatcher};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);

const TOOLS: &str = r#"
[[tool]]
name = "show_args"
description = "Print each argument on its own line, in brackets"
class = "read"
command = ["/usr/bin/printf", "[%s]\n", "{text}", "{file}", "{count}", "{speed}"]

[tool.args.text]
type = "string"
required = false

[tool.args.file]
type = "path"
required = false

[tool.args.count]
type = "integer"
min = 1
max = 10
required = false

[tool.args.speed]
type = "enum"
values = ["fast", "slow"]
required = false

[[tool]]
name = "tagged"
description = "Print a tag that matches a pattern"
class = "read"
command = ["/usr/bin/printf", "%s", "{tag}"]

[tool.args.tag]
type = "string"
pattern = "^[a-z0-9-]+$"

[[tool]]
name = "count_to"
description = "Print the numbers up to n"
class = "read"
command = ["/usr/bin/seq", "1", "{n}"]
max_output_bytes = 1000

[tool.args.n]
type = "integer"
min = 1
max = 1000000

[[tool]]
name = "fail"
description = "Say something on stderr and exit 3"
class = "action"
command = ["/bin/sh", "-c", "echo first line >&2; echo the reason >&2; exit 3"]

[[tool]]
name = "linger"
description = "Write the group id, then start two sleepers and wait"
class = "read"
command = ["/bin/sh", "-c", "echo $$ > \"$1\"; sleep 60 & sleep 60 & wait", "sh", "{pidfile}"]
timeout_secs = 1

[tool.args.pidfile]
type = "path"

[[tool]]
name = "linger_long"
description = "The same, with a long timeout: only the caller's deadline ends it"
class = "read"
command = ["/bin/sh", "-c", "echo $$ > \"$1\"; sleep 60 & sleep 60 & wait", "sh", "{pidfile}"]

[tool.args.pidfile]
type = "path"

[[tool]]
name = "append_copy"
description = "Append a file to another"
class = "mutate"
command = ["/bin/sh", "-c", "cat \"$1\" >> \"$2\"", "sh", "{source}", "{dest}"]
outputs = ["dest"]

[tool.args.source]
type = "path"

[tool.args.dest]
type = "path"
"#;

/// The tools file of these suites.
fn tools_file_text() -> String {
    TOOLS.to_owned()
}

struct Env {
    dispatcher: Dispatcher,
    control: Control,
    root: tempfile::TempDir,
    outside: tempfile::TempDir,
    tools_file: PathBuf,
}

impl Env {
    async fn start() -> Env {
        let dispatcher = Dispatcher::start().await.expect("dispatcher starts");
        let token = dispatcher.mint_token("domain-user").await.expect("token create");
        let control = Control::new(dispatcher.base_url(), token);
        let root = tempfile::Builder::new().prefix("e2e-domain-root-").tempdir().expect("root");
        let outside = tempfile::Builder::new().prefix("e2e-domain-outside-").tempdir().expect("outside");
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::fs::write(root.path().join("sub/file.txt"), "inside\n").unwrap();
        std::fs::write(outside.path().join("secret.txt"), "secret\n").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.txt"), root.path().join("link-out")).unwrap();
        std::os::unix::fs::symlink("sub/file.txt", root.path().join("link-in")).unwrap();
        let tools_file = outside.path().join("tools.toml");
        std::fs::write(&tools_file, tools_file_text()).unwrap();
        Env { dispatcher, control, root, outside, tools_file }
    }

    async fn agent(&self, binary: Option<PathBuf>) -> (Agent, String) {
        let code = self.control.pairing_code().await.expect("pairing code");
        let mut builder = Agent::builder(self.dispatcher.base_url())
            .root(self.root.path())
            .code(code)
            .flag("--tools-file", self.tools_file.display());
        if let Some(binary) = binary {
            builder = builder.binary(binary);
        }
        let mut agent = builder.spawn().expect("agent spawns");
        let id = self.online_device(&mut agent).await;
        (agent, id)
    }

    async fn online_device(&self, agent: &mut Agent) -> String {
        self.control.first_online_device(agent, 30 * SECOND).await
    }

    async fn call(&self, id: &str, tool: &str, input: Value) -> Value {
        let (status, result) = self.control.call(id, tool, input, Some(20_000)).await.expect("call");
        assert_eq!(status, StatusCode::OK, "{tool}: {result}");
        result
    }

    /// The root as the agent reports it (canonical, as path arguments are passed).
    fn real_root(&self) -> PathBuf {
        std::fs::canonicalize(self.root.path()).expect("canonical root")
    }
}

/// The manifest's tools of a device, once it has sent one.
async fn advertised(control: &Control, id: &str) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let (_, device) = control.device(id).await.unwrap();
        if let Some(tools) = device["tools"].as_array() {
            return tools.clone();
        }
        assert!(started.elapsed() < 10 * SECOND, "no manifest: {device}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn error_of(result: &Value) -> String {
    assert_eq!(result["ok"], false, "{result}");
    result["error"].as_str().expect("error text").to_owned()
}

fn stdout_of(result: &Value) -> String {
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["result"]["exitCode"], 0, "{result}");
    result["result"]["stdout"].as_str().expect("stdout").to_owned()
}

/// Ids of the processes still running (not zombies: those are dead, waiting for whoever
/// inherited them to reap them) whose process group is `group`.
fn group_members(group: u32) -> Vec<u32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        if fields.get(2).and_then(|pgrp| pgrp.parse::<u32>().ok()) == Some(group) {
            members.push(pid);
        }
    }
    members
}

/// Waits until no process is left in `group` (a killed process takes a moment to be reaped).
async fn assert_group_gone(group: u32, within: Duration) {
    let started = Instant::now();
    loop {
        let members = group_members(group);
        if members.is_empty() {
            return;
        }
        assert!(started.elapsed() < within, "processes of group {group} still alive: {members:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn read_group(pidfile: &Path) -> u32 {
    let started = Instant::now();
    loop {
        if let Some(group) = std::fs::read_to_string(pidfile).ok().and_then(|text| text.trim().parse().ok()) {
            return group;
        }
        assert!(started.elapsed() < 10 * SECOND, "{} never written", pidfile.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Arguments: what reaches the program, and what is refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_are_typed_scoped_and_literal() {
    let env = Env::start().await;
    let (_agent, id) = env.agent(None).await;
    let real = env.real_root();

    // The manifest advertises the domain tools beside the built-ins, with their schemas.
    let tools = advertised(&env.control, &id).await;
    assert_eq!(tools.len(), 16 + 7, "{tools:?}");
    let show = tools.iter().find(|t| t["name"] == "show_args").expect("show_args advertised");
    assert_eq!(show["class"], "read");
    assert_eq!(show["inputSchema"]["additionalProperties"], false);
    assert_eq!(show["inputSchema"]["properties"]["count"]["maximum"], 10);
    assert_eq!(show["inputSchema"]["properties"]["speed"]["enum"], json!(["fast", "slow"]));
    let append = tools.iter().find(|t| t["name"] == "append_copy").expect("append_copy");
    assert_eq!(append["class"], "mutate");
    assert_eq!(append["inputSchema"]["required"], json!(["dest", "source"]));

    // Every typed argument, in place; an absent optional one leaves its element out.
    let result =
        env.call(&id, "show_args", json!({"text": "hi", "file": "sub/file.txt", "count": 3, "speed": "slow"})).await;
    let expected = format!("[hi]\n[{}]\n[3]\n[slow]\n", real.join("sub/file.txt").display());
    assert_eq!(stdout_of(&result), expected, "a relative path is passed resolved and absolute");
    assert_eq!(result["result"]["stderr"], "");
    assert_eq!(result["result"]["truncated"], false);
    assert_eq!(stdout_of(&env.call(&id, "show_args", json!({})).await), "[]\n");
    let absolute = real.join("sub/file.txt").display().to_string();
    assert_eq!(stdout_of(&env.call(&id, "show_args", json!({"file": absolute})).await), format!("[{absolute}]\n"));
    // A path that does not exist yet (an output) is passed too, beneath its real parent.
    let new = env.call(&id, "show_args", json!({"file": "sub/new.las"})).await;
    assert_eq!(stdout_of(&new), format!("[{}]\n", real.join("sub/new.las").display()));
    // A symlink that stays inside is passed as its target.
    let link_in = env.call(&id, "show_args", json!({"file": "link-in"})).await;
    assert_eq!(stdout_of(&link_in), format!("[{}]\n", real.join("sub/file.txt").display()));

    // Shell metacharacters are one literal argv element each: nothing is interpreted.
    let marker = env.root.path().join("pwned");
    for text in [
        "; rm -rf ~",
        "$(touch PWNED)",
        "`touch PWNED`",
        "a && touch PWNED",
        "'quoted' \"double\"",
        "line one\nline two",
        "| cat /etc/passwd",
        "> out.txt",
        "%s %d \\n",
        "* ? [a-z]",
        "$HOME ${PATH}",
    ] {
        let text = text.replace("PWNED", &marker.display().to_string());
        let result = env.call(&id, "show_args", json!({"text": text})).await;
        assert_eq!(stdout_of(&result), format!("[{text}]\n"), "passed literally");
    }
    assert!(!marker.exists(), "no shell ran the text");
    assert!(!env.root.path().join("out.txt").exists());

    // Paths out of the scope are refused before anything runs.
    let secret = env.outside.path().join("secret.txt").display().to_string();
    for (path, needle) in [
        (secret.as_str(), "outside the allowed roots"),
        ("../secret.txt", "outside the allowed roots"),
        ("sub/../../x", "outside the allowed roots"),
        ("link-out", "outside the allowed roots"),
        ("/etc/passwd", "outside the allowed roots"),
        ("missing-dir/x", "No such file"),
    ] {
        let error = error_of(&env.call(&id, "show_args", json!({"file": path})).await);
        assert!(error.contains(needle), "{path}: {error}");
    }

    // A file with another hard link (which may lie outside the roots) is not handed over.
    std::fs::write(env.root.path().join("sub/linked.txt"), "linked\n").unwrap();
    std::fs::hard_link(env.root.path().join("sub/linked.txt"), env.outside.path().join("linked.txt")).unwrap();
    let error = error_of(&env.call(&id, "show_args", json!({"file": "sub/linked.txt"})).await);
    assert!(error.contains("hard links"), "{error}");

    // Undeclared, missing, mistyped and out-of-bounds arguments are refused.
    for (tool, input, needle) in [
        ("show_args", json!({"colour": "red"}), "unknown argument `colour`"),
        ("show_args", json!({"count": 0}), "outside 1..=10"),
        ("show_args", json!({"count": 11}), "outside 1..=10"),
        ("show_args", json!({"count": "3"}), "must be an integer"),
        ("show_args", json!({"count": 2.5}), "must be an integer"),
        ("show_args", json!({"speed": "warp"}), "must be one of: fast, slow"),
        ("show_args", json!({"text": "--output=/etc/passwd"}), "may not start with `-`"),
        ("show_args", json!({"text": 5}), "must be a string"),
        ("show_args", json!({"file": ["a"]}), "must be a string"),
        ("show_args", json!("text"), "must be a JSON object"),
        ("tagged", json!({}), "missing required argument `tag`"),
        ("tagged", json!({"tag": "Bad Tag"}), "does not match the pattern"),
        ("tagged", json!({"tag": "ok\n; id"}), "does not match the pattern"),
        ("count_to", json!({"n": 1_000_001}), "outside 1..=1000000"),
    ] {
        let error = error_of(&env.call(&id, tool, input.clone()).await);
        assert!(error.contains(needle), "{tool} {input}: {error}");
        assert!(error.contains(&format!("invalid input for {tool}")), "{error}");
    }
    // A pattern may allow a leading dash on purpose.
    assert_eq!(stdout_of(&env.call(&id, "tagged", json!({"tag": "-v"})).await), "-v");

    // Output beyond the cap is cut and flagged; a non-zero exit says its code and stderr.
    let flood = env.call(&id, "count_to", json!({"n": 200_000})).await;
    let stdout = stdout_of(&flood);
    assert_eq!(stdout.len(), 1000, "capped at max_output_bytes");
    assert!(stdout.starts_with("1\n2\n3\n"), "{stdout}");
    assert_eq!(flood["result"]["truncated"], true);
    let small = env.call(&id, "count_to", json!({"n": 3})).await;
    assert_eq!(stdout_of(&small), "1\n2\n3\n");
    assert_eq!(small["result"]["truncated"], false);
    let error = error_of(&env.call(&id, "fail", json!({})).await);
    assert!(error.contains("exited with code 3"), "{error}");
    assert!(error.ends_with("first line\nthe reason"), "the end of stderr: {error}");
}

/// A timeout kills the whole process group; so does the caller's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_leave_no_process_behind() {
    let env = Env::start().await;
    let (mut agent, id) = env.agent(None).await;

    let started = Instant::now();
    let result = env.call(&id, "linger", json!({"pidfile": "linger.pid"})).await;
    let error = error_of(&result);
    assert!(error.contains("timed out after 1 s"), "{error}");
    assert!(error.contains("process group"), "{error}");
    assert!(started.elapsed() < 10 * SECOND, "answered at the tool's timeout: {:?}", started.elapsed());
    let group = read_group(&env.root.path().join("linger.pid")).await;
    assert!(group > 1);
    assert_group_gone(group, 5 * SECOND).await;

    // The tool's timeout is 30 s; the caller waits 1.5 s: the deadline ends the process too.
    let (status, result) =
        env.control.call(&id, "linger_long", json!({"pidfile": "long.pid"}), Some(1500)).await.expect("call");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{result}");
    assert_eq!(result["error"], "device timed out");
    let group = read_group(&env.root.path().join("long.pid")).await;
    assert_group_gone(group, 5 * SECOND).await;
    assert!(agent.is_running(), "{}", agent.log_tail(40));

    // The agent still serves.
    assert_eq!(stdout_of(&env.call(&id, "count_to", json!({"n": 2})).await), "1\n2\n");
}

/// A mutating shell-out: proposed with its exact command and preconditions, run only on
/// approval, once; a change to its output after the proposal refuses the apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutating_shell_out_is_proposed_then_applied_once() {
    let env = Env::start().await;
    let (_agent, id) = env.agent(None).await;
    let real = env.real_root();
    std::fs::write(env.root.path().join("part.txt"), "one part\n").unwrap();
    let dest = env.root.path().join("sub/joined.txt");

    let proposed = env.call(&id, "append_copy", json!({"source": "part.txt", "dest": "sub/joined.txt"})).await;
    assert_eq!(proposed["ok"], true, "{proposed}");
    assert_eq!(proposed["proposal"], true, "{proposed}");
    let plan = &proposed["result"];
    let source_real = real.join("part.txt").display().to_string();
    let dest_real = real.join("sub/joined.txt").display().to_string();
    assert_eq!(plan["tool"], "append_copy");
    assert_eq!(plan["command"], json!(["/bin/sh", "-c", "cat \"$1\" >> \"$2\"", "sh", source_real, dest_real]));
    assert_eq!(plan["preconditions"]["dest"]["type"], "absent", "{plan}");
    assert!(plan["preconditions"].get("source").is_none(), "only declared outputs: {plan}");
    let summary = plan["summary"].as_str().expect("summary");
    assert!(summary.contains("/bin/sh") && summary.contains("writes"), "{summary}");
    assert!(!dest.exists(), "a proposal runs nothing");
    let proposal_id = proposed["proposalId"].as_str().expect("proposalId").to_owned();

    let (status, applied) = env.control.approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{applied}");
    assert_eq!(applied["ok"], true, "{applied}");
    assert_eq!(applied["result"]["exitCode"], 0);
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "one part\n");
    let (status, again) = env.control.approve(&proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "one part\n", "ran exactly once");
    let (_, stored) = env.control.proposal(&proposal_id).await.unwrap();
    assert_eq!(stored["status"], "applied", "{stored}");

    // Proposed on the current content; the output changes; the apply is refused, nothing runs.
    let second = env.call(&id, "append_copy", json!({"source": "part.txt", "dest": "sub/joined.txt"})).await;
    assert_eq!(second["result"]["preconditions"]["dest"]["type"], "file", "{second}");
    std::fs::write(&dest, "edited meanwhile\n").unwrap();
    let proposal_id = second["proposalId"].as_str().expect("proposalId");
    let (status, refused) = env.control.approve(proposal_id).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{refused}");
    let error = error_of(&refused);
    assert!(error.contains("changed since the proposal"), "{error}");
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "edited meanwhile\n", "nothing ran");
}

fn host_agent_tools(args: &[&str]) -> std::process::Output {
    std::process::Command::new(e2e::bin::host_agent())
        .arg("tools")
        .args(args)
        .env_remove("FUSION_HOST_TOOLS_FILE")
        .env_remove("FUSION_HOST_ROOTS")
        .output()
        .expect("host-agent tools runs")
}

/// `host-agent tools --tools-file` prints every descriptor; a bad file is exit 2 from `tools`
/// and from `run`, which refuses it before connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_files_are_validated_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, tools_file_text()).unwrap();
    let output = host_agent_tools(&["--root", &root, "--tools-file", &good.display().to_string()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let descriptors: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON descriptors");
    assert_eq!(descriptors.len(), 23);
    assert_eq!(descriptors[0]["name"], "list_directory", "built-ins first");
    assert_eq!(descriptors[16]["name"], "show_args");
    // The variable also names the file.
    let from_env = std::process::Command::new(e2e::bin::host_agent())
        .args(["tools", "--root", &root])
        .env("FUSION_HOST_TOOLS_FILE", &good)
        .output()
        .unwrap();
    assert_eq!(serde_json::from_slice::<Vec<Value>>(&from_env.stdout).expect("JSON").len(), 23);

    let head = "[[tool]]\nname = \"conv\"\ndescription = \"d\"\n";
    let arg = "[tool.args.a]\ntype = \"path\"\n";
    let bad = [
        (format!("{head}class = \"read\"\ncommand = [\"/bin/cat\", \"{{a}}\"]\nshell = true\n{arg}"), "unknown field `shell`"),
        (format!("{head}class = \"exec\"\ncommand = [\"/bin/cat\", \"{{a}}\"]\n{arg}"), "unknown variant `exec`"),
        (format!("{head}class = \"read\"\ncommand = [\"/bin/cat\", \"{{b}}\"]\n{arg}"), "the placeholder {b} has no argument"),
        (format!("{head}class = \"read\"\ncommand = [\"cat\", \"{{a}}\"]\n{arg}"), "`cat` is not an absolute path"),
        (format!("{head}class = \"read\"\ncommand = [\"/no/such/program\", \"{{a}}\"]\n{arg}"), "/no/such/program cannot be used"),
        (format!("{head}class = \"read\"\ncommand = [\"/bin/cat\", \"{{a}}\"]\n[tool.args.a]\ntype = \"string\"\npattern = \"[\"\n"), "bad pattern"),
        ("[[tool]]\nname = \"read_file\"\ndescription = \"d\"\nclass = \"read\"\ncommand = [\"/bin/true\"]\n".to_owned(), "built-in"),
    ];
    for (text, needle) in &bad {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let output = host_agent_tools(&["--root", &root, "--tools-file", &file.display().to_string()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text}\n{stderr}");
        assert!(stderr.contains(needle), "{stderr:?} should say {needle:?}");
        assert!(stderr.contains(&file.display().to_string()), "names the file: {stderr}");
        assert!(stderr.contains("tool `conv`") || stderr.contains("tool `read_file`"), "names the tool: {stderr}");
        assert!(output.stdout.is_empty(), "prints no descriptors");
    }

    // `host-agent call` runs a domain tool locally: a mutation's proposal, or with --apply the
    // command itself; a refused argument is exit 1.
    std::fs::write(dir.path().join("part.txt"), "part\n").unwrap();
    let call = |input: &str, apply: bool| {
        let mut command = std::process::Command::new(e2e::bin::host_agent());
        command.args(["call", "append_copy", input, "--root", &root, "--tools-file", &good.display().to_string()]);
        if apply {
            command.arg("--apply");
        }
        command.env_remove("FUSION_HOST_TOOLS_FILE").env_remove("FUSION_HOST_ROOTS").output().expect("call runs")
    };
    let proposed = call(r#"{"source": "part.txt", "dest": "whole.txt"}"#, false);
    assert!(proposed.status.success(), "{}", String::from_utf8_lossy(&proposed.stderr));
    let proposal: Value = serde_json::from_slice(&proposed.stdout).expect("HostResult");
    assert_eq!(proposal["proposal"], true, "{proposal}");
    assert!(!dir.path().join("whole.txt").exists());
    let applied = call(r#"{"source": "part.txt", "dest": "whole.txt"}"#, true);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stdout));
    assert_eq!(std::fs::read_to_string(dir.path().join("whole.txt")).unwrap(), "part\n");
    let refused = call(r#"{"source": "/etc/passwd", "dest": "whole.txt"}"#, true);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stdout).contains("outside the allowed roots"));

    // `run` refuses the same file before connecting: the server would never answer.
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, &bad[2].0).unwrap();
    let server = format!("http://{}", e2e::free_addr());
    let mut agent = Agent::builder(&server)
        .root(dir.path())
        .code("NEVER-USED")
        .flag("--tools-file", file.display())
        .spawn()
        .expect("spawn");
    assert_eq!(agent.exit_code(10 * SECOND).await.unwrap(), 2, "{}", agent.log_tail(20));
    let log = agent.log();
    assert!(log.contains("tool `conv`: the placeholder {b} has no argument"), "{log}");
    assert!(!log.contains("enrolling"), "it never tried to connect: {log}");
}

/// The example crate's agent: the built-ins, its Rust domain tool `ifc_inventory`, and a tools
/// file beside them, end to end through the dispatcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_agent_serves_its_rust_tool() {
    let binary = example_binary("ifc-agent");
    let env = Env::start().await;
    std::fs::write(env.root.path().join("model.ifc"), IFC_MODEL).unwrap();
    let (_agent, id) = env.agent(Some(binary)).await;

    let tools = advertised(&env.control, &id).await;
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    assert!(names.contains(&"ifc_inventory") && names.contains(&"show_args") && names.contains(&"read_file"));
    let inventory = tools.iter().find(|t| t["name"] == "ifc_inventory").unwrap();
    assert_eq!(inventory["class"], "mutate");
    assert_eq!(inventory["inputSchema"]["required"], json!(["model"]));

    let proposed = env.call(&id, "ifc_inventory", json!({"model": "model.ifc"})).await;
    assert_eq!(proposed["proposal"], true, "{proposed}");
    let plan = &proposed["result"];
    assert!(plan["summary"].as_str().unwrap().contains("4 entities of 3 types, IFC4"), "{plan}");
    assert!(plan["diff"].as_str().unwrap().contains("+IFCWALL,2"), "{plan}");
    assert_eq!(plan["preconditions"]["output"]["type"], "absent");
    let csv = env.root.path().join("model.ifc.inventory.csv");
    assert!(!csv.exists());
    let (status, applied) = env.control.approve(proposed["proposalId"].as_str().unwrap()).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{applied}");
    assert_eq!(applied["ok"], true, "{applied}");
    assert_eq!(applied["result"]["entities"], 4);
    assert_eq!(std::fs::read_to_string(&csv).unwrap(), "type,count\nIFCDOOR,1\nIFCPROJECT,1\nIFCWALL,2\n");

    // The same scope as every tool: a model outside the roots is refused.
    let outside = env.outside.path().join("model.ifc");
    std::fs::write(&outside, IFC_MODEL).unwrap();
    let error = error_of(&env.call(&id, "ifc_inventory", json!({"model": outside.display().to_string()})).await);
    assert!(error.contains("outside the allowed roots"), "{error}");
    // And the tools file's tools run beside it.
    assert_eq!(stdout_of(&env.call(&id, "count_to", json!({"n": 1})).await), "1\n");
}

const IFC_MODEL: &str = "ISO-10303-21;\nHEADER;\nFILE_SCHEMA(('IFC4'));\nENDSEC;\nDATA;\n\
#1= IFCPROJECT('0YvctVUKr0kugbFTf53O9L',$,'Demo',$,$,$,$,$,$);\n#2= IFCWALL('2O2Fr$t4X7Zf8NOew3FLOH',$,'A; wall',$,$,$,$,$,$);\n\
#3= IFCWALL('1',$,'B',$,$,$,$,$,$);\n#4= IFCDOOR('2',$,$,$,$,$,$,$,$,$,$,$,$);\nENDSEC;\nEND-ISO-10303-21;\n";

/// The binary of a workspace example, built (in this test's profile) if it is missing.
fn example_binary(name: &str) -> PathBuf {
    let path = e2e::bin::locate(name);
    if path.is_file() {
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command.current_dir(e2e::bin::workspace_root()).args(["build", "-p", name]);
    if e2e::bin::locate(e2e::bin::DISPATCHER).parent().is_some_and(|dir| dir.ends_with("release")) {
        command.arg("--release");
    }
    let output = command.output().expect("cargo build runs");
    assert!(output.status.success(), "cargo build -p {name}: {}", String::from_utf8_lossy(&output.stderr));
    let path = e2e::bin::locate(name);
    assert!(path.is_file(), "{} missing after the build", path.display());
    path
}
