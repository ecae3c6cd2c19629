//! Smoke runs of the measurement tools, as CI runs them: `bench --quick` must print every
//! section and exit 0, `chaos --quick` must keep every invariant (exit 0) and say so, and
//! `soak --quick` must answer every call as it should and print every process's figures.
//! All need nats-server and PostgreSQL (scripts/test.sh provides them).
//!
//! Not here: the figures themselves (BENCHMARKS.md); a smoke run on a debug build measures
//! nothing worth keeping.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Runs one of this package's binaries with `args`, killing it after `limit`.
fn run(binary: &str, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(binary)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {binary}: {e}"));
    let started = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "{binary} {args:?} still running after {limit:?}\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn bench_quick_prints_every_section() {
    let output = run(env!("CARGO_BIN_EXE_bench"), &["--quick"], Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench --quick failed ({}):\n{stdout}\n{stderr}", output.status);
    for heading in [
        "== machine",
        "== baseline: raw NATS request-reply",
        "== baseline: bare axum SSE push answered by a POST",
        "== embedded dispatcher",
        "== cluster: three replicas",
        "== recovery:",
        "== ratios to the baselines",
        "== targets",
    ] {
        assert!(stdout.contains(heading), "no {heading:?} section in:\n{stdout}");
    }
    for figure in [
        "offline answer (503 device offline)",
        "KiB per stream",
        "reconnects per 100 ms window",
        "cross-replica p50 at 1 in flight",
        "cross-replica throughput at 64",
        "embedded throughput at 64 >= 0.6x bare SSE+POST",
        "server CPU per call at 64 in flight, cluster",
        "offline answer (embedded)",
        "offline answer (cluster)",
        "memory per idle device stream (embedded)",
        "memory per idle device stream (cluster)",
        "devices back after kill -9",
        "no 100 ms window",
    ] {
        assert!(stdout.contains(figure), "no {figure:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("[n/a]"), "a figure was not measured:\n{stdout}");
}

#[test]
fn chaos_quick_keeps_the_invariants() {
    let output = run(env!("CARGO_BIN_EXE_chaos"), &["--quick"], Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chaos --quick failed ({}):\n{stdout}\n{stderr}", output.status);
    for line in ["calls executed twice: 0", "calls unresolved past their timeout + 1 s: 0", "chaos passed"] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(stdout.contains("kill -9 replica"), "no fault was injected:\n{stdout}");
}

#[test]
fn soak_quick_answers_every_call_and_prints_every_process() {
    let output = run(env!("CARGO_BIN_EXE_soak"), &["--quick", "--settle-secs", "2"], Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "soak --quick failed ({}):\n{stdout}\n{stderr}", output.status);
    for line in [
        "small calls: 2000 ok",
        "large calls (256 KiB): 40 ok",
        "errors: offline 20",
        "errors: timed out 10",
        "0 executed twice",
        "dispatcher 2",
        "nats-server 0",
        "host-agent 0",
        "soak done",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
}
