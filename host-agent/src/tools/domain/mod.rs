//! Domain tools from a tools file (`host-agent run --tools-file F`): named shell-outs whose
//! program is fixed and whose only variable parts are typed, checked arguments. Each declared
//! tool is a [`CommandTool`], added to the toolbox through the same [`Tool`] seam an app uses,
//! so it is advertised, scoped and proposed like a built-in.
//!
//! Owns: binding a call's input to the declared arguments (nothing undeclared, nothing missing,
//! each value of its type: a `path` resolved through the scope and passed as its real absolute
//! path, a `string` matching its pattern, an `enum` value, an `integer` within its bounds), the
//! command line that results, a `mutate` tool's proposal (`{tool, summary, command,
//! preconditions}`, one precondition per declared output), and the result
//! `{exitCode, stdout, stderr, truncated}`: a non-zero exit, a signal or a timeout is `ok:
//! false` with the exit code and the end of stderr.
//!
//! A path argument is checked on the filesystem, not only as text: it must resolve beneath its
//! root through the root's handle (no `..` above it, no symlink out), a file with several hard
//! links is refused (another link may lie outside), and the program receives the canonical path
//! (symlinks inside the root already resolved), or for a path that does not exist yet, the
//! canonical parent joined with the new name. The program then opens that path by name, outside
//! the agent's handles: a process on this machine that swaps a directory for a symlink in that
//! moment could redirect it. Calls cannot create symlinks; local processes are trusted as the
//! user is.
//!
//! Layout: `file` reads and validates the TOML; `process` runs the command.
//!
//! Does not: use a shell, ever; pass the agent's environment (see `process::SAFE_ENV`).

mod file;
mod process;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use protocol::{ToolClass, ToolDescriptor};
use serde_json::{json, Map, Value};

pub use file::{Element, FileError, Kind, Param, Spec};
pub use file::{DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_TIMEOUT_SECS, MAX_OUTPUT_BYTES, MAX_TIMEOUT_SECS};
pub use process::SAFE_ENV;

use super::{Context, Proposal, Tool, ToolError};
use crate::scope::{link_count, ScopedPath};

/// Longest `string` argument, in bytes.
pub const MAX_STRING_BYTES: usize = 4096;
/// How much of stderr's end an error quotes.
const STDERR_TAIL_CHARS: usize = 2000;

/// Reads and validates a tools file into its tools; the programs must exist and be executable.
pub fn load(path: &Path) -> Result<Vec<CommandTool>, FileError> {
    Ok(file::load(path)?.into_iter().map(CommandTool::new).collect())
}

/// One tool of a tools file.
#[derive(Debug, Clone)]
pub struct CommandTool {
    spec: Spec,
}

/// A call's value of one argument, checked.
#[derive(Debug)]
enum Bound {
    Path { real: PathBuf, scoped: ScopedPath },
    Text(String),
}

impl Bound {
    fn as_arg(&self) -> OsString {
        match self {
            Bound::Path { real, .. } => real.clone().into_os_string(),
            Bound::Text(text) => OsString::from(text),
        }
    }
}

impl CommandTool {
    fn new(spec: Spec) -> Self {
        CommandTool { spec }
    }

    /// The tool's name, as the file declares it.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The declaration, validated.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    fn invalid(&self, message: impl Into<String>) -> ToolError {
        ToolError::InvalidInput { tool: self.spec.name.clone(), message: message.into() }
    }

    /// Checks the input against the declared arguments and resolves it.
    fn bind(&self, ctx: &Context, input: &Value) -> Result<Vec<(String, Bound)>, ToolError> {
        let empty = Map::new();
        let object = match input {
            Value::Object(object) => object,
            Value::Null => &empty,
            _ => return Err(self.invalid("the input must be a JSON object of arguments")),
        };
        if let Some(unknown) = object.keys().find(|key| !self.spec.params.contains_key(*key)) {
            let known: Vec<&str> = self.spec.params.keys().map(String::as_str).collect();
            return Err(self.invalid(format!(
                "unknown argument `{unknown}` (this tool takes: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        let mut bound = Vec::new();
        for (name, param) in &self.spec.params {
            let value = match object.get(name) {
                None | Some(Value::Null) if param.required => {
                    return Err(self.invalid(format!("missing required argument `{name}`")))
                }
                None | Some(Value::Null) => continue,
                Some(value) => value,
            };
            let checked = self.check(ctx, name, param, value)?;
            bound.push((name.clone(), checked));
        }
        Ok(bound)
    }

    fn check(&self, ctx: &Context, name: &str, param: &Param, value: &Value) -> Result<Bound, ToolError> {
        let text = || value.as_str().ok_or_else(|| self.invalid(format!("`{name}` must be a string")));
        match &param.kind {
            Kind::Path => {
                let writes = self.spec.outputs.iter().any(|output| output == name);
                resolve_path(ctx, text()?, writes)
            }
            Kind::String { pattern } => {
                let text = text()?;
                if text.contains('\0') {
                    return Err(self.invalid(format!("`{name}` holds a NUL byte")));
                }
                if text.len() > MAX_STRING_BYTES {
                    return Err(self.invalid(format!("`{name}` is longer than {MAX_STRING_BYTES} bytes")));
                }
                match pattern {
                    Some(pattern) if !pattern.is_match(text) => {
                        return Err(self.invalid(format!("`{name}` does not match the pattern {}", pattern.as_str())))
                    }
                    None if text.starts_with('-') => {
                        return Err(self.invalid(format!(
                            "`{name}` may not start with `-` (the program would read it as an option); the tool's \
                             pattern can allow it"
                        )))
                    }
                    _ => {}
                }
                Ok(Bound::Text(text.to_owned()))
            }
            Kind::Enum { values } => {
                let text = text()?;
                if !values.iter().any(|allowed| allowed == text) {
                    return Err(self.invalid(format!("`{name}` must be one of: {}", values.join(", "))));
                }
                Ok(Bound::Text(text.to_owned()))
            }
            Kind::Integer { min, max } => {
                let number = value.as_i64().ok_or_else(|| self.invalid(format!("`{name}` must be an integer")))?;
                if min.is_some_and(|min| number < min) || max.is_some_and(|max| number > max) {
                    let bound = |limit: Option<i64>| limit.map_or("unbounded".to_owned(), |l| l.to_string());
                    return Err(self.invalid(format!(
                        "`{name}` is {number}, outside {}..={}",
                        bound(*min),
                        bound(*max)
                    )));
                }
                Ok(Bound::Text(number.to_string()))
            }
        }
    }

    /// The arguments after the program, for a bound input.
    fn arguments(&self, bound: &[(String, Bound)]) -> Vec<OsString> {
        self.spec
            .args
            .iter()
            .filter_map(|element| match element {
                Element::Literal(text) => Some(OsString::from(text)),
                Element::Param(name) => bound.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_arg()),
            })
            .collect()
    }

    fn execute(&self, ctx: &Context, input: &Value) -> Result<Value, ToolError> {
        let bound = self.bind(ctx, input)?;
        let args = self.arguments(&bound);
        let cwd = PathBuf::from(ctx.scope.roots_display().first().cloned().unwrap_or_else(|| "/".to_owned()));
        let program = self.spec.program.display().to_string();
        let run =
            process::run(&self.spec.program, &args, &cwd, self.spec.timeout, ctx.deadline, self.spec.max_output_bytes)
                .map_err(|error| ToolError::Failed(format!("cannot start {program}: {error}")))?;
        let stderr = String::from_utf8_lossy(&run.stderr.bytes).into_owned();
        let tail = tail_of(&stderr);
        match run.ended {
            process::Ended::DeadlineExceeded => Err(ToolError::DeadlineExceeded),
            process::Ended::TimedOut => Err(ToolError::Failed(format!(
                "{program} timed out after {} s and was killed with its process group{tail}",
                self.spec.timeout.as_secs()
            ))),
            process::Ended::Exited(status) => match status.code() {
                Some(0) => Ok(json!({
                    "exitCode": 0,
                    "stdout": String::from_utf8_lossy(&run.stdout.bytes),
                    "stderr": stderr,
                    "truncated": run.stdout.truncated || run.stderr.truncated,
                })),
                Some(code) => Err(ToolError::Failed(format!("{program} exited with code {code}{tail}"))),
                None => Err(ToolError::Failed(format!("{program} was killed ({status}){tail}"))),
            },
        }
    }
}

/// `: <the end of stderr>`, or nothing when it is empty.
fn tail_of(stderr: &str) -> String {
    let trimmed = stderr.trim_end();
    if trimmed.is_empty() {
        return String::new();
    }
    let count = trimmed.chars().count();
    let tail: String = trimmed.chars().skip(count.saturating_sub(STDERR_TAIL_CHARS)).collect();
    let cut = if count > STDERR_TAIL_CHARS { "…" } else { "" };
    format!(": {cut}{tail}")
}

/// A path argument, checked beneath its root and made real (see the module's doc).
fn resolve_path(ctx: &Context, text: &str, writes: bool) -> Result<Bound, ToolError> {
    let scope = ctx.scope;
    let scoped = ctx.resolve(text)?;
    let io_error = ctx.io(&scoped);
    let root = scope.roots_display()[scoped.root()].clone();
    let root_real = std::fs::canonicalize(&root).map_err(|error| ToolError::io(root.clone(), error))?;
    let inside = |real: PathBuf| {
        if real.starts_with(&root_real) {
            Ok(real)
        } else {
            Err(ToolError::Scope(crate::scope::ScopeError::OutsideRoots {
                path: text.to_owned(),
                roots: scope.roots_display().join(", "),
            }))
        }
    };
    let real = match scope.symlink_metadata(&scoped) {
        Ok(_) => {
            // Follows symlinks only while they stay beneath the root handle.
            let metadata = scope.metadata(&scoped).map_err(&io_error)?;
            if metadata.is_file() && (link_count(&metadata) > 1) && (writes || scope.is_unreadable_link(&metadata)) {
                return Err(io_error(crate::scope::MultiplyLinked { links: link_count(&metadata) }.into()));
            }
            let real = std::fs::canonicalize(scope.absolute(&scoped)).map_err(&io_error)?;
            inside(real)?
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let (Some(parent), Some(name)) = (scoped.parent(), scoped.name()) else {
                return Err(io_error(error));
            };
            let metadata = scope.metadata(&parent).map_err(ctx.io(&parent))?;
            if !metadata.is_dir() {
                return Err(ToolError::Refused(format!("{}: is not a directory", scope.display(&parent))));
            }
            let real = std::fs::canonicalize(scope.absolute(&parent)).map_err(ctx.io(&parent))?;
            inside(real)?.join(name)
        }
        Err(error) => return Err(io_error(error)),
    };
    Ok(Bound::Path { real, scoped })
}

impl Tool for CommandTool {
    fn descriptor(&self) -> ToolDescriptor {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for (name, param) in &self.spec.params {
            let mut schema = match &param.kind {
                Kind::Path => json!({"type": "string"}),
                Kind::String { pattern: Some(pattern) } => json!({"type": "string", "pattern": pattern.as_str()}),
                Kind::String { pattern: None } => json!({"type": "string"}),
                Kind::Enum { values } => json!({"type": "string", "enum": values}),
                Kind::Integer { min, max } => {
                    let mut schema = json!({"type": "integer"});
                    if let Some(min) = min {
                        schema["minimum"] = json!(min);
                    }
                    if let Some(max) = max {
                        schema["maximum"] = json!(max);
                    }
                    schema
                }
            };
            let mut description = param.description.clone();
            if matches!(param.kind, Kind::Path) {
                let note = "A path inside the allowed roots (relative paths start at the first root).";
                description = if description.is_empty() { note.to_owned() } else { format!("{description}. {note}") };
            }
            if !description.is_empty() {
                schema["description"] = Value::String(description);
            }
            properties.insert(name.clone(), schema);
            if param.required {
                required.push(name.clone());
            }
        }
        ToolDescriptor {
            name: self.spec.name.clone(),
            description: self.spec.description.clone(),
            input_schema: json!({
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": false,
            }),
            class: self.spec.class,
        }
    }

    fn run(&self, ctx: &Context, input: &Value) -> Result<Value, ToolError> {
        self.execute(ctx, input)
    }

    fn plan(&self, ctx: &Context, input: &Value) -> Result<Proposal, ToolError> {
        if self.spec.class != ToolClass::Mutate {
            return Err(ToolError::Refused(format!("{} is not a mutation: it has no plan", self.spec.name)));
        }
        let bound = self.bind(ctx, input)?;
        let mut command = vec![self.spec.program.display().to_string()];
        command.extend(self.arguments(&bound).iter().map(|arg| arg.to_string_lossy().into_owned()));
        let mut proposal = Proposal::new("");
        let mut writes = Vec::new();
        for output in &self.spec.outputs {
            if let Some((_, Bound::Path { scoped, .. })) = bound.iter().find(|(name, _)| name == output) {
                let condition = ctx.condition(scoped)?;
                writes.push(condition.path.clone());
                proposal = proposal.with_precondition(output.clone(), condition);
            }
        }
        proposal.summary = format!(
            "run {}{}",
            shell_words(&command),
            if writes.is_empty() { String::new() } else { format!(" (writes {})", writes.join(", ")) }
        );
        Ok(proposal.with_detail("command", json!(command)))
    }
}

/// The command line as a person reads it: elements with spaces or quotes shown quoted. For
/// display only; nothing is ever parsed from it.
fn shell_words(command: &[String]) -> String {
    command
        .iter()
        .map(|word| {
            let plain = !word.is_empty()
                && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c) || !c.is_ascii());
            if plain {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quoting() {
        let words = ["/usr/bin/pdal", "translate", "/r/a b.e57", "it's", ""].map(String::from);
        assert_eq!(shell_words(&words), r"/usr/bin/pdal translate '/r/a b.e57' 'it'\''s' ''");
    }

    #[test]
    fn stderr_tails() {
        assert_eq!(tail_of(" \n"), "");
        assert_eq!(tail_of("bad input\n"), ": bad input");
        let long = "x".repeat(STDERR_TAIL_CHARS + 10);
        assert_eq!(tail_of(&long).chars().count(), STDERR_TAIL_CHARS + 3);
    }
}
