//! The mutations of file content: write_file, edit_file, append_file, and the atomic install of
//! a file's new content that `tree` (copy) shares.
//!
//! Each observes its target (content hash, or absence), proposes a unified diff, and on apply
//! writes beneath the target's parent directory handle: new content goes to a temporary file in
//! the same directory, then is renamed over the target, or hard-linked to a name that must still
//! be free, so readers never see half a file and an absent target is never overwritten.
//!
//! Nothing is ever written in place, so nothing reaches a file through another of its hard links
//! (which may lie outside the roots): write_file and edit_file replace the name, and append_file
//! too: it opens the file read-only, copies the old content (checked against the verified hash as
//! it goes) and the new text to a temporary, and renames that over the name. A name swapped for
//! another file between the checks and the rename changes only which file the name holds, never
//! the content of a file outside.
//! Does not: create, move, copy or delete trees (`tree`).

use std::ffi::OsStr;
use std::io::{self, Read};

use cap_std::fs::{Dir, OpenOptions, Permissions};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::deadline::Watched;
use super::state::{observe, text_diff, Depth, Observation, Preconditions, State, DIFF_LIMIT};
use super::{to_json, Builtin, Change, Context, Mutation, ToolError};
use crate::scope::{open_checked, FileId, ScopedPath};

/// edit_file refuses files larger than this.
pub const EDIT_LIMIT: usize = 8 << 20;

/// How [`install`] puts the new file in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Rename over the existing name.
    Replace,
    /// Link to the name, failing if anything holds it by then.
    CreateNew,
}

/// Writes `content` to `name` in `dir` through a temporary file beside it, then puts it in place.
/// The temporary is removed on any failure. `AlreadyExists` means the name was taken meanwhile.
pub fn install(
    dir: &Dir,
    name: &OsStr,
    content: &mut dyn Read,
    how: Install,
    permissions: Option<Permissions>,
) -> io::Result<u64> {
    let temporary = super::state::temporary_name(name);
    let mut file = dir.open_with(&temporary, OpenOptions::new().write(true).create_new(true))?;
    let result = (|| {
        let written = io::copy(content, &mut file)?;
        if let Some(permissions) = permissions {
            file.set_permissions(permissions)?;
        }
        file.sync_all()?;
        match how {
            Install::Replace => dir.rename(&temporary, dir, name)?,
            Install::CreateNew => match dir.hard_link(&temporary, dir, name) {
                Ok(()) => dir.remove_file(&temporary)?,
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => return Err(error),
                // A filesystem without hard links: check, then rename (a narrow window remains).
                Err(_) => {
                    if dir.symlink_metadata(name).is_ok() {
                        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
                    }
                    dir.rename(&temporary, dir, name)?;
                }
            },
        }
        Ok(written)
    })();
    if result.is_err() {
        let _ = dir.remove_file(&temporary);
    }
    result
}

/// Creates the missing parent directories of `path`, beneath its root.
pub fn ensure_parent(ctx: &Context, path: &ScopedPath) -> Result<(), ToolError> {
    match path.parent() {
        Some(parent) if !parent.is_root() => {
            ctx.scope.root_dir(path).create_dir_all(parent.rel()).map_err(ctx.io(&parent))
        }
        _ => Ok(()),
    }
}

/// Checks that the parent of `path` is a directory, or says that the apply will create it.
pub fn parent_note(ctx: &Context, path: &ScopedPath) -> Result<&'static str, ToolError> {
    let Some(parent) = path.parent() else {
        return Err(ToolError::Refused("a root itself cannot be replaced".to_owned()));
    };
    match ctx.scope.metadata(&parent) {
        Ok(metadata) if metadata.is_dir() => Ok(""),
        Ok(_) => Err(ToolError::Refused(format!("{} is not a directory", ctx.scope.display(&parent)))),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok("; creates the missing parent directories"),
        Err(error) => Err(ctx.io(&parent)(error)),
    }
}

/// Maps an install failure: a name taken meanwhile is a changed target.
pub fn install_error<'a>(ctx: &'a Context, path: &'a ScopedPath) -> impl Fn(io::Error) -> ToolError + 'a {
    move |error| {
        if error.kind() == io::ErrorKind::AlreadyExists {
            ToolError::Changed(format!("{} appeared since the proposal", ctx.scope.display(path)))
        } else if error.get_ref().is_some_and(|inner| inner.is::<ChangedUnderUs>()) {
            ToolError::Changed(format!("{} {error}", ctx.scope.display(path)))
        } else {
            ctx.io(path)(error)
        }
    }
}

/// Writes `bytes` as the new content of `path`, whose verified state is `state`.
pub(crate) fn write_content(ctx: &Context, path: &ScopedPath, state: &State, bytes: &[u8]) -> Result<u64, ToolError> {
    let how = match state {
        State::Absent => Install::CreateNew,
        State::File { .. } | State::Hardlinked { .. } => Install::Replace,
        other => return Err(not_a_file(ctx, path, other)),
    };
    ensure_parent(ctx, path)?;
    let (dir, name) = ctx.scope.open_parent(path).map_err(ctx.io(path))?;
    let permissions = match how {
        Install::Replace => dir.symlink_metadata(&name).ok().map(|metadata| metadata.permissions()),
        Install::CreateNew => None,
    };
    install(&dir, &name, &mut &bytes[..], how, permissions).map_err(install_error(ctx, path))
}

fn not_a_file(ctx: &Context, path: &ScopedPath, state: &State) -> ToolError {
    let what = match state {
        State::Dir { .. } => "is a directory",
        State::Symlink { .. } => "is a symlink (name the file it points to instead)",
        _ => "is not a regular file",
    };
    ToolError::Refused(format!("{} {what}", ctx.scope.display(path)))
}

/// Refuses a change that needs the content of a multiply-linked file this device does not read.
fn linked_content(ctx: &Context, path: &ScopedPath, links: u64, verb: &str) -> ToolError {
    ToolError::Refused(format!(
        "{} has {links} hard links and another of them may lie outside the allowed roots: {verb} would read or \
         change the content they share, so it is refused (write_file replaces this name alone; start the agent \
         with --allow-hardlinked-reads to read such files)",
        ctx.scope.display(path)
    ))
}

/// Requires a file that exists, or refuses.
fn existing_file(ctx: &Context, path: &ScopedPath, state: &State) -> Result<(), ToolError> {
    match state {
        State::File { .. } => Ok(()),
        State::Hardlinked { links, .. } => Err(linked_content(ctx, path, *links, "editing it")),
        State::Absent => Err(ToolError::Refused(format!("{} does not exist", ctx.scope.display(path)))),
        other => Err(not_a_file(ctx, path, other)),
    }
}

/// A file (absent or regular) to be written as a whole: refuses anything else.
fn writable(ctx: &Context, path: &ScopedPath, state: &State) -> Result<(), ToolError> {
    match state {
        State::Absent | State::File { .. } | State::Hardlinked { .. } => Ok(()),
        other => Err(not_a_file(ctx, path, other)),
    }
}

/// The diff of a content change, when the old content was kept (small text) or absent.
fn content_diff(ctx: &Context, path: &ScopedPath, observed: &Observation, new: &[u8]) -> Option<String> {
    let old = match observed.state() {
        State::Absent => None,
        _ => Some(observed.content.as_deref()?),
    };
    text_diff(&ctx.scope.display(path), old, Some(new))
}

fn target(observed: &Observation) -> Preconditions {
    Preconditions { target: Some(observed.condition.clone()), ..Default::default() }
}

#[derive(Serialize)]
struct Applied {
    applied: bool,
    path: String,
    bytes: u64,
}

fn applied(ctx: &Context, path: &ScopedPath, bytes: u64) -> Result<Value, ToolError> {
    to_json(&Applied { applied: true, path: ctx.scope.display(path), bytes })
}

/// Create or overwrite a file with the given text.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteFile {
    /// The file: relative to the first root, or absolute inside a root. Missing parent
    /// directories are created.
    pub path: String,
    /// The complete new content.
    pub content: String,
}

impl Builtin for WriteFile {
    const NAME: &'static str = "write_file";
    const DESCRIPTION: &'static str = "Create or overwrite a text file (missing parent directories are created). Proposes a unified diff; the apply writes atomically and only if the file is still as proposed.";
}

impl Mutation for WriteFile {
    type Snapshot = (ScopedPath, Observation);

    fn observe(&self, ctx: &Context) -> Result<(Preconditions, Self::Snapshot), ToolError> {
        let path = ctx.scope.resolve(&self.path)?;
        let observed = observe(ctx, &path, Depth::Shallow, DIFF_LIMIT)?;
        Ok((target(&observed), (path, observed)))
    }

    fn plan(&self, ctx: &Context, (path, observed): &Self::Snapshot) -> Result<Change, ToolError> {
        writable(ctx, path, observed.state())?;
        let note = parent_note(ctx, path)?;
        let shown = ctx.scope.display(path);
        let new = self.content.len();
        let summary = match observed.state() {
            State::File { size, .. } => format!("Overwrite {shown} ({size} → {new} bytes){note}"),
            State::Hardlinked { size, links, .. } => format!(
                "Replace {shown} ({size} → {new} bytes); it has {links} hard links: only this name gets the new \
                 content, the others keep the old"
            ),
            _ => format!("Create {shown} ({new} bytes){note}"),
        };
        Ok(Change { summary, diff: content_diff(ctx, path, observed, self.content.as_bytes()) })
    }

    fn apply(&self, ctx: &Context, (path, observed): Self::Snapshot) -> Result<Value, ToolError> {
        writable(ctx, &path, observed.state())?;
        let bytes = write_content(ctx, &path, observed.state(), self.content.as_bytes())?;
        applied(ctx, &path, bytes)
    }
}

/// Replace exact text in a file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EditFile {
    /// The file: relative to the first root, or absolute inside a root.
    pub path: String,
    /// Applied in order; each `find` must occur exactly once in the text as the earlier edits left it.
    #[schemars(length(min = 1))]
    pub edits: Vec<Edit>,
}

/// One exact-text replacement.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Edit {
    /// The exact text to find (not a pattern); must occur exactly once.
    pub find: String,
    /// The text to put in its place.
    pub replace: String,
}

impl Builtin for EditFile {
    const NAME: &'static str = "edit_file";
    const DESCRIPTION: &'static str = "Edit a UTF-8 text file (up to 8 MiB) by exact find/replace pairs, applied in order; each `find` must occur exactly once. Proposes a unified diff; the apply re-checks the file's hash and the finds, then writes atomically.";
}

impl EditFile {
    /// The edited text, or why the edits do not apply.
    fn edited(&self, ctx: &Context, path: &ScopedPath, observed: &Observation) -> Result<String, ToolError> {
        existing_file(ctx, path, observed.state())?;
        let shown = ctx.scope.display(path);
        let content = observed.content.as_deref().ok_or_else(|| {
            ToolError::Refused(format!("{shown} is larger than {EDIT_LIMIT} bytes: too large to edit"))
        })?;
        let mut text = std::str::from_utf8(content)
            .map_err(|_| ToolError::Refused(format!("{shown} is not UTF-8 text")))?
            .to_owned();
        if self.edits.is_empty() {
            return Err(ToolError::Refused("edits is empty".to_owned()));
        }
        let count = self.edits.len();
        for (index, edit) in self.edits.iter().enumerate() {
            let which = format!("edit {} of {count}", index + 1);
            if edit.find.is_empty() {
                return Err(ToolError::Refused(format!("{which}: `find` is empty")));
            }
            let at = match occurrences(&text, &edit.find) {
                (0, _) => {
                    return Err(ToolError::Refused(format!(
                        "{which}: `find` {} is not in {shown}",
                        snippet(&edit.find)
                    )))
                }
                (1, Some(at)) => at,
                _ => {
                    return Err(ToolError::Refused(format!(
                        "{which}: `find` {} occurs more than once in {shown}; include more surrounding text",
                        snippet(&edit.find)
                    )))
                }
            };
            text.replace_range(at..at + edit.find.len(), &edit.replace);
        }
        Ok(text)
    }
}

/// How many times `needle` occurs in `haystack`, overlaps included (counting stops at 2), and where
/// the first occurrence starts.
fn occurrences(haystack: &str, needle: &str) -> (usize, Option<usize>) {
    let Some(first) = haystack.find(needle) else {
        return (0, None);
    };
    let next_start = first + haystack[first..].chars().next().map_or(1, char::len_utf8);
    let again = haystack[next_start..].contains(needle);
    (if again { 2 } else { 1 }, Some(first))
}

fn snippet(text: &str) -> String {
    let short: String = text.chars().take(60).collect();
    if short.len() < text.len() {
        format!("{short:?}…")
    } else {
        format!("{short:?}")
    }
}

impl Mutation for EditFile {
    type Snapshot = (ScopedPath, Observation);

    fn observe(&self, ctx: &Context) -> Result<(Preconditions, Self::Snapshot), ToolError> {
        let path = ctx.scope.resolve(&self.path)?;
        let observed = observe(ctx, &path, Depth::Shallow, EDIT_LIMIT)?;
        Ok((target(&observed), (path, observed)))
    }

    fn plan(&self, ctx: &Context, (path, observed): &Self::Snapshot) -> Result<Change, ToolError> {
        let text = self.edited(ctx, path, observed)?;
        let summary = format!(
            "Edit {} ({} replacement{})",
            ctx.scope.display(path),
            self.edits.len(),
            if self.edits.len() == 1 { "" } else { "s" }
        );
        Ok(Change { summary, diff: content_diff(ctx, path, observed, text.as_bytes()) })
    }

    fn apply(&self, ctx: &Context, (path, observed): Self::Snapshot) -> Result<Value, ToolError> {
        let text = self.edited(ctx, &path, &observed)?;
        let bytes = write_content(ctx, &path, observed.state(), text.as_bytes())?;
        applied(ctx, &path, bytes)
    }
}

/// Append text to a file, creating it if needed.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppendFile {
    /// The file: relative to the first root, or absolute inside a root. Created (with missing
    /// parent directories) when absent.
    pub path: String,
    /// The text to add at the end.
    pub content: String,
}

impl Builtin for AppendFile {
    const NAME: &'static str = "append_file";
    const DESCRIPTION: &'static str = "Append text to the end of a file, creating it (and missing parent directories) when absent. Proposes a unified diff; the apply appends only if the file is still as proposed.";
}

impl Mutation for AppendFile {
    type Snapshot = (ScopedPath, Observation);

    fn observe(&self, ctx: &Context) -> Result<(Preconditions, Self::Snapshot), ToolError> {
        let path = ctx.scope.resolve(&self.path)?;
        let observed = observe(ctx, &path, Depth::Shallow, DIFF_LIMIT)?;
        Ok((target(&observed), (path, observed)))
    }

    fn plan(&self, ctx: &Context, (path, observed): &Self::Snapshot) -> Result<Change, ToolError> {
        appendable(ctx, path, observed.state())?;
        let note = parent_note(ctx, path)?;
        let shown = ctx.scope.display(path);
        let added = self.content.len();
        let (summary, new) = match observed.state() {
            State::File { size, .. } => {
                let new = observed.content.as_ref().map(|old| [old.as_slice(), self.content.as_bytes()].concat());
                (format!("Append {added} bytes to {shown} ({size} bytes)"), new)
            }
            _ => (format!("Create {shown} ({added} bytes){note}"), Some(self.content.clone().into_bytes())),
        };
        let diff = new.and_then(|new| content_diff(ctx, path, observed, &new));
        Ok(Change { summary, diff })
    }

    fn apply(&self, ctx: &Context, (path, observed): Self::Snapshot) -> Result<Value, ToolError> {
        appendable(ctx, &path, observed.state())?;
        if observed.state() == &State::Absent {
            let bytes = write_content(ctx, &path, observed.state(), self.content.as_bytes())?;
            return applied(ctx, &path, bytes);
        }
        let State::File { size, sha256 } = observed.state() else {
            return Err(not_a_file(ctx, &path, observed.state()));
        };
        let io_error = ctx.io(&path);
        let (dir, name) = ctx.scope.open_parent(&path).map_err(&io_error)?;
        // Read-only: whatever the name holds by now, this handle cannot change it.
        let mut file = open_checked(&dir, name.as_ref(), OpenOptions::new().read(true)).map_err(&io_error)?;
        let metadata = file.metadata().map_err(&io_error)?;
        let named = dir.symlink_metadata(&name).map_err(&io_error)?;
        match append_way(FileId::of(&metadata), FileId::of(&named), ctx.scope.reads_hardlinked()) {
            AppendWay::Rewrite => {
                // The name alone gets the old content and the new, through a temporary; the old
                // content must be the one the preconditions verified, byte for byte.
                let old = Verified::new(Watched::new(&mut file, ctx.deadline), *size, sha256);
                let mut content = old.chain(self.content.as_bytes());
                install(&dir, &name, &mut content, Install::Replace, Some(metadata.permissions()))
                    .map_err(install_error(ctx, &path))?;
            }
            AppendWay::Refuse { links } => return Err(linked_content(ctx, &path, links, "appending to it")),
            AppendWay::Swapped => {
                return Err(ToolError::Changed(format!("{} was replaced while being opened", ctx.scope.display(&path))))
            }
        }
        applied(ctx, &path, self.content.len() as u64)
    }
}

/// A reader of a file's old content that fails, at its end, unless the bytes read had the size and
/// SHA-256 the preconditions verified: a file swapped in after the check is never copied.
struct Verified<'a, R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    size: u64,
    sha256: &'a str,
}

impl<'a, R> Verified<'a, R> {
    fn new(inner: R, size: u64, sha256: &'a str) -> Self {
        Verified { inner, hasher: Sha256::new(), read: 0, size, sha256 }
    }
}

impl<R: Read> Read for Verified<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let count = self.inner.read(buffer)?;
        self.read += count as u64;
        if self.read > self.size {
            return Err(changed_under_us());
        }
        if count == 0 && hex::encode(std::mem::take(&mut self.hasher).finalize()) != self.sha256 {
            return Err(changed_under_us());
        }
        self.hasher.update(&buffer[..count]);
        Ok(count)
    }
}

/// The error of a file whose content is no longer the verified one.
#[derive(Debug, thiserror::Error)]
#[error("changed since its preconditions were verified")]
struct ChangedUnderUs;

fn changed_under_us() -> io::Error {
    io::Error::other(ChangedUnderUs)
}

/// How an append reaches an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppendWay {
    /// Copy the old content and the new to a temporary renamed over the name.
    Rewrite,
    /// The file has other names and its content is not read on this device.
    Refuse { links: u64 },
    /// The name no longer names the file that was opened.
    Swapped,
}

/// Decides how to append from the open handle's identity and the name's, looked up after the
/// open: the name must still name that file, and a file with other names is read (to copy it)
/// only where the device reads such files.
fn append_way(handle: FileId, name: FileId, reads_hardlinked: bool) -> AppendWay {
    let links = handle.links.max(name.links);
    if !handle.same_file(&name) {
        AppendWay::Swapped
    } else if links <= 1 || reads_hardlinked {
        AppendWay::Rewrite
    } else {
        AppendWay::Refuse { links }
    }
}

/// A file that can be appended to: absent, or regular and readable by the scope's rule.
fn appendable(ctx: &Context, path: &ScopedPath, state: &State) -> Result<(), ToolError> {
    match state {
        State::Hardlinked { links, .. } => Err(linked_content(ctx, path, *links, "appending to it")),
        other => writable(ctx, path, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_copy_only_a_file_still_named_and_readable() {
        let id = |inode, links| FileId { device: 1, inode, links };
        let cases = [
            // (handle, name looked up after the open, reads of linked files allowed, way)
            (id(7, 1), id(7, 1), false, AppendWay::Rewrite),
            (id(7, 1), id(7, 1), true, AppendWay::Rewrite),
            (id(7, 2), id(7, 2), false, AppendWay::Refuse { links: 2 }),
            (id(7, 2), id(7, 2), true, AppendWay::Rewrite),
            // A link made or dropped between the two looks: the larger count decides.
            (id(7, 1), id(7, 3), false, AppendWay::Refuse { links: 3 }),
            (id(7, 2), id(7, 1), false, AppendWay::Refuse { links: 2 }),
            // The name was swapped after the open: whatever the counts, nothing is written.
            (id(7, 1), id(8, 1), false, AppendWay::Swapped),
            (id(7, 1), id(8, 1), true, AppendWay::Swapped),
            (id(7, 1), FileId { device: 2, inode: 7, links: 1 }, false, AppendWay::Swapped),
        ];
        for (handle, name, allowed, want) in cases {
            assert_eq!(append_way(handle, name, allowed), want, "{handle:?} {name:?} {allowed}");
        }
    }

    #[test]
    fn occurrences_count_overlaps() {
        assert_eq!(occurrences("abc", "b"), (1, Some(1)));
        assert_eq!(occurrences("aaa", "aa"), (2, Some(0)));
        assert_eq!(occurrences("abab", "ab"), (2, Some(0)));
        assert_eq!(occurrences("xyz", "q"), (0, None));
        assert_eq!(occurrences("é-é", "é"), (2, Some(0)));
    }
}
