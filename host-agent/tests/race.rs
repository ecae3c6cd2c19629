//! The symlink race (Invariant 8, CVE-2022-21658's shape): one thread keeps swapping a directory
//! inside the root for a symlink to an outside directory with the same layout (a rename dance),
//! while other threads run reads, walks, searches, hashes and applied writes through it. Every
//! output is scanned for the outside tree's secrets and the outside tree is compared afterwards;
//! the count of escapes must be zero.
//!
//! Runs for 10 seconds, or `FUSION_RACE_SECS`. Does not: try static escapes (`escape.rs`).

mod tool_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_agent::tools::Toolbox;
use serde_json::{json, Value};
use sha2::Digest;

const SECRET: &str = "OUTSIDE-SECRET-91c3e7";
const HIDDEN_NAME: &str = "outside-only-5d20aa.txt";

fn race_duration() -> Duration {
    let secs = std::env::var("FUSION_RACE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10u64);
    Duration::from_secs(secs.max(1))
}

/// Names and contents of every file below `dir` (ambient, test-side only).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path.clone());
                out.push((path, Vec::new()));
            } else {
                out.push((path.clone(), std::fs::read(&path).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// Renames `from` to `to` inside `root`; when a worker created a stray `swap` directory in the
/// gap (write_file creates missing parents), removes it and tries again.
fn rename_over_strays(root: &Path, from: &str, to: &str) {
    for _ in 0..1000 {
        match std::fs::rename(root.join(from), root.join(to)) {
            Ok(()) => return,
            Err(_) => {
                let stray = root.join(to);
                if std::fs::symlink_metadata(&stray).is_ok_and(|m| m.is_dir()) {
                    let _ = std::fs::remove_dir_all(&stray);
                }
            }
        }
    }
    panic!("could not rename {from} to {to}");
}

#[cfg(unix)]
#[test]
fn swapping_a_directory_for_a_symlink_mid_operation_never_escapes() {
    let base = tempfile::tempdir().expect("tempdir");
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    // The outside tree mirrors the inside one, so a path through the swap finds a file there.
    for dir in [root.join("swap/sub"), outside.join("sub")] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    std::fs::write(root.join("swap/f.txt"), "inside content\n").expect("write");
    std::fs::write(root.join("swap/sub/g.txt"), "inside g\n").expect("write");
    let secret_content = format!("{SECRET}\nmore secret text\n");
    std::fs::write(outside.join("f.txt"), &secret_content).expect("write");
    std::fs::write(outside.join("sub/g.txt"), &secret_content).expect("write");
    std::fs::write(outside.join(HIDDEN_NAME), &secret_content).expect("write");
    std::os::unix::fs::symlink(&outside, root.join("evil")).expect("symlink");
    let before = snapshot(&outside);
    let forbidden = [
        SECRET.to_owned(),
        HIDDEN_NAME.to_owned(),
        hex::encode(sha2::Sha256::digest(secret_content.as_bytes())),
        hex::encode(md5::Md5::digest(secret_content.as_bytes())),
    ];

    let toolbox = Arc::new(Toolbox::new(std::slice::from_ref(&root)).expect("toolbox"));
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (root, stop, swaps) = (root.clone(), stop.clone(), swaps.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                rename_over_strays(&root, "swap", "parked"); // the real directory steps aside
                rename_over_strays(&root, "evil", "swap"); // the symlink out takes its name
                std::thread::sleep(Duration::from_micros(50));
                rename_over_strays(&root, "swap", "evil");
                rename_over_strays(&root, "parked", "swap");
                swaps.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };

    let duration = race_duration();
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let (toolbox, stop, forbidden) = (toolbox.clone(), stop.clone(), forbidden.clone());
            std::thread::spawn(move || {
                let (mut ops, mut escapes, mut refused) = (0u64, 0u64, 0u64);
                let mut record = |result: &protocol::HostResult, what: &str| {
                    ops += 1;
                    if !result.ok {
                        refused += 1;
                    }
                    let text = serde_json::to_string(result).expect("encode");
                    if let Some(secret) = forbidden.iter().find(|s| text.contains(s.as_str())) {
                        escapes += 1;
                        let excerpt: String = text.chars().take(400).collect();
                        eprintln!("ESCAPE in {what}: output carries {secret:?}: {excerpt}");
                    }
                };
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let run = |tool: &str, input: Value| toolbox.run(&tool_support::call(tool, input));
                    let calls: [(&str, Value); 10] = [
                        ("read_file", json!({"path": "swap/f.txt"})),
                        ("list_directory", json!({"path": "swap"})),
                        ("list_directory", json!({"path": ".", "recursive": true})),
                        ("grep", json!({"pattern": "SECRET|inside", "path": "swap"})),
                        ("grep", json!({"pattern": "SECRET", "context": 1})),
                        ("hash_file", json!({"path": "swap/sub/g.txt"})),
                        ("stat", json!({"path": "swap/f.txt"})),
                        ("glob", json!({"pattern": "**/*.txt", "path": "swap"})),
                        ("disk_usage", json!({"path": "swap"})),
                        ("read_file", json!({"path": "swap/sub/g.txt"})),
                    ];
                    for (tool, input) in calls {
                        record(&run(tool, input.clone()), &format!("{tool} {input}"));
                    }
                    // Applied mutations through the swapping directory.
                    let target = format!("swap/new-{worker}-{n}.txt");
                    let mutations = [
                        ("write_file", json!({"path": target, "content": "written\n"})),
                        ("append_file", json!({"path": target, "content": "appended\n"})),
                        (
                            "edit_file",
                            json!({"path": "swap/f.txt", "edits": [{"find": "content", "replace": "content"}]}),
                        ),
                        ("copy", json!({"from": "swap/f.txt", "to": format!("swap/copy-{worker}-{n}.txt")})),
                        ("create_directory", json!({"path": format!("swap/dir-{worker}-{n}")})),
                        ("delete", json!({"path": target})),
                        ("delete", json!({"path": format!("swap/copy-{worker}-{n}.txt")})),
                        ("delete", json!({"path": format!("swap/dir-{worker}-{n}"), "recursive": true})),
                    ];
                    for (tool, input) in mutations {
                        let proposal = run(tool, input.clone());
                        record(&proposal, &format!("propose {tool} {input}"));
                        let preconditions = proposal
                            .result
                            .filter(|_| proposal.proposal == Some(true))
                            .map(|plan| plan["preconditions"].clone())
                            .unwrap_or_else(|| json!({"target": {"path": target, "type": "absent"}}));
                        let applied = toolbox.run(&tool_support::apply_call(tool, input.clone(), preconditions));
                        record(&applied, &format!("apply {tool} {input}"));
                    }
                }
                (ops, escapes, refused)
            })
        })
        .collect();

    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let (mut ops, mut escapes, mut refused) = (0u64, 0u64, 0u64);
    for worker in workers {
        let (o, e, r) = worker.join().expect("worker");
        ops += o;
        escapes += e;
        refused += r;
    }
    swapper.join().expect("swapper");
    let elapsed = started.elapsed();
    let after = snapshot(&outside);
    let changed_outside = after.iter().filter(|entry| !before.contains(entry)).count()
        + before.iter().filter(|entry| !after.contains(entry)).count();
    escapes += changed_outside as u64;
    println!(
        "race: {:.1} s, {ops} operations ({refused} refused), {} swaps, {escapes} escapes ({changed_outside} outside changes)",
        elapsed.as_secs_f64(),
        swaps.load(Ordering::Relaxed)
    );
    assert_eq!(escapes, 0, "operations escaped the root");
    assert!(elapsed >= duration);
    assert!(swaps.load(Ordering::Relaxed) > 100, "the swap barely ran");
    assert!(refused > 0 && refused < ops, "the race never hit both sides: {refused} of {ops} refused");
}
