//! open_path and reveal_in_os never hand an executable or a launcher to the desktop (issue 11,
//! finding 8): files with an executable bit, launcher and script types (`.desktop`, `.sh`,
//! `.html`, `.exe`, ...; any case), files whose first bytes say they are one (a shebang, a
//! desktop entry, an ELF or PE header), and bundle directories (`.app`) are refused; documents
//! and plain directories still open.
//!
//! The actions' program is a recorder script outside the root, so nothing is ever launched:
//! the test reads what the recorder was given.
//!
//! Does not: test the actions' scope checks (`tools.rs`, `escape.rs`).

#![cfg(unix)]

mod tool_support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use host_agent::tools::{Commands, Launcher, Toolbox};
use serde_json::json;
use tool_support::{call, Fixture};

/// A script outside the root that appends each argument it gets to a log.
fn recorder(fx: &Fixture) -> (PathBuf, PathBuf) {
    let log = fx.outside("launched.log");
    let script = fx.outside("recorder.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> '{}'; done\n", log.display()),
    )
    .expect("write the recorder");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (script, log)
}

fn launched(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn chmod(fx: &Fixture, rel: &str, mode: u32) {
    std::fs::set_permissions(fx.path(rel), std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Launcher files a caller could have written and had approved, and documents that must open.
fn plant(fx: &Fixture) {
    fx.write("evil.desktop", "[Desktop Entry]\nType=Application\nExec=sh -c 'touch /tmp/pwned'\n");
    fx.write("run.sh", "#!/bin/sh\ntouch /tmp/pwned\n");
    fx.write("page.html", "<script>fetch('http://attacker')</script>\n");
    fx.write("PAGE.HTM", "<script></script>\n");
    fx.write("Setup.EXE", "MZ\u{90}\0");
    fx.write("run.Command", "echo\n");
    fx.write("go.ps1", "Write-Host hi\n");
    fx.write("x.py", "print(1)\n");
    fx.write("link.url", "[InternetShortcut]\nURL=file:///bin/sh\n");
    fx.write("trailing.sh.", "#!/bin/sh\n");
    fx.write("image.svg", "<svg onload='alert(1)'/>\n");
    fx.write("Tool.app/Contents/Info.plist", "<plist/>\n");
    // No telling extension, but an executable bit, or launcher bytes at the start.
    fx.write("tool", "binary");
    chmod(fx, "tool", 0o755);
    fx.write("report.pdf", "%PDF-1.4 but executable\n");
    chmod(fx, "report.pdf", 0o744);
    fx.write("entry", "# a comment\n[Desktop Entry]\nExec=sh\n");
    fx.write("script", "#!/usr/bin/env python3\nprint(1)\n");
    fx.write("elf", "\u{7f}ELF\u{2}\u{1}\u{1}");
    // Symlinks with harmless names to a launcher and to a bundle; and one to the root itself.
    std::os::unix::fs::symlink("run.sh", fx.path("readme.txt")).expect("symlink");
    std::os::unix::fs::symlink("Tool.app", fx.path("Folder")).expect("symlink");
    std::os::unix::fs::symlink(".", fx.path("here")).expect("symlink");
    // What must still open.
    fx.write("plan.pdf", "%PDF-1.4\n");
    fx.write("notes.txt", "notes\n");
    fx.write("docs/guide.md", "# guide\n");
}

const REFUSED: [&str; 21] = [
    "evil.desktop",
    "run.sh",
    "page.html",
    "PAGE.HTM",
    "Setup.EXE",
    "run.Command",
    "go.ps1",
    "x.py",
    "link.url",
    "trailing.sh.",
    "image.svg",
    "Tool.app",
    "tool",
    "report.pdf",
    "entry",
    "script",
    "elf",
    "readme.txt",
    "Folder",
    "Tool.app/",
    "./run.sh",
];

const OPENED: [&str; 5] = ["plan.pdf", "notes.txt", "docs", "docs/guide.md", "here"];

#[test]
fn actions_refuse_executables_and_launchers() {
    let fx = Fixture::new();
    let (script, log) = recorder(&fx);
    plant(&fx);
    let commands = Commands { open: Launcher::new(&script), reveal: Launcher::new(&script) };
    let toolbox = Toolbox::new(std::slice::from_ref(&fx.root)).expect("toolbox").with_commands(commands);
    let mut refused = 0;
    let mut handed_over = Vec::new();
    for tool in ["open_path", "reveal_in_os"] {
        for path in REFUSED {
            let result = toolbox.run(&call(tool, json!({ "path": path })));
            match result.error {
                None => handed_over.push(format!("{tool} {path}")),
                Some(error) => {
                    assert!(error.contains("refused"), "{tool} {path}: {error}");
                    refused += 1;
                }
            }
        }
        for path in OPENED {
            let result = toolbox.run(&call(tool, json!({ "path": path })));
            assert!(result.ok, "{tool} {path}: {:?}", result.error);
        }
    }
    let got = launched(&log);
    println!(
        "{refused} launcher calls refused, {} handed to the program; the recorder got {} paths",
        handed_over.len(),
        got.len()
    );
    assert!(handed_over.is_empty(), "handed to the program: {handed_over:?}");
    let expected: Vec<String> = OPENED.iter().map(|p| fx.path(p).to_string_lossy().into_owned()).collect();
    assert_eq!(got, [expected.clone(), expected].concat(), "only documents and folders were handed over");
}

/// `host-agent call` with the device's flags and environment: the list is extended and relaxed
/// as asked, and an extension that is not one is a usage error (exit 2).
#[test]
fn the_device_extends_and_relaxes_the_list() {
    let fx = Fixture::new();
    let (script, log) = recorder(&fx);
    plant(&fx);
    let open = |path: &str, flags: &[&str], env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_host-agent"));
        command.args(["call", "open_path", &json!({ "path": path }).to_string(), "--root"]).arg(&fx.root);
        command.args(flags).env("FUSION_HOST_OPENER", &script);
        for name in ["FUSION_HOST_OPEN_DENY_EXT", "FUSION_HOST_OPEN_ALLOW_EXT"] {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        let output = command.output().expect("run host-agent call");
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    assert_eq!(open("plan.pdf", &[], &[]).0, Some(0));
    let (code, out) = open("plan.pdf", &["--open-deny-ext", "odt,.PDF"], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("`.pdf` is a program, script or launcher type"), "{out}");
    assert_eq!(open("notes.txt", &[], &[("FUSION_HOST_OPEN_DENY_EXT", "txt")]).0, Some(1));
    assert_eq!(open("page.html", &[], &[]).0, Some(1));
    assert_eq!(open("page.html", &["--open-allow-ext", "html"], &[]).0, Some(0));
    assert_eq!(open("PAGE.HTM", &[], &[("FUSION_HOST_OPEN_ALLOW_EXT", "htm,svg")]).0, Some(0));
    // An allowed extension never lets an executable bit through.
    assert_eq!(open("report.pdf", &["--open-allow-ext", "pdf"], &[]).0, Some(1));
    assert_eq!(open("plan.pdf", &["--open-deny-ext", "tar.gz"], &[]).0, Some(2));
    let handed = launched(&log);
    let expected: Vec<String> =
        ["plan.pdf", "page.html", "PAGE.HTM"].iter().map(|p| fx.path(p).to_string_lossy().into_owned()).collect();
    assert_eq!(handed, expected);
}
