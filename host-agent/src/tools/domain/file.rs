//! The tools file: the TOML that declares named shell-outs, read into validated [`Spec`]s.
//!
//! ```toml
//! [[tool]]
//! name = "line_count"                        # [a-z][a-z0-9_]{0,63}; not a built-in's name
//! description = "Count the lines of a text file"
//! class = "read"                             # read | mutate | action
//! command = ["/usr/bin/wc", "-l", "{file}"]  # argv; "{name}" is an argument, a whole element
//! timeout_secs = 10                          # default 30; then the process tree is killed
//! max_output_bytes = 65536                   # default 1048576; per stream, then cut
//! outputs = []                               # mutate: the argument names it writes
//!
//! [tool.args.file]
//! type = "path"                              # path | string | enum | integer
//! description = "The file"
//! required = true                            # default true
//! ```
//!
//! Owns the rules a file must follow, all checked before anything runs ([`parse`], pure and
//! table-tested): no unknown key anywhere; a valid, unique name that no built-in has; a
//! description; a class; the program a fixed absolute path; every `{name}` element an
//! argument declared under `[tool.args.name]` and every argument used; a placeholder only as a
//! whole element; each argument's settings only for its type (a `pattern` that compiles, a
//! non-empty `values` list, `min <= max`); `outputs` only for `mutate` tools, naming `path`
//! arguments; bounded timeouts and output caps. [`check_programs`] adds the one rule that looks
//! at the machine: the program exists and is executable.
//!
//! Does not: bind a call's input to the arguments or run anything (`super`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::ToolClass;
use regex::Regex;
use serde::Deserialize;

use crate::tools::tool::is_valid_name;

/// Default `timeout_secs`.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// Largest `timeout_secs`: a day.
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// Default `max_output_bytes`, per stream.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// Largest `max_output_bytes`: both streams together stay within the dispatcher's default
/// body limit (8 MiB).
pub const MAX_OUTPUT_BYTES: u64 = 4 << 20;
/// Compiled size limit of a `pattern`.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A tools file that cannot be used: which file, which tool (when one is to blame), and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tools file {}: {}{message}", file.display(), tool.as_ref().map(|t| format!("tool {t}: ")).unwrap_or_default())]
pub struct FileError {
    pub file: PathBuf,
    /// The tool as `` `name` `` or `#n` (1-based) when it has no usable name.
    pub tool: Option<String>,
    pub message: String,
}

impl FileError {
    /// A problem with the tool named `name` in `file`.
    pub fn at(file: &Path, name: &str, message: impl Into<String>) -> Self {
        FileError { file: file.to_owned(), tool: Some(format!("`{name}`")), message: message.into() }
    }
}

/// One declared tool, validated.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub description: String,
    pub class: ToolClass,
    /// The fixed absolute program.
    pub program: PathBuf,
    /// The arguments after the program: literal text, or an argument's value.
    pub args: Vec<Element>,
    pub timeout: Duration,
    pub max_output_bytes: usize,
    /// The `path` arguments a `mutate` tool writes: their state is its proposal's preconditions.
    pub outputs: Vec<String>,
    pub params: BTreeMap<String, Param>,
}

/// One element of the command line after the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Element {
    Literal(String),
    /// `{name}`: the value of argument `name`; left out when that argument is optional and absent.
    Param(String),
}

/// A declared argument.
#[derive(Debug, Clone)]
pub struct Param {
    pub kind: Kind,
    pub description: String,
    pub required: bool,
}

/// What values an argument takes.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A path through the scope, passed as the resolved absolute path.
    Path,
    /// Any text matching `pattern` (as written: anchor it with `^…$` to match the whole value).
    String {
        pattern: Option<Regex>,
    },
    Enum {
        values: Vec<String>,
    },
    Integer {
        min: Option<i64>,
        max: Option<i64>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTool {
    name: String,
    description: String,
    class: ToolClass,
    command: Vec<String>,
    timeout_secs: Option<u64>,
    max_output_bytes: Option<u64>,
    #[serde(default)]
    outputs: Vec<String>,
    #[serde(default)]
    args: BTreeMap<String, RawParam>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    #[serde(rename = "type")]
    kind: KindName,
    #[serde(default)]
    description: String,
    required: Option<bool>,
    pattern: Option<String>,
    values: Option<Vec<String>>,
    min: Option<i64>,
    max: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindName {
    Path,
    String,
    Enum,
    Integer,
}

/// Reads and validates a tools file, and checks that every program is there to run.
pub fn load(path: &Path) -> Result<Vec<Spec>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|error| FileError {
        file: path.to_owned(),
        tool: None,
        message: format!("cannot be read: {error}"),
    })?;
    let specs = parse(&text, &super::super::is_builtin).map_err(|(tool, message)| FileError {
        file: path.to_owned(),
        tool,
        message,
    })?;
    check_programs(&specs).map_err(|(name, message)| FileError::at(path, &name, message))?;
    Ok(specs)
}

/// Validates a tools file's text. `is_builtin` says which names the built-ins hold. An error
/// is the tool to blame (`` `name` `` or `#n`) and the problem.
pub fn parse(text: &str, is_builtin: &dyn Fn(&str) -> bool) -> Result<Vec<Spec>, (Option<String>, String)> {
    let table: toml::Table = toml::from_str(text).map_err(|error| (None, format!("not valid TOML: {error}")))?;
    if let Some(key) = table.keys().find(|key| *key != "tool") {
        return Err((None, format!("unknown key `{key}` at the top level (tools are declared as [[tool]] tables)")));
    }
    let entries = match table.get("tool") {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(entries)) => entries,
        Some(_) => return Err((None, "`tool` must be an array of tables: declare each tool as [[tool]]".into())),
    };
    let mut specs: Vec<Spec> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let label = match entry.get("name").and_then(toml::Value::as_str) {
            Some(name) => format!("`{name}`"),
            None => format!("#{}", index + 1),
        };
        let raw: RawTool = entry
            .clone()
            .try_into()
            .map_err(|error: toml::de::Error| (Some(label.clone()), error.message().trim_end().to_owned()))?;
        if specs.iter().any(|spec| spec.name == raw.name) {
            return Err((Some(label), "another tool of this file has the same name".into()));
        }
        let spec = validate(raw, is_builtin).map_err(|message| (Some(label), message))?;
        specs.push(spec);
    }
    Ok(specs)
}

fn validate(raw: RawTool, is_builtin: &dyn Fn(&str) -> bool) -> Result<Spec, String> {
    if !is_valid_name(&raw.name) {
        return Err("invalid name: a name is [a-z][a-z0-9_]{0,63}".into());
    }
    if is_builtin(&raw.name) {
        return Err("the name is a built-in tool's".into());
    }
    if raw.description.trim().is_empty() {
        return Err("the description is empty".into());
    }
    let mut params = BTreeMap::new();
    for (name, param) in raw.args {
        if !is_valid_name(&name) {
            return Err(format!("invalid argument name `{name}`: a name is [a-z][a-z0-9_]{{0,63}}"));
        }
        let param = validate_param(param).map_err(|message| format!("argument `{name}`: {message}"))?;
        params.insert(name, param);
    }

    let (program, rest) = raw.command.split_first().ok_or("the command is empty")?;
    if placeholder(program).is_some() {
        return Err(format!("the program must be a fixed absolute path, not the placeholder {program}"));
    }
    if program.contains('\0') || !Path::new(program).is_absolute() {
        return Err(format!("the program `{program}` is not an absolute path"));
    }
    let mut args = Vec::with_capacity(rest.len());
    let mut used = BTreeSet::new();
    for element in rest {
        if element.contains('\0') {
            return Err(format!("the command element {element:?} holds a NUL byte"));
        }
        if let Some(name) = placeholder(element) {
            if !params.contains_key(name) {
                return Err(format!("the placeholder {element} has no argument: declare [tool.args.{name}]"));
            }
            used.insert(name.to_owned());
            args.push(Element::Param(name.to_owned()));
            continue;
        }
        if let Some(name) = params.keys().find(|name| element.contains(&format!("{{{name}}}"))) {
            return Err(format!(
                "the placeholder {{{name}}} must be a whole element of the command, not part of {element:?}"
            ));
        }
        args.push(Element::Literal(element.clone()));
    }
    if let Some(name) = params.keys().find(|name| !used.contains(*name)) {
        return Err(format!("argument `{name}` is declared but the command never uses {{{name}}}"));
    }

    let timeout_secs = raw.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
        return Err(format!("timeout_secs must be between 1 and {MAX_TIMEOUT_SECS}"));
    }
    let max_output_bytes = raw.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
    if !(1..=MAX_OUTPUT_BYTES).contains(&max_output_bytes) {
        return Err(format!("max_output_bytes must be between 1 and {MAX_OUTPUT_BYTES}"));
    }

    if raw.class != ToolClass::Mutate && !raw.outputs.is_empty() {
        return Err("outputs are declared by mutate tools only".into());
    }
    let mut seen = BTreeSet::new();
    for output in &raw.outputs {
        match params.get(output) {
            None => return Err(format!("the output `{output}` is not an argument")),
            Some(param) if !matches!(param.kind, Kind::Path) => {
                return Err(format!("the output `{output}` is not a path argument"))
            }
            Some(_) if !seen.insert(output) => return Err(format!("the output `{output}` is listed twice")),
            Some(_) => {}
        }
    }

    Ok(Spec {
        name: raw.name,
        description: raw.description.trim().to_owned(),
        class: raw.class,
        program: PathBuf::from(program),
        args,
        timeout: Duration::from_secs(timeout_secs),
        max_output_bytes: usize::try_from(max_output_bytes).unwrap_or(usize::MAX),
        outputs: raw.outputs,
        params,
    })
}

fn validate_param(raw: RawParam) -> Result<Param, String> {
    let only = |field: &str, present: bool, kind: &str| {
        if present {
            Err(format!("`{field}` is only for {kind} arguments"))
        } else {
            Ok(())
        }
    };
    if raw.kind != KindName::String {
        only("pattern", raw.pattern.is_some(), "string")?;
    }
    if raw.kind != KindName::Enum {
        only("values", raw.values.is_some(), "enum")?;
    }
    if raw.kind != KindName::Integer {
        only("min", raw.min.is_some(), "integer")?;
        only("max", raw.max.is_some(), "integer")?;
    }
    let kind = match raw.kind {
        KindName::Path => Kind::Path,
        KindName::String => {
            let pattern = raw
                .pattern
                .map(|pattern| {
                    regex::RegexBuilder::new(&pattern)
                        .size_limit(PATTERN_SIZE_LIMIT)
                        .build()
                        .map_err(|error| format!("bad pattern {pattern:?}: {error}"))
                })
                .transpose()?;
            Kind::String { pattern }
        }
        KindName::Enum => {
            let values = raw.values.ok_or("an enum argument needs `values`")?;
            if values.is_empty() {
                return Err("`values` is empty".into());
            }
            if let Some(bad) = values.iter().find(|value| value.is_empty() || value.contains('\0')) {
                return Err(format!("the value {bad:?} cannot be an argument"));
            }
            Kind::Enum { values }
        }
        KindName::Integer => {
            if let (Some(min), Some(max)) = (raw.min, raw.max) {
                if min > max {
                    return Err(format!("min {min} is above max {max}"));
                }
            }
            Kind::Integer { min: raw.min, max: raw.max }
        }
    };
    Ok(Param { kind, description: raw.description.trim().to_owned(), required: raw.required.unwrap_or(true) })
}

/// The argument name of a whole-element placeholder (`{name}` with a valid name).
fn placeholder(element: &str) -> Option<&str> {
    element.strip_prefix('{')?.strip_suffix('}').filter(|name| is_valid_name(name))
}

/// Every program is a regular file this user may execute. An error is the tool and the problem.
pub fn check_programs(specs: &[Spec]) -> Result<(), (String, String)> {
    for spec in specs {
        let shown = spec.program.display();
        let metadata = std::fs::metadata(&spec.program)
            .map_err(|error| (spec.name.clone(), format!("the program {shown} cannot be used: {error}")))?;
        if !metadata.is_file() {
            return Err((spec.name.clone(), format!("the program {shown} is not a file")));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if metadata.permissions().mode() & 0o111 == 0 {
                return Err((spec.name.clone(), format!("the program {shown} is not executable")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(name: &str) -> bool {
        matches!(name, "read_file" | "write_file")
    }

    const GOOD: &str = r#"
[[tool]]
name = "line_count"
description = "Count the lines of a text file"
class = "read"
command = ["/usr/bin/wc", "-l", "{file}"]
timeout_secs = 10
max_output_bytes = 65536
outputs = []

[tool.args.file]
type = "path"
description = "The file"
required = true

[[tool]]
name = "to_las"
description = "Convert a scan"
class = "mutate"
command = ["/usr/bin/pdal", "translate", "{source}", "{dest}", "--compression", "{compression}", "{points}", "{tag}"]
outputs = ["dest"]

[tool.args.source]
type = "path"

[tool.args.dest]
type = "path"

[tool.args.compression]
type = "enum"
values = ["none", "laz"]

[tool.args.points]
type = "integer"
min = 1
max = 1000
required = false

[tool.args.tag]
type = "string"
pattern = "^[a-z]+$"
required = false
"#;

    #[test]
    fn the_contract_example_and_more() {
        let specs = parse(GOOD, &builtin).expect("valid");
        assert_eq!(specs.len(), 2);
        let count = &specs[0];
        assert_eq!(count.name, "line_count");
        assert_eq!(count.class, ToolClass::Read);
        assert_eq!(count.program, PathBuf::from("/usr/bin/wc"));
        assert_eq!(count.args, [Element::Literal("-l".into()), Element::Param("file".into())]);
        assert_eq!(count.timeout, Duration::from_secs(10));
        assert_eq!(count.max_output_bytes, 65536);
        assert!(count.params["file"].required);
        let convert = &specs[1];
        assert_eq!(convert.timeout, Duration::from_secs(DEFAULT_TIMEOUT_SECS));
        assert_eq!(convert.max_output_bytes, 1 << 20);
        assert_eq!(convert.outputs, ["dest"]);
        assert!(!convert.params["points"].required);
        assert!(matches!(convert.params["points"].kind, Kind::Integer { min: Some(1), max: Some(1000) }));
        assert!(parse("", &builtin).expect("empty").is_empty());
    }

    /// One tool with `body` spliced in, args after it.
    fn tool(body: &str) -> String {
        format!("[[tool]]\nname = \"t\"\ndescription = \"d\"\n{body}")
    }

    #[test]
    fn bad_files_name_the_tool_and_the_problem() {
        let read = "class = \"read\"\ncommand = [\"/bin/echo\", \"{a}\"]\n";
        let arg = "[tool.args.a]\ntype = \"string\"\n";
        let cases: Vec<(String, &str, &str)> = vec![
            ("[tool]\nname = \"x\"".into(), "", "array of tables"),
            ("unknown = 1".into(), "", "unknown key `unknown` at the top level"),
            ("[[tool]\n".into(), "", "not valid TOML"),
            (tool(&format!("{read}colour = \"red\"\n{arg}")), "`t`", "unknown field `colour`"),
            (tool(&format!("class = \"write\"\ncommand = [\"/bin/echo\", \"{{a}}\"]\n{arg}")), "`t`", "unknown variant `write`"),
            (format!("[[tool]]\ndescription = \"d\"\n{read}{arg}"), "#1", "missing field `name`"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"string\"\nfoo = 1\n")), "`t`", "unknown field `foo`"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"float\"\n")), "`t`", "unknown variant `float`"),
            (tool("class = \"read\"\ncommand = [\"/bin/echo\", \"{b}\"]\n"), "`t`", "the placeholder {b} has no argument"),
            (tool(&format!("class = \"read\"\ncommand = [\"echo\", \"{{a}}\"]\n{arg}")), "`t`", "`echo` is not an absolute path"),
            (tool(&format!("class = \"read\"\ncommand = [\"./bin/x\", \"{{a}}\"]\n{arg}")), "`t`", "is not an absolute path"),
            (tool(&format!("class = \"read\"\ncommand = [\"{{a}}\"]\n{arg}")), "`t`", "not the placeholder {a}"),
            (tool("class = \"read\"\ncommand = []\n"), "`t`", "the command is empty"),
            (tool(&format!("class = \"read\"\ncommand = [\"/bin/echo\", \"--in={{a}}\"]\n{arg}")), "`t`", "must be a whole element"),
            (tool(&format!("class = \"read\"\ncommand = [\"/bin/echo\"]\n{arg}")), "`t`", "never uses {a}"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"string\"\npattern = \"(\"\n")), "`t`", "bad pattern"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"string\"\nvalues = [\"x\"]\n")), "`t`", "`values` is only for enum"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"path\"\npattern = \"x\"\n")), "`t`", "`pattern` is only for string"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"enum\"\n")), "`t`", "needs `values`"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"enum\"\nvalues = []\n")), "`t`", "`values` is empty"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"integer\"\nmin = 5\nmax = 1\n")), "`t`", "min 5 is above max 1"),
            (tool(&format!("{read}[tool.args.a]\ntype = \"enum\"\nvalues = [\"\"]\n")), "`t`", "cannot be an argument"),
            (tool(&format!("{read}outputs = [\"a\"]\n{arg}")), "`t`", "outputs are declared by mutate tools only"),
            (tool(&format!("class = \"mutate\"\ncommand = [\"/bin/echo\", \"{{a}}\"]\noutputs = [\"a\"]\n{arg}")), "`t`", "not a path argument"),
            (tool(&format!("class = \"mutate\"\ncommand = [\"/bin/echo\", \"{{a}}\"]\noutputs = [\"b\"]\n{arg}")), "`t`", "the output `b` is not an argument"),
            (tool(&format!("{read}timeout_secs = 0\n{arg}")), "`t`", "timeout_secs must be"),
            (tool(&format!("{read}max_output_bytes = 0\n{arg}")), "`t`", "max_output_bytes must be"),
            (tool(&format!("{read}timeout_secs = -1\n{arg}")), "`t`", "invalid value"),
            (format!("[[tool]]\nname = \"read_file\"\ndescription = \"d\"\n{read}{arg}"), "`read_file`", "built-in"),
            (format!("[[tool]]\nname = \"Bad-Name\"\ndescription = \"d\"\n{read}{arg}"), "`Bad-Name`", "invalid name"),
            (tool("class = \"read\"\ncommand = [\"/bin/echo\", \"{a}\"]\n[tool.args.a]\ntype = \"string\"\n[tool.args.B]\ntype = \"string\"\n"), "`t`", "invalid argument name `B`"),
            (format!("{}\n{}", tool(&format!("{read}{arg}")), tool(&format!("{read}{arg}"))), "`t`", "same name"),
            (tool(&format!("description = \"again\"\n{read}{arg}")), "", "not valid TOML"),
            ("[[tool]]\nname = \"t\"\ndescription = \" \"\nclass = \"read\"\ncommand = [\"/bin/true\"]\n".into(), "`t`", "description is empty"),
        ];
        for (text, tool, needle) in cases {
            let (blamed, message) = match parse(&text, &builtin) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(error) => error,
            };
            assert_eq!(blamed.as_deref().unwrap_or(""), tool, "{message}\n{text}");
            assert!(message.contains(needle), "{message:?} should say {needle:?}\n{text}");
        }
    }

    #[test]
    fn errors_read_well() {
        let error = FileError::at(Path::new("/etc/tools.toml"), "x", "the placeholder {b} has no argument");
        assert_eq!(error.to_string(), "tools file /etc/tools.toml: tool `x`: the placeholder {b} has no argument");
    }

    #[cfg(unix)]
    #[test]
    fn programs_must_exist_and_be_executable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("not-executable");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        let spec = |program: &Path| {
            let text = format!(
                "[[tool]]\nname = \"t\"\ndescription = \"d\"\nclass = \"read\"\ncommand = [{:?}]\n",
                program.display().to_string()
            );
            parse(&text, &builtin).expect("valid")
        };
        assert!(check_programs(&spec(Path::new("/bin/sh"))).is_ok());
        let (_, missing) = check_programs(&spec(&dir.path().join("missing"))).expect_err("missing");
        assert!(missing.contains("cannot be used"), "{missing}");
        let (_, mode) = check_programs(&spec(&script)).expect_err("mode");
        assert!(mode.contains("not executable"), "{mode}");
        let (_, directory) = check_programs(&spec(dir.path())).expect_err("dir");
        assert!(directory.contains("not a file"), "{directory}");
    }
}
