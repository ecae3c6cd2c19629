//! What `deploy/` ships, validated as CI does: `deploy/ci/check.sh` renders the kustomize
//! overlays (kubectl kustomize), validates them (kubernetes-validate), scans them (checkov),
//! lints the Dockerfile (hadolint), checks the alert rules (promtool) and the NATS
//! configuration (nats-server -t), and checks what no schema knows (deploy/ci/check_manifests.py:
//! the timing numbers against each other and the longest call, pod security, no secrets).
//!
//! Each step must be able to fail: the same script runs on copies of `deploy/` broken in one
//! way each, and must stop at the step that catches it. The tools come from
//! `deploy/ci/.venv` and Debian (scripts/test.sh installs them); missing, the test fails
//! saying so, it never skips.
//!
//! Not here: the runtime behaviour the numbers stand for (tests/lifecycle.rs, tests/cluster.rs).

use std::path::{Path, PathBuf};
use std::process::Output;

use e2e::bin::workspace_root;

fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

fn run_check(deploy: &Path) -> Output {
    let script = deploy_dir().join("ci/check.sh");
    std::process::Command::new("bash")
        .arg(&script)
        .arg(deploy)
        .env("DEPLOY_TOOLS_BIN", deploy_dir().join("ci/.venv/bin"))
        .output()
        .unwrap_or_else(|error| panic!("running {}: {error}", script.display()))
}

fn show(output: &Output) -> String {
    format!(
        "exit {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A copy of `deploy/` (without the tools' virtualenv) in a temporary directory.
fn copy_of_deploy() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("e2e-deploy-").tempdir().expect("tempdir");
    copy_tree(&deploy_dir(), dir.path());
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name == ".venv" || name == "run" {
            continue;
        }
        let (source, target) = (entry.path(), to.join(&name));
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&source, &target);
        } else {
            std::fs::copy(&source, &target).expect("copy");
        }
    }
}

/// Replaces exactly one occurrence of `from` in `file` (under `root`) with `to`.
fn break_file(root: &Path, file: &str, from: &str, to: &str) {
    let path = root.join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(text.matches(from).count(), 1, "{file}: {from:?} must occur once");
    std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
}

#[test]
fn the_shipped_deploy_passes_every_check() {
    let output = run_check(&deploy_dir());
    let text = show(&output);
    assert!(output.status.success(), "deploy/ci/check.sh failed:\n{text}");
    for step in
        ["kubectl kustomize", "kubernetes-validate", "checkov", "hadolint", "promtool", "nats-server -t", "consistent"]
    {
        assert!(text.contains(step), "step {step:?} did not run:\n{text}");
    }
    // checkov: nothing failed, and what is skipped is explained in deploy/CHECKOV.md.
    assert!(text.contains("Failed checks: 0"), "{text}");
    let explained = std::fs::read_to_string(deploy_dir().join("CHECKOV.md")).expect("deploy/CHECKOV.md");
    for check in ["CKV_K8S_15", "CKV_K8S_35", "CKV_K8S_40", "CKV_K8S_43"] {
        assert!(explained.contains(check), "deploy/CHECKOV.md does not explain {check}");
    }
}

/// One way to break `deploy/` per step, and the step that must catch it.
#[test]
fn each_step_catches_what_it_is_for() {
    // (the step, the file, what it says, what it says once broken)
    let cases: [(&str, &str, &str, &str); 7] = [
        (
            "kubectl kustomize",
            "k8s/base/kustomization.yaml",
            "  - migrate-job.yaml\n",
            "  - migrate-job.yaml\n  - missing.yaml\n",
        ),
        ("kubernetes-validate", "k8s/base/nats.yaml", "replicas: 3\n", "replicas: three\n"),
        (
            "checkov",
            "k8s/base/nats.yaml",
            "      automountServiceAccountToken: false\n",
            "      automountServiceAccountToken: false\n      hostNetwork: true\n",
        ),
        ("hadolint", "Dockerfile", "WORKDIR /src\n", "WORKDIR /src\nRUN cd /tmp && ls\n"),
        (
            "promtool",
            "k8s/monitoring/alerts.rules.yml",
            "expr: dispatcher_broker_up == 0",
            "expr: dispatcher_broker_up ==",
        ),
        ("nats-server -t", "k8s/base/nats.conf", "max_payload: 8MB\n", "max_payload: 8MB\nmax_payload {\n"),
        (
            "check_manifests.py",
            "k8s/base/dispatcher.yaml",
            "terminationGracePeriodSeconds: 320",
            "terminationGracePeriodSeconds: 30",
        ),
    ];
    for (step, file, from, to) in cases {
        let copy = copy_of_deploy();
        break_file(copy.path(), file, from, to);
        let output = run_check(copy.path());
        let text = show(&output);
        assert!(!output.status.success(), "{file} broken for {step}, yet every check passed:\n{text}");
        assert!(
            text.contains(&format!("FAILED step: {step}")),
            "{file} broken for {step}: the failure should be at that step:\n{text}"
        );
    }
}
