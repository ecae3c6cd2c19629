//! The control API's answers as text for a person at a terminal: aligned tables of devices,
//! proposals and directory entries, file contents, a proposal's summary and unified diff, the
//! pairing code with the command to paste, relative times ("12 s ago"). Pure functions from
//! the API's values to strings; colours only when [`Style::color`] says so (a terminal).
//!
//! Everything a device or a file chose (names, summaries, diffs, contents) passes through
//! [`printable`] first, so no escape sequence it holds reaches the operator's terminal.
//!
//! Not here: deciding what to show (the commands pick the renderer) or any I/O.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use protocol::{CallMode, CallOutcome, CallRecord, Device, HostResult, PairingCode, Proposal};
use serde_json::Value;

/// How to print: with ANSI colours (stdout is a terminal and `NO_COLOR` is unset) or without.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

/// A colour for a table cell or a diff line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paint {
    Green,
    Red,
    Cyan,
    Dim,
}

impl Style {
    pub fn paint(self, text: &str, paint: Paint) -> String {
        if !self.color || text.is_empty() {
            return text.to_owned();
        }
        let code = match paint {
            Paint::Green => "32",
            Paint::Red => "31",
            Paint::Cyan => "36",
            Paint::Dim => "2",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// Characters that would reorder what the terminal shows (bidirectional overrides).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with control characters shown as escapes (`\u{1b}`), except newlines, tabs and the
/// `\r` of a `\r\n`: a file or a device name cannot drive the operator's terminal.
pub fn printable(text: &str) -> Cow<'_, str> {
    let mut chars = text.chars().peekable();
    let risky = |c: char, next: Option<&char>| {
        (c.is_control() && c != '\n' && c != '\t' && !(c == '\r' && next == Some(&'\n'))) || is_bidi_control(c)
    };
    let mut clean = true;
    while let Some(c) = chars.next() {
        if risky(c, chars.peek()) {
            clean = false;
            break;
        }
    }
    if clean {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if risky(c, chars.peek()) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// One table cell: [`printable`], and on one line (newlines and tabs escaped too).
pub fn cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_bidi_control(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Rows under headers, columns aligned (two spaces apart), no trailing blanks. A cell's paint
/// wraps its text only, so colours never shift the alignment.
pub fn table(headers: &[&str], rows: &[Vec<(String, Option<Paint>)>], style: Style) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, (text, _)) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(text.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<(String, Option<Paint>)>| {
        let mut text = String::new();
        for (i, (cell, paint)) in cells.into_iter().enumerate().take(columns) {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            match paint {
                Some(paint) => text.push_str(&style.paint(&cell, paint)),
                None => text.push_str(&cell),
            }
            if i + 1 < columns {
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| ((*h).to_owned(), None)).collect());
    for row in rows {
        line(row.clone());
    }
    out
}

/// A span of seconds in words: `12 s`, `5 min`, `3 h`, `2 d` (rounded).
pub fn span(secs: u64) -> String {
    if secs < 60 {
        return format!("{secs} s");
    }
    let minutes = (secs + 30) / 60;
    if minutes < 60 {
        return format!("{minutes} min");
    }
    let hours = (secs + 1800) / 3600;
    if hours < 24 {
        return format!("{hours} h");
    }
    format!("{} d", (secs + 43_200) / 86_400)
}

/// `then` relative to `now`: `12 s ago`, `in 10 min`, `just now`.
pub fn relative_time(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let millis = (now - then).num_milliseconds();
    if millis.abs() < 1000 {
        return "just now".into();
    }
    let words = span(millis.unsigned_abs() / 1000);
    if millis > 0 {
        format!("{words} ago")
    } else {
        format!("in {words}")
    }
}

/// An RFC 3339 time to the second, as the API writes it.
pub fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `word` as one shell word: as it is when it holds only safe characters, else single-quoted.
pub fn shell_word(word: &str) -> Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

/// A new pairing code, when it expires, and the exact command that enrolls a device with it.
pub fn pairing(code: &PairingCode, server: &str, now: DateTime<Utc>) -> String {
    format!(
        "Pairing code: {code}\nExpires:      {at} ({left})\n\nOn the device, run:\n\n  host-agent run --server {server} --code {code}\n\n\
         Add --root <folder> for each folder it may use (the default is the home directory).\n",
        code = cell(&code.code),
        at = timestamp(code.expires_at),
        left = relative_time(now, code.expires_at),
        server = shell_word(server),
    )
}

/// The device table: name, id, online, replica, platform, last seen.
pub fn devices(devices: &[Device], now: DateTime<Utc>, style: Style) -> String {
    if devices.is_empty() {
        return "No devices yet. Pair one with: dispatcher pair\n".into();
    }
    let rows: Vec<Vec<(String, Option<Paint>)>> = devices
        .iter()
        .map(|device| {
            let online = if device.online { ("yes".to_owned(), Some(Paint::Green)) } else { ("no".into(), None) };
            let last_seen = match (device.online, device.last_seen_at) {
                (true, _) => "now".to_owned(),
                (false, Some(at)) => relative_time(now, at),
                (false, None) => "never".into(),
            };
            vec![
                (cell(&device.name), None),
                (cell(&device.id), None),
                online,
                (device.replica.as_deref().map_or_else(|| "-".into(), cell), None),
                (device.platform.as_deref().map_or_else(|| "-".into(), cell), None),
                (last_seen, None),
            ]
        })
        .collect();
    table(&["NAME", "ID", "ONLINE", "REPLICA", "PLATFORM", "LAST SEEN"], &rows, style)
}

/// The one-line summary of a device's plan, if it has one.
fn summary_of(plan: &Value) -> Option<&str> {
    plan.get("summary").and_then(Value::as_str)
}

/// The proposal table: id, device (its name when known), tool, status, created, summary.
pub fn proposals(
    proposals: &[Proposal],
    names: &HashMap<String, String>,
    all: bool,
    now: DateTime<Utc>,
    style: Style,
) -> String {
    if proposals.is_empty() {
        return if all { "No proposals.\n".into() } else { "No pending proposals.\n".into() };
    }
    let rows: Vec<Vec<(String, Option<Paint>)>> = proposals
        .iter()
        .map(|proposal| {
            let status = proposal.status.as_str();
            let paint = match status {
                "pending" => Some(Paint::Cyan),
                "applied" => Some(Paint::Green),
                "failed" => Some(Paint::Red),
                _ => None,
            };
            vec![
                (cell(&proposal.id), None),
                (cell(names.get(&proposal.device_id).unwrap_or(&proposal.device_id)), None),
                (cell(&proposal.tool), None),
                (status.to_owned(), paint),
                (relative_time(now, proposal.created_at), None),
                (summary_of(&proposal.proposal).map_or_else(String::new, cell), None),
            ]
        })
        .collect();
    table(&["ID", "DEVICE", "TOOL", "STATUS", "CREATED", "SUMMARY"], &rows, style)
}

/// An outcome's colour: green for ok, red for the failures, cyan while pending.
fn outcome_paint(outcome: CallOutcome) -> Option<Paint> {
    match outcome {
        CallOutcome::Ok => Some(Paint::Green),
        CallOutcome::Pending => Some(Paint::Cyan),
        CallOutcome::Error | CallOutcome::Offline | CallOutcome::TimedOut | CallOutcome::Unknown => Some(Paint::Red),
    }
}

fn mode_word(mode: CallMode) -> &'static str {
    match mode {
        CallMode::Auto => "auto",
        CallMode::Apply => "apply",
    }
}

/// Milliseconds in words: `850 ms`, `2.4 s`, then as [`span`].
pub fn duration_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => span(ms / 1000),
    }
}

/// A byte count in words: `512 B`, `3.2 KiB`, `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / KIB),
        _ => format!("{:.1} MiB", n as f64 / (KIB * KIB)),
    }
}

/// The call log table: when, device (its name when known), tool, mode, outcome, duration,
/// result size, call id.
pub fn calls(calls: &[CallRecord], names: &HashMap<String, String>, now: DateTime<Utc>, style: Style) -> String {
    if calls.is_empty() {
        return "No calls.\n".into();
    }
    let rows: Vec<Vec<(String, Option<Paint>)>> = calls
        .iter()
        .map(|call| {
            vec![
                (relative_time(now, call.dispatched_at), None),
                (cell(names.get(&call.device_id).unwrap_or(&call.device_id)), None),
                (cell(&call.tool), None),
                (mode_word(call.mode).to_owned(), None),
                (call.outcome.as_str().to_owned(), outcome_paint(call.outcome)),
                (call.duration_ms.map_or_else(|| "-".into(), duration_ms), None),
                (call.result_bytes.map_or_else(|| "-".into(), bytes), None),
                (cell(&call.call_id), None),
            ]
        })
        .collect();
    table(&["WHEN", "DEVICE", "TOOL", "MODE", "OUTCOME", "DURATION", "RESULT", "CALL ID"], &rows, style)
}

/// One call's record, a field a line.
pub fn call_record(call: &CallRecord, device_name: Option<&str>, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let at = |time: DateTime<Utc>| format!("{} ({})", timestamp(time), relative_time(now, time));
    let device = match device_name {
        Some(name) => format!("{} ({})", cell(name), cell(&call.device_id)),
        None => cell(&call.device_id),
    };
    let _ = writeln!(out, "Call:        {}", cell(&call.call_id));
    let _ = writeln!(out, "Device:      {device}");
    let _ = writeln!(out, "Tool:        {}", cell(&call.tool));
    let class = call.class.map(|c| format!(" ({c:?})").to_lowercase()).unwrap_or_default();
    let _ = writeln!(out, "Mode:        {}{class}", mode_word(call.mode));
    if let Some(id) = &call.proposal_id {
        let _ = writeln!(out, "Proposal:    {}", cell(id));
    }
    let _ = writeln!(out, "Outcome:     {}", call.outcome.as_str());
    if let Some(error) = &call.error {
        let _ = writeln!(out, "Error:       {}", cell(error));
    }
    let _ = writeln!(out, "Dispatched:  {} by {}", at(call.dispatched_at), cell(&call.dispatched_by));
    match (call.pushed_at, &call.pushed_by) {
        (Some(time), Some(by)) => {
            let _ = writeln!(out, "Pushed:      {} by {}", at(time), cell(by));
        }
        _ => {
            let _ = writeln!(out, "Pushed:      -");
        }
    }
    match call.finished_at {
        Some(time) => {
            let _ = writeln!(out, "Finished:    {}", at(time));
        }
        None => {
            let _ = writeln!(out, "Finished:    -");
        }
    }
    if let Some(ms) = call.duration_ms {
        let _ = writeln!(out, "Duration:    {}", duration_ms(ms));
    }
    if let Some(n) = call.result_bytes {
        let _ = writeln!(out, "Result size: {}", bytes(n));
    }
    out
}

/// A unified diff, lines coloured by kind when the style has colour.
pub fn diff(diff: &str, style: Style) -> String {
    let mut out = String::with_capacity(diff.len() + 1);
    for line in printable(diff).lines() {
        let paint = if line.starts_with("+++") || line.starts_with("---") {
            None
        } else if line.starts_with('+') {
            Some(Paint::Green)
        } else if line.starts_with('-') {
            Some(Paint::Red)
        } else if line.starts_with("@@") {
            Some(Paint::Cyan)
        } else {
            None
        };
        match paint {
            Some(paint) => out.push_str(&style.paint(line, paint)),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A device's plan for a mutation: its summary, the command it would run (a domain tool), and
/// its unified diff.
pub fn plan(plan: &Value, style: Style) -> String {
    let mut out = String::new();
    match summary_of(plan) {
        Some(summary) => {
            let _ = writeln!(out, "{}", printable(summary));
        }
        None => {
            let _ = writeln!(out, "{}", pretty_json(plan));
        }
    }
    if let Some(argv) = plan.get("command").and_then(Value::as_array) {
        let words: Vec<String> =
            argv.iter().map(|w| shell_word(&cell(w.as_str().unwrap_or(""))).into_owned()).collect();
        let _ = writeln!(out, "command: {}", words.join(" "));
    }
    if let Some(text) = plan.get("diff").and_then(Value::as_str) {
        out.push_str(&diff(text, style));
    }
    out
}

/// A call that answered a proposal: what it would do, and how to apply or reject it.
pub fn proposed(plan_value: &Value, proposal_id: &str, server: &str, style: Style) -> String {
    let id = cell(proposal_id);
    let server = shell_word(server);
    format!(
        "Proposed (nothing has changed yet): {}\nProposal: {id}\nApply it:  dispatcher approve {id} --server {server}\n\
         Reject it: dispatcher reject {id} --server {server}\n",
        plan(plan_value, style)
    )
}

/// A proposal as approve shows it before asking: where, what, and the change.
pub fn proposal(proposal: &Proposal, device_name: Option<&str>, now: DateTime<Utc>, style: Style) -> String {
    let device = match device_name {
        Some(name) => format!("{} ({})", cell(name), cell(&proposal.device_id)),
        None => cell(&proposal.device_id),
    };
    format!(
        "Proposal {id} ({status})\nDevice:  {device}\nTool:    {tool}\nCreated: {at} ({ago})\n\n{plan}",
        id = cell(&proposal.id),
        status = proposal.status.as_str(),
        tool = cell(&proposal.tool),
        at = timestamp(proposal.created_at),
        ago = relative_time(now, proposal.created_at),
        plan = plan(&proposal.proposal, style),
    )
}

/// JSON indented for reading, escapes and all (control characters are escaped by JSON itself).
pub fn pretty_json(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// A tool's result as text, and a note for stderr (truncation, a binary file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub text: String,
    pub note: Option<String>,
}

fn entries_table(result: &Value) -> Option<Output> {
    let entries = result.get("entries")?.as_array()?;
    let mut rows = Vec::with_capacity(entries.len());
    for entry in entries {
        let kind = entry.get("type")?.as_str()?;
        let path = entry.get("path").or_else(|| entry.get("name"))?.as_str()?;
        let size = match (kind, entry.get("size").and_then(Value::as_u64)) {
            ("file", Some(size)) => size.to_string(),
            _ => "-".into(),
        };
        rows.push(vec![(cell(kind), None), (size, None), (cell(path), None)]);
    }
    let text = if rows.is_empty() {
        "(empty directory)\n".to_owned()
    } else {
        table(&["TYPE", "SIZE", "PATH"], &rows, Style::default())
    };
    let truncated = result.get("truncated").and_then(Value::as_bool).unwrap_or(false);
    let note = truncated.then(|| format!("truncated: the listing stopped after {} entries", rows.len()));
    Some(Output { text, note })
}

fn file_content(result: &Value) -> Option<Output> {
    if result.get("binary").and_then(Value::as_bool) == Some(true) {
        let size = result.get("size").and_then(Value::as_u64).map_or_else(|| "unknown".into(), |s| s.to_string());
        return Some(Output { text: String::new(), note: Some(format!("binary file ({size} bytes), not shown")) });
    }
    let content = result.get("content")?.as_str()?;
    let mut text = printable(content).into_owned();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let truncated = result.get("truncated").and_then(Value::as_bool).unwrap_or(false);
    let note = truncated.then(|| {
        let total = result.get("totalLines").and_then(Value::as_u64);
        let total = total.map_or_else(String::new, |n| format!(" of {n} lines"));
        format!("truncated: this is not the whole file{total}; read the rest with startLine and endLine")
    });
    Some(Output { text, note })
}

/// A successful tool result: `list_directory` as a table, `read_file` as the file's text,
/// anything else as indented JSON.
pub fn tool_result(tool: &str, result: Option<&Value>) -> Output {
    let Some(result) = result.filter(|r| !r.is_null()) else {
        return Output { text: "done (no result)\n".into(), note: None };
    };
    let shaped = match tool {
        "list_directory" => entries_table(result),
        "read_file" => file_content(result),
        _ => None,
    };
    shaped.unwrap_or_else(|| Output { text: format!("{}\n", pretty_json(result)), note: None })
}

/// The outcome of an approval that the device answered with `ok: true`.
pub fn applied(result: &HostResult) -> String {
    match &result.result {
        None | Some(Value::Null) => "Applied.\n".into(),
        Some(Value::Object(fields)) if fields.is_empty() => "Applied.\n".into(),
        Some(value) => format!("Applied.\n{}\n", pretty_json(value)),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use protocol::ProposalStatus;
    use serde_json::json;

    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn device(name: &str, id: &str, online: bool, replica: Option<&str>, last_seen: Option<i64>) -> Device {
        Device {
            id: id.into(),
            name: name.into(),
            platform: Some("linux".into()),
            online,
            replica: replica.map(str::to_owned),
            created_at: at(-86_400),
            last_seen_at: last_seen.map(at),
            tools: None,
            roots: None,
            tool_count: None,
        }
    }

    #[test]
    fn spans_and_relative_times() {
        let cases: &[(u64, &str)] = &[
            (0, "0 s"),
            (12, "12 s"),
            (59, "59 s"),
            (60, "1 min"),
            (89, "1 min"),
            (90, "2 min"),
            (599, "10 min"),
            (3599, "1 h"),
            (7200, "2 h"),
            (86_399, "1 d"),
            (3 * 86_400, "3 d"),
        ];
        for (secs, want) in cases {
            assert_eq!(span(*secs), *want, "{secs}");
        }
        assert_eq!(relative_time(at(12), at(0)), "12 s ago");
        assert_eq!(relative_time(at(0), at(600)), "in 10 min");
        assert_eq!(relative_time(at(0), at(0)), "just now");
        assert_eq!(relative_time(at(0), at(-7200)), "2 h ago");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert!(matches!(printable("plain\ttext\nline two\r\n"), Cow::Borrowed(_)));
        assert_eq!(printable("red \x1b[31mX"), "red \\u{1b}[31mX");
        assert_eq!(printable("a\rb"), "a\\u{d}b");
        assert_eq!(printable("bell\x07 del\x7f c1\u{9b}"), "bell\\u{7} del\\u{7f} c1\\u{9b}");
        assert_eq!(printable("abc\u{202e}def"), "abc\\u{202e}def");
        assert_eq!(cell("two\nlines\tand\x1b"), "two\\nlines\\tand\\u{1b}");
    }

    #[test]
    fn tables_align_and_paint_only_the_text() {
        let rows = vec![
            vec![("a".to_owned(), None), ("long value".to_owned(), Some(Paint::Green)), ("x".to_owned(), None)],
            vec![("ééé".to_owned(), None), ("v".to_owned(), None), (String::new(), None)],
        ];
        let plain = table(&["K", "VALUE", "LAST"], &rows, Style::default());
        assert_eq!(plain, "K    VALUE       LAST\na    long value  x\nééé  v\n");
        let colored = table(&["K", "VALUE", "LAST"], &rows, Style { color: true });
        assert_eq!(colored.lines().nth(1), Some("a    \x1b[32mlong value\x1b[0m  x"));
    }

    #[test]
    fn device_table() {
        let id_a = "11111111-1111-4111-8111-111111111111";
        let id_b = "22222222-2222-4222-8222-222222222222";
        let list = [
            device("laptop", id_a, true, Some("replica-a"), Some(-30)),
            device("old\x1b[2Jbox", id_b, false, None, Some(-125)),
        ];
        let text = devices(&list, at(0), Style::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[0],
            "NAME             ID                                    ONLINE  REPLICA    PLATFORM  LAST SEEN"
        );
        assert_eq!(lines[1], format!("laptop           {id_a}  yes     replica-a  linux     now"));
        assert_eq!(lines[2], format!("old\\u{{1b}}[2Jbox  {id_b}  no      -          linux     2 min ago"));
        assert!(!text.contains('\x1b'));
        let never = [device("new", id_a, false, None, None)];
        assert!(devices(&never, at(0), Style::default()).lines().nth(1).unwrap().ends_with("never"));
        assert!(devices(&[], at(0), Style::default()).starts_with("No devices yet"));
        let colored = devices(&list, at(0), Style { color: true });
        assert!(colored.contains("\x1b[32myes\x1b[0m"), "{colored}");
    }

    fn stored(id: &str, device_id: &str, status: ProposalStatus, plan: Value) -> Proposal {
        Proposal {
            id: id.into(),
            device_id: device_id.into(),
            tool: "write_file".into(),
            input: json!({"path": "notes.txt", "content": "hi\n"}),
            proposal: plan,
            status,
            created_at: at(-180),
            decided_at: None,
            result: None,
        }
    }

    #[test]
    fn proposal_table_names_devices() {
        let plan = json!({"tool": "write_file", "summary": "Create notes.txt (3 bytes)", "preconditions": {}});
        let list = [
            stored("p1", "d1", ProposalStatus::Pending, plan.clone()),
            stored("p2", "d2", ProposalStatus::Applied, json!({})),
        ];
        let names = HashMap::from([("d1".to_owned(), "laptop".to_owned())]);
        let text = proposals(&list, &names, true, at(0), Style::default());
        assert_eq!(
            text,
            "ID  DEVICE  TOOL        STATUS   CREATED    SUMMARY\n\
             p1  laptop  write_file  pending  3 min ago  Create notes.txt (3 bytes)\n\
             p2  d2      write_file  applied  3 min ago\n"
        );
        assert_eq!(proposals(&[], &names, false, at(0), Style::default()), "No pending proposals.\n");
        assert_eq!(proposals(&[], &names, true, at(0), Style::default()), "No proposals.\n");
    }

    #[test]
    fn plans_show_summary_command_and_diff() {
        let diff_text = "--- a/notes.txt\n+++ b/notes.txt\n@@ -1 +1 @@\n-old\n+new\n";
        let plan_value = json!({"tool": "write_file", "summary": "Overwrite notes.txt (4 → 4 bytes)",
            "diff": diff_text, "preconditions": {}});
        assert_eq!(plan(&plan_value, Style::default()), format!("Overwrite notes.txt (4 → 4 bytes)\n{diff_text}"));
        let colored = plan(&plan_value, Style { color: true });
        assert!(colored.contains("\x1b[31m-old\x1b[0m\n\x1b[32m+new\x1b[0m\n"), "{colored}");
        assert!(colored.contains("\n--- a/notes.txt\n+++ b/notes.txt\n"), "{colored}");

        let domain = json!({"tool": "convert", "summary": "Convert a.las", "command": ["/usr/bin/conv", "a b.las"]});
        assert_eq!(plan(&domain, Style::default()), "Convert a.las\ncommand: /usr/bin/conv 'a b.las'\n");

        let text = proposed(&plan_value, "p-1", "http://127.0.0.1:9", Style::default());
        assert!(text.starts_with("Proposed (nothing has changed yet): Overwrite notes.txt"), "{text}");
        assert!(text.contains("\n-old\n+new\n\nProposal: p-1\n"), "{text}");
        assert!(text.contains("Apply it:  dispatcher approve p-1 --server http://127.0.0.1:9\n"), "{text}");
        assert!(text.contains("Reject it: dispatcher reject p-1 --server http://127.0.0.1:9\n"), "{text}");
    }

    #[test]
    fn approve_preview() {
        let plan_value = json!({"summary": "Create notes.txt (3 bytes)", "diff": "+hi\n"});
        let text =
            proposal(&stored("p1", "d1", ProposalStatus::Pending, plan_value), Some("laptop"), at(0), Style::default());
        assert_eq!(
            text,
            "Proposal p1 (pending)\nDevice:  laptop (d1)\nTool:    write_file\nCreated: 2023-11-14T22:10:20Z (3 min ago)\n\n\
             Create notes.txt (3 bytes)\n+hi\n"
        );
    }

    #[test]
    fn pairing_prints_the_command_to_paste() {
        let code = PairingCode { code: "K7Q2-9XMD-40AF".into(), expires_at: at(600) };
        let text = pairing(&code, "http://127.0.0.1:8080", at(0));
        assert!(text.starts_with("Pairing code: K7Q2-9XMD-40AF\nExpires:      2023-11-14T22:23:20Z (in 10 min)\n"));
        assert!(text.contains("\n  host-agent run --server http://127.0.0.1:8080 --code K7Q2-9XMD-40AF\n"), "{text}");
        let odd = pairing(&code, "https://h/x y", at(0));
        assert!(odd.contains("--server 'https://h/x y' --code"), "{odd}");
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("https://d.example:8443/pulsn"), "https://d.example:8443/pulsn");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("$(rm)"), "'$(rm)'");
    }

    #[test]
    fn tool_results() {
        let listing = json!({"entries": [
            {"path": "docs", "name": "docs", "type": "dir", "size": 4096},
            {"path": "docs/readme.md", "name": "readme.md", "type": "file", "size": 9},
        ], "truncated": false});
        let out = tool_result("list_directory", Some(&listing));
        assert_eq!(out.text, "TYPE  SIZE  PATH\ndir   -     docs\nfile  9     docs/readme.md\n");
        assert_eq!(out.note, None);
        let cut = tool_result("list_directory", Some(&json!({"entries": [], "truncated": true})));
        assert_eq!(cut.text, "(empty directory)\n");
        assert_eq!(cut.note.as_deref(), Some("truncated: the listing stopped after 0 entries"));

        let read =
            tool_result("read_file", Some(&json!({"content": "hello\nworld", "totalLines": 2, "truncated": false})));
        assert_eq!(read, Output { text: "hello\nworld\n".into(), note: None });
        let long = tool_result("read_file", Some(&json!({"content": "a\n", "totalLines": 90000, "truncated": true})));
        assert_eq!(long.text, "a\n");
        assert!(long.note.as_deref().unwrap().contains("not the whole file of 90000 lines"), "{long:?}");
        let binary = tool_result("read_file", Some(&json!({"binary": true, "size": 2048})));
        assert_eq!(binary.text, "");
        assert_eq!(binary.note.as_deref(), Some("binary file (2048 bytes), not shown"));
        let escaped = tool_result("read_file", Some(&json!({"content": "\x1b]0;owned\x07", "truncated": false})));
        assert_eq!(escaped.text, "\\u{1b}]0;owned\\u{7}\n");

        let stat = json!({"type": "file", "size": 3});
        assert_eq!(
            tool_result("stat", Some(&stat)).text,
            format!("{}\n", serde_json::to_string_pretty(&stat).unwrap())
        );
        // A shape the renderer does not know falls back to JSON.
        let odd = json!({"entries": "not a list"});
        assert!(tool_result("list_directory", Some(&odd)).text.contains("\"not a list\""));
        assert_eq!(tool_result("open_path", None).text, "done (no result)\n");
    }

    #[test]
    fn apply_outcomes() {
        assert_eq!(applied(&HostResult::success("c", json!({}))), "Applied.\n");
        assert_eq!(applied(&HostResult::success("c", Value::Null)), "Applied.\n");
        assert_eq!(applied(&HostResult::success("c", json!({"written": 3}))), "Applied.\n{\n  \"written\": 3\n}\n");
    }
}
