//! Build script: rebuilds the crate when a migration is added, so `sqlx::migrate!` embeds it;
//! and records the git commit this binary is built from, for `dispatcher_build_info`
//! (`DISPATCHER_GIT_COMMIT`: set it when building outside a git checkout, as an image build
//! may; `unknown` when neither is available).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=DISPATCHER_GIT_COMMIT");
    let commit = std::env::var("DISPATCHER_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=DISPATCHER_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves: its file, and the branch it points at (in a worktree the branch
    // lives in the common directory). Only existing files: a missing one would rebuild always.
    for path in ["HEAD", &symbolic_head().unwrap_or_default()] {
        if path.is_empty() {
            continue;
        }
        if let Some(file) = git(&["rev-parse", "--git-path", path]) {
            if std::path::Path::new(&file).exists() {
                println!("cargo:rerun-if-changed={file}");
            }
        }
    }
}

fn symbolic_head() -> Option<String> {
    git(&["symbolic-ref", "-q", "HEAD"])
}

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !text.is_empty()).then_some(text)
}
