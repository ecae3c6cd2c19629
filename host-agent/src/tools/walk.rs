//! Bounded, deterministic walks over a directory tree, entirely through directory handles.
//!
//! Owns: visiting the entries below a base `Dir` depth-first, each directory's entries in name
//! order; never following a symlink (it is reported as one); skipping device names on Windows (see
//! [`crate::scope::is_reserved_here`]), as every tool does; bounding the work by a visit budget
//! and a depth limit, and saying when a bound cut the walk short; stopping with [`Expired`] once
//! the call's deadline has passed (checked at every entry, and while reading a large directory).
//!
//! Why not the `ignore` crate's walker: it walks by ambient path strings, so a directory swapped
//! for a symlink between two steps would lead it out of the root. Here each directory is opened
//! from its parent's handle by a single name (cap-std refuses a name that resolves outside that
//! parent), and its entries are then opened from its own handle, so a swap mid-walk cannot escape.
//!
//! Does not: decide what to do with entries (the tools), or resolve input paths (`crate::scope`).

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use cap_std::fs::{Dir, FileType, Metadata};

use super::deadline::{is_expired, Deadline, Expired};
use crate::scope::is_reserved_here;

/// Directories deeper than this below the base are not entered (bounds open handles).
pub const MAX_DEPTH: usize = 256;
/// While reading one directory's entries, the deadline is checked every this many.
const DEADLINE_EVERY: usize = 256;

/// What an entry is, as the tools report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device: never opened for content.
    Other,
}

impl Kind {
    pub fn of(file_type: FileType) -> Kind {
        if file_type.is_symlink() {
            Kind::Symlink
        } else if file_type.is_dir() {
            Kind::Dir
        } else if file_type.is_file() {
            Kind::File
        } else {
            Kind::Other
        }
    }

    /// The `type` field of the contract: `file`, `dir` or `symlink` (special files count as files).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File | Kind::Other => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
        }
    }
}

/// One entry met by a walk.
pub struct Entry<'a> {
    /// The handle of the directory that holds the entry: open the entry from it by `name`.
    pub dir: &'a Dir,
    pub name: &'a OsStr,
    /// The path relative to the walk's base.
    pub rel: &'a Path,
    pub kind: Kind,
}

impl Entry<'_> {
    /// The entry's own metadata (a symlink is described, not followed).
    pub fn metadata(&self) -> io::Result<Metadata> {
        self.dir.symlink_metadata(self.name)
    }

    /// The relative path with `/` separators, as globs match it.
    pub fn rel_slash(&self) -> String {
        slash_path(self.rel)
    }
}

/// A relative path with `/` separators on every platform.
pub fn slash_path(path: &Path) -> String {
    path.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// What the visitor wants next.
pub enum Flow {
    Continue,
    Stop,
}

/// Bounds of one walk.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries deeper than this are not visited (1: the base's children only).
    pub max_depth: usize,
    /// At most this many entries are visited.
    pub max_visits: usize,
    /// The walk stops with [`Expired`] once this has passed.
    pub deadline: Deadline,
}

/// How a walk ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Walked {
    pub visited: usize,
    /// The visit budget or the depth cap cut the walk short.
    pub cut: bool,
    /// Directories that could not be read (permissions, a swap mid-walk) and were skipped.
    pub unreadable: usize,
}

struct Frame {
    dir: Dir,
    rel: PathBuf,
    depth: usize,
    entries: std::vec::IntoIter<(OsString, Kind)>,
}

/// Walks the tree below `base`, calling `visit` for every entry in depth-first, name order.
/// An error reading `base` itself goes through `base_error`; unreadable directories below it are
/// skipped and counted; an error from `visit` stops the walk and is returned, and so does the
/// deadline once it has passed.
pub fn walk<E: From<Expired>>(
    base: Dir,
    limits: Limits,
    base_error: impl FnOnce(io::Error) -> E,
    mut visit: impl FnMut(&Entry<'_>) -> Result<Flow, E>,
) -> Result<Walked, E> {
    let mut walked = Walked::default();
    let entries = match read_entries(&base, limits.max_visits.saturating_add(1), limits.deadline) {
        Err(error) if is_expired(&error) => return Err(Expired.into()),
        read => read.map_err(base_error)?,
    };
    let mut stack = vec![Frame { dir: base, rel: PathBuf::new(), depth: 1, entries: entries.into_iter() }];
    while let Some(frame) = stack.last_mut() {
        let Some((name, kind)) = frame.entries.next() else {
            stack.pop();
            continue;
        };
        if walked.visited >= limits.max_visits {
            walked.cut = true;
            break;
        }
        limits.deadline.check()?;
        walked.visited += 1;
        let rel = frame.rel.join(&name);
        let entry = Entry { dir: &frame.dir, name: &name, rel: &rel, kind };
        match visit(&entry) {
            Err(error) => return Err(error),
            Ok(Flow::Stop) => break,
            Ok(Flow::Continue) => {}
        }
        if kind != Kind::Dir || frame.depth >= limits.max_depth {
            continue;
        }
        if frame.depth >= MAX_DEPTH {
            walked.cut = true;
            continue;
        }
        // One name, resolved beneath the parent's handle: a symlink swapped in here is followed
        // only if it stays inside that directory, so the walk cannot leave the tree.
        let child = frame.dir.open_dir(&name).and_then(|dir| {
            let budget = limits.max_visits.saturating_sub(walked.visited).saturating_add(1);
            read_entries(&dir, budget, limits.deadline).map(|entries| (dir, entries))
        });
        match child {
            Ok((dir, entries)) => {
                let depth = frame.depth + 1;
                stack.push(Frame { dir, rel, depth, entries: entries.into_iter() });
            }
            Err(error) if is_expired(&error) => return Err(Expired.into()),
            Err(_) => walked.unreadable += 1,
        }
    }
    Ok(walked)
}

/// A directory's entries (at most `limit` of them) sorted by name, with their kinds. The kind comes
/// from the directory entry itself, or from an lstat where the filesystem does not say. Fails
/// with [`Expired`] (in the `io::Error`) once `deadline` has passed.
fn read_entries(dir: &Dir, limit: usize, deadline: Deadline) -> io::Result<Vec<(OsString, Kind)>> {
    let mut entries = Vec::new();
    for entry in dir.entries()? {
        if entries.len() >= limit {
            break;
        }
        if entries.len() % DEADLINE_EVERY == 0 {
            deadline.check()?;
        }
        let entry = entry?;
        let name = entry.file_name();
        if is_reserved_here(&name) {
            continue;
        }
        let file_type = entry.file_type()?;
        let mut kind = Kind::of(file_type);
        if kind == Kind::Other && !is_special(file_type) {
            kind = match dir.symlink_metadata(&name) {
                Ok(metadata) => Kind::of(metadata.file_type()),
                Err(_) => continue,
            };
        }
        entries.push((name, kind));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

#[cfg(unix)]
fn is_special(file_type: FileType) -> bool {
    use cap_std::fs::FileTypeExt;
    file_type.is_fifo() || file_type.is_socket() || file_type.is_block_device() || file_type.is_char_device()
}

#[cfg(not(unix))]
fn is_special(_: FileType) -> bool {
    false
}
