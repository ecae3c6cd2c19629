//! Hard links inside a root to files outside it (issue 11, finding 3): no mutation writes in
//! place through a file with more than one link, and the content of such a file is read only
//! when the device allows it (`--allow-hardlinked-reads`).
//!
//! Each case puts a secret outside the root and a hard link to it inside, then checks the
//! outside file byte for byte and every output for the secret, its SHA-256 and its MD5.
//! Metadata (type, size) of a linked file may be reported; its content may not.
//!
//! Does not: test symlinks (`escape.rs`, `race.rs`).

#![cfg(unix)]

mod tool_support;

use std::path::PathBuf;

use host_agent::tools::Toolbox;
use md5::Digest as _;
use protocol::HostResult;
use serde_json::{json, Value};
use tool_support::{apply_call, call, Fixture};

const SECRET: &str = "OUTSIDE-SECRET-51c2e7\nsecond line of the secret\n";

struct Linked {
    fx: Fixture,
    /// The file outside the root.
    outside: PathBuf,
    /// What an output must never carry.
    forbidden: Vec<String>,
}

/// A root holding `link.txt` (a hard link to `secret.txt` beside the root) and `dir/linked.txt`
/// (another link to it, next to an ordinary `dir/plain.txt`).
fn linked() -> Linked {
    let fx = Fixture::new();
    let outside = fx.outside("secret.txt");
    std::fs::write(&outside, SECRET).expect("secret");
    std::fs::hard_link(&outside, fx.path("link.txt")).expect("hard link");
    fx.write("dir/plain.txt", "plain\n");
    std::fs::hard_link(&outside, fx.path("dir/linked.txt")).expect("hard link");
    let forbidden = vec![
        "OUTSIDE-SECRET-51c2e7".to_owned(),
        hex::encode(sha2::Sha256::digest(SECRET.as_bytes())),
        hex::encode(md5::Md5::digest(SECRET.as_bytes())),
    ];
    Linked { fx, outside, forbidden }
}

impl Linked {
    fn outside_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.outside).expect("read the outside file")
    }

    /// Fails when a result carries the secret in any form.
    fn clean(&self, what: &str, result: &HostResult) {
        let text = serde_json::to_string(result).expect("encode");
        for secret in &self.forbidden {
            assert!(!text.contains(secret.as_str()), "{what}: the output carries {secret:?}: {text}");
        }
    }

    fn run(&self, toolbox: &Toolbox, tool: &str, input: Value) -> HostResult {
        let result = toolbox.run(&call(tool, input.clone()));
        self.clean(&format!("{tool} {input}"), &result);
        result
    }
}

fn secret_preconditions(path: &std::path::Path) -> Value {
    json!({"target": {
        "path": path.to_string_lossy(),
        "type": "file",
        "size": SECRET.len(),
        "sha256": hex::encode(sha2::Sha256::digest(SECRET.as_bytes())),
    }})
}

#[test]
fn append_through_a_hard_link_never_reaches_the_outside_file() {
    let world = linked();
    let fx = &world.fx;
    let before = world.outside_bytes();
    let input = json!({"path": "link.txt", "content": "APPENDED\n"});

    let proposed = fx.toolbox.run(&call("append_file", input.clone()));
    // The apply as a caller who knows the secret's hash would send it (the proposal of an
    // agent without the rule carried exactly these preconditions).
    let preconditions = match proposed.result.as_ref().filter(|_| proposed.ok && proposed.is_proposal()) {
        Some(plan) => plan["preconditions"].clone(),
        None => secret_preconditions(&fx.path("link.txt")),
    };
    let applied = fx.toolbox.run(&apply_call("append_file", input, preconditions));
    world.clean("append_file apply", &applied);
    let after = world.outside_bytes();
    println!(
        "append_file through a hard link: outside file {} bytes before, {} bytes after (apply ok: {}, error: {:?})",
        before.len(),
        after.len(),
        applied.ok,
        applied.error
    );
    assert_eq!(after, before, "the outside file changed");
    world.clean("append_file proposal", &proposed);
    assert!(!applied.ok, "an append through a multiply-linked file is refused by default: {:?}", applied.result);
    assert!(!proposed.ok, "and so is its proposal: {:?}", proposed.result);
    let error = proposed.error.expect("error");
    assert!(error.contains("hard links"), "{error}");
}

#[test]
fn the_content_of_a_multiply_linked_file_is_not_read() {
    let world = linked();
    let fx = &world.fx;
    let toolbox = &fx.toolbox;
    for (tool, input) in [
        ("read_file", json!({"path": "link.txt"})),
        ("read_file", json!({"path": "dir/linked.txt", "startLine": 1, "endLine": 1})),
        ("hash_file", json!({"path": "link.txt"})),
        ("hash_file", json!({"path": "link.txt", "algorithm": "md5"})),
        ("grep", json!({"pattern": "SECRET", "path": "link.txt"})),
        ("edit_file", json!({"path": "link.txt", "edits": [{"find": "second", "replace": "x"}]})),
        ("copy", json!({"from": "link.txt", "to": "stolen.txt"})),
    ] {
        let result = world.run(toolbox, tool, input.clone());
        assert!(!result.ok, "{tool} {input} should be refused, got {:?}", result.result);
        let error = result.error.expect("error");
        assert!(error.contains("hard links"), "{tool}: {error}");
    }

    // A search over a tree skips such files and says how many it skipped.
    let grep = world.run(toolbox, "grep", json!({"pattern": "SECRET|plain", "path": "."}));
    assert!(grep.ok, "{:?}", grep.error);
    let out = grep.result.expect("grep");
    let paths: Vec<&str> =
        out["matches"].as_array().expect("matches").iter().filter_map(|m| m["path"].as_str()).collect();
    assert_eq!(paths, [fx.path("dir/plain.txt").to_string_lossy()], "{out}");
    assert_eq!(out["skippedHardlinked"], 2, "{out}");

    // A copied tree leaves them out, counted as skipped.
    let input = json!({"from": "dir", "to": "dir-copy"});
    let plan = world.run(toolbox, "copy", input.clone());
    assert!(plan.ok && plan.is_proposal(), "{:?}", plan.error);
    let preconditions = plan.result.expect("plan")["preconditions"].clone();
    let copied = toolbox.run(&apply_call("copy", input, preconditions));
    world.clean("copy dir apply", &copied);
    assert!(copied.ok, "{:?}", copied.error);
    let out = copied.result.expect("copied");
    assert_eq!((out["files"].as_u64(), out["skipped"].as_u64()), (Some(1), Some(1)), "{out}");
    assert!(!fx.path("dir-copy/linked.txt").exists());

    // A write replaces the name inside the root; the outside file keeps its content, and the
    // proposal shows no diff of content it may not read.
    let input = json!({"path": "link.txt", "content": "replaced\n"});
    let plan = world.run(toolbox, "write_file", input.clone());
    assert!(plan.ok && plan.is_proposal(), "{:?}", plan.error);
    let plan = plan.result.expect("plan");
    assert_eq!(plan["preconditions"]["target"]["type"], "hardlinked", "{plan}");
    let written = toolbox.run(&apply_call("write_file", input, plan["preconditions"].clone()));
    assert!(written.ok, "{:?}", written.error);
    assert_eq!(fx.read("link.txt"), "replaced\n");
    assert_eq!(world.outside_bytes(), SECRET.as_bytes());
}

#[test]
fn metadata_of_a_multiply_linked_file_is_reported() {
    let world = linked();
    let fx = &world.fx;
    let stat = fx.ok("stat", json!({"path": "link.txt"}));
    assert_eq!((stat["type"].as_str(), stat["size"].as_u64()), (Some("file"), Some(SECRET.len() as u64)));
    let listing = fx.ok("list_directory", json!({"path": ".", "recursive": true}));
    let names: Vec<&str> =
        listing["entries"].as_array().expect("entries").iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(names.contains(&"link.txt") && names.contains(&"linked.txt"), "{names:?}");
    let usage = fx.ok("disk_usage", json!({"path": "dir"}));
    assert_eq!(usage["files"], 2);
    let glob = fx.ok("glob", json!({"pattern": "**/*link*"}));
    assert_eq!(glob["matches"].as_array().map(Vec::len), Some(2), "{glob}");

    // Delete and move act on the name: the outside file is untouched.
    let (_, moved) = fx.propose_apply("move", json!({"from": "link.txt", "to": "moved.txt"}));
    assert_eq!(moved["applied"], true);
    fx.propose_apply("delete", json!({"path": "moved.txt"}));
    assert_eq!(world.outside_bytes(), SECRET.as_bytes());
}

#[test]
fn a_device_that_allows_hardlinked_reads_still_never_writes_through_them() {
    let world = linked();
    let fx = &world.fx;
    let toolbox = Toolbox::new(std::slice::from_ref(&fx.root)).expect("toolbox").with_hardlinked_reads(true);
    let read = toolbox.run(&call("read_file", json!({"path": "link.txt"})));
    assert_eq!(read.result.expect("read")["content"], SECRET, "reads are allowed");
    let grep = toolbox.run(&call("grep", json!({"pattern": "OUTSIDE-SECRET"})));
    let out = grep.result.expect("grep");
    assert_eq!(out["matches"].as_array().map(Vec::len), Some(2), "{out}");
    assert!(out.get("skippedHardlinked").is_none(), "{out}");

    // The append rewrites this name through a temporary: the outside file keeps its bytes.
    let input = json!({"path": "link.txt", "content": "APPENDED\n"});
    let plan = toolbox.run(&call("append_file", input.clone()));
    let plan = plan.result.expect("plan");
    assert_eq!(plan["preconditions"]["target"]["type"], "file");
    let applied = toolbox.run(&apply_call("append_file", input, plan["preconditions"].clone()));
    assert!(applied.ok, "{:?}", applied.error);
    assert_eq!(fx.read("link.txt"), format!("{SECRET}APPENDED\n"));
    assert_eq!(world.outside_bytes(), SECRET.as_bytes());

    // Edits replace the name too.
    let input = json!({"path": "dir/linked.txt", "edits": [{"find": "second", "replace": "2nd"}]});
    let plan = toolbox.run(&call("edit_file", input.clone())).result.expect("plan");
    let edited = toolbox.run(&apply_call("edit_file", input, plan["preconditions"].clone()));
    assert!(edited.ok, "{:?}", edited.error);
    assert!(fx.read("dir/linked.txt").contains("2nd line"));
    assert_eq!(world.outside_bytes(), SECRET.as_bytes());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&world.outside).expect("meta").nlink(), 1, "both inside names were replaced");
}

/// A file that gains a second link after its append was proposed: the apply re-observes it,
/// sees the change, and writes nothing.
#[test]
fn a_link_made_after_the_proposal_stops_the_append() {
    let fx = Fixture::new();
    fx.write("log.txt", "first\n");
    let input = json!({"path": "log.txt", "content": "second\n"});
    let plan = fx.propose("append_file", input.clone());
    std::fs::hard_link(fx.path("log.txt"), fx.outside("elsewhere.txt")).expect("hard link");
    let refused = fx.apply("append_file", input, &plan["preconditions"]);
    let error = refused.error.expect("refused");
    assert!(error.contains("changed since the proposal") && error.contains("hard links"), "{error}");
    assert_eq!(std::fs::read_to_string(fx.outside("elsewhere.txt")).expect("read"), "first\n");
}

/// A name swapped between a singly linked file and a hard link to an outside file while appends
/// are applied through it: whichever the append opens, the outside file never changes (the
/// apply checks the link count on the handle it writes through).
#[test]
fn swapping_in_a_hard_link_during_appends_never_reaches_the_outside_file() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let fx = Fixture::new();
    let outside = fx.outside("secret.txt");
    std::fs::write(&outside, "first\n").expect("outside");
    fx.write("log.txt", "first\n");
    let input = json!({"path": "log.txt", "content": "more\n"});
    let plan = fx.propose("append_file", input.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, root, outside) = (Arc::clone(&stop), fx.root.clone(), outside.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::fs::write(root.join("plain.tmp"), "first\n").expect("plain");
                std::fs::rename(root.join("plain.tmp"), root.join("log.txt")).expect("swap in plain");
                std::fs::hard_link(&outside, root.join("linked.tmp")).expect("link");
                std::fs::rename(root.join("linked.tmp"), root.join("log.txt")).expect("swap in link");
                swaps += 1;
            }
            swaps
        })
    };
    let started = std::time::Instant::now();
    let (mut applied, mut refused) = (0u64, 0u64);
    while started.elapsed() < std::time::Duration::from_secs(2) {
        match fx.apply("append_file", input.clone(), &plan["preconditions"]).ok {
            true => applied += 1,
            false => refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    println!("{swaps} swaps; {applied} appends applied (to plain files), {refused} refused");
    assert_eq!(std::fs::read_to_string(&outside).expect("outside"), "first\n", "the outside file changed");
}
