//! The tools: the [`Toolbox`] the runtime holds, the registry of the 16 built-in tools, the
//! [`Tool`] seam through which an app (or a tools file) adds its own beside them, and the one
//! entry point that turns a [`HostCall`] into a [`HostResult`].
//!
//! A tool is a value: a serde input type (`deny_unknown_fields`) whose JSON Schema is derived from
//! the same type with schemars, so the published schema and the validation cannot drift, plus the
//! code that runs it. Reads and actions implement `Immediate`; mutations implement `Mutation`
//! (observe the targets, plan touching nothing, apply after the preconditions are verified again).
//!
//! Layout:
//! - `inspect`: list_directory, read_file, stat, disk_usage, hash_file.
//! - `search`: glob, grep.
//! - `edit`: write_file, edit_file, append_file (content mutations).
//! - `tree`: create_directory, move, copy, delete (structure mutations).
//! - `action`: open_path, reveal_in_os (named commands, never a shell; never a program or a
//!   launcher handed to the desktop).
//! - `state`: preconditions, content hashing, tree digests, diffs.
//! - `walk`: bounded walks that never follow symlinks.
//! - `deadline`: the call's deadline, checked as the tools go: long work stops when the caller
//!   has stopped waiting, answering `deadline exceeded`.
//! - `tool`: the public [`Tool`] trait, [`Proposal`] and how the toolbox runs an added tool
//!   (a mutation's preconditions verified again before its apply).
//! - [`domain`]: tools declared in a tools file (`--tools-file`): named shell-outs with typed,
//!   scoped arguments, run without a shell in their own process group.
//!
//! Does not: resolve or refuse paths (`crate::scope`), talk to the server, dedupe calls or
//! abandon calls at their deadline (the runtime does; it calls [`Toolbox::run`] on a blocking
//! thread and posts nothing once the deadline has passed).

mod action;
mod deadline;
pub mod domain;
mod edit;
mod inspect;
mod search;
mod state;
mod tool;
mod tree;
mod walk;

use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;

use protocol::{HostCall, HostResult, Plan, ToolClass, ToolDescriptor};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

pub use action::{Commands, LaunchRules, Launcher, DEFAULT_DENIED, ENV_OPENER, ENV_REVEALER, WINDOWS_DENIED};
pub use deadline::{Deadline, Expired};
pub use state::{text_diff, Condition, Preconditions, State};
pub use tool::{parse_input, schema_for, AddError, Proposal, Tool};

use crate::scope::{is_escape, Scope, ScopeError, ScopedPath};

/// Why a call failed. Its `Display` is the `error` text of the [`HostResult`].
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool `{0}`")]
    UnknownTool(String),
    #[error("invalid input for {tool}: {message}")]
    InvalidInput { tool: String, message: String },
    #[error(transparent)]
    Scope(#[from] ScopeError),
    #[error("{path}: {}", describe_io(.source))]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The call is well-formed but cannot be done as asked (a directory where a file is needed…).
    #[error("{0}")]
    Refused(String),
    #[error("an apply needs the preconditions of its proposal")]
    MissingPreconditions,
    #[error("the target changed since the proposal: {0}")]
    Changed(String),
    #[error("the tool failed unexpectedly: {0}")]
    Panicked(String),
    /// The call's deadline passed while the tool was working: it stopped (nobody waits for it).
    #[error("deadline exceeded: the caller stopped waiting, so the work was stopped")]
    DeadlineExceeded,
    /// A program the tool ran failed: a non-zero exit, a signal, a timeout, or it could not
    /// start. The text says which, with the end of its stderr.
    #[error("{0}")]
    Failed(String),
}

impl From<Expired> for ToolError {
    fn from(_: Expired) -> Self {
        ToolError::DeadlineExceeded
    }
}

impl ToolError {
    /// An I/O error on the path shown as `path`; a deadline that passed inside a reader or a
    /// walk is [`ToolError::DeadlineExceeded`], whatever path it met.
    pub fn io(path: String, source: io::Error) -> Self {
        if deadline::is_expired(&source) {
            ToolError::DeadlineExceeded
        } else {
            ToolError::Io { path, source }
        }
    }
}

fn describe_io(error: &io::Error) -> String {
    if is_escape(error) {
        "refused: it leads outside the allowed roots".to_owned()
    } else {
        error.to_string()
    }
}

/// What one call runs with: the scope every path goes through and the call's deadline (and,
/// for the built-in actions, the commands they start and what they refuse to hand over).
pub struct Context<'a> {
    pub(crate) scope: &'a Scope,
    pub(crate) commands: &'a Commands,
    pub(crate) launch: &'a LaunchRules,
    pub(crate) deadline: Deadline,
}

impl Context<'_> {
    /// The allowed roots: resolve paths and open files through it, never around it.
    pub fn scope(&self) -> &Scope {
        self.scope
    }

    /// When the caller stops waiting: check it in long loops ([`Deadline::check`]) and stop
    /// with [`ToolError::DeadlineExceeded`] once it has passed.
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// Places a path from the input in the scope (relative to the first root), or refuses it.
    pub fn resolve(&self, path: &str) -> Result<ScopedPath, ToolError> {
        Ok(self.scope.resolve(path)?)
    }

    /// The state of a path as a mutation's precondition: absent, a file's size and content
    /// hash, a directory's tree digest, a symlink's target hash. Touches nothing.
    pub fn condition(&self, path: &ScopedPath) -> Result<Condition, ToolError> {
        Ok(state::observe(self, path, state::Depth::Tree, 0)?.condition)
    }

    /// Writes `content` as the whole new content of the file `path` (created with its missing
    /// parent directories, or replaced): through a temporary beside it and a rename, beneath the
    /// root's handle, so readers never see half a file. Returns the bytes written.
    pub fn write_file(&self, path: &ScopedPath, content: &[u8]) -> Result<u64, ToolError> {
        let state = self.condition(path)?.state;
        edit::write_content(self, path, &state, content)
    }

    /// Maps an I/O error on `path` to a [`ToolError`] that names the path in display form.
    pub fn io(&self, path: &ScopedPath) -> impl Fn(io::Error) -> ToolError + '_ {
        let shown = self.scope.display(path);
        move |source| ToolError::io(shown.clone(), source)
    }

    /// Resolves a path from the input, or the first root when it is absent.
    pub fn resolve_or_root(&self, path: Option<&str>) -> Result<ScopedPath, ToolError> {
        Ok(self.scope.resolve(path.unwrap_or("."))?)
    }
}

/// The common part of every built-in tool: its input type names it and describes it.
pub(crate) trait Builtin: DeserializeOwned + JsonSchema {
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
}

/// A read or an action: runs on arrival, whatever the call's mode.
pub(crate) trait Immediate: Builtin {
    const CLASS: ToolClass;
    fn run(self, ctx: &Context) -> Result<Value, ToolError>;
}

/// What a proposal says beyond its preconditions.
pub(crate) struct Change {
    pub summary: String,
    pub diff: Option<String>,
}

/// A mutation: proposes in `auto` mode, changes the disk only in `apply` mode.
pub(crate) trait Mutation: Builtin {
    /// What [`Mutation::observe`] read that planning and applying need (old content…).
    type Snapshot;
    /// Reads the current state of every target, touching nothing. Never fails because a target
    /// has the wrong shape (absent, a directory…): that is part of the state, judged by `plan`.
    fn observe(&self, ctx: &Context) -> Result<(Preconditions, Self::Snapshot), ToolError>;
    /// Works out the change from what was observed, touching nothing; refuses what cannot be done.
    fn plan(&self, ctx: &Context, snapshot: &Self::Snapshot) -> Result<Change, ToolError>;
    /// Carries out the change. Called only once a fresh observation equals the proposal's.
    fn apply(&self, ctx: &Context, snapshot: Self::Snapshot) -> Result<Value, ToolError>;
}

enum Outcome {
    Done(Value),
    Proposal(Value),
}

struct Entry {
    name: &'static str,
    description: &'static str,
    class: ToolClass,
    schema: fn() -> Value,
    run: fn(&Context, &HostCall) -> Result<Outcome, ToolError>,
}

const fn immediate<T: Immediate>() -> Entry {
    Entry {
        name: T::NAME,
        description: T::DESCRIPTION,
        class: T::CLASS,
        schema: schema_for::<T>,
        run: run_immediate::<T>,
    }
}

const fn mutation<T: Mutation>() -> Entry {
    Entry {
        name: T::NAME,
        description: T::DESCRIPTION,
        class: ToolClass::Mutate,
        schema: schema_for::<T>,
        run: run_mutation::<T>,
    }
}

static ENTRIES: [Entry; 16] = [
    immediate::<inspect::ListDirectory>(),
    immediate::<inspect::ReadFile>(),
    immediate::<inspect::Stat>(),
    immediate::<search::Glob>(),
    immediate::<search::Grep>(),
    immediate::<inspect::DiskUsage>(),
    immediate::<inspect::HashFile>(),
    mutation::<edit::WriteFile>(),
    mutation::<edit::EditFile>(),
    mutation::<edit::AppendFile>(),
    mutation::<tree::CreateDirectory>(),
    mutation::<tree::Move>(),
    mutation::<tree::Copy>(),
    mutation::<tree::Delete>(),
    immediate::<action::OpenPath>(),
    immediate::<action::RevealInOs>(),
];

fn parse_builtin<T: Builtin>(call: &HostCall) -> Result<T, ToolError> {
    parse_input(T::NAME, &call.input)
}

fn run_immediate<T: Immediate>(ctx: &Context, call: &HostCall) -> Result<Outcome, ToolError> {
    parse_builtin::<T>(call)?.run(ctx).map(Outcome::Done)
}

fn run_mutation<T: Mutation>(ctx: &Context, call: &HostCall) -> Result<Outcome, ToolError> {
    let input = parse_builtin::<T>(call)?;
    if call.is_apply() {
        let expected = call.preconditions.as_ref().ok_or(ToolError::MissingPreconditions)?;
        let expected = Preconditions::deserialize(expected).map_err(|error| ToolError::InvalidInput {
            tool: T::NAME.to_owned(),
            message: format!("preconditions: {error}"),
        })?;
        // The proposal observed its targets without error, so a target that cannot be observed
        // now, or a re-check that refuses after the preconditions held, is a change too.
        let (current, snapshot) = input.observe(ctx).map_err(|error| match error {
            ToolError::Io { .. } => ToolError::Changed(error.to_string()),
            other => other,
        })?;
        expected.verify(&current)?;
        input.apply(ctx, snapshot).map(Outcome::Done).map_err(|error| match error {
            ToolError::Refused(detail) => ToolError::Changed(detail),
            other => other,
        })
    } else {
        let (preconditions, snapshot) = input.observe(ctx)?;
        let change = input.plan(ctx, &snapshot)?;
        let plan = Plan {
            tool: T::NAME.to_owned(),
            summary: change.summary,
            diff: change.diff,
            preconditions: to_json(&preconditions)?,
        };
        Ok(Outcome::Proposal(to_json(&plan)?))
    }
}

/// Serializes a tool's output; our own types always serialize, so a failure is reported, not hidden.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<Value, ToolError> {
    serde_json::to_value(value).map_err(|error| ToolError::Refused(format!("cannot encode the result: {error}")))
}

/// True when `name` is one of the 16 built-in tools.
pub(crate) fn is_builtin(name: &str) -> bool {
    ENTRIES.iter().any(|entry| entry.name == name)
}

/// The built-in tools over a set of roots, and the tools added beside them
/// ([`Toolbox::with_tool`]). `Send + Sync`; share it in an `Arc`.
pub struct Toolbox {
    scope: Scope,
    commands: Commands,
    launch: LaunchRules,
    added: Vec<tool::Added>,
}

impl std::fmt::Debug for Toolbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Toolbox").field("scope", &self.scope).finish_non_exhaustive()
    }
}

impl Toolbox {
    /// Opens each root as a directory handle (`cap_std::fs::Dir`); an error if a root is missing or
    /// not a directory. The actions' commands come from [`Commands::from_env`].
    pub fn new(roots: &[PathBuf]) -> Result<Self, ScopeError> {
        Ok(Self {
            scope: Scope::open(roots)?,
            commands: Commands::from_env(),
            launch: LaunchRules::default(),
            added: Vec::new(),
        })
    }

    /// Allows reading the content of regular files with more than one hard link (refused by
    /// default: another link may lie outside the roots). Mutations never write in place through
    /// such a file either way.
    pub fn with_hardlinked_reads(mut self, allow: bool) -> Self {
        self.scope = self.scope.allow_hardlinked_reads(allow);
        self
    }

    /// Replaces what `open_path` and `reveal_in_os` refuse to hand over (default:
    /// [`LaunchRules::default`]).
    pub fn with_launch_rules(mut self, rules: LaunchRules) -> Self {
        self.launch = rules;
        self
    }

    /// Replaces the commands `open_path` and `reveal_in_os` start.
    pub fn with_commands(mut self, commands: Commands) -> Self {
        self.commands = commands;
        self
    }

    /// The scope every path goes through.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Adds a tool beside the built-ins (the original's `tools: [...builtinTools, convertIfc]`).
    /// Refused when its name is not `[a-z][a-z0-9_]{0,63}` or is taken by a built-in or an
    /// added tool. A mutation (class `mutate`) is proposed and applied like the built-ins.
    ///
    /// ```
    /// use host_agent::tools::{Context, Tool, ToolError, Toolbox};
    /// use protocol::{HostCall, ToolClass, ToolDescriptor};
    /// use serde_json::{json, Value};
    ///
    /// /// Says how many roots the device serves.
    /// struct RootCount;
    ///
    /// impl Tool for RootCount {
    ///     fn descriptor(&self) -> ToolDescriptor {
    ///         ToolDescriptor {
    ///             name: "root_count".into(),
    ///             description: "How many roots this device serves".into(),
    ///             input_schema: json!({"type": "object", "additionalProperties": false}),
    ///             class: ToolClass::Read,
    ///         }
    ///     }
    ///
    ///     fn run(&self, ctx: &Context, _input: &Value) -> Result<Value, ToolError> {
    ///         Ok(json!({"roots": ctx.scope().roots_display().len()}))
    ///     }
    /// }
    ///
    /// let root = tempfile::tempdir()?;
    /// let toolbox = Toolbox::new(&[root.path().to_path_buf()])?.with_tool(RootCount)?;
    /// assert_eq!(toolbox.descriptors().len(), 17);
    /// let call = HostCall {
    ///     call_id: "c1".into(),
    ///     tool: "root_count".into(),
    ///     input: json!({}),
    ///     mode: None,
    ///     preconditions: None,
    ///     deadline: None,
    ///     traceparent: None,
    /// };
    /// assert_eq!(toolbox.run(&call).result, Some(json!({"roots": 1})));
    /// // A second tool of the same name is refused.
    /// assert!(toolbox.with_tool(RootCount).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_tool(mut self, tool: impl Tool) -> Result<Self, AddError> {
        let added = tool::Added::new(std::sync::Arc::new(tool))?;
        let name = &added.descriptor.name;
        if self.class_of(name).is_some() {
            return Err(AddError::NameTaken(name.clone()));
        }
        self.added.push(added);
        Ok(self)
    }

    /// Adds every tool a tools file declares ([`domain`]); an error names the file, the tool
    /// and the problem.
    pub fn with_tools_file(self, path: &std::path::Path) -> Result<Self, domain::FileError> {
        domain::load(path)?.into_iter().try_fold(self, |toolbox, tool| {
            let name = tool.name().to_owned();
            toolbox.with_tool(tool).map_err(|error| domain::FileError::at(path, &name, error.to_string()))
        })
    }

    /// Every tool, the 16 built-ins first, each with the JSON Schema of its input.
    pub fn descriptors(&self) -> Vec<ToolDescriptor> {
        ENTRIES
            .iter()
            .map(|entry| ToolDescriptor {
                name: entry.name.to_owned(),
                description: entry.description.to_owned(),
                input_schema: (entry.schema)(),
                class: entry.class,
            })
            .chain(self.added.iter().map(|added| added.descriptor.clone()))
            .collect()
    }

    /// The class of a tool, or `None` for an unknown name.
    pub fn class_of(&self, tool: &str) -> Option<ToolClass> {
        ENTRIES.iter().find(|entry| entry.name == tool).map(|entry| entry.class).or_else(|| {
            self.added.iter().find(|added| added.descriptor.name == tool).map(|added| added.descriptor.class)
        })
    }

    /// The roots in display form.
    pub fn roots(&self) -> Vec<String> {
        self.scope.roots_display()
    }

    /// Runs one call to completion (blocking filesystem I/O: call it on a blocking thread).
    ///
    /// Never panics outward: an unknown tool, invalid input, a scope violation, an I/O error or a
    /// panic inside a tool all become `ok: false` with a message. In `auto` mode (or no mode) reads
    /// and actions run and a mutation answers its proposal, touching nothing; in `apply` mode a
    /// mutation first checks the call's preconditions and changes nothing if they no longer hold.
    /// Past the call's `deadline` a tool stops as soon as it notices (within one read or one
    /// directory entry) and answers `deadline exceeded`.
    pub fn run(&self, call: &HostCall) -> HostResult {
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| self.dispatch(call)))
            .unwrap_or_else(|payload| Err(ToolError::Panicked(panic_message(payload.as_ref()))));
        match outcome {
            Ok(Outcome::Done(result)) => HostResult::success(&call.call_id, result),
            Ok(Outcome::Proposal(plan)) => HostResult::proposal(&call.call_id, plan),
            Err(error) => HostResult::failure(&call.call_id, error.to_string()),
        }
    }

    fn dispatch(&self, call: &HostCall) -> Result<Outcome, ToolError> {
        let ctx = Context {
            scope: &self.scope,
            commands: &self.commands,
            launch: &self.launch,
            deadline: Deadline::of(call.deadline),
        };
        if let Some(entry) = ENTRIES.iter().find(|entry| entry.name == call.tool) {
            ctx.deadline.check()?;
            return (entry.run)(&ctx, call);
        }
        let added = self
            .added
            .iter()
            .find(|added| added.descriptor.name == call.tool)
            .ok_or_else(|| ToolError::UnknownTool(call.tool.clone()))?;
        ctx.deadline.check()?;
        added.run(&ctx, call)
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_tools_with_unique_names_and_object_schemas() {
        let base = tempfile::tempdir().expect("tempdir");
        let toolbox = Toolbox::new(&[base.path().to_path_buf()]).expect("toolbox");
        let descriptors = toolbox.descriptors();
        assert_eq!(descriptors.len(), 16);
        let mut names: Vec<_> = descriptors.iter().map(|d| d.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 16);
        for descriptor in &descriptors {
            assert_eq!(descriptor.input_schema["type"], "object", "{}", descriptor.name);
            assert_eq!(descriptor.input_schema["additionalProperties"], false, "{}", descriptor.name);
            assert!(!descriptor.description.is_empty());
        }
    }

    #[test]
    fn panic_messages_are_kept() {
        let payload = panic::catch_unwind(|| panic!("boom {}", 7)).expect_err("panicked");
        assert_eq!(panic_message(payload.as_ref()), "boom 7");
    }
}
