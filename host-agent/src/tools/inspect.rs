//! The read tools that look at one path: list_directory, read_file, stat, disk_usage, hash_file.
//!
//! Owns their inputs (and so their schemas), their outputs and their bounds: a listing stops at
//! 1000 entries, a read at 1 MiB of content, every walk at a visit budget, each saying
//! `truncated`. Does not: search (`search`), or change anything.

use std::io::Read;

use chrono::{DateTime, Utc};
use md5::Md5;
use protocol::ToolClass;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use super::deadline::Watched;
use super::state::hash_content;
use super::walk::{self, Flow, Kind, Limits};
use super::{to_json, Builtin, Context, Immediate, ToolError};

/// list_directory returns at most this many entries.
pub const LIST_LIMIT: usize = 1000;
/// read_file returns at most this many bytes of content.
pub const READ_LIMIT: usize = 1 << 20;
/// read_file scans at most this many bytes to count lines; past it `totalLines` is a lower bound.
pub const SCAN_LIMIT: u64 = 256 << 20;
/// read_file looks for a NUL byte in this many leading bytes to call a file binary.
pub const BINARY_SNIFF: usize = 8 * 1024;
/// A recursive listing or disk_usage visits at most this many entries.
pub const VISIT_LIMIT: usize = 1_000_000;

/// List a directory's entries (name order), optionally the whole tree below it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListDirectory {
    /// The directory: relative to the first root, or absolute inside a root.
    pub path: String,
    /// List every entry below the directory, depth first. Symlinks are reported, never followed.
    #[serde(default)]
    pub recursive: Option<bool>,
}

#[derive(Serialize)]
struct Listing {
    entries: Vec<ListEntry>,
    truncated: bool,
}

#[derive(Serialize)]
struct ListEntry {
    path: String,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
}

impl Builtin for ListDirectory {
    const NAME: &'static str = "list_directory";
    const DESCRIPTION: &'static str = "List a directory (optionally recursive). Entries are {path, name, type: file|dir|symlink, size}; at most 1000, with truncated: true when there were more. Symlinks are listed, never followed.";
}

impl Immediate for ListDirectory {
    const CLASS: ToolClass = ToolClass::Read;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let base = ctx.scope.resolve(&self.path)?;
        let io_error = ctx.io(&base);
        let dir = ctx.scope.open_dir(&base).map_err(&io_error)?;
        let max_depth = if self.recursive.unwrap_or(false) { walk::MAX_DEPTH } else { 1 };
        let mut entries = Vec::new();
        let mut truncated = false;
        let limits = Limits { max_depth, max_visits: VISIT_LIMIT, deadline: ctx.deadline };
        let walked = walk::walk(dir, limits, &io_error, |entry| {
            if entries.len() == LIST_LIMIT {
                truncated = true;
                return Ok(Flow::Stop);
            }
            let size = match entry.kind {
                Kind::Dir => 0,
                _ => entry.metadata().map(|metadata| metadata.len()).unwrap_or(0),
            };
            entries.push(ListEntry {
                path: ctx.scope.display(&base.join(entry.rel)),
                name: entry.name.to_string_lossy().into_owned(),
                kind: entry.kind.as_str(),
                size,
            });
            Ok(Flow::Continue)
        })?;
        to_json(&Listing { entries, truncated: truncated || walked.cut })
    }
}

/// Read a text file, whole or a range of lines.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReadFile {
    /// The file: relative to the first root, or absolute inside a root.
    pub path: String,
    /// First line to return, 1-based (default 1).
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub start_line: Option<u64>,
    /// Last line to return, 1-based and inclusive (default: the last line).
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub end_line: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TextContent {
    content: String,
    total_lines: u64,
    truncated: bool,
}

#[derive(Serialize)]
struct BinaryContent {
    binary: bool,
    size: u64,
}

impl Builtin for ReadFile {
    const NAME: &'static str = "read_file";
    const DESCRIPTION: &'static str = "Read a UTF-8 text file, optionally lines startLine..=endLine (1-based). Returns {content, totalLines, truncated}; content is capped at 1 MiB (truncated: true, cut at a line end where possible). A binary file (a NUL byte in its first 8 KiB) returns {binary: true, size} instead.";
}

impl Immediate for ReadFile {
    const CLASS: ToolClass = ToolClass::Read;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let start = self.start_line.unwrap_or(1);
        let end = self.end_line.unwrap_or(u64::MAX);
        if start == 0 || end == 0 {
            return Err(ToolError::Refused("startLine and endLine are 1-based".to_owned()));
        }
        if start > end {
            return Err(ToolError::Refused(format!("startLine {start} is after endLine {end}")));
        }
        let path = ctx.scope.resolve(&self.path)?;
        let io_error = ctx.io(&path);
        let mut file = ctx.scope.open_file(&path).map_err(&io_error)?;
        let size = file.metadata().map_err(&io_error)?.len();
        let mut lines = LineRange::new(start, end);
        let mut buffer = vec![0u8; 64 * 1024];
        let mut scanned = 0u64;
        let mut first = true;
        loop {
            ctx.deadline.check()?;
            let read = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(io_error(error)),
            };
            if first && buffer[..read.min(BINARY_SNIFF)].contains(&0) {
                return to_json(&BinaryContent { binary: true, size });
            }
            first = false;
            lines.feed(&buffer[..read]);
            scanned += read as u64;
            if scanned >= SCAN_LIMIT {
                lines.truncated = true;
                break;
            }
        }
        let (content, total_lines, truncated) = lines.finish();
        to_json(&TextContent { content, total_lines, truncated })
    }
}

/// Collects lines `start..=end` (up to [`READ_LIMIT`] bytes) while counting every line.
struct LineRange {
    start: u64,
    end: u64,
    /// The number of the line the next byte belongs to.
    line: u64,
    /// Newlines seen, and whether bytes follow the last one.
    newlines: u64,
    open_line: bool,
    content: Vec<u8>,
    truncated: bool,
}

impl LineRange {
    fn new(start: u64, end: u64) -> Self {
        LineRange { start, end, line: 1, newlines: 0, open_line: false, content: Vec::new(), truncated: false }
    }

    fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let (segment, ends_line) = match chunk.iter().position(|&byte| byte == b'\n') {
                Some(at) => (&chunk[..=at], true),
                None => (chunk, false),
            };
            if (self.start..=self.end).contains(&self.line) {
                self.take(segment);
            }
            if ends_line {
                self.newlines += 1;
                self.line += 1;
                self.open_line = false;
            } else {
                self.open_line = true;
            }
            chunk = &chunk[segment.len()..];
        }
    }

    fn take(&mut self, segment: &[u8]) {
        if self.truncated {
            return;
        }
        let room = READ_LIMIT - self.content.len();
        if segment.len() <= room {
            self.content.extend_from_slice(segment);
            return;
        }
        self.truncated = true;
        self.content.extend_from_slice(&segment[..room]);
        // Cut back to the last whole line, when one fits at all.
        if let Some(at) = self.content.iter().rposition(|&byte| byte == b'\n') {
            self.content.truncate(at + 1);
        }
    }

    fn finish(mut self) -> (String, u64, bool) {
        let total = self.newlines + u64::from(self.open_line);
        if self.truncated {
            // Do not end in the middle of a UTF-8 sequence.
            if let Err(error) = std::str::from_utf8(&self.content) {
                if error.error_len().is_none() {
                    self.content.truncate(error.valid_up_to());
                }
            }
        }
        (String::from_utf8_lossy(&self.content).into_owned(), total, self.truncated)
    }
}

/// Describe one path: type, size, times, read-only flag.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Stat {
    /// The path: relative to the first root, or absolute inside a root. A symlink is described
    /// itself, not followed.
    pub path: String,
}

#[derive(Serialize)]
struct StatOutput {
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    modified: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created: Option<DateTime<Utc>>,
    readonly: bool,
}

impl Builtin for Stat {
    const NAME: &'static str = "stat";
    const DESCRIPTION: &'static str = "Describe a path: {type: file|dir|symlink, size (bytes; 0 for a directory), modified, created? (RFC 3339, UTC), readonly}. A symlink is described itself, not followed.";
}

impl Immediate for Stat {
    const CLASS: ToolClass = ToolClass::Read;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let path = ctx.scope.resolve(&self.path)?;
        let metadata = ctx.scope.symlink_metadata(&path).map_err(ctx.io(&path))?;
        let kind = Kind::of(metadata.file_type());
        let time =
            |time: std::io::Result<cap_std::time::SystemTime>| time.ok().map(|t| DateTime::<Utc>::from(t.into_std()));
        to_json(&StatOutput {
            kind: kind.as_str(),
            size: if kind == Kind::Dir { 0 } else { metadata.len() },
            modified: time(metadata.modified()),
            created: time(metadata.created()),
            readonly: metadata.permissions().readonly(),
        })
    }
}

/// Total size and counts of a tree.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskUsage {
    /// A directory (or a file): relative to the first root, or absolute inside a root.
    pub path: String,
}

#[derive(Serialize)]
struct Usage {
    bytes: u64,
    files: u64,
    dirs: u64,
    truncated: bool,
}

impl Builtin for DiskUsage {
    const NAME: &'static str = "disk_usage";
    const DESCRIPTION: &'static str = "Total apparent size of a tree: {bytes, files, dirs, truncated}. dirs counts the directories below the path; symlinks count as files of their own size and are not followed. Stops after 1,000,000 entries with truncated: true.";
}

impl Immediate for DiskUsage {
    const CLASS: ToolClass = ToolClass::Read;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let path = ctx.scope.resolve(&self.path)?;
        let io_error = ctx.io(&path);
        let metadata = ctx.scope.metadata(&path).map_err(&io_error)?;
        if !metadata.is_dir() {
            return to_json(&Usage { bytes: metadata.len(), files: 1, dirs: 0, truncated: false });
        }
        let dir = ctx.scope.open_dir(&path).map_err(&io_error)?;
        let mut usage = Usage { bytes: 0, files: 0, dirs: 0, truncated: false };
        let limits = Limits { max_depth: walk::MAX_DEPTH, max_visits: VISIT_LIMIT, deadline: ctx.deadline };
        let walked = walk::walk(dir, limits, &io_error, |entry| {
            if entry.kind == Kind::Dir {
                usage.dirs += 1;
            } else {
                usage.files += 1;
                usage.bytes += entry.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            }
            Ok(Flow::Continue)
        })?;
        usage.truncated = walked.cut;
        to_json(&usage)
    }
}

/// Hash a file's content.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashFile {
    /// The file: relative to the first root, or absolute inside a root.
    pub path: String,
    /// The algorithm (default sha256).
    #[serde(default)]
    pub algorithm: Option<Algorithm>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    #[default]
    Sha256,
    Md5,
}

#[derive(Serialize)]
struct HashOutput {
    algorithm: Algorithm,
    hash: String,
}

impl Builtin for HashFile {
    const NAME: &'static str = "hash_file";
    const DESCRIPTION: &'static str =
        "Hash a file's content: {algorithm, hash} with sha256 (default) or md5, as lowercase hex.";
}

impl Immediate for HashFile {
    const CLASS: ToolClass = ToolClass::Read;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let path = ctx.scope.resolve(&self.path)?;
        let io_error = ctx.io(&path);
        let file = Watched::new(ctx.scope.open_file(&path).map_err(&io_error)?, ctx.deadline);
        let algorithm = self.algorithm.unwrap_or_default();
        let hash = match algorithm {
            Algorithm::Sha256 => hash_content::<Sha256>(file, 0),
            Algorithm::Md5 => hash_content::<Md5>(file, 0),
        }
        .map_err(&io_error)?
        .hash;
        to_json(&HashOutput { algorithm, hash })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[u8], start: u64, end: u64) -> (String, u64, bool) {
        let mut range = LineRange::new(start, end);
        for chunk in text.chunks(3) {
            range.feed(chunk);
        }
        range.finish()
    }

    #[test]
    fn line_ranges() {
        assert_eq!(lines(b"a\nb\nc\n", 1, u64::MAX), ("a\nb\nc\n".into(), 3, false));
        assert_eq!(lines(b"a\nb\nc", 2, 3), ("b\nc".into(), 3, false));
        assert_eq!(lines(b"a\nb\nc\n", 2, 2), ("b\n".into(), 3, false));
        assert_eq!(lines(b"a\nb\n", 5, 9), ("".into(), 2, false));
        assert_eq!(lines(b"", 1, u64::MAX), ("".into(), 0, false));
        assert_eq!(lines(b"\n\n", 1, u64::MAX), ("\n\n".into(), 2, false));
    }

    #[test]
    fn cut_at_line_end_and_char_boundary() {
        let mut text = "x".repeat(READ_LIMIT - 2).into_bytes();
        text.extend_from_slice(b"\nyyyy\n");
        let (content, total, truncated) = lines(&text, 1, u64::MAX);
        assert!(truncated);
        assert_eq!(total, 2);
        assert_eq!(content.len(), READ_LIMIT - 1);
        let one_line = "é".repeat(READ_LIMIT);
        let (content, _, truncated) = lines(one_line.as_bytes(), 1, u64::MAX);
        assert!(truncated);
        assert!(!content.contains('\u{FFFD}'));
        assert_eq!(content.len(), READ_LIMIT);
    }
}
