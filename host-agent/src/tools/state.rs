//! What a proposal promises and its apply verifies: the observed state of each target (its content
//! hash, a digest of its tree listing, or its absence), and the helpers that compute it: content
//! hashing, tree digests and unified diffs.
//!
//! Owns: the `preconditions` JSON of a plan (`{target?, source?, destination?}`, each
//! `{path, type, sha256?, size?, entries?, links?, identity?}`), comparing a fresh observation
//! with it, and saying what changed. A file with more than one hard link whose content the scope
//! does not read is observed by its metadata only (`type: "hardlinked"`). Does not: decide what a
//! mutation does (`edit`, `tree`).

use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::deadline::Watched;
use super::walk::{self, Flow, Kind, Limits};
use super::{Context, ToolError};
use crate::scope::{link_count, ScopedPath};

/// Trees with more entries than this are not proposed for move, copy or delete.
pub const TREE_LIMIT: usize = 1_000_000;
/// Texts larger than this get no diff (and a diff is cut at this size).
pub const DIFF_LIMIT: usize = 1 << 20;

/// The preconditions of a plan: the state of each target when it was proposed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Preconditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Condition>,
}

/// One target (in display form) and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub path: String,
    #[serde(flatten)]
    pub state: State,
}

/// The state of a path. A directory's `sha256` digests its whole tree listing (relative paths,
/// types, sizes, modification times and link targets); it is left out where only "a directory
/// is there" matters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum State {
    Absent,
    File {
        size: u64,
        sha256: String,
    },
    Dir {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entries: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// A regular file with more than one hard link, whose content is not read (see
    /// `crate::scope`): `identity` digests its device, inode, size, times and link count.
    Hardlinked {
        size: u64,
        links: u64,
        identity: String,
    },
    /// `sha256` is of the link's target text.
    Symlink {
        sha256: String,
    },
    /// A FIFO, socket or device.
    Other,
}

impl State {
    pub(crate) fn describe(&self) -> String {
        match self {
            State::Absent => "absent".to_owned(),
            State::File { size, sha256 } => format!("a file of {size} bytes (sha256 {})", short(sha256)),
            State::Hardlinked { size, links, .. } => format!("a file of {size} bytes with {links} hard links"),
            State::Dir { entries: Some(entries), .. } => format!("a directory of {entries} entries"),
            State::Dir { .. } => "a directory".to_owned(),
            State::Symlink { .. } => "a symlink".to_owned(),
            State::Other => "a special file".to_owned(),
        }
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

impl Preconditions {
    /// Checks a fresh observation against these (the proposal's) preconditions.
    pub fn verify(&self, current: &Preconditions) -> Result<(), ToolError> {
        if self == current {
            return Ok(());
        }
        let roles = [
            ("target", &self.target, &current.target),
            ("source", &self.source, &current.source),
            ("destination", &self.destination, &current.destination),
        ];
        let detail = roles
            .iter()
            .find(|(_, expected, now)| expected != now)
            .map(|(role, expected, now)| match (expected, now) {
                (Some(expected), Some(now)) if expected.path != now.path => {
                    format!("the {role} was {}, the call names {}", expected.path, now.path)
                }
                (Some(expected), Some(now)) => {
                    format!("{} was {}, is now {}", now.path, expected.state.describe(), now.state.describe())
                }
                _ => format!("the preconditions do not describe this call's {role}"),
            })
            .unwrap_or_default();
        Err(ToolError::Changed(detail))
    }
}

/// How deep to look at a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Only that it is a directory.
    Shallow,
    /// A digest of its whole tree listing.
    Tree,
}

/// A path's state, and its content when it is a regular file no larger than asked.
pub struct Observation {
    pub condition: Condition,
    pub content: Option<Vec<u8>>,
}

impl Observation {
    pub fn state(&self) -> &State {
        &self.condition.state
    }
}

/// Observes a path without following a final symlink, touching nothing. A regular file is
/// hashed through the scope; its content is kept when it is at most `keep` bytes.
pub fn observe(ctx: &Context, path: &ScopedPath, depth: Depth, keep: usize) -> Result<Observation, ToolError> {
    let io_error = ctx.io(path);
    let condition = |state| Condition { path: ctx.scope.display(path), state };
    let metadata = match ctx.scope.symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Ok(Observation { condition: condition(State::Absent), content: None });
        }
        Err(error) => return Err(io_error(error)),
    };
    let (state, content) = match Kind::of(metadata.file_type()) {
        Kind::Symlink => {
            let target = ctx.scope.root_dir(path).read_link_contents(path.beneath()).map_err(&io_error)?;
            (State::Symlink { sha256: hex::encode(Sha256::digest(target.as_os_str().as_encoded_bytes())) }, None)
        }
        Kind::Dir if depth == Depth::Shallow => (State::Dir { entries: None, sha256: None }, None),
        Kind::Dir => {
            let (entries, sha256) = tree_digest(ctx, path)?;
            (State::Dir { entries: Some(entries), sha256: Some(sha256) }, None)
        }
        Kind::File if ctx.scope.is_unreadable_link(&metadata) => {
            let (size, links) = (metadata.len(), link_count(&metadata));
            (State::Hardlinked { size, links, identity: identity(&metadata) }, None)
        }
        Kind::File => {
            let file = Watched::new(ctx.scope.open_file(path).map_err(&io_error)?, ctx.deadline);
            let hashed = hash_content::<Sha256>(file, keep).map_err(&io_error)?;
            (State::File { size: hashed.size, sha256: hashed.hash }, hashed.content)
        }
        Kind::Other => (State::Other, None),
    };
    Ok(Observation { condition: condition(state), content })
}

/// A digest of what identifies a file without reading it: device, inode, size, modification and
/// change times, link count. Any write, rename over, relink or chmod changes it.
fn identity(metadata: &cap_std::fs::Metadata) -> String {
    #[cfg(unix)]
    let parts = {
        use cap_std::fs::MetadataExt;
        let m = metadata;
        format!(
            "{}:{}:{}:{}.{}:{}.{}:{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.nlink()
        )
    };
    #[cfg(not(unix))]
    let parts = format!("{}:{:?}", metadata.len(), metadata.modified().ok());
    hex::encode(Sha256::digest(parts.as_bytes()))
}

pub struct Hashed {
    pub size: u64,
    /// Lowercase hex.
    pub hash: String,
    pub content: Option<Vec<u8>>,
}

/// Streams a reader through a digest, keeping the bytes when there are at most `keep` of them.
pub fn hash_content<D: Digest>(mut reader: impl Read, keep: usize) -> io::Result<Hashed> {
    let mut hasher = D::new();
    let mut kept = Some(Vec::new());
    let mut size = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        hasher.update(&buffer[..read]);
        size += read as u64;
        if let Some(bytes) = kept.as_mut() {
            if bytes.len() + read <= keep {
                bytes.extend_from_slice(&buffer[..read]);
            } else {
                kept = None;
            }
        }
    }
    Ok(Hashed { size, hash: hex::encode(hasher.finalize()), content: kept })
}

/// A digest of a directory's tree listing: every entry's relative path, type, size, modification
/// time and (for symlinks) target, in walk order. Refuses trees over [`TREE_LIMIT`] entries and
/// trees with unreadable directories: the proposal could not promise what it cannot see.
fn tree_digest(ctx: &Context, path: &ScopedPath) -> Result<(u64, String), ToolError> {
    let io_error = ctx.io(path);
    let dir = ctx.scope.open_dir(path).map_err(&io_error)?;
    let mut hasher = Sha256::new();
    let limits = Limits { max_depth: walk::MAX_DEPTH, max_visits: TREE_LIMIT, deadline: ctx.deadline };
    let walked = walk::walk(dir, limits, &io_error, |entry| {
        let metadata = entry.metadata().map_err(&io_error)?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|time| time.into_std().duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_nanos());
        let size = if entry.kind == Kind::Dir { 0 } else { metadata.len() };
        hasher.update(entry.rel_slash().as_bytes());
        hasher.update(format!("\0{}\0{size}\0{modified}\0", entry.kind.as_str()).as_bytes());
        if entry.kind == Kind::Symlink {
            let target = entry.dir.read_link_contents(entry.name).map_err(&io_error)?;
            hasher.update(target.as_os_str().as_encoded_bytes());
        }
        hasher.update(b"\n");
        Ok(Flow::Continue)
    })?;
    if walked.cut {
        return Err(ToolError::Refused(format!(
            "{} holds more than {TREE_LIMIT} entries (or is nested deeper than {} levels): too large to propose",
            ctx.scope.display(path),
            walk::MAX_DEPTH
        )));
    }
    if walked.unreadable > 0 {
        return Err(ToolError::Refused(format!(
            "{}: {} directories in the tree cannot be read",
            ctx.scope.display(path),
            walked.unreadable
        )));
    }
    Ok((walked.visited as u64, hex::encode(hasher.finalize())))
}

/// A unified diff between two versions of a file (`None` for an absent side), or `None` when
/// either side is not text or is over `DIFF_LIMIT` (1 MiB). The diff itself is cut at that size.
pub fn text_diff(path: &str, old: Option<&[u8]>, new: Option<&[u8]>) -> Option<String> {
    fn as_text(bytes: Option<&[u8]>) -> Option<&str> {
        match bytes {
            None => Some(""),
            Some(bytes) if bytes.len() <= DIFF_LIMIT && !bytes.contains(&0) => std::str::from_utf8(bytes).ok(),
            Some(_) => None,
        }
    }
    let (old_text, new_text) = (as_text(old)?, as_text(new)?);
    let old_name = if old.is_some() { path } else { "/dev/null" };
    let new_name = if new.is_some() { path } else { "/dev/null" };
    let mut diff = similar::TextDiff::from_lines(old_text, new_text)
        .unified_diff()
        .context_radius(3)
        .header(old_name, new_name)
        .to_string();
    if diff.len() > DIFF_LIMIT {
        let mut cut = DIFF_LIMIT;
        while !diff.is_char_boundary(cut) {
            cut -= 1;
        }
        diff.truncate(cut);
        diff.push_str("\n[diff truncated]\n");
    }
    Some(diff)
}

/// A file name that is not in use yet in a directory, for a temporary beside the target.
pub fn temporary_name(name: &std::ffi::OsStr) -> std::ffi::OsString {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.subsec_nanos());
    let unique = format!("{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    let stem: String = Path::new(name).to_string_lossy().chars().take(64).collect();
    format!(".{stem}.{unique}.fusion-tmp").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preconditions_round_trip_and_compare() {
        let pre = Preconditions {
            target: Some(Condition { path: "/r/a".into(), state: State::File { size: 3, sha256: "ab".repeat(32) } }),
            ..Default::default()
        };
        let json = serde_json::to_value(&pre).expect("encode");
        assert_eq!(json["target"]["type"], "file");
        assert_eq!(json["target"]["path"], "/r/a");
        let back: Preconditions = serde_json::from_value(json).expect("decode");
        assert!(pre.verify(&back).is_ok());
        let absent = Preconditions {
            target: Some(Condition { path: "/r/a".into(), state: State::Absent }),
            ..Default::default()
        };
        let error = pre.verify(&absent).expect_err("changed").to_string();
        assert!(error.contains("changed since the proposal"), "{error}");
        assert!(error.contains("is now absent"), "{error}");
    }

    #[test]
    fn diffs_only_for_text() {
        let diff = text_diff("/r/a", Some(b"one\ntwo\n"), Some(b"one\nthree\n")).expect("text");
        assert!(diff.contains("-two") && diff.contains("+three"), "{diff}");
        assert!(text_diff("/r/a", Some(b"\0bin"), Some(b"x")).is_none());
        assert!(text_diff("/r/a", None, Some(b"new\n")).expect("new").contains("+new"));
    }

    #[test]
    fn hashing_keeps_small_content_only() {
        let hashed = hash_content::<Sha256>(&b"hello"[..], 5).expect("hash");
        assert_eq!(hashed.content.as_deref(), Some(&b"hello"[..]));
        assert_eq!(hashed.hash, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert!(hash_content::<Sha256>(&b"hello"[..], 4).expect("hash").content.is_none());
    }
}
