//! The seam through which an app adds its own tools beside the built-ins: the public [`Tool`]
//! trait, the [`Proposal`] a mutation makes, and how the toolbox runs an added tool.
//!
//! Owns: the name rule every tool follows (`[a-z][a-z0-9_]{0,63}`), turning a proposal into the
//! `result` of a `proposal: true` HostResult (`{tool, summary, diff?, ...details,
//! preconditions}`), and the propose/apply discipline for added mutations: `auto` plans and
//! touches nothing; `apply` plans again, verifies that the fresh preconditions equal the ones
//! the call carries (stored with the proposal), and only then runs the tool.
//!
//! Does not: resolve paths (the [`Context`] hands out the scope), catch panics or check the
//! deadline before a call starts (the [`super::Toolbox`] does both for every tool).

use std::collections::BTreeMap;
use std::sync::Arc;

use protocol::{ToolClass, ToolDescriptor};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{Condition, Context, Outcome, ToolError};

/// A tool an app implements in Rust and adds to a [`super::Toolbox`] with
/// [`super::Toolbox::with_tool`]. It is advertised in the manifest like a built-in and runs
/// under the same rules: the same scope, the same deadline, panics caught, errors answered as
/// `ok: false` with the error's text.
///
/// - A `read` or an `action` ([`ToolDescriptor::class`]) implements [`Tool::run`], which runs
///   whatever the call's mode.
/// - A `mutate` tool implements [`Tool::plan`] (work out the change and observe its targets,
///   touching nothing) and [`Tool::run`] (carry the change out). A call in `auto` mode answers
///   the plan as a proposal; `run` is called only in `apply` mode, after a fresh `plan` has
///   observed exactly the preconditions the proposal recorded. Otherwise nothing runs and the
///   call answers that the target changed since the proposal.
///
/// `run` and `plan` are called on a blocking thread: plain blocking I/O is fine. Paths from the
/// input go through [`Context::resolve`] and are opened through [`Context::scope`], never by
/// name with `std::fs`.
///
/// A mutation that creates a file, proposed and then applied:
///
/// ```
/// use host_agent::tools::{parse_input, schema_for, Context, Proposal, Tool, ToolError, Toolbox};
/// use protocol::{CallMode, HostCall, ToolClass, ToolDescriptor};
/// use serde_json::{json, Value};
///
/// /// The input, validated by serde and described by schemars: one type, no drift.
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// #[serde(deny_unknown_fields)]
/// struct TouchInput {
///     /// The file to create.
///     path: String,
/// }
///
/// struct Touch;
///
/// impl Tool for Touch {
///     fn descriptor(&self) -> ToolDescriptor {
///         ToolDescriptor {
///             name: "touch".into(),
///             description: "Create an empty file".into(),
///             input_schema: schema_for::<TouchInput>(),
///             class: ToolClass::Mutate,
///         }
///     }
///
///     fn plan(&self, ctx: &Context, input: &Value) -> Result<Proposal, ToolError> {
///         let input: TouchInput = parse_input("touch", input)?;
///         let path = ctx.resolve(&input.path)?;
///         let shown = ctx.scope().display(&path);
///         Ok(Proposal::new(format!("create the empty file {shown}"))
///             .with_precondition("target", ctx.condition(&path)?))
///     }
///
///     fn run(&self, ctx: &Context, input: &Value) -> Result<Value, ToolError> {
///         let input: TouchInput = parse_input("touch", input)?;
///         let path = ctx.resolve(&input.path)?;
///         let (dir, name) = ctx.scope().open_parent(&path).map_err(|e| ToolError::io(input.path.clone(), e))?;
///         dir.write(&name, b"").map_err(|e| ToolError::io(input.path.clone(), e))?;
///         Ok(json!({"created": ctx.scope().display(&path)}))
///     }
/// }
///
/// let root = tempfile::tempdir()?;
/// let toolbox = Toolbox::new(&[root.path().to_path_buf()])?.with_tool(Touch)?;
/// let propose = HostCall {
///     call_id: "c1".into(),
///     tool: "touch".into(),
///     input: json!({"path": "new.txt"}),
///     mode: None,
///     preconditions: None,
///     deadline: None,
///     traceparent: None,
/// };
/// let proposal = toolbox.run(&propose);
/// assert_eq!(proposal.proposal, Some(true));
/// assert!(!root.path().join("new.txt").exists(), "a proposal touches nothing");
///
/// let plan = proposal.result.expect("the proposal");
/// let apply = HostCall {
///     mode: Some(CallMode::Apply),
///     preconditions: Some(plan["preconditions"].clone()),
///     ..propose
/// };
/// assert!(toolbox.run(&apply).ok);
/// assert!(root.path().join("new.txt").exists());
/// // Applied again, the target is no longer absent: refused, nothing runs.
/// let again = toolbox.run(&apply);
/// assert!(!again.ok);
/// assert!(again.error.unwrap().contains("changed since the proposal"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Tool: Send + Sync + 'static {
    /// The name (`[a-z][a-z0-9_]{0,63}`), description, input JSON Schema and class. Read once,
    /// when the tool is added.
    fn descriptor(&self) -> ToolDescriptor;

    /// A read or an action: does the work. A mutation: carries out the change, called only in
    /// `apply` mode once the preconditions of a fresh [`Tool::plan`] equal the proposal's.
    fn run(&self, ctx: &Context, input: &Value) -> Result<Value, ToolError>;

    /// A mutation: what [`Tool::run`] would do, and the state of every target it depends on,
    /// touching nothing. Not called for reads and actions.
    fn plan(&self, ctx: &Context, input: &Value) -> Result<Proposal, ToolError> {
        let _ = (ctx, input);
        Err(ToolError::Refused("this tool is not a mutation: it has no plan".to_owned()))
    }
}

/// A mutation's proposal: one line saying what the apply would do, an optional unified diff,
/// any other fields the tool wants shown (`details`, e.g. the command line it would run), and
/// the preconditions, one [`Condition`] per named target, that the apply verifies first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Proposal {
    pub summary: String,
    pub diff: Option<String>,
    pub details: Map<String, Value>,
    pub preconditions: BTreeMap<String, Condition>,
}

impl Proposal {
    /// A proposal with this summary, no diff, no details and no preconditions yet.
    pub fn new(summary: impl Into<String>) -> Self {
        Proposal { summary: summary.into(), ..Proposal::default() }
    }

    /// Adds a unified diff (shown by the admin page and the CLI).
    pub fn with_diff(mut self, diff: impl Into<String>) -> Self {
        self.diff = Some(diff.into());
        self
    }

    /// Adds a field of the proposal (`tool`, `summary`, `diff` and `preconditions` are kept).
    pub fn with_detail(mut self, key: impl Into<String>, value: Value) -> Self {
        self.details.insert(key.into(), value);
        self
    }

    /// Adds the state of one target, under a name of the tool's choosing (`target`, an
    /// argument's name...).
    pub fn with_precondition(mut self, role: impl Into<String>, condition: Condition) -> Self {
        self.preconditions.insert(role.into(), condition);
        self
    }

    /// The `result` of the proposal's HostResult.
    fn to_json(&self, tool: &str) -> Result<Value, ToolError> {
        let mut plan = self.details.clone();
        plan.insert("tool".into(), Value::String(tool.to_owned()));
        plan.insert("summary".into(), Value::String(self.summary.clone()));
        match &self.diff {
            Some(diff) => plan.insert("diff".into(), Value::String(diff.clone())),
            None => plan.remove("diff"),
        };
        plan.insert("preconditions".into(), super::to_json(&self.preconditions)?);
        Ok(Value::Object(plan))
    }
}

/// Why a tool could not be added to a toolbox.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("invalid tool name `{0}`: a name is [a-z][a-z0-9_]{{0,63}}")]
    InvalidName(String),
    #[error("the name `{0}` is taken by a built-in tool or a tool added before")]
    NameTaken(String),
}

/// True for a tool (or argument) name: `[a-z][a-z0-9_]{0,63}`.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The JSON Schema of an input type (draft 2020-12, subschemas inlined): derive it from the
/// same type [`parse_input`] reads, so the advertised schema and the validation cannot drift.
pub fn schema_for<T: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|settings| {
            settings.inline_subschemas = true;
            settings.meta_schema = None;
        })
        .into_generator();
    generator.into_root_schema_for::<T>().to_value()
}

/// Reads a call's input as `T`; an error is [`ToolError::InvalidInput`] naming the tool.
pub fn parse_input<T: DeserializeOwned>(tool: &str, input: &Value) -> Result<T, ToolError> {
    T::deserialize(input).map_err(|error| ToolError::InvalidInput { tool: tool.to_owned(), message: error.to_string() })
}

/// A tool added to a toolbox, with the descriptor it gave when added.
pub(super) struct Added {
    pub descriptor: ToolDescriptor,
    tool: Arc<dyn Tool>,
}

impl Added {
    pub fn new(tool: Arc<dyn Tool>) -> Result<Self, AddError> {
        let descriptor = tool.descriptor();
        if !is_valid_name(&descriptor.name) {
            return Err(AddError::InvalidName(descriptor.name));
        }
        Ok(Added { descriptor, tool })
    }

    pub fn run(&self, ctx: &Context, call: &protocol::HostCall) -> Result<Outcome, ToolError> {
        if self.descriptor.class != ToolClass::Mutate {
            return self.tool.run(ctx, &call.input).map(Outcome::Done);
        }
        if !call.is_apply() {
            let proposal = self.tool.plan(ctx, &call.input)?;
            return proposal.to_json(&self.descriptor.name).map(Outcome::Proposal);
        }
        let expected = call.preconditions.as_ref().ok_or(ToolError::MissingPreconditions)?;
        let expected: BTreeMap<String, Condition> = serde_json::from_value(expected.clone()).map_err(|error| {
            ToolError::InvalidInput { tool: self.descriptor.name.clone(), message: format!("preconditions: {error}") }
        })?;
        // The proposal was planned without error, so a plan that fails now met a change.
        let fresh = self.tool.plan(ctx, &call.input).map_err(|error| match error {
            ToolError::Io { .. } | ToolError::Scope(_) | ToolError::Refused(_) => ToolError::Changed(error.to_string()),
            other => other,
        })?;
        verify(&expected, &fresh.preconditions)?;
        self.tool.run(ctx, &call.input).map(Outcome::Done)
    }
}

/// Checks a fresh observation against the proposal's preconditions, naming the first change.
pub(crate) fn verify(
    expected: &BTreeMap<String, Condition>,
    current: &BTreeMap<String, Condition>,
) -> Result<(), ToolError> {
    if expected == current {
        return Ok(());
    }
    let roles = expected.keys().chain(current.keys());
    let detail = roles
        .filter_map(|role| match (expected.get(role), current.get(role)) {
            (Some(was), Some(now)) if was.path != now.path => {
                Some(format!("the {role} was {}, the call names {}", was.path, now.path))
            }
            (Some(was), Some(now)) if was != now => {
                Some(format!("{} was {}, is now {}", now.path, was.state.describe(), now.state.describe()))
            }
            (Some(_), Some(_)) => None,
            _ => Some(format!("the preconditions do not describe this call's {role}")),
        })
        .next()
        .unwrap_or_default();
    Err(ToolError::Changed(detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::State;

    #[test]
    fn names() {
        for good in ["a", "line_count", "convert_ifc2", &format!("a{}", "b".repeat(63))] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "A", "1a", "_a", "a-b", "a b", "é", "a.b", &format!("a{}", "b".repeat(64))] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    fn condition(path: &str, state: State) -> Condition {
        Condition { path: path.into(), state }
    }

    #[test]
    fn verification_names_the_change() {
        let absent = BTreeMap::from([("dest".to_owned(), condition("/r/out.las", State::Absent))]);
        assert!(verify(&absent, &absent.clone()).is_ok());
        let file = BTreeMap::from([(
            "dest".to_owned(),
            condition("/r/out.las", State::File { size: 3, sha256: "ab".repeat(32) }),
        )]);
        let error = verify(&absent, &file).expect_err("changed").to_string();
        assert!(error.contains("changed since the proposal"), "{error}");
        assert!(error.contains("/r/out.las was absent, is now a file of 3 bytes"), "{error}");
        let elsewhere = BTreeMap::from([("dest".to_owned(), condition("/r/other.las", State::Absent))]);
        assert!(verify(&absent, &elsewhere).expect_err("path").to_string().contains("the call names /r/other.las"));
        let error = verify(&absent, &BTreeMap::new()).expect_err("missing").to_string();
        assert!(error.contains("do not describe this call's dest"), "{error}");
    }

    #[test]
    fn proposals_keep_their_own_fields() {
        let proposal = Proposal::new("run it")
            .with_detail("command", serde_json::json!(["/bin/true"]))
            .with_detail("summary", Value::String("overridden?".into()))
            .with_precondition("dest", condition("/r/x", State::Absent));
        let json = proposal.to_json("convert").expect("json");
        assert_eq!(json["tool"], "convert");
        assert_eq!(json["summary"], "run it");
        assert_eq!(json["command"][0], "/bin/true");
        assert_eq!(json["preconditions"]["dest"]["type"], "absent");
        assert!(json.get("diff").is_none());
    }
}
