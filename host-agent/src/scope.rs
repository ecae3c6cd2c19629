//! The scope: the allowed roots, opened once as directory handles, and the one way a path string
//! from a tool call becomes something a tool may touch.
//!
//! Owns: refusing path input (empty, NUL bytes, Windows drive, UNC and `\\?\` forms, reserved
//! device names on Windows, `..` above a root, absolute paths outside every root); mapping an accepted
//! path to a root and a normalized relative path ([`ScopedPath`]); and opening files and directories
//! beneath the root handles with cap-std. Ambient authority is used only to open the roots; every
//! later access resolves beneath a root handle (openat2 `RESOLVE_BENEATH` on Linux, an equivalent
//! manual resolution elsewhere), so `..`, absolute symlinks, symlinks out of the root and symlinks
//! swapped in between a check and a use all fail instead of escaping.
//!
//! Hard links cannot be told apart from the file they name: a link inside a root may name a file
//! that also lives outside every root. So the content of a regular file with more than one link
//! is not read ([`Scope::open_file`], [`Scope::open_entry`] refuse it with [`MultiplyLinked`])
//! unless the device allows it ([`Scope::allow_hardlinked_reads`]); its metadata may still be
//! reported. The link count is known on Unix; elsewhere every file counts as singly linked.
//!
//! Path rules, the same on every platform so a device behaves alike wherever it runs:
//! - `/` and `\` are both separators; `.` and empty components are dropped; `..` pops one component
//!   lexically and may not climb above the root.
//! - A relative path is taken relative to the first root; an absolute one is accepted only when it
//!   lies lexically under a root (as given, or its canonical form), and is made relative to it.
//! - Drive-letter prefixes are accepted only on Windows, and only as `X:\…` absolute paths.
//! - Windows device names (`NUL`, `COM1.txt`, ...) are refused on Windows, where they name devices
//!   in every directory, and walks there skip entries so named ([`is_reserved_here`]); on other
//!   systems they are ordinary names, the same in every tool.
//!
//! Does not: know tools, inputs or outputs (`tools/`), or walk trees (`tools/walk.rs`).

use std::ffi::OsStr;
use std::io;
use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, File, Metadata, OpenOptions};

/// Why a root could not be opened or a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("no roots are configured")]
    NoRoots,
    #[error("root {path} cannot be opened: {source}")]
    RootUnavailable {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("root {path} is not a directory")]
    RootNotDirectory { path: String },
    #[error("the path is empty (use \".\" for the first root)")]
    EmptyPath,
    #[error("{path:?}: a path may not contain a NUL byte")]
    NulByte { path: String },
    #[error("{path:?}: Windows drive, UNC and device paths are refused")]
    WindowsPrefix { path: String },
    #[error("{path:?}: `{name}` is a reserved device name on Windows and is refused")]
    ReservedName { path: String, name: String },
    #[error("{path:?} is outside the allowed roots ({roots})")]
    OutsideRoots { path: String, roots: String },
}

/// A path inside the scope: which root, and a normalized path relative to it (empty for the root
/// itself; never `.`, `..`, a prefix or a root component).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScopedPath {
    root: usize,
    rel: PathBuf,
}

impl ScopedPath {
    /// Index of the root in the order the roots were given.
    pub fn root(&self) -> usize {
        self.root
    }

    /// The path relative to its root; empty for the root itself.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// The relative path in the form cap-std takes: `.` for the root itself.
    pub fn beneath(&self) -> &Path {
        if self.rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &self.rel
        }
    }

    pub fn is_root(&self) -> bool {
        self.rel.as_os_str().is_empty()
    }

    /// The last component, or `None` for the root itself.
    pub fn name(&self) -> Option<&OsStr> {
        self.rel.file_name()
    }

    /// The parent directory, or `None` for the root itself.
    pub fn parent(&self) -> Option<ScopedPath> {
        let parent = self.rel.parent()?;
        Some(ScopedPath { root: self.root, rel: parent.to_path_buf() })
    }

    /// A path below this one. `rel` must hold normal components only (as a walk yields them).
    pub fn join(&self, rel: &Path) -> ScopedPath {
        ScopedPath { root: self.root, rel: self.rel.join(rel) }
    }

    /// True when `other` is this path or lies beneath it (same root, lexically).
    pub fn contains(&self, other: &ScopedPath) -> bool {
        self.root == other.root && other.rel.starts_with(&self.rel)
    }
}

struct Root {
    /// The root as given, made absolute: what users see and what output paths start with.
    display: PathBuf,
    /// Absolute forms an input path may start with (as given, and canonical), as components.
    aliases: Vec<Vec<String>>,
    dir: Dir,
}

/// The allowed roots, each held open as a directory handle. `Send + Sync`.
pub struct Scope {
    roots: Vec<Root>,
    /// Whether the content of a regular file with more than one hard link may be read.
    hardlinked_reads: bool,
}

/// A regular file whose content is not read because it has more than one hard link: another
/// of its names may lie outside the allowed roots. Carried inside an `io::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "refused: it has {links} hard links and another of them may lie outside the allowed roots, so its content \
     is not read (start the agent with --allow-hardlinked-reads to read such files)"
)]
pub struct MultiplyLinked {
    pub links: u64,
}

impl From<MultiplyLinked> for io::Error {
    fn from(linked: MultiplyLinked) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, linked)
    }
}

/// The link count of an I/O error that is a [`MultiplyLinked`] refusal.
pub fn multiply_linked(error: &io::Error) -> Option<u64> {
    error.get_ref().and_then(|inner| inner.downcast_ref::<MultiplyLinked>()).map(|linked| linked.links)
}

/// Which file a handle or a name refers to, and how many names it has: enough to tell that a name
/// still names the file a handle was opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub device: u64,
    pub inode: u64,
    pub links: u64,
}

impl FileId {
    /// The identity in `metadata`. Where the platform does not say (not Unix), every file is
    /// `0/0` with one link.
    pub fn of(metadata: &Metadata) -> FileId {
        #[cfg(unix)]
        {
            use cap_std::fs::MetadataExt;
            FileId { device: metadata.dev(), inode: metadata.ino(), links: metadata.nlink() }
        }
        #[cfg(not(unix))]
        {
            let _ = metadata;
            FileId { device: 0, inode: 0, links: 1 }
        }
    }

    /// The same file (the link counts may differ, read at different moments).
    pub fn same_file(&self, other: &FileId) -> bool {
        (self.device, self.inode) == (other.device, other.inode)
    }
}

/// How many hard links name the file `metadata` describes; 1 where the platform does not say.
pub fn link_count(metadata: &Metadata) -> u64 {
    FileId::of(metadata).links
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope").field("roots", &self.roots_display()).finish()
    }
}

impl Scope {
    /// Opens each root as a directory handle: the only use of ambient authority in the tools.
    pub fn open(roots: &[PathBuf]) -> Result<Self, ScopeError> {
        if roots.is_empty() {
            return Err(ScopeError::NoRoots);
        }
        let roots = roots.iter().map(|path| open_root(path)).collect::<Result<Vec<_>, _>>()?;
        Ok(Scope { roots, hardlinked_reads: false })
    }

    /// Allows (or, the default, refuses) reading the content of regular files with more than one
    /// hard link.
    pub fn allow_hardlinked_reads(mut self, allow: bool) -> Self {
        self.hardlinked_reads = allow;
        self
    }

    /// Whether the content of multiply-linked files is read.
    pub fn reads_hardlinked(&self) -> bool {
        self.hardlinked_reads
    }

    /// True when a file with this metadata is a regular file whose content is not to be read.
    pub fn is_unreadable_link(&self, metadata: &Metadata) -> bool {
        !self.hardlinked_reads && metadata.is_file() && link_count(metadata) > 1
    }

    /// Refuses, on the open handle itself, a file whose content is not to be read.
    fn readable(&self, file: File) -> io::Result<File> {
        let metadata = file.metadata()?;
        if self.is_unreadable_link(&metadata) {
            return Err(MultiplyLinked { links: link_count(&metadata) }.into());
        }
        Ok(file)
    }

    /// The roots in display form, in the order given.
    pub fn roots_display(&self) -> Vec<String> {
        self.roots.iter().map(|root| root.display.to_string_lossy().into_owned()).collect()
    }

    /// Parses a path from a tool call and places it in the scope, or refuses it.
    pub fn resolve(&self, input: &str) -> Result<ScopedPath, ScopeError> {
        match parse_path(input)? {
            Parsed::Relative(components) => Ok(ScopedPath { root: 0, rel: components.iter().collect() }),
            Parsed::Absolute(components) => self
                .roots
                .iter()
                .enumerate()
                .flat_map(|(index, root)| root.aliases.iter().map(move |alias| (index, alias)))
                .filter(|(_, alias)| starts_with_components(&components, alias))
                .max_by_key(|(_, alias)| alias.len())
                .map(|(index, alias)| ScopedPath { root: index, rel: components[alias.len()..].iter().collect() })
                .ok_or_else(|| self.outside(input)),
        }
    }

    fn outside(&self, input: &str) -> ScopeError {
        ScopeError::OutsideRoots { path: input.to_owned(), roots: self.roots_display().join(", ") }
    }

    /// The absolute display form of a scoped path: its root's display path joined with it.
    pub fn display(&self, path: &ScopedPath) -> String {
        self.absolute(path).to_string_lossy().into_owned()
    }

    /// The absolute path of a scoped path, for handing to another program (an opener). Everything
    /// in this crate itself goes through the handles instead.
    pub fn absolute(&self, path: &ScopedPath) -> PathBuf {
        let root = &self.roots[path.root].display;
        if path.is_root() {
            root.clone()
        } else {
            root.join(&path.rel)
        }
    }

    /// The handle of the root a path lies in.
    pub fn root_dir(&self, path: &ScopedPath) -> &Dir {
        &self.roots[path.root].dir
    }

    /// Opens a regular file to read its content beneath its root, following symlinks only while
    /// they stay inside (see [`open_regular`]); refuses a multiply-linked file unless allowed.
    pub fn open_file(&self, path: &ScopedPath) -> io::Result<File> {
        self.readable(open_regular(self.root_dir(path), path.beneath())?)
    }

    /// Opens the file `name` of a directory met in a walk to read its content, by the same rules
    /// as [`Scope::open_file`].
    pub fn open_entry(&self, dir: &Dir, name: &Path) -> io::Result<File> {
        self.readable(open_regular(dir, name)?)
    }

    /// Opens a directory beneath its root (the root itself for an empty relative path).
    pub fn open_dir(&self, path: &ScopedPath) -> io::Result<Dir> {
        let root = self.root_dir(path);
        if path.is_root() {
            root.try_clone()
        } else {
            root.open_dir(&path.rel)
        }
    }

    /// Metadata of the path itself: a final symlink is described, not followed.
    pub fn symlink_metadata(&self, path: &ScopedPath) -> io::Result<Metadata> {
        let root = self.root_dir(path);
        if path.is_root() {
            root.dir_metadata()
        } else {
            root.symlink_metadata(&path.rel)
        }
    }

    /// Metadata of what the path names, following symlinks only while they stay inside.
    pub fn metadata(&self, path: &ScopedPath) -> io::Result<Metadata> {
        let root = self.root_dir(path);
        if path.is_root() {
            root.dir_metadata()
        } else {
            root.metadata(&path.rel)
        }
    }

    /// Opens the parent directory of a path beneath its root, with the final component's name:
    /// mutations act on `(parent, name)` so nothing but that one name is resolved again.
    pub fn open_parent(&self, path: &ScopedPath) -> io::Result<(Dir, std::ffi::OsString)> {
        match (path.parent(), path.name()) {
            (Some(parent), Some(name)) => Ok((self.open_dir(&parent)?, name.to_os_string())),
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "the root itself cannot be changed")),
        }
    }
}

fn open_root(path: &Path) -> Result<Root, ScopeError> {
    let shown = path.to_string_lossy().into_owned();
    let unavailable = |source| ScopeError::RootUnavailable { path: shown.clone(), source };
    let mut display = std::path::absolute(path).map_err(unavailable)?;
    if display.components().any(|component| component == Component::ParentDir) {
        // `../x` as given: show where it really is rather than a path with `..` in it.
        display = strip_verbatim(std::fs::canonicalize(&display).map_err(unavailable)?);
    }
    let metadata = std::fs::metadata(&display).map_err(unavailable)?;
    if !metadata.is_dir() {
        return Err(ScopeError::RootNotDirectory { path: shown });
    }
    let dir = Dir::open_ambient_dir(&display, ambient_authority()).map_err(unavailable)?;
    let mut aliases = vec![path_components(&display)];
    if let Ok(canonical) = std::fs::canonicalize(&display) {
        let canonical = path_components(&strip_verbatim(canonical));
        if !aliases.contains(&canonical) {
            aliases.push(canonical);
        }
    }
    Ok(Root { display, aliases, dir })
}

/// `\\?\C:\x` → `C:\x`: the form `canonicalize` returns on Windows, and the one users type.
fn strip_verbatim(path: PathBuf) -> PathBuf {
    match path.to_str().and_then(|text| text.strip_prefix(r"\\?\")) {
        Some(rest) if rest.as_bytes().get(1) == Some(&b':') => PathBuf::from(rest),
        _ => path,
    }
}

/// An absolute OS path as the comparable components [`parse_path`] produces: the drive (`c:`) on
/// Windows, then the normal components. `..` is resolved lexically.
fn path_components(path: &Path) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for component in path.components() {
        match component {
            Component::Prefix(prefix) => out.push(prefix.as_os_str().to_string_lossy().to_ascii_lowercase()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name.to_string_lossy().into_owned()),
        }
    }
    out
}

fn starts_with_components(path: &[String], prefix: &[String]) -> bool {
    path.len() >= prefix.len() && path.iter().zip(prefix).all(|(a, b)| same_component(a, b))
}

fn same_component(a: &str, b: &str) -> bool {
    if cfg!(windows) {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// A path string checked and split, before it is placed under a root.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Relative(Vec<String>),
    /// Components of an absolute path; on Windows the first is the lowercased drive (`c:`).
    Absolute(Vec<String>),
}

fn is_separator(c: char) -> bool {
    c == '/' || c == '\\'
}

/// Checks and splits a path string. Pure: the refusal rules live here and are table-tested.
fn parse_path(input: &str) -> Result<Parsed, ScopeError> {
    let refuse_prefix = || ScopeError::WindowsPrefix { path: input.to_owned() };
    if input.is_empty() {
        return Err(ScopeError::EmptyPath);
    }
    if input.contains('\0') {
        return Err(ScopeError::NulByte { path: input.to_owned() });
    }
    let mut chars = input.chars();
    let (first, second, third) = (chars.next(), chars.next(), chars.next());
    // `\\server\share`, `\\?\…`, `\\.\…`, and their forward-slash spellings.
    if first.is_some_and(is_separator) && second.is_some_and(is_separator) {
        return Err(refuse_prefix());
    }
    let has_drive = first.is_some_and(|c| c.is_ascii_alphabetic()) && second == Some(':');
    let (drive, rest, absolute) = if has_drive {
        // `C:\x` is absolute on Windows; `C:x` is relative to a per-drive directory: refused.
        if !cfg!(windows) || !third.is_some_and(is_separator) {
            return Err(refuse_prefix());
        }
        (Some(input[..2].to_ascii_lowercase()), &input[2..], true)
    } else {
        (None, input, first.is_some_and(is_separator))
    };
    if cfg!(windows) && absolute && drive.is_none() {
        // `\x` means "on the current drive": ambiguous, refused.
        return Err(refuse_prefix());
    }
    let mut components: Vec<String> = drive.into_iter().collect();
    let floor = components.len();
    for part in rest.split(is_separator) {
        match part {
            "" | "." => {}
            ".." => {
                if components.len() == floor {
                    return Err(ScopeError::OutsideRoots {
                        path: input.to_owned(),
                        roots: "`..` climbs above the root".to_owned(),
                    });
                }
                components.pop();
            }
            name => {
                if let Some(reserved) = reserved_device_name(name).filter(|_| cfg!(windows)) {
                    return Err(ScopeError::ReservedName { path: input.to_owned(), name: reserved.to_owned() });
                }
                if cfg!(windows) && name.contains(':') {
                    // Alternate data streams (`file:stream`).
                    return Err(refuse_prefix());
                }
                components.push(name.to_owned());
            }
        }
    }
    Ok(if absolute { Parsed::Absolute(components) } else { Parsed::Relative(components) })
}

/// True when `name` is a device on this system rather than a file: a reserved name, on Windows
/// only. Walks skip such entries, as path input refuses them.
pub fn is_reserved_here(name: &OsStr) -> bool {
    cfg!(windows) && reserved_device_name(&name.to_string_lossy()).is_some()
}

/// Windows treats these names as devices in every directory, with any extension and trailing
/// dots or spaces (`nul.txt`, `COM1 .log`). The rule itself, the same on every system; it is
/// applied on Windows only.
fn reserved_device_name(component: &str) -> Option<&str> {
    const NAMES: [&str; 6] = ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"];
    let stem = component.split('.').next().unwrap_or(component).trim_end_matches([' ', '.']);
    let upper = stem.to_ascii_uppercase();
    let numbered = ["COM", "LPT"].iter().any(|prefix| {
        upper.strip_prefix(prefix).is_some_and(|digit| {
            matches!(digit, "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7" | "8" | "9" | "¹" | "²" | "³")
        })
    });
    (numbered || NAMES.contains(&upper.as_str())).then_some(stem)
}

/// Opens a regular file for reading beneath `dir`. The open does not block (a FIFO swapped in
/// cannot hang the call), and anything but a regular file (a directory, FIFO, socket, device) is
/// refused after the open, on the handle itself, so no check-then-use gap is left.
pub fn open_regular(dir: &Dir, path: &Path) -> io::Result<File> {
    open_checked(dir, path, OpenOptions::new().read(true))
}

/// Opens a regular file beneath `dir` with `options`, without blocking, refusing anything but a
/// regular file once it is open (see [`open_regular`]).
pub fn open_checked(dir: &Dir, path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    #[cfg(unix)]
    {
        use cap_std::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = dir.open_with(path, options)?;
    let file_type = file.metadata()?.file_type();
    if file_type.is_dir() {
        Err(io::Error::new(io::ErrorKind::IsADirectory, "is a directory"))
    } else if !file_type.is_file() {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "is not a regular file"))
    } else {
        Ok(file)
    }
}

/// True when an I/O error is cap-std refusing a resolution that would leave the root.
pub fn is_escape(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::PermissionDenied
        && error.get_ref().is_some_and(|inner| inner.to_string().contains("outside of the filesystem"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(parts: &[&str]) -> Result<Parsed, String> {
        Ok(Parsed::Relative(parts.iter().map(|p| p.to_string()).collect()))
    }

    fn parse(input: &str) -> Result<Parsed, String> {
        parse_path(input).map_err(|e| e.to_string())
    }

    #[test]
    fn relative_paths_are_normalized() {
        assert_eq!(parse("a/b"), rel(&["a", "b"]));
        assert_eq!(parse("./a//b/."), rel(&["a", "b"]));
        assert_eq!(parse("a\\b"), rel(&["a", "b"]));
        assert_eq!(parse("a/../b"), rel(&["b"]));
        assert_eq!(parse("."), rel(&[]));
        assert_eq!(parse("%2e%2e%2f"), rel(&["%2e%2e%2f"]));
        assert_eq!(parse("ab:c"), rel(&["ab:c"]));
    }

    #[test]
    fn refusals() {
        let refused = [
            "",
            "..",
            "../x",
            "a/../../x",
            "..\\x",
            "a\\..\\..\\x",
            "x\0y",
            "\\\\server\\share\\x",
            "//server/share/x",
            "\\\\?\\C:\\x",
            "\\\\.\\pipe\\x",
            "C:x",
            "c:..\\x",
            "a:b",
        ];
        for input in refused {
            assert!(parse_path(input).is_err(), "{input:?} should be refused");
        }
        // Device names: refused on Windows, ordinary names elsewhere.
        for input in ["NUL", "con.txt", "a/COM1/b", "lpt9.log", "Aux .txt", "CONIN$"] {
            assert_eq!(parse_path(input).is_err(), cfg!(windows), "{input:?}");
        }
        if !cfg!(windows) {
            assert_eq!(parse("nul"), rel(&["nul"]));
        }
        assert_eq!(is_reserved_here(OsStr::new("COM1.txt")), cfg!(windows));
        assert!(!is_reserved_here(OsStr::new("notes.txt")));
        #[cfg(not(windows))]
        assert!(parse_path("C:\\Windows\\win.ini").is_err());
    }

    #[test]
    fn reserved_names_are_exact() {
        assert_eq!(reserved_device_name("nul"), Some("nul"));
        assert_eq!(reserved_device_name("COM3.txt"), Some("COM3"));
        assert_eq!(reserved_device_name("console"), None);
        assert_eq!(reserved_device_name("COM10"), None);
        assert_eq!(reserved_device_name("nullable"), None);
        assert_eq!(reserved_device_name("LPT"), None);
    }

    #[cfg(unix)]
    #[test]
    fn absolute_paths_map_to_their_root() {
        let base = tempfile::tempdir().expect("tempdir");
        let one = base.path().join("one");
        let two = base.path().join("one-two");
        std::fs::create_dir_all(&one).expect("mkdir");
        std::fs::create_dir_all(&two).expect("mkdir");
        let scope = Scope::open(&[one.clone(), two.clone()]).expect("scope");
        let inside = scope.resolve(&format!("{}/a/b", one.display())).expect("inside");
        assert_eq!((inside.root(), inside.rel()), (0, Path::new("a/b")));
        let second = scope.resolve(&format!("{}/x", two.display())).expect("second root");
        assert_eq!((second.root(), second.rel()), (1, Path::new("x")));
        let itself = scope.resolve(&one.display().to_string()).expect("root");
        assert!(itself.is_root());
        assert!(scope.resolve(&format!("{}/../x", one.display())).is_err());
        assert!(scope.resolve(&format!("{}/x", base.path().display())).is_err());
        assert!(scope.resolve("/etc/passwd").is_err());
        assert_eq!(scope.display(&inside), format!("{}/a/b", one.display()));
    }

    #[cfg(unix)]
    #[test]
    fn a_root_given_with_dot_dot_is_shown_resolved() {
        let base = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(base.path().join("one")).expect("mkdir");
        std::fs::create_dir_all(base.path().join("two")).expect("mkdir");
        let scope = Scope::open(&[base.path().join("one/../two")]).expect("scope");
        let shown = std::fs::canonicalize(base.path().join("two")).expect("canonical");
        assert_eq!(scope.roots_display(), vec![shown.display().to_string()]);
        assert!(scope.resolve(&format!("{}/x", shown.display())).is_ok());
    }

    #[test]
    fn missing_or_file_roots_are_errors() {
        let base = tempfile::tempdir().expect("tempdir");
        let file = base.path().join("f");
        std::fs::write(&file, "x").expect("write");
        assert!(matches!(Scope::open(&[file]), Err(ScopeError::RootNotDirectory { .. })));
        assert!(matches!(Scope::open(&[base.path().join("missing")]), Err(ScopeError::RootUnavailable { .. })));
        assert!(matches!(Scope::open(&[]), Err(ScopeError::NoRoots)));
    }
}
