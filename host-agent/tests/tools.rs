//! Every built-in tool against a real temporary tree: reads with their bounds, mutations proposed
//! then applied, applies refused after the target changed, replayed applies taking effect once,
//! input validation, and the actions' argument.
//!
//! Does not: try to escape the root (`escape.rs`) or race a symlink swap (`race.rs`).

mod tool_support;

use serde_json::{json, Value};
use tool_support::{shown, Fixture};

fn names(entries: &Value) -> Vec<String> {
    entries.as_array().expect("an array").iter().map(|e| e["name"].as_str().expect("name").to_owned()).collect()
}

// ---- reads ----

#[test]
fn list_directory_lists_types_and_sizes_in_name_order() {
    let fx = Fixture::new();
    fx.write("b.txt", "12345");
    fx.write("a/inner.txt", "x");
    std::fs::create_dir(fx.path("c")).expect("mkdir");
    #[cfg(unix)]
    std::os::unix::fs::symlink(fx.path("a"), fx.path("link")).expect("symlink");
    let out = fx.ok("list_directory", json!({"path": "."}));
    assert_eq!(out["truncated"], false);
    let entries = out["entries"].as_array().expect("entries");
    let by_name = |name: &str| entries.iter().find(|e| e["name"] == name).cloned().expect(name);
    assert_eq!(by_name("b.txt")["type"], "file");
    assert_eq!(by_name("b.txt")["size"], 5);
    assert_eq!(by_name("b.txt")["path"], shown(&fx.path("b.txt")));
    assert_eq!(by_name("a")["type"], "dir");
    #[cfg(unix)]
    assert_eq!(by_name("link")["type"], "symlink");
    let mut sorted = names(&out["entries"]);
    sorted.sort();
    assert_eq!(names(&out["entries"]), sorted);
    assert!(!names(&out["entries"]).contains(&"inner.txt".to_owned()), "not recursive");

    let deep = fx.ok("list_directory", json!({"path": fx.root.to_string_lossy(), "recursive": true}));
    let all = names(&deep["entries"]);
    assert!(all.contains(&"inner.txt".to_owned()));
    // The symlink to `a` is listed, not followed: `inner.txt` appears once.
    assert_eq!(all.iter().filter(|n| *n == "inner.txt").count(), 1);
}

#[test]
fn list_directory_caps_at_1000_entries() {
    let fx = Fixture::new();
    for i in 0..1000 {
        fx.write(&format!("many/f{i:04}"), "");
    }
    let exact = fx.ok("list_directory", json!({"path": "many"}));
    assert_eq!(exact["entries"].as_array().map(Vec::len), Some(1000));
    assert_eq!(exact["truncated"], false);
    fx.write("many/f1000", "");
    let over = fx.ok("list_directory", json!({"path": "many"}));
    assert_eq!(over["entries"].as_array().map(Vec::len), Some(1000));
    assert_eq!(over["truncated"], true);
    let recursive = fx.ok("list_directory", json!({"path": ".", "recursive": true}));
    assert_eq!(recursive["entries"].as_array().map(Vec::len), Some(1000));
    assert_eq!(recursive["truncated"], true);
}

#[test]
fn list_directory_of_a_file_or_missing_path_fails() {
    let fx = Fixture::new();
    fx.write("f", "x");
    assert!(fx.err("list_directory", json!({"path": "f"})).contains("f"));
    assert!(fx.err("list_directory", json!({"path": "missing"})).contains("missing"));
}

#[test]
fn read_file_whole_and_line_ranges() {
    let fx = Fixture::new();
    fx.write("t.txt", "one\ntwo\nthree\nfour");
    let whole = fx.ok("read_file", json!({"path": "t.txt"}));
    assert_eq!(whole, json!({"content": "one\ntwo\nthree\nfour", "totalLines": 4, "truncated": false}));
    let range = fx.ok("read_file", json!({"path": "t.txt", "startLine": 2, "endLine": 3}));
    assert_eq!(range["content"], "two\nthree\n");
    assert_eq!(range["totalLines"], 4);
    let tail = fx.ok("read_file", json!({"path": "t.txt", "startLine": 4}));
    assert_eq!(tail["content"], "four");
    let past = fx.ok("read_file", json!({"path": "t.txt", "startLine": 10}));
    assert_eq!(past["content"], "");
    assert!(fx.err("read_file", json!({"path": "t.txt", "startLine": 3, "endLine": 2})).contains("startLine"));
    assert!(fx.err("read_file", json!({"path": "t.txt", "startLine": 0})).contains("1-based"));
    assert!(fx.err("read_file", json!({"path": "."})).contains("directory"));
}

#[test]
fn read_file_caps_content_at_one_mib() {
    let fx = Fixture::new();
    let line = format!("{}\n", "a".repeat(99));
    let big = line.repeat(20_000); // 2,000,000 bytes, 20,000 lines
    fx.write("big.txt", &big);
    let out = fx.ok("read_file", json!({"path": "big.txt"}));
    assert_eq!(out["truncated"], true);
    assert_eq!(out["totalLines"], 20_000);
    let content = out["content"].as_str().expect("content");
    assert!(content.len() <= 1 << 20, "{}", content.len());
    assert!(content.len() > (1 << 20) - 100);
    assert!(content.ends_with('\n'), "cut at a line end");
    // A range past the first MiB is reachable.
    let late = fx.ok("read_file", json!({"path": "big.txt", "startLine": 19_999, "endLine": 20_000}));
    assert_eq!(late["content"], line.repeat(2));
    assert_eq!(late["truncated"], false);
}

#[test]
fn read_file_reports_binary_files() {
    let fx = Fixture::new();
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    bytes.extend(std::iter::repeat_n(7u8, 5000));
    fx.write("image.png", &bytes);
    let out = fx.ok("read_file", json!({"path": "image.png"}));
    assert_eq!(out, json!({"binary": true, "size": bytes.len()}));
}

#[test]
fn stat_describes_files_dirs_and_symlinks() {
    let fx = Fixture::new();
    fx.write("f.txt", "hello");
    let file = fx.ok("stat", json!({"path": "f.txt"}));
    assert_eq!(file["type"], "file");
    assert_eq!(file["size"], 5);
    assert_eq!(file["readonly"], false);
    let modified = file["modified"].as_str().expect("modified");
    let parsed = chrono::DateTime::parse_from_rfc3339(modified).expect("RFC 3339");
    assert_eq!(parsed.offset().local_minus_utc(), 0);
    assert!((chrono::Utc::now() - parsed.to_utc()).num_seconds().abs() < 600);
    assert_eq!(fx.ok("stat", json!({"path": "."}))["type"], "dir");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("f.txt", fx.path("l")).expect("symlink");
        assert_eq!(fx.ok("stat", json!({"path": "l"}))["type"], "symlink");
        let mut permissions = std::fs::metadata(fx.path("f.txt")).expect("meta").permissions();
        permissions.set_readonly(true);
        std::fs::set_permissions(fx.path("f.txt"), permissions).expect("chmod");
        assert_eq!(fx.ok("stat", json!({"path": "f.txt"}))["readonly"], true);
    }
    assert!(fx.err("stat", json!({"path": "nope"})).contains("nope"));
}

#[test]
fn glob_matches_relative_paths() {
    let fx = Fixture::new();
    fx.write("src/main.rs", "");
    fx.write("src/deep/lib.rs", "");
    fx.write("top.rs", "");
    fx.write("notes.txt", "");
    let all = fx.ok("glob", json!({"pattern": "**/*.rs"}));
    let matches: Vec<String> = serde_json::from_value(all["matches"].clone()).expect("strings");
    let expected: Vec<String> =
        ["src/deep/lib.rs", "src/main.rs", "top.rs"].iter().map(|p| shown(&fx.path(p))).collect();
    assert_eq!(matches, expected);
    assert_eq!(all["truncated"], false);
    let top = fx.ok("glob", json!({"pattern": "*.rs"}));
    assert_eq!(top["matches"], json!([shown(&fx.path("top.rs"))]));
    let under = fx.ok("glob", json!({"pattern": "*.rs", "path": "src"}));
    assert_eq!(under["matches"], json!([shown(&fx.path("src/main.rs"))]));
    let braces = fx.ok("glob", json!({"pattern": "{notes.txt,src}"}));
    assert_eq!(braces["matches"].as_array().map(Vec::len), Some(2));
    assert!(fx.err("glob", json!({"pattern": "/etc/*"})).contains("relative"));
    assert!(fx.err("glob", json!({"pattern": "../*"})).contains("relative"));
    assert!(fx.err("glob", json!({"pattern": "a[", "path": "."})).contains("glob"));
}

#[test]
fn glob_caps_at_1000_matches() {
    let fx = Fixture::new();
    for i in 0..1001 {
        fx.write(&format!("g/{i}.log"), "");
    }
    let out = fx.ok("glob", json!({"pattern": "g/*.log"}));
    assert_eq!(out["matches"].as_array().map(Vec::len), Some(1000));
    assert_eq!(out["truncated"], true);
}

#[test]
fn grep_finds_lines_with_options() {
    let fx = Fixture::new();
    fx.write("a.txt", "alpha\nBeta\ngamma beta\n");
    fx.write("sub/b.md", "nothing\nbeta here\n");
    fx.write("bin.dat", b"beta\0beta\0");
    let out = fx.ok("grep", json!({"pattern": "beta"}));
    assert_eq!(out["truncated"], false);
    let found: Vec<(String, u64, String)> = out["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .map(|m| {
            (
                m["path"].as_str().unwrap_or("").to_owned(),
                m["line"].as_u64().unwrap_or(0),
                m["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            (shown(&fx.path("a.txt")), 3, "gamma beta".to_owned()),
            (shown(&fx.path("sub/b.md")), 2, "beta here".to_owned()),
        ],
        "binary files are skipped"
    );
    let insensitive = fx.ok("grep", json!({"pattern": "BETA", "caseInsensitive": true, "path": "a.txt"}));
    assert_eq!(insensitive["matches"].as_array().map(Vec::len), Some(2));
    let literal = fx.ok("grep", json!({"pattern": "a.p", "literal": true}));
    assert_eq!(literal["matches"].as_array().map(Vec::len), Some(0));
    let regex = fx.ok("grep", json!({"pattern": "^a.p"}));
    assert_eq!(regex["matches"].as_array().map(Vec::len), Some(1));
    let filtered = fx.ok("grep", json!({"pattern": "beta", "glob": "*.md"}));
    assert_eq!(filtered["matches"].as_array().map(Vec::len), Some(1));
    assert_eq!(filtered["matches"][0]["path"], shown(&fx.path("sub/b.md")));
    assert!(fx.err("grep", json!({"pattern": "("})).contains("invalid pattern"));
    assert!(fx.err("grep", json!({"pattern": "x", "context": 11})).contains("context"));
}

#[test]
fn grep_returns_context_lines() {
    let fx = Fixture::new();
    fx.write("c.txt", "1\n2\nhit 3\n4\nhit 5\n6\n7\n");
    let out = fx.ok("grep", json!({"pattern": "hit", "context": 2}));
    let matches = out["matches"].as_array().expect("matches");
    assert_eq!(matches.len(), 2);
    assert_eq!(matches[0]["line"], 3);
    assert_eq!(matches[0]["before"], json!(["1", "2"]));
    assert_eq!(matches[0]["after"], json!(["4", "hit 5"]));
    assert_eq!(matches[1]["line"], 5);
    assert_eq!(matches[1]["before"], json!(["hit 3", "4"]));
    assert_eq!(matches[1]["after"], json!(["6", "7"]));
    let none = fx.ok("grep", json!({"pattern": "hit"}));
    assert!(none["matches"][0].get("before").is_none());
}

#[test]
fn grep_caps_matches_and_line_length() {
    let fx = Fixture::new();
    fx.write("many.txt", "match\n".repeat(250));
    let out = fx.ok("grep", json!({"pattern": "match"}));
    assert_eq!(out["matches"].as_array().map(Vec::len), Some(200));
    assert_eq!(out["truncated"], true);
    let exact = fx.write("exact.txt", "needle\n".repeat(200));
    let out = fx.ok("grep", json!({"pattern": "needle", "path": exact.to_string_lossy()}));
    assert_eq!(out["matches"].as_array().map(Vec::len), Some(200));
    assert_eq!(out["truncated"], false);

    fx.write("long.txt", format!("short needle2\n{}needle2{}\n", "x".repeat(2000), "y".repeat(2000)));
    let out = fx.ok("grep", json!({"pattern": "needle2"}));
    let matches = out["matches"].as_array().expect("matches");
    assert_eq!(matches.len(), 2);
    assert!(matches[0].get("truncated").is_none());
    assert_eq!(matches[1]["text"].as_str().map(str::len), Some(1024));
    assert_eq!(matches[1]["truncated"], true);
    assert_eq!(out["truncated"], false);
}

#[test]
fn disk_usage_counts_a_tree() {
    let fx = Fixture::new();
    fx.write("d/a", "123");
    fx.write("d/e/b", "4567");
    fx.write("d/e/f/c", "");
    assert_eq!(
        fx.ok("disk_usage", json!({"path": "d"})),
        json!({"bytes": 7, "files": 3, "dirs": 2, "truncated": false})
    );
    assert_eq!(
        fx.ok("disk_usage", json!({"path": "d/a"})),
        json!({"bytes": 3, "files": 1, "dirs": 0, "truncated": false})
    );
}

#[test]
fn hash_file_sha256_and_md5() {
    let fx = Fixture::new();
    fx.write("h", "hello");
    assert_eq!(
        fx.ok("hash_file", json!({"path": "h"})),
        json!({"algorithm": "sha256", "hash": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"})
    );
    assert_eq!(
        fx.ok("hash_file", json!({"path": "h", "algorithm": "md5"})),
        json!({"algorithm": "md5", "hash": "5d41402abc4b2a76b9719d911017c592"})
    );
    assert!(fx.err("hash_file", json!({"path": "h", "algorithm": "crc32"})).contains("invalid input"));
    assert!(fx.err("hash_file", json!({"path": "."})).contains("directory"));
}

#[cfg(unix)]
#[test]
fn reads_refuse_fifos_without_hanging() {
    let fx = Fixture::new();
    let status = std::process::Command::new("mkfifo").arg(fx.path("pipe")).status().expect("mkfifo");
    assert!(status.success());
    assert!(fx.err("read_file", json!({"path": "pipe"})).contains("not a regular file"));
    assert!(fx.err("hash_file", json!({"path": "pipe"})).contains("not a regular file"));
    let out = fx.ok("grep", json!({"pattern": "x"}));
    assert_eq!(out["matches"], json!([]));
}

/// Windows device names (NUL, COM1, ...) are ordinary names elsewhere: every tool treats such a
/// file like any other on Linux and macOS (they are refused on Windows only, see `scope.rs`).
#[cfg(not(windows))]
#[test]
fn windows_device_names_are_ordinary_files_elsewhere() {
    let fx = Fixture::new();
    for name in ["nul", "CON", "com1.txt", "aux/lpt9.log"] {
        fx.write(name, "device-name file\n");
    }
    for name in ["nul", "CON", "com1.txt", "aux/lpt9.log"] {
        assert_eq!(fx.ok("read_file", json!({"path": name}))["content"], "device-name file\n", "{name}");
        assert_eq!(fx.ok("stat", json!({"path": name}))["type"], "file", "{name}");
        assert!(fx.ok("hash_file", json!({"path": name}))["hash"].is_string(), "{name}");
    }
    let listed = fx.ok("list_directory", json!({"path": ".", "recursive": true}));
    let mut listed = names(&listed["entries"]);
    listed.sort();
    assert_eq!(listed, ["CON", "aux", "com1.txt", "lpt9.log", "nul"]);
    let grep = fx.ok("grep", json!({"pattern": "device-name"}));
    assert_eq!(grep["matches"].as_array().map(Vec::len), Some(4), "{grep}");
    let glob = fx.ok("glob", json!({"pattern": "**/*"}));
    assert_eq!(glob["matches"].as_array().map(Vec::len), Some(5), "{glob}");
    fx.propose_apply("write_file", json!({"path": "prn", "content": "x"}));
    fx.propose_apply("append_file", json!({"path": "nul", "content": "more\n"}));
    assert_eq!(fx.read("nul"), "device-name file\nmore\n");
    fx.propose_apply("move", json!({"from": "CON", "to": "aux/CONIN$"}));
    fx.propose_apply("delete", json!({"path": "aux", "recursive": true}));
    assert!(!fx.path("aux").exists());
}

// ---- validation and dispatch ----

#[test]
fn invalid_input_and_unknown_tools_fail_clearly() {
    let fx = Fixture::new();
    let unknown = fx.err("list_directory", json!({"path": ".", "recursve": true}));
    assert!(
        unknown.contains("invalid input for list_directory") && unknown.contains("unknown field `recursve`"),
        "{unknown}"
    );
    let missing = fx.err("read_file", json!({}));
    assert!(missing.contains("missing field `path`"), "{missing}");
    let wrong = fx.err("read_file", json!({"path": 7}));
    assert!(wrong.contains("invalid type"), "{wrong}");
    assert!(fx.err("read_file", json!("just a string")).contains("invalid input"));
    assert!(fx.err("rm_rf", json!({})).contains("unknown tool `rm_rf`"));
    assert!(fx.err("read_file", json!({"path": ""})).contains("empty"));
    let result = fx.run("stat", json!({"path": "."}));
    assert_eq!(result.call_id, "call-stat");
}

#[test]
fn descriptors_publish_the_validated_schema() {
    let fx = Fixture::new();
    let descriptors = fx.toolbox.descriptors();
    let names: Vec<&str> = descriptors.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "list_directory",
            "read_file",
            "stat",
            "glob",
            "grep",
            "disk_usage",
            "hash_file",
            "write_file",
            "edit_file",
            "append_file",
            "create_directory",
            "move",
            "copy",
            "delete",
            "open_path",
            "reveal_in_os"
        ]
    );
    let class = |name: &str| descriptors.iter().find(|d| d.name == name).map(|d| d.class);
    assert_eq!(class("grep"), Some(protocol::ToolClass::Read));
    assert_eq!(class("move"), Some(protocol::ToolClass::Mutate));
    assert_eq!(class("open_path"), Some(protocol::ToolClass::Action));
    let edit = descriptors.iter().find(|d| d.name == "edit_file").expect("edit_file");
    assert_eq!(edit.input_schema["required"], json!(["path", "edits"]));
    assert_eq!(edit.input_schema["properties"]["edits"]["items"]["additionalProperties"], false);
    let grep = descriptors.iter().find(|d| d.name == "grep").expect("grep");
    assert!(grep.input_schema["properties"]["caseInsensitive"].is_object());
    assert_eq!(fx.toolbox.roots(), vec![shown(&fx.root)]);
}

#[test]
fn two_roots_relative_goes_to_the_first() {
    let base = tempfile::tempdir().expect("tempdir");
    let (one, two) = (base.path().join("one"), base.path().join("two"));
    std::fs::create_dir(&one).expect("mkdir");
    std::fs::create_dir(&two).expect("mkdir");
    std::fs::write(one.join("f"), "first").expect("write");
    std::fs::write(two.join("f"), "second").expect("write");
    let toolbox = host_agent::tools::Toolbox::new(&[one.clone(), two.clone()]).expect("toolbox");
    let read = |path: String| toolbox.run(&tool_support::call("read_file", json!({ "path": path })));
    assert_eq!(read("f".into()).result.expect("ok")["content"], "first");
    assert_eq!(read(shown(&two.join("f"))).result.expect("ok")["content"], "second");
    assert!(host_agent::tools::Toolbox::new(&[base.path().join("absent")]).is_err());
}

// ---- mutations ----

#[test]
fn write_file_proposes_a_diff_then_applies_once() {
    let fx = Fixture::new();
    let input = json!({"path": "new/dir/f.txt", "content": "hello\n"});
    let plan = fx.propose("write_file", input.clone());
    assert!(!fx.path("new").exists(), "a proposal touches nothing");
    assert!(plan["diff"].as_str().expect("diff").contains("+hello"));
    assert_eq!(plan["preconditions"]["target"]["type"], "absent");
    assert_eq!(plan["preconditions"]["target"]["path"], shown(&fx.path("new/dir/f.txt")));
    let applied = fx.apply("write_file", input.clone(), &plan["preconditions"]);
    assert!(applied.ok, "{:?}", applied.error);
    assert_eq!(fx.read("new/dir/f.txt"), "hello\n");
    let replay = fx.apply("write_file", input, &plan["preconditions"]);
    assert!(!replay.ok);
    assert!(replay.error.expect("error").contains("changed since the proposal"));
    assert_eq!(fx.read("new/dir/f.txt"), "hello\n");
    let leftovers: Vec<_> = std::fs::read_dir(fx.path("new/dir")).expect("ls").collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
}

#[test]
fn write_file_overwrite_is_refused_when_the_target_changed() {
    let fx = Fixture::new();
    fx.write("f.txt", "one\ntwo\n");
    let input = json!({"path": "f.txt", "content": "one\nthree\n"});
    let plan = fx.propose("write_file", input.clone());
    let diff = plan["diff"].as_str().expect("diff");
    assert!(diff.contains("-two") && diff.contains("+three"), "{diff}");
    assert_eq!(plan["preconditions"]["target"]["type"], "file");
    assert_eq!(plan["preconditions"]["target"]["size"], 8);
    fx.write("f.txt", "someone else\n");
    let refused = fx.apply("write_file", input, &plan["preconditions"]);
    assert!(!refused.ok);
    let error = refused.error.expect("error");
    assert!(error.contains("the target changed since the proposal"), "{error}");
    assert_eq!(fx.read("f.txt"), "someone else\n", "untouched");
}

#[test]
fn write_file_needs_preconditions_and_refuses_directories() {
    let fx = Fixture::new();
    let mut call = tool_support::call("write_file", json!({"path": "x", "content": ""}));
    call.mode = Some(protocol::CallMode::Apply);
    let result = fx.toolbox.run(&call);
    assert!(result.error.expect("error").contains("preconditions"));
    assert!(!fx.path("x").exists());
    let bogus = fx.apply("write_file", json!({"path": "x", "content": ""}), &json!({"bogus": 1}));
    assert!(bogus.error.expect("error").contains("preconditions"));
    std::fs::create_dir(fx.path("d")).expect("mkdir");
    assert!(fx.err("write_file", json!({"path": "d", "content": "x"})).contains("is a directory"));
    assert!(fx.err("write_file", json!({"path": ".", "content": "x"})).contains("root"));
}

#[cfg(unix)]
#[test]
fn write_file_keeps_the_mode_of_the_file_it_replaces() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    let script = fx.write("run.sh", "#!/bin/sh\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    fx.propose_apply("write_file", json!({"path": "run.sh", "content": "#!/bin/sh\necho hi\n"}));
    let mode = std::fs::metadata(&script).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o750);
}

#[test]
fn edit_file_replaces_unique_text() {
    let fx = Fixture::new();
    fx.write("e.txt", "let a = 1;\nlet b = 2;\nlet c = 3;\n");
    let input = json!({"path": "e.txt", "edits": [{"find": "b = 2", "replace": "b = 20"}, {"find": "c = 3", "replace": "c = 30"}]});
    let plan = fx.propose("edit_file", input.clone());
    let diff = plan["diff"].as_str().expect("diff");
    assert!(diff.contains("-let b = 2;") && diff.contains("+let c = 30;"), "{diff}");
    assert_eq!(fx.read("e.txt"), "let a = 1;\nlet b = 2;\nlet c = 3;\n");
    let result = fx.apply("edit_file", input.clone(), &plan["preconditions"]);
    assert!(result.ok, "{:?}", result.error);
    assert_eq!(fx.read("e.txt"), "let a = 1;\nlet b = 20;\nlet c = 30;\n");
    let replay = fx.apply("edit_file", input, &plan["preconditions"]);
    assert!(replay.error.expect("error").contains("changed since the proposal"));
    assert_eq!(fx.read("e.txt"), "let a = 1;\nlet b = 20;\nlet c = 30;\n");
}

#[test]
fn edit_file_refuses_ambiguous_or_missing_finds() {
    let fx = Fixture::new();
    fx.write("e.txt", "x = 1\nx = 1\n");
    let twice = fx.err("edit_file", json!({"path": "e.txt", "edits": [{"find": "x = 1", "replace": "y"}]}));
    assert!(twice.contains("more than once"), "{twice}");
    let absent = fx.err("edit_file", json!({"path": "e.txt", "edits": [{"find": "zzz", "replace": "y"}]}));
    assert!(absent.contains("is not in"), "{absent}");
    let empty = fx.err("edit_file", json!({"path": "e.txt", "edits": [{"find": "", "replace": "y"}]}));
    assert!(empty.contains("empty"), "{empty}");
    assert!(fx.err("edit_file", json!({"path": "e.txt", "edits": []})).contains("empty"));
    assert!(fx
        .err("edit_file", json!({"path": "nope.txt", "edits": [{"find": "a", "replace": "b"}]}))
        .contains("does not exist"));
    fx.write("bin", b"\xff\xfe\x00");
    assert!(fx.err("edit_file", json!({"path": "bin", "edits": [{"find": "a", "replace": "b"}]})).contains("UTF-8"));
    assert_eq!(fx.read("e.txt"), "x = 1\nx = 1\n");
}

#[test]
fn edit_file_apply_after_a_change_is_refused() {
    let fx = Fixture::new();
    fx.write("e.txt", "keep\nold\n");
    let input = json!({"path": "e.txt", "edits": [{"find": "old", "replace": "new"}]});
    let plan = fx.propose("edit_file", input.clone());
    fx.write("e.txt", "keep\nold\nmore\n");
    let refused = fx.apply("edit_file", input, &plan["preconditions"]);
    assert!(refused.error.expect("error").contains("changed since the proposal"));
    assert_eq!(fx.read("e.txt"), "keep\nold\nmore\n");
}

#[test]
fn append_file_appends_or_creates() {
    let fx = Fixture::new();
    fx.write("log.txt", "first\n");
    let input = json!({"path": "log.txt", "content": "second\n"});
    let plan = fx.propose("append_file", input.clone());
    assert!(plan["diff"].as_str().expect("diff").contains("+second"));
    assert_eq!(fx.read("log.txt"), "first\n");
    let result = fx.apply("append_file", input.clone(), &plan["preconditions"]);
    assert!(result.ok, "{:?}", result.error);
    assert_eq!(fx.read("log.txt"), "first\nsecond\n");
    let replay = fx.apply("append_file", input, &plan["preconditions"]);
    assert!(replay.error.expect("error").contains("changed since the proposal"));
    assert_eq!(fx.read("log.txt"), "first\nsecond\n", "one effect");
    fx.propose_apply("append_file", json!({"path": "fresh/new.txt", "content": "x"}));
    assert_eq!(fx.read("fresh/new.txt"), "x");
}

#[test]
fn create_directory_is_mkdir_p() {
    let fx = Fixture::new();
    let input = json!({"path": "a/b/c"});
    let plan = fx.propose("create_directory", input.clone());
    assert!(!fx.path("a").exists());
    let result = fx.apply("create_directory", input.clone(), &plan["preconditions"]);
    assert_eq!(result.result.expect("ok")["created"], true);
    assert!(fx.path("a/b/c").is_dir());
    let replay = fx.apply("create_directory", input.clone(), &plan["preconditions"]);
    assert!(replay.error.expect("error").contains("changed since the proposal"));
    let again = fx.propose("create_directory", input);
    assert!(again["summary"].as_str().expect("summary").contains("already exists"));
    fx.write("file", "x");
    assert!(fx.err("create_directory", json!({"path": "file"})).contains("not a directory"));
}

#[test]
fn move_renames_files_and_trees_once() {
    let fx = Fixture::new();
    fx.write("src.txt", "content");
    let input = json!({"from": "src.txt", "to": "moved/dst.txt"});
    let plan = fx.propose("move", input.clone());
    assert_eq!(plan["preconditions"]["source"]["type"], "file");
    assert_eq!(plan["preconditions"]["destination"]["type"], "absent");
    assert!(fx.path("src.txt").exists());
    let result = fx.apply("move", input.clone(), &plan["preconditions"]);
    assert!(result.ok, "{:?}", result.error);
    assert!(!fx.path("src.txt").exists());
    assert_eq!(fx.read("moved/dst.txt"), "content");
    let replay = fx.apply("move", input, &plan["preconditions"]);
    assert!(replay.error.expect("error").contains("changed since the proposal"));
    assert_eq!(fx.read("moved/dst.txt"), "content");

    fx.write("tree/x/y.txt", "y");
    fx.propose_apply("move", json!({"from": "tree", "to": "tree2"}));
    assert_eq!(fx.read("tree2/x/y.txt"), "y");
    assert!(!fx.path("tree").exists());
}

#[test]
fn move_refuses_existing_destinations_and_changed_sources() {
    let fx = Fixture::new();
    fx.write("a", "a");
    fx.write("b", "b");
    assert!(fx.err("move", json!({"from": "a", "to": "b"})).contains("already exists"));
    assert!(fx.err("move", json!({"from": "missing", "to": "c"})).contains("does not exist"));
    fx.write("dir/f", "f");
    assert!(fx.err("move", json!({"from": "dir", "to": "dir/inside"})).contains("into itself"));
    assert!(fx.err("move", json!({"from": ".", "to": "elsewhere"})).contains("root"));
    let input = json!({"from": "a", "to": "c"});
    let plan = fx.propose("move", input.clone());
    fx.write("a", "changed");
    assert!(fx.apply("move", input.clone(), &plan["preconditions"]).error.expect("error").contains("changed"));
    assert!(fx.path("a").exists() && !fx.path("c").exists());
    let plan = fx.propose("move", input.clone());
    fx.write("c", "appeared");
    assert!(fx.apply("move", input, &plan["preconditions"]).error.expect("error").contains("changed"));
    assert_eq!(fx.read("a"), "changed");
    assert_eq!(fx.read("c"), "appeared");
}

#[test]
fn copy_copies_files_and_trees() {
    let fx = Fixture::new();
    fx.write("f.txt", "file");
    let (_, result) = fx.propose_apply("copy", json!({"from": "f.txt", "to": "copies/f.txt"}));
    assert_eq!(result["files"], 1);
    assert_eq!(fx.read("copies/f.txt"), "file");
    assert_eq!(fx.read("f.txt"), "file");

    fx.write("t/a.txt", "a");
    fx.write("t/sub/b.txt", "bb");
    std::fs::create_dir(fx.path("t/empty")).expect("mkdir");
    #[cfg(unix)]
    std::os::unix::fs::symlink("/etc", fx.path("t/sub/etc-link")).expect("symlink");
    let input = json!({"from": "t", "to": "t-copy"});
    let plan = fx.propose("copy", input.clone());
    assert_eq!(plan["preconditions"]["source"]["type"], "dir");
    assert!(plan["preconditions"]["source"]["sha256"].is_string());
    let result = fx.apply("copy", input.clone(), &plan["preconditions"]);
    let out = result.result.expect("copied");
    assert_eq!(out["files"], 2);
    assert_eq!(out["bytes"], 3);
    assert_eq!(fx.read("t-copy/sub/b.txt"), "bb");
    assert!(fx.path("t-copy/empty").is_dir());
    #[cfg(unix)]
    {
        assert_eq!(out["skipped"], 1);
        assert!(std::fs::symlink_metadata(fx.path("t-copy/sub/etc-link")).is_err(), "symlinks are not copied");
    }
    let replay = fx.apply("copy", input, &plan["preconditions"]);
    assert!(replay.error.expect("error").contains("changed since the proposal"));
    let leftovers: Vec<String> = std::fs::read_dir(&fx.root)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("fusion-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn copy_refuses_a_tree_changed_since_the_proposal() {
    let fx = Fixture::new();
    fx.write("t/a.txt", "a");
    let input = json!({"from": "t", "to": "u"});
    let plan = fx.propose("copy", input.clone());
    fx.write("t/added.txt", "new");
    let refused = fx.apply("copy", input, &plan["preconditions"]);
    assert!(refused.error.expect("error").contains("changed since the proposal"));
    assert!(!fx.path("u").exists());
    assert!(fx.err("copy", json!({"from": "t", "to": "t/inner"})).contains("into itself"));
}

#[test]
fn delete_files_dirs_and_trees() {
    let fx = Fixture::new();
    fx.write("f.txt", "bye\n");
    let input = json!({"path": "f.txt"});
    let plan = fx.propose("delete", input.clone());
    assert!(plan["diff"].as_str().expect("diff").contains("-bye"));
    assert!(fx.path("f.txt").exists());
    assert!(fx.apply("delete", input.clone(), &plan["preconditions"]).ok);
    assert!(!fx.path("f.txt").exists());
    let replay = fx.apply("delete", input, &plan["preconditions"]);
    assert!(replay.error.expect("error").contains("changed since the proposal"));

    std::fs::create_dir(fx.path("empty")).expect("mkdir");
    fx.propose_apply("delete", json!({"path": "empty"}));
    assert!(!fx.path("empty").exists());

    fx.write("tree/a/b.txt", "b");
    assert!(fx.err("delete", json!({"path": "tree"})).contains("recursive"));
    let input = json!({"path": "tree", "recursive": true});
    let plan = fx.propose("delete", input.clone());
    fx.write("tree/a/c.txt", "added");
    assert!(fx.apply("delete", input.clone(), &plan["preconditions"]).error.expect("error").contains("changed"));
    assert!(fx.path("tree/a/b.txt").exists(), "untouched");
    fx.propose_apply("delete", input);
    assert!(!fx.path("tree").exists());
    assert!(fx.err("delete", json!({"path": "."})).contains("root"));
    assert!(fx.err("delete", json!({"path": "gone"})).contains("does not exist"));
}

#[cfg(unix)]
#[test]
fn delete_of_a_symlink_removes_the_link_only() {
    let fx = Fixture::new();
    let outside = fx.outside("keep");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("precious"), "p").expect("write");
    std::os::unix::fs::symlink(&outside, fx.path("link")).expect("symlink");
    fx.write("tree/x", "x");
    std::os::unix::fs::symlink(&outside, fx.path("tree/inner-link")).expect("symlink");
    fx.propose_apply("delete", json!({"path": "link"}));
    fx.propose_apply("delete", json!({"path": "tree", "recursive": true}));
    assert!(!fx.path("link").exists() && !fx.path("tree").exists());
    assert_eq!(std::fs::read_to_string(outside.join("precious")).expect("still there"), "p");
}

#[test]
fn reads_ignore_the_mode_and_mutations_never_run_in_auto() {
    let fx = Fixture::new();
    fx.write("f", "x");
    let read = fx.toolbox.run(&tool_support::apply_call("read_file", json!({"path": "f"}), json!({})));
    assert_eq!(read.result.expect("ok")["content"], "x");
    for (tool, input) in [
        ("write_file", json!({"path": "f", "content": "y"})),
        ("append_file", json!({"path": "f", "content": "y"})),
        ("edit_file", json!({"path": "f", "edits": [{"find": "x", "replace": "y"}]})),
        ("move", json!({"from": "f", "to": "g"})),
        ("copy", json!({"from": "f", "to": "g"})),
        ("delete", json!({"path": "f"})),
        ("create_directory", json!({"path": "d"})),
    ] {
        fx.propose(tool, input);
    }
    assert_eq!(fx.read("f"), "x");
    assert!(!fx.path("g").exists() && !fx.path("d").exists());
}

// ---- actions ----

#[cfg(unix)]
fn recorder(fx: &Fixture) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let log = fx.outside("opener.log");
    let script = fx.outside("opener.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> '{}'; done\n", log.display()),
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (script, log)
}

#[cfg(unix)]
#[test]
fn actions_start_the_named_program_with_the_scoped_path_only() {
    use host_agent::tools::{Commands, Launcher};
    let fx = Fixture::new();
    let (script, log) = recorder(&fx);
    let commands = Commands { open: Launcher::new(&script), reveal: Launcher::new(&script) };
    let toolbox =
        host_agent::tools::Toolbox::new(std::slice::from_ref(&fx.root)).expect("toolbox").with_commands(commands);
    fx.write("doc; rm -rf ~.txt", "x");
    let opened = toolbox.run(&tool_support::call("open_path", json!({"path": "doc; rm -rf ~.txt"})));
    assert!(opened.ok, "{:?}", opened.error);
    assert_eq!(opened.result.expect("ok")["opened"], shown(&fx.path("doc; rm -rf ~.txt")));
    let revealed = toolbox.run(&tool_support::call("reveal_in_os", json!({"path": "."})));
    assert!(revealed.ok, "{:?}", revealed.error);
    let missing = toolbox.run(&tool_support::call("open_path", json!({"path": "nope"})));
    assert!(!missing.ok);
    let outside = toolbox.run(&tool_support::call("open_path", json!({"path": "../opener.log"})));
    assert!(!outside.ok);
    let lines: Vec<String> = std::fs::read_to_string(&log).expect("log").lines().map(str::to_owned).collect();
    assert_eq!(lines, vec![shown(&fx.path("doc; rm -rf ~.txt")), shown(&fx.root)]);
}

#[cfg(unix)]
#[test]
fn actions_report_a_failing_or_missing_program() {
    use host_agent::tools::{Commands, Launcher};
    let fx = Fixture::new();
    let failing = Commands { open: Launcher::new("false"), reveal: Launcher::new("/nonexistent/opener") };
    let toolbox =
        host_agent::tools::Toolbox::new(std::slice::from_ref(&fx.root)).expect("toolbox").with_commands(failing);
    let open = toolbox.run(&tool_support::call("open_path", json!({"path": "."})));
    assert!(open.error.expect("error").contains("failed"));
    let reveal = toolbox.run(&tool_support::call("reveal_in_os", json!({"path": "."})));
    assert!(reveal.error.expect("error").contains("cannot start"));
}

#[test]
fn apply_reports_a_change_when_the_target_can_no_longer_be_observed() {
    let fx = Fixture::new();
    fx.write("d/f.txt", "one\n");
    let input = json!({"path": "d/f.txt", "content": "two\n"});
    let plan = fx.propose("write_file", input.clone());
    std::fs::remove_dir_all(fx.path("d")).expect("rm");
    fx.write("d", "now a file");
    let refused = fx.apply("write_file", input, &plan["preconditions"]);
    let error = refused.error.expect("error");
    assert!(error.contains("changed since the proposal"), "{error}");
    assert_eq!(fx.read("d"), "now a file");

    std::fs::create_dir(fx.path("e")).expect("mkdir");
    let input = json!({"path": "e"});
    let plan = fx.propose("delete", input.clone());
    fx.write("e/late.txt", "late");
    let refused = fx.apply("delete", input, &plan["preconditions"]);
    let error = refused.error.expect("error");
    assert!(error.contains("changed since the proposal") && error.contains("not empty"), "{error}");
    assert!(fx.path("e/late.txt").exists());
}
