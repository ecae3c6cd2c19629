//! What an answer of the control API means for the operator: [`classify`] sorts a status and
//! body into done, device offline, device timed out, refused or failed, and [`CliError`] is the
//! one error every command returns, each variant with its exit code ([`ExitCode`], as
//! CONTRACT.md lists them). Pure: no I/O here.
//!
//! Not here: the words of a command's own failures (the commands add the context), nor any
//! decision of the server's (this only reads what it answered).

use serde_json::Value;

/// The exit codes of the operator commands (CONTRACT.md, "The operator CLI").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The command did what it was asked.
    Done = 0,
    /// The tool (or an apply) answered `ok: false`.
    ToolFailed = 1,
    /// A usage error: bad flags or input, an ambiguous name, a confirmation that cannot be asked.
    Usage = 2,
    /// `device offline` (503).
    Offline = 3,
    /// `device timed out` (504).
    TimedOut = 4,
    /// The server refused: 401, 403, 404, 409 or another 4xx.
    Refused = 5,
    /// The server could not be reached (connection, DNS, TLS, timeout) or could not serve (5xx).
    Unreachable = 6,
}

impl From<ExitCode> for i32 {
    fn from(code: ExitCode) -> Self {
        code as i32
    }
}

/// Why an operator command did not end with exit code 0; the text is what stderr shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    ToolFailed(String),
    #[error("{0}")]
    Offline(String),
    #[error("{0}")]
    TimedOut(String),
    #[error("{message} (the server answered {status})")]
    Refused { status: u16, message: String },
    #[error("{0}")]
    Unreachable(String),
    #[error("the server failed: {message} ({status})")]
    ServerFailed { status: u16, message: String },
    #[error("unexpected answer from the server: {0}")]
    Unexpected(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_) => ExitCode::Usage,
            Self::ToolFailed(_) => ExitCode::ToolFailed,
            Self::Offline(_) => ExitCode::Offline,
            Self::TimedOut(_) => ExitCode::TimedOut,
            Self::Refused { .. } => ExitCode::Refused,
            Self::Unreachable(_) | Self::ServerFailed { .. } | Self::Unexpected(_) => ExitCode::Unreachable,
        }
    }
}

/// What kind of answer a status and body are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 2xx.
    Success,
    /// 503 with the server-made HostResult `device offline`.
    Offline,
    /// 504 with the server-made HostResult `device timed out`.
    TimedOut,
    /// Any 4xx.
    Refused,
    /// Anything else: a 5xx without those texts (a proxy's, or the server's own failure).
    Failed,
}

/// Sorts an answer. 503 and 504 count as the device's only when the body is the contract's
/// HostResult with its exact error text: a load balancer's 503 is not about the device.
pub fn classify(status: u16, body: &Value) -> Answer {
    let error = body.get("error").and_then(Value::as_str);
    match status {
        200..=299 => Answer::Success,
        503 if error == Some(protocol::ERROR_DEVICE_OFFLINE) => Answer::Offline,
        504 if error == Some(protocol::ERROR_DEVICE_TIMED_OUT) => Answer::TimedOut,
        400..=499 => Answer::Refused,
        _ => Answer::Failed,
    }
}

/// The server's words for a failure: its `{"error"}` text, else the body itself (cut to one
/// short line, e.g. a proxy's HTML page), else the status's reason.
pub fn error_text(status: u16, body: &Value) -> String {
    const LONGEST: usize = 200;
    if let Some(error) = body.get("error").and_then(Value::as_str) {
        return error.to_owned();
    }
    let text = match body {
        Value::Null => String::new(),
        Value::String(text) => text.split_whitespace().collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    };
    if text.is_empty() {
        return http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("no reason given")
            .to_lowercase();
    }
    match text.char_indices().nth(LONGEST) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The error for an answer that is not a success: refused (4xx) or failed (anything else).
/// Offline and timed-out answers of calls and approvals are worded by their commands.
pub fn failure(status: u16, body: &Value) -> CliError {
    let message = error_text(status, body);
    if (400..=499).contains(&status) {
        CliError::Refused { status, message }
    } else {
        CliError::ServerFailed { status, message }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn answers_are_classified() {
        let offline = json!({"callId": "c", "ok": false, "error": "device offline"});
        let timed_out = json!({"callId": "c", "ok": false, "error": "device timed out"});
        let cases: &[(u16, Value, Answer)] = &[
            (200, json!({"ok": true}), Answer::Success),
            (201, json!({"code": "X"}), Answer::Success),
            (204, Value::Null, Answer::Success),
            (200, json!({"ok": false, "error": "device offline"}), Answer::Success),
            (503, offline.clone(), Answer::Offline),
            (504, timed_out.clone(), Answer::TimedOut),
            (503, json!({"error": "the bus is unavailable"}), Answer::Failed),
            (503, Value::String("<html>no upstream</html>".into()), Answer::Failed),
            (504, json!({"error": "device offline"}), Answer::Failed),
            (503, timed_out, Answer::Failed),
            (504, offline, Answer::Failed),
            (400, json!({"error": "bad"}), Answer::Refused),
            (401, json!({"error": "missing or invalid credentials"}), Answer::Refused),
            (403, json!({"error": "forbidden"}), Answer::Refused),
            (404, json!({"error": "not found"}), Answer::Refused),
            (409, json!({"error": "proposal is applied, not pending"}), Answer::Refused),
            (413, Value::Null, Answer::Refused),
            (429, json!({"error": "slow down"}), Answer::Refused),
            (500, json!({"error": "internal error"}), Answer::Failed),
            (502, Value::Null, Answer::Failed),
            (302, Value::Null, Answer::Failed),
        ];
        for (status, body, want) in cases {
            assert_eq!(classify(*status, body), *want, "{status} {body}");
        }
    }

    #[test]
    fn error_texts() {
        assert_eq!(error_text(404, &json!({"error": "not found"})), "not found");
        assert_eq!(error_text(502, &Value::Null), "bad gateway");
        assert_eq!(error_text(599, &Value::Null), "no reason given");
        assert_eq!(error_text(503, &Value::String("<html>\n  down\n</html>".into())), "<html> down </html>");
        assert_eq!(error_text(400, &json!({"other": 1})), r#"{"other":1}"#);
        let long = error_text(500, &Value::String("x".repeat(500)));
        assert_eq!(long.chars().count(), 201);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn errors_map_to_the_contract_codes() {
        let cases = [
            (CliError::Usage("u".into()), 2),
            (CliError::ToolFailed("t".into()), 1),
            (CliError::Offline("o".into()), 3),
            (CliError::TimedOut("t".into()), 4),
            (CliError::Refused { status: 401, message: "m".into() }, 5),
            (CliError::Unreachable("u".into()), 6),
            (CliError::ServerFailed { status: 500, message: "m".into() }, 6),
            (CliError::Unexpected("x".into()), 6),
        ];
        for (error, code) in cases {
            assert_eq!(i32::from(error.exit_code()), code, "{error:?}");
        }
        assert_eq!(failure(409, &json!({"error": "proposal is applied, not pending"})).exit_code(), ExitCode::Refused);
        assert_eq!(failure(500, &json!({"error": "internal error"})).exit_code(), ExitCode::Unreachable);
        assert_eq!(
            failure(401, &json!({"error": "missing or invalid credentials"})).to_string(),
            "missing or invalid credentials (the server answered 401)"
        );
    }
}
