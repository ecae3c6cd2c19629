//! The search tools: glob (find paths by pattern, with globset) and grep (search contents, with
//! grep-searcher and grep-regex).
//!
//! Owns their inputs, outputs and bounds: glob returns at most 1000 paths, grep at most 200
//! matches with each line (and context line) cut to 1 KiB, both walk at most 100,000 entries and
//! grep reads at most 1 GiB, each bound reported as `truncated`. Every file grep reads is opened
//! from the handle of the directory holding it (see `walk`); a file with more than one hard link
//! is not read unless the device allows it (see `crate::scope`): named directly it is refused,
//! met in a walk it is skipped and counted in `skippedHardlinked`. Does not: change anything.

use std::collections::VecDeque;
use std::io::{self, Read};

use globset::{GlobBuilder, GlobMatcher};
use grep_regex::{RegexMatcher, RegexMatcherBuilder};
use grep_searcher::{BinaryDetection, Searcher, SearcherBuilder, Sink, SinkContext, SinkMatch};
use protocol::ToolClass;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::deadline::{is_expired, Deadline, Watched};
use super::walk::{self, Flow, Kind, Limits};
use super::{to_json, Builtin, Context, Immediate, ToolError};
use crate::scope::{multiply_linked, ScopedPath};

/// glob returns at most this many paths.
pub const GLOB_LIMIT: usize = 1000;
/// grep returns at most this many matches.
pub const MATCH_LIMIT: usize = 200;
/// grep cuts every returned line to this many bytes.
pub const LINE_LIMIT: usize = 1024;
/// grep returns at most this many context lines on each side of a match.
pub const CONTEXT_LIMIT: u32 = 10;
/// glob and grep visit at most this many entries.
pub const SEARCH_VISIT_LIMIT: usize = 100_000;
/// grep reads at most this many bytes in all.
pub const SEARCH_BYTE_LIMIT: u64 = 1 << 30;
/// A single line longer than this makes grep skip the file (bounds the searcher's buffer).
const HEAP_LIMIT: usize = 64 << 20;

/// Find paths by glob pattern.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Glob {
    /// Matched against paths relative to `path`, with `/` separators: `*` and `?` stay within one
    /// component, `**` spans directories, `{a,b}` alternates, `[ab]` is a class.
    pub pattern: String,
    /// The directory to search (default: the first root).
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Serialize)]
struct GlobOutput {
    matches: Vec<String>,
    truncated: bool,
}

impl Builtin for Glob {
    const NAME: &'static str = "glob";
    const DESCRIPTION: &'static str = "Find files and directories whose path relative to `path` (default: the first root) matches a glob such as `**/*.rs` or `src/*.{ts,tsx}`. Returns absolute paths, at most 1000, with truncated: true when there were more. Symlinks are matched, never followed.";
}

impl Immediate for Glob {
    const CLASS: ToolClass = ToolClass::Read;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let matcher = relative_glob(&self.pattern)?;
        let base = ctx.resolve_or_root(self.path.as_deref())?;
        let io_error = ctx.io(&base);
        let dir = ctx.scope.open_dir(&base).map_err(&io_error)?;
        // Without `**` a match has at most as many components as the pattern has separators + 1.
        let max_depth =
            if self.pattern.contains("**") { walk::MAX_DEPTH } else { self.pattern.matches('/').count() + 1 };
        let mut matches = Vec::new();
        let mut truncated = false;
        let limits = Limits { max_depth, max_visits: SEARCH_VISIT_LIMIT, deadline: ctx.deadline };
        let walked = walk::walk(dir, limits, &io_error, |entry| {
            if matcher.is_match(entry.rel_slash()) {
                if matches.len() == GLOB_LIMIT {
                    truncated = true;
                    return Ok(Flow::Stop);
                }
                matches.push(ctx.scope.display(&base.join(entry.rel)));
            }
            Ok(Flow::Continue)
        })?;
        to_json(&GlobOutput { matches, truncated: truncated || walked.cut })
    }
}

/// A glob over relative paths; absolute patterns and `..` are refused (they could never match).
fn relative_glob(pattern: &str) -> Result<GlobMatcher, ToolError> {
    if pattern.is_empty() {
        return Err(ToolError::Refused("the glob pattern is empty".to_owned()));
    }
    if pattern.starts_with(['/', '\\']) || pattern.split(['/', '\\']).any(|part| part == "..") {
        return Err(ToolError::Refused(format!(
            "glob pattern {pattern:?} must be relative to `path` without `..`: pass the directory as `path`"
        )));
    }
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|glob| glob.compile_matcher())
        .map_err(|error| ToolError::Refused(format!("invalid glob pattern: {error}")))
}

/// Search file contents for a regular expression (or a literal string).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grep {
    /// A regular expression (Rust regex syntax), or a literal string with `literal: true`.
    pub pattern: String,
    /// A file or a directory to search (default: the first root).
    #[serde(default)]
    pub path: Option<String>,
    /// Match `pattern` literally instead of as a regular expression.
    #[serde(default)]
    pub literal: Option<bool>,
    #[serde(default)]
    pub case_insensitive: Option<bool>,
    /// Lines of context to return before and after each match (at most 10).
    #[serde(default)]
    #[schemars(range(max = 10))]
    pub context: Option<u32>,
    /// Only search files matching this glob: against the file name when it has no `/`, else
    /// against the path relative to `path`.
    #[serde(default)]
    pub glob: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GrepOutput {
    matches: Vec<Match>,
    truncated: bool,
    /// Files with more than one hard link met in the walk and not read (absent when none).
    #[serde(skip_serializing_if = "is_zero")]
    skipped_hardlinked: u64,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

#[derive(Serialize)]
struct Match {
    path: String,
    line: u64,
    text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<Vec<String>>,
    /// Set when `text` was cut to 1 KiB.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

impl Builtin for Grep {
    const NAME: &'static str = "grep";
    const DESCRIPTION: &'static str = "Search file contents under `path` (a file or directory; default: the first root) for a regex or, with literal: true, a plain string. Returns {matches: [{path, line, text, before?, after?}], truncated}: at most 200 matches, each line cut to 1 KiB (the match then has truncated: true). Binary files are skipped; symlinks are not followed; `glob` filters the files searched. Files with several hard links are not read unless the device allows it (skippedHardlinked counts those skipped).";
}

impl Immediate for Grep {
    const CLASS: ToolClass = ToolClass::Read;

    fn run(self, ctx: &Context) -> Result<Value, ToolError> {
        let context = self.context.unwrap_or(0);
        if context > CONTEXT_LIMIT {
            return Err(ToolError::Refused(format!("context is at most {CONTEXT_LIMIT} lines")));
        }
        let matcher = RegexMatcherBuilder::new()
            .case_insensitive(self.case_insensitive.unwrap_or(false))
            .fixed_strings(self.literal.unwrap_or(false))
            .line_terminator(Some(b'\n'))
            .build(&self.pattern)
            .map_err(|error| ToolError::Refused(format!("invalid pattern: {error}")))?;
        let filter = self.glob.as_deref().map(FileFilter::new).transpose()?;
        let base = ctx.resolve_or_root(self.path.as_deref())?;
        let mut search = Search {
            matcher,
            searcher: SearcherBuilder::new()
                .line_number(true)
                .before_context(context as usize)
                .after_context(context as usize)
                .binary_detection(BinaryDetection::quit(0))
                .heap_limit(Some(HEAP_LIMIT))
                .build(),
            context: context as usize,
            matches: Vec::new(),
            full: false,
            budget: SEARCH_BYTE_LIMIT,
            deadline: ctx.deadline,
        };
        let io_error = ctx.io(&base);
        let metadata = ctx.scope.metadata(&base).map_err(&io_error)?;
        let mut truncated = false;
        let mut skipped_hardlinked = 0;
        if metadata.is_dir() {
            let dir = ctx.scope.open_dir(&base).map_err(&io_error)?;
            let limits = Limits { max_depth: walk::MAX_DEPTH, max_visits: SEARCH_VISIT_LIMIT, deadline: ctx.deadline };
            let walked = walk::walk(dir, limits, &io_error, |entry| {
                if entry.kind != Kind::File || filter.as_ref().is_some_and(|f| !f.matches(entry)) {
                    return Ok(Flow::Continue);
                }
                // Files that vanish or cannot be read mid-walk are skipped, as grep does; a deadline
                // met inside one stops the search.
                match ctx.scope.open_entry(entry.dir, entry.name.as_ref()) {
                    Ok(file) => {
                        let shown = ctx.scope.display(&base.join(entry.rel));
                        if let Err(error) = search.file(file, shown) {
                            if is_expired(&error) {
                                return Err(ToolError::DeadlineExceeded);
                            }
                        }
                    }
                    Err(error) if multiply_linked(&error).is_some() => skipped_hardlinked += 1,
                    Err(_) => {}
                }
                Ok(if search.done() { Flow::Stop } else { Flow::Continue })
            })?;
            truncated |= walked.cut;
        } else {
            let name_ok = filter.as_ref().is_none_or(|f| f.matches_name(&base));
            if name_ok {
                let file = ctx.scope.open_file(&base).map_err(&io_error)?;
                search.file(file, ctx.scope.display(&base)).map_err(&io_error)?;
            }
        }
        truncated |= search.full || search.budget == 0;
        to_json(&GrepOutput { matches: search.matches, truncated, skipped_hardlinked })
    }
}

/// The `glob` filter of grep.
struct FileFilter {
    matcher: GlobMatcher,
    by_name: bool,
}

impl FileFilter {
    fn new(pattern: &str) -> Result<Self, ToolError> {
        Ok(FileFilter { matcher: relative_glob(pattern)?, by_name: !pattern.contains('/') })
    }

    fn matches(&self, entry: &walk::Entry<'_>) -> bool {
        if self.by_name {
            self.matcher.is_match(entry.name)
        } else {
            self.matcher.is_match(entry.rel_slash())
        }
    }

    fn matches_name(&self, path: &ScopedPath) -> bool {
        path.name().is_some_and(|name| self.matcher.is_match(name))
    }
}

struct Search {
    matcher: RegexMatcher,
    searcher: Searcher,
    context: usize,
    matches: Vec<Match>,
    /// A match past [`MATCH_LIMIT`] was found.
    full: bool,
    /// Bytes left to read in all.
    budget: u64,
    deadline: Deadline,
}

impl Search {
    fn done(&self) -> bool {
        self.full || self.budget == 0
    }

    fn file(&mut self, file: cap_std::fs::File, path: String) -> io::Result<()> {
        let mut sink = Collector {
            path,
            context: self.context,
            recent: VecDeque::new(),
            open: Vec::new(),
            matches: &mut self.matches,
            full: &mut self.full,
        };
        let reader = Budgeted { inner: Watched::new(file, self.deadline), budget: &mut self.budget };
        self.searcher.search_reader(&self.matcher, reader, &mut sink)
    }
}

/// A reader that ends once the shared byte budget is spent.
struct Budgeted<'a, R> {
    inner: R,
    budget: &'a mut u64,
}

impl<R: Read> Read for Budgeted<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let allowed = usize::try_from(*self.budget).unwrap_or(usize::MAX).min(buffer.len());
        let read = self.inner.read(&mut buffer[..allowed])?;
        *self.budget -= read as u64;
        Ok(read)
    }
}

/// Collects matches with their context. grep-searcher reports each line once, as a match or as
/// context; the collector keeps the last `context` lines so a match's `before` holds its full
/// window, and feeds following lines to the `after` of every match whose window is still open.
struct Collector<'a> {
    path: String,
    context: usize,
    recent: VecDeque<(u64, String)>,
    /// Indexes into `matches` still collecting `after` lines.
    open: Vec<usize>,
    matches: &'a mut Vec<Match>,
    full: &'a mut bool,
}

impl Collector<'_> {
    fn line(&mut self, number: u64, bytes: &[u8], is_match: bool) -> bool {
        let (text, cut) = clip_line(bytes);
        let context = self.context as u64;
        let matches = &mut *self.matches;
        self.open.retain(|&index| {
            let open = &mut matches[index];
            if number > open.line && number <= open.line + context {
                open.after.get_or_insert_with(Vec::new).push(text.clone());
            }
            number < open.line + context
        });
        if is_match {
            if self.matches.len() == MATCH_LIMIT {
                *self.full = true;
                return false;
            }
            let before = (self.context > 0).then(|| {
                self.recent
                    .iter()
                    .filter(|(line, _)| *line < number && line + context >= number)
                    .map(|(_, text)| text.clone())
                    .collect()
            });
            self.matches.push(Match {
                path: self.path.clone(),
                line: number,
                text: text.clone(),
                before,
                after: (self.context > 0).then(Vec::new),
                truncated: cut,
            });
            if self.context > 0 {
                self.open.push(self.matches.len() - 1);
            }
        }
        if self.context > 0 {
            self.recent.push_back((number, text));
            while self.recent.len() > self.context {
                self.recent.pop_front();
            }
        }
        true
    }
}

/// A line without its terminator, cut to [`LINE_LIMIT`] bytes at a character boundary.
fn clip_line(bytes: &[u8]) -> (String, bool) {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.len() <= LINE_LIMIT {
        return (String::from_utf8_lossy(bytes).into_owned(), false);
    }
    let mut cut = LINE_LIMIT;
    // Back off over UTF-8 continuation bytes so a character is never split.
    while cut > 0 && (bytes[cut] & 0b1100_0000) == 0b1000_0000 {
        cut -= 1;
    }
    (String::from_utf8_lossy(&bytes[..cut]).into_owned(), true)
}

impl Sink for Collector<'_> {
    type Error = io::Error;

    fn matched(&mut self, _: &Searcher, found: &SinkMatch<'_>) -> Result<bool, io::Error> {
        let first = found.line_number().unwrap_or(0);
        for (offset, line) in found.lines().enumerate() {
            if !self.line(first + offset as u64, line, true) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn context(&mut self, _: &Searcher, context: &SinkContext<'_>) -> Result<bool, io::Error> {
        Ok(self.line(context.line_number().unwrap_or(0), context.bytes(), false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_keeps_characters_whole() {
        let (text, cut) = clip_line("é".repeat(600).as_bytes());
        assert!(cut);
        assert_eq!(text.len(), LINE_LIMIT);
        let (text, cut) = clip_line(format!("a{}", "é".repeat(600)).as_bytes());
        assert!(cut);
        assert_eq!(text.len(), LINE_LIMIT - 1);
        assert_eq!(clip_line(b"abc\r\n"), ("abc".to_owned(), false));
    }

    #[test]
    fn globs_are_relative() {
        assert!(relative_glob("/etc/*").is_err());
        assert!(relative_glob("../*").is_err());
        assert!(relative_glob("a/../../b").is_err());
        let glob = relative_glob("src/*.rs").expect("glob");
        assert!(glob.is_match("src/main.rs"));
        assert!(!glob.is_match("src/a/main.rs"));
        assert!(relative_glob("**/*.rs").expect("glob").is_match("a/b/c.rs"));
    }
}
