//! The mutations of the tree's structure: create_directory, move, copy, delete.
//!
//! Each observes its targets (a file's hash, a directory tree's listing digest, or absence) and on
//! apply acts beneath the parent directory handles of its paths, by single names, so nothing
//! resolved at apply time can lead out of the roots. A copied tree is built under a temporary
//! name beside the destination and renamed into place; symlinks inside a copied tree are skipped
//! (and counted), never recreated, and so are files with more than one hard link unless the
//! device reads them (copying reads content). Move and delete act on names only, so they work on
//! multiply-linked files and leave their other links alone. Does not: change file content
//! (`edit`).

use std::ffi::OsStr;
use std::io;

use cap_std::fs::{Dir, OpenOptions};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::deadline::Watched;
use super::edit::{ensure_parent, install, install_error, parent_note, Install};
use super::state::{
    observe, temporary_name, text_diff, Depth, Observation, Preconditions, State, DIFF_LIMIT, TREE_LIMIT,
};
use super::walk::{self, Flow, Kind, Limits};
use super::{to_json, Builtin, Change, Context, Mutation, ToolError};
use crate::scope::{multiply_linked, ScopedPath};

/// Create a directory and any missing parents.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateDirectory {
    /// The directory: relative to the first root, or absolute inside a root.
    pub path: String,
}

#[derive(Serialize)]
struct Created {
    applied: bool,
    path: String,
    created: bool,
}

impl Builtin for CreateDirectory {
    const NAME: &'static str = "create_directory";
    const DESCRIPTION: &'static str =
        "Create a directory with any missing parents (like mkdir -p). Nothing to do when it already exists.";
}

impl Mutation for CreateDirectory {
    type Snapshot = (ScopedPath, Observation);

    fn observe(&self, ctx: &Context) -> Result<(Preconditions, Self::Snapshot), ToolError> {
        let path = ctx.scope.resolve(&self.path)?;
        let observed = observe(ctx, &path, Depth::Shallow, 0)?;
        Ok((Preconditions { target: Some(observed.condition.clone()), ..Default::default() }, (path, observed)))
    }

    fn plan(&self, ctx: &Context, (path, observed): &Self::Snapshot) -> Result<Change, ToolError> {
        let shown = ctx.scope.display(path);
        let summary = match observed.state() {
            State::Absent => format!("Create directory {shown} (and any missing parents)"),
            State::Dir { .. } => format!("{shown} already exists; nothing to do"),
            _ => return Err(ToolError::Refused(format!("{shown} exists and is not a directory"))),
        };
        Ok(Change { summary, diff: None })
    }

    fn apply(&self, ctx: &Context, snapshot: Self::Snapshot) -> Result<Value, ToolError> {
        self.plan(ctx, &snapshot)?;
        let (path, observed) = snapshot;
        let created = observed.state() == &State::Absent;
        if created {
            ctx.scope.root_dir(&path).create_dir_all(path.rel()).map_err(ctx.io(&path))?;
        }
        to_json(&Created { applied: true, path: ctx.scope.display(&path), created })
    }
}

/// A source and destination pair, as move and copy take them.
pub struct Pair {
    from: ScopedPath,
    to: ScopedPath,
    source: Observation,
    destination: Observation,
}

fn observe_pair(ctx: &Context, from: &str, to: &str) -> Result<(Preconditions, Pair), ToolError> {
    let from = ctx.scope.resolve(from)?;
    let to = ctx.scope.resolve(to)?;
    let source = observe(ctx, &from, Depth::Tree, 0)?;
    let destination = observe(ctx, &to, Depth::Shallow, 0)?;
    let preconditions = Preconditions {
        source: Some(source.condition.clone()),
        destination: Some(destination.condition.clone()),
        ..Default::default()
    };
    Ok((preconditions, Pair { from, to, source, destination }))
}

impl Pair {
    /// Refuses what neither move nor copy can do; returns the parent note for the destination.
    fn check(&self, ctx: &Context, verb: &str) -> Result<&'static str, ToolError> {
        let (from, to) = (ctx.scope.display(&self.from), ctx.scope.display(&self.to));
        if self.from.is_root() {
            return Err(ToolError::Refused(format!("cannot {verb} a root ({from})")));
        }
        match self.source.state() {
            State::Absent => return Err(ToolError::Refused(format!("{from} does not exist"))),
            State::Other => return Err(ToolError::Refused(format!("{from} is not a regular file or directory"))),
            _ => {}
        }
        if self.destination.state() != &State::Absent {
            return Err(ToolError::Refused(format!(
                "{to} already exists: give the new path itself (a directory is not moved or copied into)"
            )));
        }
        if self.from.contains(&self.to) {
            return Err(ToolError::Refused(format!("cannot {verb} {from} into itself ({to})")));
        }
        parent_note(ctx, &self.to)
    }

    fn what(&self) -> String {
        match self.source.state() {
            State::File { size, .. } => format!("file ({size} bytes)"),
            State::Hardlinked { size, links, .. } => format!("file ({size} bytes, one of its {links} hard links)"),
            State::Dir { entries: Some(entries), .. } => format!("directory ({entries} entries)"),
            State::Symlink { .. } => "symlink".to_owned(),
            _ => "entry".to_owned(),
        }
    }
}

#[derive(Serialize)]
struct Moved {
    applied: bool,
    from: String,
    to: String,
}

/// Move or rename a file, directory or symlink.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Move {
    /// What to move: relative to the first root, or absolute inside a root.
    pub from: String,
    /// Its new path (which must not exist yet); missing parent directories are created.
    pub to: String,
}

impl Builtin for Move {
    const NAME: &'static str = "move";
    const DESCRIPTION: &'static str = "Move or rename a file, directory or symlink to a new path that must not exist yet (missing parent directories are created). The apply verifies the source's hash (a directory's tree listing) and the destination's absence first.";
}

impl Mutation for Move {
    type Snapshot = Pair;

    fn observe(&self, ctx: &Context) -> Result<(Preconditions, Pair), ToolError> {
        observe_pair(ctx, &self.from, &self.to)
    }

    fn plan(&self, ctx: &Context, pair: &Pair) -> Result<Change, ToolError> {
        let note = pair.check(ctx, "move")?;
        let summary =
            format!("Move {} {} to {}{note}", pair.what(), ctx.scope.display(&pair.from), ctx.scope.display(&pair.to));
        Ok(Change { summary, diff: None })
    }

    fn apply(&self, ctx: &Context, pair: Pair) -> Result<Value, ToolError> {
        pair.check(ctx, "move")?;
        ensure_parent(ctx, &pair.to)?;
        let (from_dir, from_name) = ctx.scope.open_parent(&pair.from).map_err(ctx.io(&pair.from))?;
        let (to_dir, to_name) = ctx.scope.open_parent(&pair.to).map_err(ctx.io(&pair.to))?;
        let moved = if matches!(pair.source.state(), State::File { .. } | State::Hardlinked { .. }) {
            // A link fails if the destination appeared meanwhile; the source name goes after.
            match from_dir.hard_link(&from_name, &to_dir, &to_name) {
                Ok(()) => from_dir.remove_file(&from_name),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Err(error),
                Err(_) => from_dir.rename(&from_name, &to_dir, &to_name),
            }
        } else {
            from_dir.rename(&from_name, &to_dir, &to_name)
        };
        match moved {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::CrossesDevices => {
                copy_into(ctx, &pair, &to_dir, &to_name)?;
                remove(&from_dir, &from_name, pair.source.state(), true).map_err(ctx.io(&pair.from))?;
            }
            Err(error) => return Err(install_error(ctx, &pair.to)(error)),
        }
        to_json(&Moved { applied: true, from: ctx.scope.display(&pair.from), to: ctx.scope.display(&pair.to) })
    }
}

/// Copy a file or a whole directory tree.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Copy {
    /// The file or directory to copy: relative to the first root, or absolute inside a root.
    pub from: String,
    /// The path of the copy (which must not exist yet); missing parent directories are created.
    pub to: String,
}

#[derive(Serialize, Default)]
struct Copied {
    applied: bool,
    from: String,
    to: String,
    files: u64,
    dirs: u64,
    bytes: u64,
    /// Symlinks, special files and (unless the device reads them) files with more than one
    /// hard link inside a copied tree, not copied.
    skipped: u64,
}

impl Builtin for Copy {
    const NAME: &'static str = "copy";
    const DESCRIPTION: &'static str = "Copy a file, or a directory tree, to a new path that must not exist yet (missing parent directories are created). Symlinks inside a tree (and files with several hard links, unless the device reads them) are skipped and counted, not copied. The apply verifies the source's hash (a tree's listing) and the destination's absence first.";
}

impl Mutation for Copy {
    type Snapshot = Pair;

    fn observe(&self, ctx: &Context) -> Result<(Preconditions, Pair), ToolError> {
        observe_pair(ctx, &self.from, &self.to)
    }

    fn plan(&self, ctx: &Context, pair: &Pair) -> Result<Change, ToolError> {
        let note = copyable(ctx, pair)?;
        let summary =
            format!("Copy {} {} to {}{note}", pair.what(), ctx.scope.display(&pair.from), ctx.scope.display(&pair.to));
        Ok(Change { summary, diff: None })
    }

    fn apply(&self, ctx: &Context, pair: Pair) -> Result<Value, ToolError> {
        copyable(ctx, &pair)?;
        ensure_parent(ctx, &pair.to)?;
        let (to_dir, to_name) = ctx.scope.open_parent(&pair.to).map_err(ctx.io(&pair.to))?;
        let mut copied = copy_into(ctx, &pair, &to_dir, &to_name)?;
        copied.applied = true;
        copied.from = ctx.scope.display(&pair.from);
        copied.to = ctx.scope.display(&pair.to);
        to_json(&copied)
    }
}

fn copyable(ctx: &Context, pair: &Pair) -> Result<&'static str, ToolError> {
    let note = pair.check(ctx, "copy")?;
    match pair.source.state() {
        State::Symlink { .. } => Err(ToolError::Refused(format!(
            "{} is a symlink: copy the path it points to",
            ctx.scope.display(&pair.from)
        ))),
        State::Hardlinked { links, .. } => Err(not_copied(ctx, &pair.from, *links)),
        _ => Ok(note),
    }
}

fn not_copied(ctx: &Context, path: &ScopedPath, links: u64) -> ToolError {
    ToolError::Refused(format!(
        "{} has {links} hard links and another of them may lie outside the allowed roots: copying reads its \
         content, so it is refused (start the agent with --allow-hardlinked-reads to read such files)",
        ctx.scope.display(path)
    ))
}

/// Copies the pair's source (a file or a tree) to `name` in `dir`, which must still be free.
fn copy_into(ctx: &Context, pair: &Pair, dir: &Dir, name: &OsStr) -> Result<Copied, ToolError> {
    let from_error = ctx.io(&pair.from);
    match pair.source.state() {
        State::File { .. } => {
            let source = ctx.scope.open_file(&pair.from).map_err(&from_error)?;
            let permissions = source.metadata().map_err(&from_error)?.permissions();
            let mut source = Watched::new(source, ctx.deadline);
            let bytes = install(dir, name, &mut source, Install::CreateNew, Some(permissions))
                .map_err(install_error(ctx, &pair.to))?;
            Ok(Copied { files: 1, bytes, ..Default::default() })
        }
        State::Dir { .. } => {
            let source = ctx.scope.open_dir(&pair.from).map_err(&from_error)?;
            let temporary = temporary_name(name);
            let to_error = ctx.io(&pair.to);
            dir.create_dir(&temporary).map_err(&to_error)?;
            let result =
                dir.open_dir(&temporary).and_then(|target| copy_tree(ctx, source, &target)).and_then(|copied| {
                    if dir.symlink_metadata(name).is_ok() {
                        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
                    }
                    dir.rename(&temporary, dir, name)?;
                    Ok(copied)
                });
            if result.is_err() {
                let _ = dir.remove_dir_all(&temporary);
            }
            result.map_err(install_error(ctx, &pair.to))
        }
        State::Hardlinked { links, .. } => Err(not_copied(ctx, &pair.from, *links)),
        _ => Err(ToolError::Refused(format!("{} cannot be copied", ctx.scope.display(&pair.from)))),
    }
}

/// Copies the tree below `source` into the empty directory `target`, never following a symlink
/// and skipping files whose content the scope does not read; stops (with an error) once the
/// call's deadline has passed.
fn copy_tree(ctx: &Context, source: Dir, target: &Dir) -> io::Result<Copied> {
    let mut copied = Copied { dirs: 1, ..Default::default() };
    let deadline = ctx.deadline;
    let limits = Limits { max_depth: walk::MAX_DEPTH, max_visits: TREE_LIMIT, deadline };
    let walked = walk::walk(
        source,
        limits,
        |error| error,
        |entry| {
            match entry.kind {
                Kind::Dir => {
                    target.create_dir(entry.rel)?;
                    copied.dirs += 1;
                }
                Kind::File => {
                    let from = match ctx.scope.open_entry(entry.dir, entry.name.as_ref()) {
                        Err(error) if multiply_linked(&error).is_some() => {
                            copied.skipped += 1;
                            return Ok(Flow::Continue);
                        }
                        opened => opened?,
                    };
                    let permissions = from.metadata()?.permissions();
                    let mut from = Watched::new(from, deadline);
                    let mut to = target.open_with(entry.rel, OpenOptions::new().write(true).create_new(true))?;
                    copied.bytes += io::copy(&mut from, &mut to)?;
                    to.set_permissions(permissions)?;
                    copied.files += 1;
                }
                Kind::Symlink | Kind::Other => copied.skipped += 1,
            }
            Ok(Flow::Continue)
        },
    )?;
    if walked.cut || walked.unreadable > 0 {
        return Err(io::Error::other("the tree could not be copied whole (too large, or unreadable directories)"));
    }
    Ok(copied)
}

/// Removes `name` from `dir` as its observed state says: a file or link, or a directory.
fn remove(dir: &Dir, name: &OsStr, state: &State, recursive: bool) -> io::Result<()> {
    match state {
        State::Dir { .. } if recursive => dir.remove_dir_all(name),
        State::Dir { .. } => dir.remove_dir(name),
        _ => dir.remove_file(name),
    }
}

/// Delete a file, a symlink, or a directory.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delete {
    /// What to delete: relative to the first root, or absolute inside a root. A symlink is
    /// removed itself, never what it points to.
    pub path: String,
    /// Delete a directory with everything in it (without it, only an empty directory is deleted).
    #[serde(default)]
    pub recursive: Option<bool>,
}

#[derive(Serialize)]
struct Deleted {
    applied: bool,
    path: String,
}

impl Builtin for Delete {
    const NAME: &'static str = "delete";
    const DESCRIPTION: &'static str = "Delete a file or symlink, an empty directory, or with recursive: true a whole tree (symlinks inside are removed, never followed). The apply verifies the file's hash (a tree's listing) first.";
}

impl Delete {
    fn recursive(&self) -> bool {
        self.recursive.unwrap_or(false)
    }

    fn check(&self, ctx: &Context, path: &ScopedPath, observed: &Observation) -> Result<String, ToolError> {
        let shown = ctx.scope.display(path);
        if path.is_root() {
            return Err(ToolError::Refused(format!("cannot delete a root ({shown})")));
        }
        Ok(match observed.state() {
            State::Absent => return Err(ToolError::Refused(format!("{shown} does not exist"))),
            State::File { size, .. } => format!("Delete file {shown} ({size} bytes)"),
            State::Hardlinked { size, links, .. } => {
                format!("Delete {shown} ({size} bytes), one of {links} hard links: the others keep the file")
            }
            State::Symlink { .. } => format!("Delete symlink {shown} (not what it points to)"),
            State::Other => format!("Delete special file {shown}"),
            State::Dir { entries: Some(entries), .. } => format!("Delete directory {shown} and its {entries} entries"),
            State::Dir { .. } => {
                let dir = ctx.scope.open_dir(path).map_err(ctx.io(path))?;
                if dir.entries().map_err(ctx.io(path))?.next().is_some() {
                    return Err(ToolError::Refused(format!(
                        "{shown} is a directory that is not empty: pass recursive: true to delete it all"
                    )));
                }
                format!("Delete empty directory {shown}")
            }
        })
    }
}

impl Mutation for Delete {
    type Snapshot = (ScopedPath, Observation);

    fn observe(&self, ctx: &Context) -> Result<(Preconditions, Self::Snapshot), ToolError> {
        let path = ctx.scope.resolve(&self.path)?;
        let depth = if self.recursive() { Depth::Tree } else { Depth::Shallow };
        let observed = observe(ctx, &path, depth, DIFF_LIMIT)?;
        Ok((Preconditions { target: Some(observed.condition.clone()), ..Default::default() }, (path, observed)))
    }

    fn plan(&self, ctx: &Context, (path, observed): &Self::Snapshot) -> Result<Change, ToolError> {
        let summary = self.check(ctx, path, observed)?;
        let diff = observed.content.as_deref().and_then(|old| text_diff(&ctx.scope.display(path), Some(old), None));
        Ok(Change { summary, diff })
    }

    fn apply(&self, ctx: &Context, (path, observed): Self::Snapshot) -> Result<Value, ToolError> {
        self.check(ctx, &path, &observed)?;
        let io_error = ctx.io(&path);
        let (dir, name) = ctx.scope.open_parent(&path).map_err(&io_error)?;
        remove(&dir, &name, observed.state(), self.recursive()).map_err(&io_error)?;
        to_json(&Deleted { applied: true, path: ctx.scope.display(&path) })
    }
}
