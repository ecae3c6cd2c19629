//! The actions: open_path (open with the OS default application) and reveal_in_os (show in the
//! file manager).
//!
//! Owns the commands they start: a named program with fixed arguments and, last, the scoped
//! absolute path as the only variable argument, started directly with `std::process::Command`,
//! never through a shell. Defaults: `xdg-open` (reveal: `xdg-open` on the parent directory) on
//! Linux and other Unixes, `open` / `open -R` on macOS, `explorer` / `explorer /select,<path>` on
//! Windows. `FUSION_HOST_OPENER` and `FUSION_HOST_REVEALER` replace the program (which then gets
//! the path as its one argument), for tests and unusual desktops.
//!
//! The path is checked beneath the root handle first (it must exist and stay inside); the
//! program then opens it by name, outside our handles. That gap is accepted: the program shows
//! the file on the local desktop and nothing of it returns to the server.
//! Does not: read or write files.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protocol::ToolClass;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{to_json, Context, Immediate, Tool, ToolError};

/// Names the program open_path starts instead of the platform's opener.
pub const ENV_OPENER: &str = "FUSION_HOST_OPENER";
/// Names the program reveal_in_os starts instead of the platform's file manager.
pub const ENV_REVEALER: &str = "FUSION_HOST_REVEALER";

/// How long an action waits to hear whether its program failed before answering.
const EXIT_WAIT: Duration = Duration::from_secs(3);

/// What the path argument is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathForm {
    /// The path itself.
    Path,
    /// The directory holding it (the path itself for a root).
    Parent,
    /// `/select,<path>`, Explorer's one-argument form.
    SelectFlag,
}

/// A named program, its fixed arguments, and the form of the one path argument it gets last.
#[derive(Debug, Clone)]
pub struct Launcher {
    program: OsString,
    args: Vec<OsString>,
    form: PathForm,
    /// Explorer exits 1 even when it succeeds.
    check_status: bool,
}

impl Launcher {
    /// `program <absolute path>`: the path is the only argument.
    pub fn new(program: impl Into<OsString>) -> Self {
        Launcher { program: program.into(), args: Vec::new(), form: PathForm::Path, check_status: true }
    }

    fn with(program: &str, args: &[&str], form: PathForm) -> Self {
        Launcher { program: program.into(), args: args.iter().map(OsString::from).collect(), form, check_status: true }
    }

    /// The arguments the program would get for `path` (whose parent inside the scope is `parent`).
    pub fn arguments(&self, path: &Path, parent: &Path) -> Vec<OsString> {
        let last = match self.form {
            PathForm::Path => path.as_os_str().to_owned(),
            PathForm::Parent => parent.as_os_str().to_owned(),
            PathForm::SelectFlag => {
                let mut flag = OsString::from("/select,");
                flag.push(path.as_os_str());
                flag
            }
        };
        self.args.iter().cloned().chain(std::iter::once(last)).collect()
    }

    fn launch(&self, path: &Path, parent: &Path) -> Result<(), ToolError> {
        let program = Path::new(&self.program).display().to_string();
        let mut child = Command::new(&self.program)
            .args(self.arguments(path, parent))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| ToolError::Refused(format!("cannot start {program}: {error}")))?;
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() || !self.check_status => return Ok(()),
                Ok(Some(status)) => return Err(ToolError::Refused(format!("{program} failed ({status})"))),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                // Still running (an opener that stays in the foreground): reap it in the background.
                Ok(None) | Err(_) => {
                    std::thread::spawn(move || child.wait());
                    return Ok(());
                }
            }
        }
    }
}

/// The programs the two actions start.
#[derive(Debug, Clone)]
pub struct Commands {
    pub open: Launcher,
    pub reveal: Launcher,
}

impl Commands {
    /// The platform's defaults, each replaced by [`ENV_OPENER`] / [`ENV_REVEALER`] when set.
    pub fn from_env() -> Self {
        Self::from_values(std::env::var_os(ENV_OPENER), std::env::var_os(ENV_REVEALER))
    }

    /// The platform's defaults, each replaced by a program when given (and not empty).
    pub fn from_values(opener: Option<OsString>, revealer: Option<OsString>) -> Self {
        let defaults = Self::platform();
        let pick = |program: Option<OsString>, default| match program {
            Some(program) if !program.is_empty() => Launcher::new(program),
            _ => default,
        };
        Commands { open: pick(opener, defaults.open), reveal: pick(revealer, defaults.reveal) }
    }

    /// The platform's opener and file manager.
    pub fn platform() -> Self {
        if cfg!(target_os = "macos") {
            Commands {
                open: Launcher::with("open", &[], PathForm::Path),
                reveal: Launcher::with("open", &["-R"], PathForm::Path),
            }
        } else if cfg!(windows) {
            Commands {
                open: Launcher { check_status: false, ..Launcher::with("explorer", &[], PathForm::Path) },
                reveal: Launcher { check_status: false, ..Launcher::with("explorer", &[], PathForm::SelectFlag) },
            }
        } else {
            Commands {
                open: Launcher::with("xdg-open", &[], PathForm::Path),
                reveal: Launcher::with("xdg-open", &[], PathForm::Parent),
            }
        }
    }
}

/// Checks the path beneath its root and starts `launcher` on it.
fn act(ctx: &Context, input: &str, launcher: &Launcher) -> Result<String, ToolError> {
    let path = ctx.scope.resolve(input)?;
    ctx.scope.metadata(&path).map_err(ctx.io(&path))?;
    let parent = path.parent().unwrap_or_else(|| path.clone());
    launcher.launch(&ctx.scope.absolute(&path), &ctx.scope.absolute(&parent))?;
    Ok(ctx.scope.display(&path))
}

/// Open a file or directory with the OS default application.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenPath {
    /// The file or directory: relative to the first root, or absolute inside a root.
    pub path: String,
}

#[derive(Serialize)]
struct Opened {
    opened: String,
}

impl Tool for OpenPath {
    const NAME: &'static str = "open_path";
    const DESCRIPTION: &'static str =
        "Open a file or directory on the device with the OS default application. Returns {opened: path}.";
}

impl Immediate for OpenPath {
    const CLASS: ToolClass = ToolClass::Action;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let opened = act(ctx, &self.path, &ctx.commands.open)?;
        to_json(&Opened { opened })
    }
}

/// Show a file or directory in the OS file manager.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevealInOs {
    /// The file or directory: relative to the first root, or absolute inside a root.
    pub path: String,
}

#[derive(Serialize)]
struct Revealed {
    revealed: String,
}

impl Tool for RevealInOs {
    const NAME: &'static str = "reveal_in_os";
    const DESCRIPTION: &'static str =
        "Show a file or directory in the device's file manager (Finder, Explorer, or the folder holding it). Returns {revealed: path}.";
}

impl Immediate for RevealInOs {
    const CLASS: ToolClass = ToolClass::Action;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let revealed = act(ctx, &self.path, &ctx.commands.reveal)?;
        to_json(&Revealed { revealed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_is_the_last_and_only_variable_argument() {
        let (path, parent) = (Path::new("/r/a b;c"), Path::new("/r"));
        assert_eq!(Launcher::new("opener").arguments(path, parent), vec![OsString::from("/r/a b;c")]);
        let reveal = Launcher::with("explorer", &[], PathForm::SelectFlag);
        assert_eq!(reveal.arguments(path, parent), vec![OsString::from("/select,/r/a b;c")]);
        let finder = Launcher::with("open", &["-R"], PathForm::Path);
        assert_eq!(finder.arguments(path, parent), vec![OsString::from("-R"), OsString::from("/r/a b;c")]);
        assert_eq!(
            Launcher::with("xdg-open", &[], PathForm::Parent).arguments(path, parent),
            vec![OsString::from("/r")]
        );
    }

    #[test]
    fn overrides_replace_the_program() {
        let commands = Commands::from_values(Some("/bin/true".into()), None);
        assert_eq!(commands.open.program, OsString::from("/bin/true"));
        assert_eq!(commands.reveal.program, Commands::platform().reveal.program);
        let empty = Commands::from_values(Some(OsString::new()), None);
        assert_eq!(empty.open.program, Commands::platform().open.program);
    }
}
