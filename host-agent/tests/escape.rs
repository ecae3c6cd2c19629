//! The escape corpus (Invariant 8): hundreds of generated paths that try to leave the root
//! (traversals in many depths and mixes, backslashes, absolute paths outside, Windows drive, UNC
//! and `\\?\` forms, device names (refused on Windows only), NUL bytes, literal percent-encodings,
//! symlinks and symlink chains pointing out, a symlinked directory out in the middle of a path),
//! each run against every path-taking tool and field, mutations both proposed and applied.
//!
//! Outside the root sit canaries: a file with a known token, size and hashes, files whose name no
//! input mentions (seen only if a listing leaked), a sibling directory sharing the root's name as
//! a prefix, and a directory that must stay empty. After every path the outside tree must be byte-for-byte unchanged, and no
//! output may carry a canary's content, name, size or hash.
//!
//! Does not: race (`race.rs`).

mod tool_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use host_agent::tools::{Commands, Launcher, Toolbox};
use protocol::HostResult;
use serde_json::{json, Value};
use sha2::Digest;

const CANARY_TOKEN: &str = "CANARY-7f3a9e-SECRET";
const CANARY2_TOKEN: &str = "SIBLING-4c1d88-SECRET";
const LEAK_DIR: &str = "leak-b9d2c4-listing";
const CANARY_SIZE: usize = 48611;
/// A file name no input ever mentions: seen in an output only if a listing leaked.
const HIDDEN_NAME: &str = "hidden-e5a1f0.dat";

/// What a path must do to the tools that follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Refused by every tool: it names something outside, or passes through a link out.
    Refused,
    /// Its last component is a symlink pointing out: refused by every tool that follows it;
    /// `stat`, `move` (from) and `delete` act on the link itself, inside the root.
    FinalLinkOut,
    /// A literal odd name inside the root: may work; only the canaries judge it.
    Literal,
}

struct World {
    base: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    canary_dir: PathBuf,
    sibling: PathBuf,
    canary: Vec<u8>,
    forbidden: Vec<String>,
    opener_log: PathBuf,
    toolbox: Toolbox,
}

fn canary_content() -> Vec<u8> {
    let mut content = format!("{CANARY_TOKEN}\n").into_bytes();
    while content.len() < CANARY_SIZE {
        content.extend_from_slice(b"canary line with the token CANARY-7f3a9e-SECRET inside\n");
    }
    content.truncate(CANARY_SIZE);
    content
}

impl World {
    fn new() -> World {
        let base = tempfile::tempdir().expect("tempdir");
        let root = base.path().join("root");
        let outside = base.path().join("outside");
        let canary_dir = base.path().join("canary-dir");
        let sibling = base.path().join("root2");
        for dir in [&root, &outside, &canary_dir, &sibling, &outside.join(LEAK_DIR)] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        let canary = canary_content();
        std::fs::write(outside.join("canary.txt"), &canary).expect("canary");
        std::fs::write(outside.join(LEAK_DIR).join("secret.txt"), CANARY_TOKEN).expect("leak");
        std::fs::write(outside.join(LEAK_DIR).join(HIDDEN_NAME), "").expect("hidden");
        std::fs::write(outside.join(HIDDEN_NAME), "").expect("hidden");
        std::fs::write(sibling.join(HIDDEN_NAME), "").expect("hidden");
        std::fs::write(sibling.join("canary2.txt"), CANARY2_TOKEN).expect("sibling canary");
        let forbidden = vec![
            CANARY_TOKEN.to_owned(),
            CANARY2_TOKEN.to_owned(),
            HIDDEN_NAME.to_owned(),
            hex::encode(sha2::Sha256::digest(&canary)),
            hex::encode(md5::Md5::digest(&canary)),
            format!("\"size\":{CANARY_SIZE}"),
            format!("\"bytes\":{CANARY_SIZE}"),
            "root:x:0:0".to_owned(),
        ];
        let opener_log = base.path().join("opener.log");
        let opener = base.path().join("opener.sh");
        std::fs::write(&opener, format!("#!/bin/sh\nprintf '%s\\n' \"$@\" >> '{}'\n", opener_log.display()))
            .expect("opener");
        set_executable(&opener);
        let commands = Commands { open: Launcher::new(&opener), reveal: Launcher::new(&opener) };
        let toolbox = Toolbox::new(std::slice::from_ref(&root)).expect("toolbox").with_commands(commands);
        let world = World { base, root, outside, canary_dir, sibling, canary, forbidden, opener_log, toolbox };
        world.reset_root();
        world
    }

    /// (Re)builds the root's fixtures: files, directories and the symlinks pointing out.
    fn reset_root(&self) {
        let root = &self.root;
        std::fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
        std::fs::write(root.join("inside.txt"), "inside\n").expect("write");
        std::fs::write(root.join("victim.txt"), "victim\n").expect("write");
        let base = self.base.path();
        let links: [(&str, PathBuf); 14] = [
            ("link-out", self.outside.clone()),
            ("link-out-rel", PathBuf::from("../outside")),
            ("link-file", self.outside.join("canary.txt")),
            ("link-file-rel", PathBuf::from("../outside/canary.txt")),
            ("chain1", PathBuf::from("chain2")),
            ("chain2", PathBuf::from("chain3")),
            ("chain3", PathBuf::from("../outside")),
            ("sub/mid", PathBuf::from("../../outside")),
            ("sub/deeper/up", PathBuf::from("../../..")),
            ("link-canary-dir", self.canary_dir.clone()),
            ("link-root2", base.join("root2")),
            ("link-etc", PathBuf::from("/etc")),
            ("loop1", PathBuf::from("loop2")),
            ("loop2", PathBuf::from("loop1")),
        ];
        for (name, target) in links {
            let link = root.join(name);
            match std::fs::symlink_metadata(&link) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&link).expect("clear"),
                Ok(_) => std::fs::remove_file(&link).expect("clear"),
                Err(_) => {}
            }
            symlink(&target, &link);
        }
    }

    /// Every file and directory outside the root, with content: must never change.
    fn outside_snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        let mut snapshot = BTreeMap::new();
        for top in [&self.outside, &self.canary_dir, &self.sibling] {
            let mut stack = vec![top.clone()];
            while let Some(dir) = stack.pop() {
                snapshot.insert(dir.clone(), None);
                for entry in std::fs::read_dir(&dir).expect("read outside") {
                    let path = entry.expect("entry").path();
                    if path.is_dir() {
                        stack.push(path);
                    } else {
                        snapshot.insert(path.clone(), Some(std::fs::read(&path).expect("read")));
                    }
                }
            }
        }
        snapshot
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

#[cfg(unix)]
fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The generated corpus: (path, expectation), deduplicated.
fn corpus(world: &World) -> Vec<(String, Expect)> {
    let root = world.root.to_string_lossy().into_owned();
    let base = world.base.path().to_string_lossy().into_owned();
    let outside = world.outside.to_string_lossy().into_owned();
    let mut cases: Vec<(String, Expect)> = Vec::new();
    let mut add = |path: String, expect: Expect| cases.push((path, expect));

    // Traversals: many depths, separators and mixes, towards every outside target.
    let targets = [
        "outside/canary.txt".to_owned(),
        "outside".to_owned(),
        format!("outside/{LEAK_DIR}"),
        "canary-dir/new.txt".to_owned(),
        "canary-dir".to_owned(),
        "root2/canary2.txt".to_owned(),
        "etc/passwd".to_owned(),
        String::new(),
    ];
    let separators = ["/", "\\", "/\\"];
    for target in &targets {
        for depth in 1..=8 {
            for sep in separators {
                let up = format!("..{sep}").repeat(depth);
                add(format!("{up}{}", target.replace('/', sep)), Expect::Refused);
            }
        }
        let prefixes = ["./", "sub/../", "sub/deeper/../../", "a/b/../../", "sub//..//", "./sub/./../"];
        for prefix in prefixes {
            for depth in 1..=3 {
                add(format!("{prefix}{}{target}", "../".repeat(depth)), Expect::Refused);
                add(
                    format!("{}{}{}", prefix.replace('/', "\\"), "..\\".repeat(depth), target.replace('/', "\\")),
                    Expect::Refused,
                );
            }
        }
    }
    for odd in [
        "..",
        "../",
        "..\\",
        "./..",
        "sub/../..",
        "sub/deeper/../../..",
        "a/../../",
        ".//..//",
        "sub\\..\\..",
        "./././..",
    ] {
        add(odd.to_owned(), Expect::Refused);
    }

    // Absolute paths outside the root (including a sibling sharing the root's name as a prefix).
    for absolute in [
        format!("{outside}/canary.txt"),
        outside.clone(),
        format!("{outside}/{LEAK_DIR}/secret.txt"),
        format!("{base}/canary-dir/new.txt"),
        format!("{base}/canary-dir"),
        format!("{base}/root2/canary2.txt"),
        format!("{base}/root2"),
        format!("{root}2/canary2.txt"),
        base.clone(),
        format!("{base}/"),
        "/".to_owned(),
        "/etc/passwd".to_owned(),
        "/etc".to_owned(),
        "/tmp".to_owned(),
        "/proc/self/environ".to_owned(),
        format!("{root}/../outside/canary.txt"),
        format!("{root}/sub/../../outside/canary.txt"),
        format!("{root}/./../outside"),
        format!("{root}/sub/deeper/../../../root2/canary2.txt"),
        format!("/{}etc/passwd", "../".repeat(6)),
        "\\etc\\passwd".to_owned(),
        outside.replace('/', "\\"),
        "//etc/passwd".to_owned(),
        format!("/{outside}/canary.txt"),
        format!("{root}/..//outside/canary.txt"),
        format!("{root}\\..\\outside\\canary.txt"),
    ] {
        add(absolute, Expect::Refused);
    }

    // Windows forms: drives, UNC, verbatim and device namespaces, reserved names.
    for windows in [
        "C:\\Windows\\win.ini",
        "C:/Windows/win.ini",
        "c:\\",
        "C:",
        "c:",
        "C:..\\..\\outside\\canary.txt",
        "c:canary.txt",
        "Z:\\canary.txt",
        "\\\\server\\share\\canary.txt",
        "\\\\server\\share",
        "//server/share/canary.txt",
        "\\\\?\\C:\\Windows\\win.ini",
        "\\\\?\\UNC\\server\\share\\x",
        "\\\\?\\GLOBALROOT\\Device\\HarddiskVolume1",
        "\\\\.\\PhysicalDrive0",
        "\\\\.\\pipe\\x",
        "\\\\.\\C:",
        "\\\\localhost\\c$\\Windows",
        "\\/server/share",
        "/\\server\\share",
        "..\\..\\Windows\\win.ini",
        "sub\\..\\..\\outside\\canary.txt",
    ] {
        add(windows.to_owned(), Expect::Refused);
    }
    // Device names: refused on Windows; elsewhere ordinary names inside the root.
    let device = if cfg!(windows) { Expect::Refused } else { Expect::Literal };
    for reserved in [
        "CON",
        "con",
        "NUL",
        "nul.txt",
        "Nul ",
        "con.",
        "PRN",
        "aux",
        "AUX.tar.gz",
        "COM1",
        "com9.log",
        "LPT1",
        "lpt9.txt",
        "COM¹",
        "CONIN$",
        "conout$",
        "sub/CON",
        "sub/nul/x.txt",
        "sub\\COM3\\x",
    ] {
        add(reserved.to_owned(), device);
    }
    let verbatim = format!("\\\\?\\{}", world.outside.join("canary.txt").display());
    add(verbatim, Expect::Refused);

    // NUL bytes anywhere.
    for nul in [
        "inside.txt\0".to_owned(),
        "\0".to_owned(),
        "../\0".to_owned(),
        "sub\0/../../outside/canary.txt".to_owned(),
        "outside\0canary".to_owned(),
        "link-out\0/canary.txt".to_owned(),
        format!("{root}/inside.txt\0"),
        format!("{root}\0/../outside"),
        "..\0/..\0/etc/passwd".to_owned(),
        "victim.txt\0.png".to_owned(),
    ] {
        add(nul, Expect::Refused);
    }

    // Literal percent-encodings and look-alikes: names inside the root, never decoded.
    for encoded in [
        "%2e%2e%2f",
        "%2e%2e/",
        "..%2f",
        "%2e%2e%5c",
        "..%5c..%5c",
        "%252e%252e%252f",
        "%c0%ae%c0%ae%c0%af",
        "%uff0e%uff0e%u2215",
        "．．／",
        "‥/",
        "..%00/",
        "%00",
        "....//",
        "...",
        ".../...",
        "%2e%2e%2f%2e%2e%2f",
    ] {
        for suffix in ["canary.txt", "outside/canary.txt", ""] {
            add(format!("{encoded}{suffix}"), Expect::Literal);
        }
    }

    // Symlinks out: through them, ending on them, chains, one in the middle of a path.
    for through in [
        "link-out/canary.txt".to_owned(),
        format!("link-out/{LEAK_DIR}"),
        format!("link-out/{LEAK_DIR}/secret.txt"),
        "link-out/new.txt".to_owned(),
        "link-out-rel/canary.txt".to_owned(),
        "chain1/canary.txt".to_owned(),
        "chain2/canary.txt".to_owned(),
        "sub/mid/canary.txt".to_owned(),
        format!("sub/mid/{LEAK_DIR}"),
        "sub/deeper/up/outside/canary.txt".to_owned(),
        "sub/deeper/up/canary-dir/new.txt".to_owned(),
        "link-canary-dir/new.txt".to_owned(),
        "link-canary-dir/sub/new.txt".to_owned(),
        "link-etc/passwd".to_owned(),
        "link-root2/canary2.txt".to_owned(),
        "loop1/x".to_owned(),
        "sub/../link-out/canary.txt".to_owned(),
        "./link-out/./canary.txt".to_owned(),
        "link-out\\canary.txt".to_owned(),
    ] {
        add(format!("{root}/{through}"), Expect::Refused);
        add(through, Expect::Refused);
    }
    for final_link in [
        "link-out",
        "link-out-rel",
        "link-file",
        "link-file-rel",
        "chain1",
        "chain3",
        "sub/mid",
        "sub/deeper/up",
        "link-canary-dir",
        "link-root2",
        "link-etc",
        "loop1",
        "./link-out",
        "link-out/.",
        "sub/./mid",
    ] {
        add(format!("{root}/{final_link}"), Expect::FinalLinkOut);
        add(final_link.to_owned(), Expect::FinalLinkOut);
    }

    // `..` is lexical: through a link out and back up is the root again, inside.
    add("link-out/../inside.txt".to_owned(), Expect::Literal);
    add(format!("{root}/sub/mid/../../inside.txt"), Expect::Literal);

    let mut seen = BTreeSet::new();
    cases.retain(|(path, _)| seen.insert(path.clone()));
    cases
}

/// One call of the corpus run: tool, input, whether apply follows a proposal, and whether the
/// path is followed (so a final symlink out must be refused).
struct Probe {
    tool: &'static str,
    input: Value,
    follows_final_link: bool,
}

fn probes(path: &str, n: usize) -> Vec<Probe> {
    let probe = |tool, input, follows_final_link| Probe { tool, input, follows_final_link };
    vec![
        probe("list_directory", json!({ "path": path }), true),
        probe("list_directory", json!({ "path": path, "recursive": true }), true),
        probe("read_file", json!({ "path": path }), true),
        probe("read_file", json!({ "path": path, "startLine": 1, "endLine": 3 }), true),
        probe("stat", json!({ "path": path }), false),
        probe("glob", json!({ "pattern": "**/*", "path": path }), true),
        probe("grep", json!({ "pattern": ".", "path": path }), true),
        probe("grep", json!({ "pattern": "CANARY", "path": path, "context": 2, "literal": true }), true),
        probe("disk_usage", json!({ "path": path }), true),
        probe("hash_file", json!({ "path": path }), true),
        probe("hash_file", json!({ "path": path, "algorithm": "md5" }), true),
        probe("write_file", json!({ "path": path, "content": "PWNED" }), true),
        probe("edit_file", json!({ "path": path, "edits": [{ "find": "CANARY", "replace": "PWNED" }] }), true),
        probe("append_file", json!({ "path": path, "content": "PWNED" }), true),
        probe("create_directory", json!({ "path": path }), true),
        probe("move", json!({ "from": path, "to": format!("moved-{n}") }), false),
        probe("move", json!({ "from": "victim.txt", "to": path }), true),
        probe("copy", json!({ "from": path, "to": format!("copied-{n}") }), true),
        probe("copy", json!({ "from": "victim.txt", "to": path }), true),
        probe("delete", json!({ "path": path, "recursive": true }), false),
        probe("delete", json!({ "path": path }), false),
        probe("open_path", json!({ "path": path }), true),
        probe("reveal_in_os", json!({ "path": path }), true),
    ]
}

/// Calls whose input is not a path but may carry one: glob patterns and grep's file filter.
fn pattern_probes(path: &str) -> Vec<Probe> {
    vec![
        Probe { tool: "glob", input: json!({ "pattern": path }), follows_final_link: false },
        Probe { tool: "grep", input: json!({ "pattern": "CANARY", "glob": path }), follows_final_link: false },
    ]
}

const MUTATIONS: [&str; 7] = ["write_file", "edit_file", "append_file", "create_directory", "move", "copy", "delete"];

#[cfg(unix)]
#[test]
fn no_path_in_the_corpus_escapes_the_root() {
    let world = World::new();
    let before = world.outside_snapshot();
    let cases = corpus(&world);
    let mut calls = 0usize;
    let mut refused = 0usize;
    let check = |result: &HostResult, what: &str| {
        let text = serde_json::to_string(result).expect("encode");
        for secret in &world.forbidden {
            let excerpt: String = text.chars().take(400).collect();
            assert!(!text.contains(secret.as_str()), "{what}: output carries {secret:?}: {excerpt}");
        }
    };
    for (n, (path, expect)) in cases.iter().enumerate() {
        world.reset_root();
        let mut all = probes(path, n);
        all.extend(pattern_probes(path));
        for probe in all {
            let what = format!("{} {} ({expect:?})", probe.tool, probe.input);
            let proposed = world.toolbox.run(&tool_support::call(probe.tool, probe.input.clone()));
            calls += 1;
            check(&proposed, &what);
            let must_fail = match expect {
                Expect::Refused => true,
                Expect::FinalLinkOut => probe.follows_final_link,
                Expect::Literal => false,
            };
            let is_path_probe = probe.input.get("path").and_then(Value::as_str) == Some(path.as_str())
                || probe.input.get("from").and_then(Value::as_str) == Some(path.as_str())
                || probe.input.get("to").and_then(Value::as_str) == Some(path.as_str());
            if must_fail && is_path_probe {
                assert!(!proposed.ok, "{what} should be refused, got {:?}", proposed.result);
            }
            if !proposed.ok {
                refused += 1;
            }
            if MUTATIONS.contains(&probe.tool) {
                // Apply with the proposal's preconditions, or hand-made ones when it was refused.
                let preconditions = proposed
                    .result
                    .as_ref()
                    .filter(|_| proposed.is_proposal())
                    .map(|plan| plan["preconditions"].clone())
                    .unwrap_or_else(|| {
                        let absent = json!({ "path": path, "type": "absent" });
                        json!({ "target": absent, "source": absent, "destination": absent })
                    });
                let applied =
                    world.toolbox.run(&tool_support::apply_call(probe.tool, probe.input.clone(), preconditions));
                calls += 1;
                check(&applied, &format!("apply {what}"));
                if applied.ok {
                    // The next probe meets the fixtures as they were (a link moved away is back).
                    world.reset_root();
                }
                if must_fail && is_path_probe {
                    assert!(!applied.ok, "apply {what} should be refused, got {:?}", applied.result);
                }
            }
        }
        assert_eq!(std::fs::read(world.outside.join("canary.txt")).expect("canary"), world.canary, "{path:?}");
        assert_eq!(world.outside_snapshot(), before, "the outside changed after {path:?}");
        assert_eq!(std::fs::read_dir(&world.canary_dir).expect("canary dir").count(), 0, "{path:?}");
    }
    let root_prefix = format!("{}/", world.root.display());
    let opened = std::fs::read_to_string(&world.opener_log).unwrap_or_default();
    for line in opened.lines() {
        assert!(line == world.root.to_string_lossy() || line.starts_with(&root_prefix), "opener got {line:?}");
    }
    let count = |expect| cases.iter().filter(|(_, e)| *e == expect).count();
    println!(
        "escape corpus: {} paths ({} refused outright, {} ending on a symlink out, {} literal odd names), {calls} calls, {refused} refused proposals/reads",
        cases.len(),
        count(Expect::Refused),
        count(Expect::FinalLinkOut),
        count(Expect::Literal),
    );
    assert!(cases.len() >= 500, "the corpus shrank to {}", cases.len());
}
