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
//!
//! Neither action hands the desktop anything it would run: a caller can write a file through a
//! proposal and then ask to open it, so [`refusal`] (pure, table-tested) refuses a file with an
//! executable bit; a file or directory whose extension is a program, script, installer, shortcut
//! or launcher type, or a page a browser would run scripts in ([`DEFAULT_DENIED`], any case, with
//! trailing dots and spaces ignored as Windows ignores them; a directory with one is a bundle such
//! as `.app`); a file whose first bytes say it is one whatever its name (a `#!` line, an ELF, PE
//! or Mach-O header, a desktop entry, an internet shortcut); and a symlink whose target is any of
//! these. [`LaunchRules`] extends or relaxes the extension list per device. The first bytes are
//! read only to decide; nothing of them is returned.
//! Does not: write files.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protocol::ToolClass;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{to_json, Builtin, Context, Immediate, ToolError};
use crate::scope::{open_regular, ScopedPath};

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

/// Extensions (lowercase, without the dot) of files the actions never hand over, on every
/// platform: programs, scripts, installers and packages, disk images, shortcuts and launchers,
/// macro documents, and pages a browser would run scripts in. A directory with one of them is a
/// bundle (`.app`) and is refused too.
#[rustfmt::skip]
pub const DEFAULT_DENIED: &[&str] = &[
    // Launchers and shortcuts.
    "desktop", "kdelnk", "lnk", "url", "website", "webloc", "inetloc", "fileloc", "appref-ms",
    "settingcontent-ms", "scf", "library-ms", "searchconnector-ms", "application", "jnlp", "xbap",
    // Shell and interpreter scripts.
    "sh", "bash", "zsh", "ksh", "csh", "tcsh", "fish", "command", "tool", "run", "py", "pyw", "pyc", "pyo", "pyz",
    "pyzw", "pl", "pm", "rb", "php", "lua", "tcl", "r", "ps1", "psm1", "ps1xml", "psc1", "bat", "cmd", "btm", "vb",
    "vbs", "vbe", "wsf", "wsh", "ws", "sct", "jar", "class", "scpt", "scptd", "applescript", "osax",
    // Programs and libraries.
    "exe", "com", "scr", "pif", "cpl", "msc", "gadget", "dll", "ocx", "sys", "drv", "xll", "bin", "elf", "out",
    "appimage", "hta", "chm", "hlp", "inf", "ins", "isp", "reg", "shb", "shs", "diagcab",
    // Installers, packages and disk images.
    "msi", "msp", "mst", "msix", "msixbundle", "appx", "appxbundle", "deb", "rpm", "snap", "flatpak", "flatpakref",
    "flatpakrepo", "pkg", "mpkg", "dmg", "iso", "img", "vhd", "vhdx", "mobileconfig", "configprofile",
    // macOS bundles, automation and terminal settings.
    "app", "framework", "bundle", "plugin", "prefpane", "saver", "qlgenerator", "mdimporter", "kext", "xpc",
    "appex", "systemextension", "workflow", "action", "terminal", "wdgt",
    // Office documents with macros.
    "docm", "dotm", "xlsm", "xltm", "xlam", "pptm", "potm", "ppam", "ppsm", "sldm",
    // Pages a browser runs scripts in.
    "html", "htm", "xhtml", "xht", "shtml", "mht", "mhtml", "svg", "svgz", "xsl", "xslt",
];

/// Denied on Windows only, where Windows Script Host runs them; elsewhere they are source files
/// an editor opens.
pub const WINDOWS_DENIED: &[&str] = &["js", "jse"];

/// How many leading bytes of a file are checked for a program or launcher signature.
const HEAD: usize = 512;

/// The extensions the actions refuse on this device: the defaults, plus `--open-deny-ext`,
/// minus `--open-allow-ext`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRules {
    denied: BTreeSet<String>,
    /// Explicitly allowed: also exempt from the content check (an executable bit never is).
    allowed: BTreeSet<String>,
}

impl Default for LaunchRules {
    fn default() -> Self {
        let windows = if cfg!(windows) { WINDOWS_DENIED } else { &[] };
        let denied = DEFAULT_DENIED.iter().chain(windows).map(|ext| (*ext).to_owned()).collect();
        LaunchRules { denied, allowed: BTreeSet::new() }
    }
}

impl LaunchRules {
    /// The defaults with `deny` added and `allow` removed (an extension in both is denied).
    /// Extensions may be given with or without the leading dot, in any case; one that is empty or
    /// holds a separator, a dot, a space or a NUL is an error that names it.
    pub fn new(deny: &[String], allow: &[String]) -> Result<Self, String> {
        let mut rules = LaunchRules::default();
        let allow = allow.iter().map(|ext| normalize_extension(ext)).collect::<Result<Vec<_>, _>>()?;
        let deny = deny.iter().map(|ext| normalize_extension(ext)).collect::<Result<Vec<_>, _>>()?;
        for ext in allow {
            rules.denied.remove(&ext);
            rules.allowed.insert(ext);
        }
        for ext in deny {
            rules.allowed.remove(&ext);
            rules.denied.insert(ext);
        }
        Ok(rules)
    }

    fn denies(&self, ext: &str) -> bool {
        self.denied.contains(ext)
    }

    fn allows(&self, ext: &str) -> bool {
        self.allowed.contains(ext)
    }
}

fn normalize_extension(given: &str) -> Result<String, String> {
    let ext = given.trim().strip_prefix('.').unwrap_or(given.trim()).to_lowercase();
    if ext.is_empty() || ext.contains(['/', '\\', '.', ' ', '\0']) {
        return Err(format!(
            "{given:?} is not a file extension (give one like `html` or `.html`, without dots inside)"
        ));
    }
    Ok(ext)
}

/// The extension that decides a name's type, lowercased: what follows the last dot, once the
/// trailing dots and spaces Windows ignores are dropped (`run.sh.` is a `.sh`; `.sh` alone too).
fn extension_of(name: &str) -> Option<String> {
    let name = name.trim_end_matches(['.', ' ']);
    name.rsplit_once('.').map(|(_, ext)| ext.to_lowercase()).filter(|ext| !ext.is_empty())
}

/// What a path is, as far as launching it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    File,
    Dir,
    /// A FIFO, socket or device.
    Other,
}

/// What an action knows about the path it would hand over.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// The names that decide its type: the name given and, when that is a symlink, the name of
    /// what it leads to.
    pub names: Vec<String>,
    pub kind: TargetKind,
    /// Any executable bit (Unix).
    pub executable: bool,
    /// The file's first bytes (at most 512; empty for a directory).
    pub head: &'a [u8],
}

/// Why the actions refuse to hand `target` to the desktop, or `None` when it is a document or a
/// plain folder.
pub fn refusal(target: &Target<'_>, rules: &LaunchRules) -> Option<String> {
    if target.kind == TargetKind::Other {
        return Some("it is not a regular file or directory".to_owned());
    }
    let extensions: Vec<String> = target.names.iter().filter_map(|name| extension_of(name)).collect();
    if let Some(ext) = extensions.iter().find(|ext| rules.denies(ext)) {
        let what = if target.kind == TargetKind::Dir { "a bundle" } else { "a program, script or launcher type" };
        return Some(format!("`.{ext}` is {what}"));
    }
    if target.kind == TargetKind::Dir {
        return None;
    }
    if target.executable {
        return Some("it has an executable bit".to_owned());
    }
    if extensions.iter().any(|ext| rules.allows(ext)) {
        return None;
    }
    signature(target.head).map(|what| format!("its first bytes are {what}"))
}

/// A program or launcher signature at the start of a file.
fn signature(head: &[u8]) -> Option<&'static str> {
    const MAGIC: [(&[u8], &str); 9] = [
        (b"#!", "a `#!` interpreter line"),
        (b"\x7fELF", "an ELF program header"),
        (b"MZ", "a Windows program header"),
        (&[0xfe, 0xed, 0xfa, 0xce], "a Mach-O program header"),
        (&[0xfe, 0xed, 0xfa, 0xcf], "a Mach-O program header"),
        (&[0xce, 0xfa, 0xed, 0xfe], "a Mach-O program header"),
        (&[0xcf, 0xfa, 0xed, 0xfe], "a Mach-O program header"),
        (&[0xca, 0xfe, 0xba, 0xbe], "a Mach-O universal program or Java class header"),
        (b"\xef\xbb\xbf#!", "a `#!` interpreter line"),
    ];
    const SECTIONS: [(&[u8], &str); 2] =
        [(b"[Desktop Entry]", "a desktop entry (a launcher)"), (b"[InternetShortcut]", "an internet shortcut")];
    if let Some((_, what)) = MAGIC.iter().find(|(magic, _)| head.starts_with(magic)) {
        return Some(what);
    }
    SECTIONS
        .iter()
        .find(|(section, _)| head.windows(section.len()).any(|window| window == *section))
        .map(|(_, what)| *what)
}

/// Looks at `path` beneath its root as [`refusal`] needs: its names (through a final symlink),
/// kind, executable bit and first bytes.
fn check_launchable(ctx: &Context, path: &ScopedPath) -> Result<(), ToolError> {
    let io_error = ctx.io(path);
    let metadata = ctx.scope.metadata(path).map_err(&io_error)?;
    let own = ctx.scope.absolute(path).file_name().map(|name| name.to_string_lossy().into_owned());
    let mut names: Vec<String> = own.into_iter().collect();
    let is_link = ctx.scope.symlink_metadata(path).map_err(&io_error)?.file_type().is_symlink();
    if is_link {
        // Where the link leads, as a path beneath the root (empty for the root itself).
        let target = ctx.scope.root_dir(path).canonicalize(path.beneath()).map_err(&io_error)?;
        let mut root = ctx.scope.absolute(path);
        path.rel().components().for_each(|_| {
            root.pop();
        });
        let name = target.file_name().or(root.file_name()).map(|name| name.to_string_lossy().into_owned());
        names.extend(name);
    }
    let kind = if metadata.is_dir() {
        TargetKind::Dir
    } else if metadata.is_file() {
        TargetKind::File
    } else {
        TargetKind::Other
    };
    let mut head = Vec::with_capacity(HEAD);
    if kind == TargetKind::File {
        let file = open_regular(ctx.scope.root_dir(path), path.beneath()).map_err(&io_error)?;
        file.take(HEAD as u64).read_to_end(&mut head).map_err(&io_error)?;
    }
    let target = Target { names, kind, executable: is_executable(&metadata), head: &head };
    match refusal(&target, ctx.launch) {
        None => Ok(()),
        Some(reason) => Err(ToolError::Refused(format!(
            "{}: refused: {reason}; open_path and reveal_in_os never hand a program, script or launcher to the \
             desktop (a device can relax the extension list with --open-allow-ext)",
            ctx.scope.display(path)
        ))),
    }
}

#[cfg(unix)]
fn is_executable(metadata: &cap_std::fs::Metadata) -> bool {
    use cap_std::fs::MetadataExt;
    metadata.is_file() && metadata.mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_: &cap_std::fs::Metadata) -> bool {
    false
}

/// Checks the path beneath its root (and what the program would get, when that is its parent),
/// refuses launchers, and starts `launcher` on it.
fn act(ctx: &Context, input: &str, launcher: &Launcher) -> Result<String, ToolError> {
    let path = ctx.scope.resolve(input)?;
    check_launchable(ctx, &path)?;
    let parent = path.parent().unwrap_or_else(|| path.clone());
    if launcher.form == PathForm::Parent && parent != path {
        check_launchable(ctx, &parent)?;
    }
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

impl Builtin for OpenPath {
    const NAME: &'static str = "open_path";
    const DESCRIPTION: &'static str = "Open a file or directory on the device with the OS default application. Returns {opened: path}. Programs, scripts, launchers, bundles, web pages and files with an executable bit are refused.";
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

impl Builtin for RevealInOs {
    const NAME: &'static str = "reveal_in_os";
    const DESCRIPTION: &'static str = "Show a file or directory in the device's file manager (Finder, Explorer, or the folder holding it). Returns {revealed: path}. Programs, scripts, launchers, bundles, web pages and files with an executable bit are refused.";
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

    fn target<'a>(names: &[&str], kind: TargetKind, executable: bool, head: &'a [u8]) -> Target<'a> {
        Target { names: names.iter().map(|name| (*name).to_owned()).collect(), kind, executable, head }
    }

    #[test]
    fn launchers_are_refused_documents_are_not() {
        use TargetKind::{Dir, File, Other};
        let rules = LaunchRules::default();
        // (names, kind, executable bit, first bytes, refused?)
        type Case = (&'static [&'static str], TargetKind, bool, &'static [u8], bool);
        let cases: [Case; 29] = [
            (&["plan.pdf"], File, false, b"%PDF-1.7", false),
            (&["notes.txt"], File, false, b"hello", false),
            (&["README"], File, false, b"# Title", false),
            (&["photos"], Dir, false, b"", false),
            (&["v1.2"], Dir, false, b"", false),
            (&[".bashrc"], File, false, b"export A=1", false),
            (&["x.desktop"], File, false, b"", true),
            (&["X.DESKTOP"], File, false, b"", true),
            (&["run.sh"], File, false, b"echo", true),
            (&["run.sh."], File, false, b"echo", true),
            (&["run.sh .. "], File, false, b"echo", true),
            (&[".sh"], File, false, b"", true),
            (&["page.HTML"], File, false, b"<p>", true),
            (&["logo.svg"], File, false, b"<svg>", true),
            (&["setup.exe"], File, false, b"MZ", true),
            (&["a.txt.exe"], File, false, b"", true),
            (&["Tool.app"], Dir, false, b"", true),
            (&["Go.workflow"], Dir, false, b"", true),
            (&["tool"], File, true, b"", true),
            (&["report.pdf"], File, true, b"%PDF", true),
            (&["photos"], Dir, true, b"", false),
            (&["entry"], File, false, b"# c\n[Desktop Entry]\nExec=x", true),
            (&["script"], File, false, b"#!/bin/sh\n", true),
            (&["bom"], File, false, b"\xef\xbb\xbf#!/bin/sh\n", true),
            (&["prog"], File, false, b"\x7fELF\x02", true),
            (&["macho"], File, false, &[0xcf, 0xfa, 0xed, 0xfe, 7], true),
            (&["readme.txt", "run.sh"], File, false, b"", true),
            (&["pipe"], Other, false, b"", true),
            (&["shortcut.txt"], File, false, b"[InternetShortcut]\nURL=file:///x", true),
        ];
        for (names, kind, executable, head, refused) in cases {
            let got = refusal(&target(names, kind, executable, head), &rules);
            assert_eq!(got.is_some(), refused, "{names:?} {kind:?} exec={executable}: {got:?}");
        }
        assert_eq!(refusal(&target(&["app.js"], File, false, b""), &rules).is_some(), cfg!(windows));
    }

    #[test]
    fn rules_extend_and_relax_the_list() {
        let rules = LaunchRules::new(&[".PDF".into(), "md".into()], &["html".into(), ".SH".into()]).expect("rules");
        let file = |name: &'static str, head: &'static [u8]| target(&[name], TargetKind::File, false, head);
        assert!(refusal(&file("plan.pdf", b""), &rules).is_some(), "denied by the device");
        assert!(refusal(&file("Notes.MD", b""), &rules).is_some());
        assert!(refusal(&file("page.html", b"<p>"), &rules).is_none(), "allowed by the device");
        assert!(
            refusal(&file("run.sh", b"#!/bin/sh\n"), &rules).is_none(),
            "an allowed extension skips the content check"
        );
        assert!(
            refusal(&target(&["run.sh"], TargetKind::File, true, b""), &rules).is_some(),
            "never an executable bit"
        );
        assert!(refusal(&file("x.desktop", b""), &rules).is_some(), "the rest of the defaults stay");
        let both = LaunchRules::new(&["html".into()], &["html".into()]).expect("rules");
        assert!(refusal(&file("page.html", b""), &both).is_some(), "deny wins over allow");
        for bad in ["", ".", "tar.gz", "a/b", "a b", "x\\y"] {
            let error = LaunchRules::new(&[bad.into()], &[]).expect_err(bad);
            assert!(error.contains("not a file extension"), "{error}");
        }
        assert_eq!(LaunchRules::new(&[], &[]).expect("rules"), LaunchRules::default());
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
