//! Locating the workspace's binaries for the suites: `CARGO_BIN_EXE_<name>` when the
//! environment names one, else the target directory this test binary was built into (so the
//! profile matches), else `<workspace>/target/{debug,release}/<name>`.
//!
//! A missing binary is built once per process with `cargo build -p dispatcher -p host-agent`.
//! An existing one is used as it is: running cargo from inside `cargo test` would wait on the
//! build lock the outer cargo holds, so `scripts/test.sh` builds everything first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The binary name of the server.
pub const DISPATCHER: &str = "dispatcher";
/// The binary name of the device runtime.
pub const HOST_AGENT: &str = "host-agent";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The target directory: `CARGO_TARGET_DIR` (relative to the workspace) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// The profile directory the running test binary lives in (`target/debug` for
/// `target/debug/deps/suite-1234`), if it looks like one.
fn own_profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    Some(deps.parent()?.to_path_buf())
}

fn exe_name(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

/// Where the binary `name` is or would be, without building it.
pub fn locate(name: &str) -> PathBuf {
    let env_name = format!("CARGO_BIN_EXE_{name}");
    if let Some(path) = std::env::var_os(&env_name) {
        return PathBuf::from(path);
    }
    let mut candidates = Vec::new();
    if let Some(dir) = own_profile_dir() {
        candidates.push(dir.join(exe_name(name)));
    }
    candidates.push(target_dir().join("debug").join(exe_name(name)));
    candidates.push(target_dir().join("release").join(exe_name(name)));
    candidates.iter().find(|path| path.is_file()).cloned().unwrap_or_else(|| candidates.remove(0))
}

/// Runs `cargo build -p dispatcher -p host-agent` once per process, in the profile of the
/// running test binary. Panics with cargo's output when the build fails.
pub fn build_once() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command.current_dir(workspace_root()).args(["build", "-p", DISPATCHER, "-p", HOST_AGENT]);
        if own_profile_dir().is_some_and(|dir| dir.file_name().is_some_and(|n| n == "release")) {
            command.arg("--release");
        }
        eprintln!("e2e: building the binaries: {command:?}");
        let output = command.output().expect("running cargo build");
        assert!(
            output.status.success(),
            "cargo build -p dispatcher -p host-agent failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

/// The path of binary `name`, built first if it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = locate(name);
    if !path.is_file() {
        build_once();
    }
    let path = locate(name);
    assert!(path.is_file(), "binary {name} not found at {} even after building it", path.display());
    path
}

/// The `dispatcher` binary.
pub fn dispatcher() -> PathBuf {
    binary(DISPATCHER)
}

/// The `host-agent` binary.
pub fn host_agent() -> PathBuf {
    binary(HOST_AGENT)
}
