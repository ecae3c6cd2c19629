//! Shared fixtures of the tool suites (`tools.rs`, `escape.rs`, `race.rs`): a real temporary tree
//! with a root inside it, a [`Toolbox`] over that root, and calls in both modes.
//!
//! Does not: fake any part of the tools; every call goes through `Toolbox::run`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use host_agent::tools::Toolbox;
use protocol::{CallMode, HostCall, HostResult};
use serde_json::Value;
use tempfile::TempDir;

/// A call in `auto` mode (no mode sent).
pub fn call(tool: &str, input: Value) -> HostCall {
    HostCall {
        call_id: format!("call-{tool}"),
        tool: tool.to_owned(),
        input,
        mode: None,
        preconditions: None,
        deadline: None,
        traceparent: None,
    }
}

/// An `apply` call carrying a proposal's preconditions.
pub fn apply_call(tool: &str, input: Value, preconditions: Value) -> HostCall {
    HostCall { mode: Some(CallMode::Apply), preconditions: Some(preconditions), ..call(tool, input) }
}

/// `base/` holds `root/` (the only allowed root) and whatever a test puts beside it.
pub struct Fixture {
    pub base: TempDir,
    pub root: PathBuf,
    pub toolbox: Toolbox,
}

impl Fixture {
    pub fn new() -> Self {
        let base = tempfile::tempdir().expect("tempdir");
        let root = base.path().join("root");
        std::fs::create_dir(&root).expect("create root");
        let toolbox = Toolbox::new(std::slice::from_ref(&root)).expect("toolbox");
        Fixture { base, root, toolbox }
    }

    /// A path inside the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// A path beside the root, outside it.
    pub fn outside(&self, rel: &str) -> PathBuf {
        self.base.path().join(rel)
    }

    /// Writes a file inside the root, creating parents.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::write(&path, content).expect("write fixture file");
        path
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).expect("read fixture file")
    }

    pub fn run(&self, tool: &str, input: Value) -> HostResult {
        self.toolbox.run(&call(tool, input))
    }

    /// Runs a read or action and returns its result, failing the test on `ok: false`.
    pub fn ok(&self, tool: &str, input: Value) -> Value {
        let result = self.run(tool, input.clone());
        assert!(result.ok, "{tool} {input} failed: {:?}", result.error);
        assert!(!result.is_proposal(), "{tool} answered a proposal");
        result.result.expect("a result")
    }

    /// Runs a call that must fail and returns its error text.
    pub fn err(&self, tool: &str, input: Value) -> String {
        let result = self.run(tool, input.clone());
        assert!(!result.ok, "{tool} {input} should fail, got {:?}", result.result);
        result.error.expect("an error text")
    }

    /// Proposes a mutation and returns the plan, checking its shape.
    pub fn propose(&self, tool: &str, input: Value) -> Value {
        let result = self.run(tool, input.clone());
        assert!(result.ok, "{tool} {input} proposal failed: {:?}", result.error);
        assert!(result.is_proposal(), "{tool} did not answer a proposal");
        let plan = result.result.expect("a plan");
        assert_eq!(plan["tool"], tool);
        assert!(plan["summary"].as_str().is_some_and(|s| !s.is_empty()), "{plan}");
        assert!(plan["preconditions"].is_object(), "{plan}");
        plan
    }

    pub fn apply(&self, tool: &str, input: Value, preconditions: &Value) -> HostResult {
        self.toolbox.run(&apply_call(tool, input, preconditions.clone()))
    }

    /// Proposes then applies, both successfully; returns (plan, apply result).
    pub fn propose_apply(&self, tool: &str, input: Value) -> (Value, Value) {
        let plan = self.propose(tool, input.clone());
        let result = self.apply(tool, input.clone(), &plan["preconditions"]);
        assert!(result.ok, "{tool} {input} apply failed: {:?}", result.error);
        assert!(!result.is_proposal());
        (plan, result.result.expect("an apply result"))
    }
}

/// The display form of a path inside the root, as outputs show it.
pub fn shown(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
