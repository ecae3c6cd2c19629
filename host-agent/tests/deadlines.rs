//! Tools stop at their call's deadline (issue 11, finding 7): the runtime gives up on a call at
//! its deadline, so work past it is wasted; hashing, reads, walks, searches and copies check the
//! deadline as they go and answer `deadline exceeded` promptly, freeing the thread.
//!
//! Each case runs one call on its own thread with a deadline a little ahead and waits for it
//! with a bound, so a tool that ignores the deadline fails the test instead of hanging it.
//!
//! Does not: test the runtime's abandoning of calls (`runtime_loop.rs`) or the agent process's
//! CPU after a deadline (`runtime.rs`).

mod tool_support;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_agent::tools::Toolbox;
use protocol::{HostCall, HostResult};
use serde_json::json;
use tool_support::{apply_call, call, Fixture};

/// How long after its deadline a call may still be running.
const GRACE: Duration = Duration::from_millis(500);
/// How long a test waits for a call before calling it stuck.
const PATIENCE: Duration = Duration::from_secs(10);

/// A call with a deadline `ahead` from now.
fn due(mut call: HostCall, ahead: Duration) -> HostCall {
    call.deadline = Some(chrono::Utc::now() + chrono::Duration::from_std(ahead).expect("duration"));
    call
}

/// Runs `call` on its own thread; returns its result and how long after the deadline it came.
/// Panics (failing the test) when the thread is still busy `PATIENCE` after the deadline.
fn run_until(toolbox: &Arc<Toolbox>, call: HostCall) -> (HostResult, Duration) {
    let deadline = call.deadline.expect("a deadline");
    let (tx, rx) = mpsc::channel();
    let worker = Arc::clone(toolbox);
    let thread = std::thread::spawn(move || {
        let result = worker.run(&call);
        let _ = tx.send((result, chrono::Utc::now()));
    });
    let started = Instant::now();
    let (result, finished) = rx
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("the call was still running {:?} after it started", started.elapsed()));
    thread.join().expect("the worker thread ends");
    let late = (finished - deadline).to_std().unwrap_or(Duration::ZERO);
    (result, late)
}

fn expect_stopped(what: &str, result: &HostResult, late: Duration) {
    println!("{what}: answered {:.3} s after its deadline: {:?}", late.as_secs_f64(), result.error);
    assert!(!result.ok, "{what} finished instead of stopping: {:?}", result.result);
    let error = result.error.as_deref().unwrap_or_default();
    assert!(error.contains("deadline exceeded"), "{what}: {error}");
    assert!(late < GRACE, "{what} ran {late:?} past its deadline");
}

fn toolbox(fx: &Fixture) -> Arc<Toolbox> {
    Arc::new(Toolbox::new(std::slice::from_ref(&fx.root)).expect("toolbox"))
}

/// An 8 GiB file that takes no disk: reading it costs CPU only.
fn sparse(fx: &Fixture, rel: &str) {
    let file = std::fs::File::create(fx.path(rel)).expect("create");
    file.set_len(8 << 30).expect("set_len");
}

#[test]
fn hashing_a_huge_file_stops_at_the_deadline() {
    let fx = Fixture::new();
    sparse(&fx, "big.bin");
    let toolbox = toolbox(&fx);
    for algorithm in ["sha256", "md5"] {
        let hash =
            due(call("hash_file", json!({"path": "big.bin", "algorithm": algorithm})), Duration::from_millis(200));
        let (result, late) = run_until(&toolbox, hash);
        expect_stopped(&format!("hash_file {algorithm} of 8 GiB"), &result, late);
    }
}

#[test]
fn reading_copying_and_proposing_on_a_huge_file_stop_at_the_deadline() {
    let fx = Fixture::new();
    sparse(&fx, "big.bin");
    std::fs::create_dir(fx.path("bigdir")).expect("mkdir");
    let file = std::fs::File::create(fx.path("bigdir/big.bin")).expect("create");
    file.set_len(2 << 30).expect("set_len");
    // Text first (so it is not called binary), then 8 GiB of holes for the line count to scan.
    fx.write("long.log", "a line of text\n".repeat(4096));
    std::fs::OpenOptions::new().write(true).open(fx.path("long.log")).expect("open").set_len(8 << 30).expect("set_len");
    let toolbox = toolbox(&fx);
    let ahead = Duration::from_millis(200);
    // A tree's proposal digests its listing, not its content: quick without a deadline.
    let copy = json!({"from": "bigdir", "to": "bigdir-copy"});
    let plan = fx.propose("copy", copy.clone());
    let cases: Vec<(&str, HostCall)> = vec![
        ("read_file of 8 GiB", call("read_file", json!({"path": "long.log", "startLine": 1, "endLine": 2}))),
        ("write_file proposal over 8 GiB", call("write_file", json!({"path": "big.bin", "content": "x"}))),
        ("copy apply of a 2 GiB file in a tree", apply_call("copy", copy, plan["preconditions"].clone())),
    ];
    for (what, call) in cases {
        let (result, late) = run_until(&toolbox, due(call, ahead));
        expect_stopped(what, &result, late);
    }
    assert!(!fx.path("bigdir-copy").exists());
    let leftovers: Vec<String> = std::fs::read_dir(&fx.root)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("fusion-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "a stopped copy leaves nothing behind: {leftovers:?}");
}

/// 50,000 small text files in 50 directories.
fn wide_tree(fx: &Fixture) {
    for d in 0..50 {
        let dir = fx.path(&format!("tree/d{d:03}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..1000 {
            std::fs::write(dir.join(format!("f{f:04}.txt")), "a line of text\n").expect("write");
        }
    }
}

#[test]
fn walks_stop_at_the_deadline() {
    let fx = Fixture::new();
    let made = Instant::now();
    wide_tree(&fx);
    println!("made 50,000 files in {:.1} s", made.elapsed().as_secs_f64());
    let toolbox = toolbox(&fx);
    let ahead = Duration::from_millis(100);
    // Unbounded, grep over this tree takes about a second; the others a few hundred ms.
    let cases = [
        ("grep over 50,000 files", call("grep", json!({"pattern": "no such text", "path": "tree"}))),
        ("disk_usage of 50,000 files", call("disk_usage", json!({"path": "tree"}))),
        ("glob over 50,000 files", call("glob", json!({"pattern": "**/*.rs", "path": "tree"}))),
        ("copy proposal of a 50,000-file tree", call("copy", json!({"from": "tree", "to": "tree-copy"}))),
    ];
    for (what, call) in cases {
        let started = Instant::now();
        let (result, late) = run_until(&toolbox, due(call, ahead));
        let took = started.elapsed();
        if result.ok {
            // Finished before its deadline on a fast machine: nothing to stop.
            assert!(took <= ahead + GRACE, "{what} took {took:?} and ignored its deadline");
            println!("{what}: finished in {:.3} s, before its deadline", took.as_secs_f64());
            continue;
        }
        expect_stopped(what, &result, late);
    }
}

#[test]
fn a_call_without_a_deadline_runs_to_the_end() {
    let fx = Fixture::new();
    fx.write("small.txt", "abc");
    let out = fx.ok("hash_file", json!({"path": "small.txt"}));
    assert_eq!(out["hash"], "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    let late = due(call("hash_file", json!({"path": "small.txt"})), Duration::from_secs(30));
    assert!(fx.toolbox.run(&late).ok);
}
