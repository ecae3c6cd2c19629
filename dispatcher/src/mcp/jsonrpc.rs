//! The JSON-RPC and Streamable HTTP rules of MCP, as pure functions: which protocol revision a
//! POST speaks, whether its envelope is well formed, the 2026-07-28 validation ladder
//! (`_meta` envelope, `MCP-Protocol-Version` / `Mcp-Method` / `Mcp-Name` headers, supported
//! version), version negotiation for `initialize`, error codes and the HTTP status each maps to.
//!
//! No I/O and no knowledge of devices or tools: [`super`] carries these decisions out.

use base64::Engine;
use serde_json::{json, Map, Value};

/// The stateless revision: no handshake, `_meta` on every request, MRTR.
pub const MODERN_VERSION: &str = "2026-07-28";
/// The handshake revisions served without sessions, newest first.
pub const LEGACY_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];
/// What a 2025 request without `MCP-Protocol-Version` is taken to speak (2025-06-18,
/// transports: "the server SHOULD assume protocol version 2025-03-26").
pub const LEGACY_DEFAULT: &str = "2025-03-26";

pub const PROTOCOL_VERSION_META_KEY: &str = "io.modelcontextprotocol/protocolVersion";
pub const CLIENT_CAPABILITIES_META_KEY: &str = "io.modelcontextprotocol/clientCapabilities";

pub const PROTOCOL_VERSION_HEADER: &str = "mcp-protocol-version";
pub const METHOD_HEADER: &str = "mcp-method";
pub const NAME_HEADER: &str = "mcp-name";

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
pub const HEADER_MISMATCH: i64 = -32020;
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

/// Every revision this endpoint serves, newest first.
pub fn supported_versions() -> Vec<&'static str> {
    let mut all = vec![MODERN_VERSION];
    all.extend(LEGACY_VERSIONS);
    all
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), data: None }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(INVALID_REQUEST, message)
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    pub fn method_not_found(method: &str) -> Self {
        Self::new(METHOD_NOT_FOUND, format!("Method not found: {method}"))
    }

    pub fn unsupported_version(requested: &str) -> Self {
        Self {
            code: UNSUPPORTED_PROTOCOL_VERSION,
            message: "Unsupported protocol version".into(),
            data: Some(json!({"supported": supported_versions(), "requested": requested})),
        }
    }

    fn to_value(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.clone().into());
        if let Some(data) = &self.data {
            error.insert("data".into(), data.clone());
        }
        Value::Object(error)
    }
}

/// Which protocol a POST speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// 2026-07-28: every request stands alone.
    Modern,
    /// A 2025 revision (the one the header names, or the default).
    Legacy(&'static str),
}

/// The routing headers of a POST, as sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingHeaders {
    pub version: Option<String>,
    pub method: Option<String>,
    pub name: Option<String>,
    /// The first routing header sent more than once, if any.
    pub duplicated: Option<&'static str>,
}

/// Picks the era: a `MCP-Protocol-Version` header decides; without one, a body carrying the
/// 2026 `_meta` envelope is modern (and will fail the header rung), anything else is a 2025
/// client (its `initialize`, or a request of a client that predates the header).
pub fn select_era(header_version: Option<&str>, body: &Value) -> Result<Era, RpcError> {
    match header_version {
        Some(MODERN_VERSION) => Ok(Era::Modern),
        Some(version) => match LEGACY_VERSIONS.iter().find(|v| **v == version) {
            Some(legacy) => Ok(Era::Legacy(legacy)),
            None => Err(RpcError::unsupported_version(version)),
        },
        None if meta_of(body).is_some_and(|meta| meta.contains_key(PROTOCOL_VERSION_META_KEY)) => Ok(Era::Modern),
        None => Ok(Era::Legacy(LEGACY_DEFAULT)),
    }
}

fn meta_of(body: &Value) -> Option<&Map<String, Value>> {
    body.get("params")?.get("_meta")?.as_object()
}

/// A well-formed JSON-RPC message from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request {
        id: Value,
        method: String,
        params: Option<Value>,
    },
    Notification {
        method: String,
    },
    /// A client's answer to a server request (this server sends none it waits for).
    Response,
}

/// Checks one JSON-RPC message's envelope. The error carries the request id when it could be
/// read, for the reply.
pub fn parse_message(value: &Value) -> Result<Message, (Value, RpcError)> {
    let Some(object) = value.as_object() else {
        return Err((Value::Null, RpcError::invalid_request("a JSON-RPC message must be an object")));
    };
    let id = match object.get("id") {
        None => None,
        Some(id @ Value::String(_)) => Some(id.clone()),
        Some(id @ Value::Number(n)) if n.is_i64() || n.is_u64() => Some(id.clone()),
        Some(_) => return Err((Value::Null, RpcError::invalid_request("id must be a string or an integer"))),
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((reply_id, RpcError::invalid_request("jsonrpc must be \"2.0\"")));
    }
    let Some(method) = object.get("method") else {
        if id.is_some() && (object.contains_key("result") || object.contains_key("error")) {
            return Ok(Message::Response);
        }
        return Err((reply_id, RpcError::invalid_request("method is missing")));
    };
    let Some(method) = method.as_str() else {
        return Err((reply_id, RpcError::invalid_request("method must be a string")));
    };
    let params = match object.get("params") {
        None | Some(Value::Null) => None,
        Some(params @ Value::Object(_)) => Some(params.clone()),
        Some(_) => return Err((reply_id, RpcError::invalid_request("params must be an object"))),
    };
    match id {
        Some(id) => Ok(Message::Request { id, method: method.to_owned(), params }),
        None => Ok(Message::Notification { method: method.to_owned() }),
    }
}

/// What the 2026-07-28 ladder learned from a request's `_meta`.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub version: String,
    pub client_capabilities: Value,
}

/// The 2026-07-28 validation ladder, first failure wins: the `_meta` envelope keys are present
/// (-32602); the routing headers are sent once and agree with the body (-32020); the version is
/// one this server speaks (-32022).
pub fn check_modern(method: &str, params: Option<&Value>, headers: &RoutingHeaders) -> Result<Envelope, RpcError> {
    let meta = params.and_then(|p| p.get("_meta")).and_then(Value::as_object).ok_or_else(|| {
        RpcError::invalid_params(format!(
            "params._meta must be an object carrying {PROTOCOL_VERSION_META_KEY:?} and {CLIENT_CAPABILITIES_META_KEY:?}"
        ))
    })?;
    let missing: Vec<&str> = [PROTOCOL_VERSION_META_KEY, CLIENT_CAPABILITIES_META_KEY]
        .into_iter()
        .filter(|key| !meta.contains_key(*key))
        .collect();
    if !missing.is_empty() {
        return Err(RpcError::invalid_params(format!(
            "params._meta is missing the required key(s): {}",
            missing.join(", ")
        )));
    }
    if let Some(header) = headers.duplicated {
        return Err(RpcError::new(HEADER_MISMATCH, format!("{header} header appears more than once")));
    }
    let version = &meta[PROTOCOL_VERSION_META_KEY];
    if headers.version.as_deref().is_none_or(|h| Some(h) != version.as_str()) {
        return Err(RpcError::new(
            HEADER_MISMATCH,
            format!("{PROTOCOL_VERSION_HEADER} header does not match the request's protocol version"),
        ));
    }
    if headers.method.as_deref() != Some(method) {
        return Err(RpcError::new(HEADER_MISMATCH, format!("{METHOD_HEADER} header does not match the method")));
    }
    if method == "tools/call" {
        let body_name = params.and_then(|p| p.get("name")).and_then(Value::as_str);
        if body_name.is_some() && headers.name.as_deref().and_then(decode_header_value).as_deref() != body_name {
            return Err(RpcError::new(HEADER_MISMATCH, format!("{NAME_HEADER} header does not match the tool name")));
        }
    }
    let Some(version) = version.as_str() else {
        return Err(RpcError::invalid_params("the protocol version must be a string"));
    };
    if version != MODERN_VERSION {
        return Err(RpcError::unsupported_version(version));
    }
    Ok(Envelope { version: version.to_owned(), client_capabilities: meta[CLIENT_CAPABILITIES_META_KEY].clone() })
}

/// A header value as the transport encodes it: verbatim, or `=?base64?…?=` for values that
/// would not survive as a header. A malformed sentinel decodes to nothing.
pub fn decode_header_value(value: &str) -> Option<String> {
    let Some(payload) = value.strip_prefix("=?base64?").and_then(|rest| rest.strip_suffix("?=")) else {
        return Some(value.to_owned());
    };
    let bytes = base64::engine::general_purpose::STANDARD.decode(payload).ok()?;
    String::from_utf8(bytes).ok()
}

/// The version an `initialize` answers: the client's when this server speaks it, otherwise
/// the newest 2025 revision (the client then decides whether to go on).
pub fn negotiate(requested: Option<&str>) -> &'static str {
    requested.and_then(|r| LEGACY_VERSIONS.iter().find(|v| **v == r).copied()).unwrap_or(LEGACY_VERSIONS[0])
}

/// JSON-RPC batches exist only in 2025-03-26; later revisions removed them.
pub fn batches_allowed(era: Era) -> bool {
    era == Era::Legacy("2025-03-26")
}

/// Whether client capabilities declare form-mode elicitation (`elicitation: {}` means form).
pub fn supports_form_elicitation(capabilities: &Value) -> bool {
    match capabilities.get("elicitation") {
        Some(Value::Object(modes)) => modes.is_empty() || modes.contains_key("form"),
        _ => false,
    }
}

/// The HTTP status of an answer that is this error: 2026-07-28 maps codes to statuses
/// (transports); 2025 answers JSON-RPC errors with 200 except for a body that is not JSON-RPC.
pub fn http_status(era: Era, code: i64) -> u16 {
    match (era, code) {
        (_, PARSE_ERROR | INVALID_REQUEST) => 400,
        (Era::Modern, INVALID_PARAMS | HEADER_MISMATCH | UNSUPPORTED_PROTOCOL_VERSION) => 400,
        (Era::Modern, METHOD_NOT_FOUND) => 404,
        _ => 200,
    }
}

pub fn success(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

pub fn failure(id: &Value, error: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": error.to_value()})
}

/// Whether an `Accept` header lets the answer be `application/json` (absent: yes).
pub fn accepts_json(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return true;
    };
    accept.split(',').any(|range| {
        let media = range.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        matches!(media.as_str(), "application/json" | "application/*" | "*/*")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(version: Option<&str>, method: Option<&str>, name: Option<&str>) -> RoutingHeaders {
        RoutingHeaders {
            version: version.map(str::to_owned),
            method: method.map(str::to_owned),
            name: name.map(str::to_owned),
            duplicated: None,
        }
    }

    fn modern_params(extra: Value) -> Value {
        let mut params =
            json!({"_meta": {PROTOCOL_VERSION_META_KEY: MODERN_VERSION, CLIENT_CAPABILITIES_META_KEY: {}}});
        if let (Some(params), Value::Object(extra)) = (params.as_object_mut(), extra) {
            params.extend(extra);
        }
        params
    }

    #[test]
    fn era_selection() {
        let modern_body = json!({"params": modern_params(json!({}))});
        let plain = json!({"method": "initialize"});
        let cases: &[(Option<&str>, &Value, Result<Era, i64>)] = &[
            (Some("2026-07-28"), &plain, Ok(Era::Modern)),
            (Some("2025-11-25"), &plain, Ok(Era::Legacy("2025-11-25"))),
            (Some("2025-06-18"), &modern_body, Ok(Era::Legacy("2025-06-18"))),
            (Some("2025-03-26"), &plain, Ok(Era::Legacy("2025-03-26"))),
            (Some("2024-11-05"), &plain, Err(UNSUPPORTED_PROTOCOL_VERSION)),
            (Some("garbage"), &plain, Err(UNSUPPORTED_PROTOCOL_VERSION)),
            (None, &modern_body, Ok(Era::Modern)),
            (None, &plain, Ok(Era::Legacy("2025-03-26"))),
            (None, &json!([1, 2]), Ok(Era::Legacy("2025-03-26"))),
        ];
        for (header, body, want) in cases {
            let got = select_era(*header, body).map_err(|e| e.code);
            assert_eq!(&got, want, "{header:?} {body}");
        }
    }

    #[test]
    fn envelopes() {
        let cases: &[(Value, Result<&str, i64>)] = &[
            (json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}), Ok("request")),
            (json!({"jsonrpc": "2.0", "id": "a", "method": "ping", "params": {}}), Ok("request")),
            (json!({"jsonrpc": "2.0", "method": "notifications/initialized"}), Ok("notification")),
            (json!({"jsonrpc": "2.0", "id": 3, "result": {}}), Ok("response")),
            (json!({"jsonrpc": "2.0", "id": 3, "error": {"code": 1, "message": "x"}}), Ok("response")),
            (json!({"jsonrpc": "1.0", "id": 1, "method": "ping"}), Err(INVALID_REQUEST)),
            (json!({"id": 1, "method": "ping"}), Err(INVALID_REQUEST)),
            (json!({"jsonrpc": "2.0", "id": null, "method": "ping"}), Err(INVALID_REQUEST)),
            (json!({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}), Err(INVALID_REQUEST)),
            (json!({"jsonrpc": "2.0", "id": {}, "method": "ping"}), Err(INVALID_REQUEST)),
            (json!({"jsonrpc": "2.0", "id": 1, "method": 7}), Err(INVALID_REQUEST)),
            (json!({"jsonrpc": "2.0", "id": 1}), Err(INVALID_REQUEST)),
            (json!({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": [1]}), Err(INVALID_REQUEST)),
            (json!("ping"), Err(INVALID_REQUEST)),
            (json!(5), Err(INVALID_REQUEST)),
        ];
        for (value, want) in cases {
            let got = parse_message(value)
                .map(|m| match m {
                    Message::Request { .. } => "request",
                    Message::Notification { .. } => "notification",
                    Message::Response => "response",
                })
                .map_err(|(_, e)| e.code);
            assert_eq!(&got, want, "{value}");
        }
        // The reply to a bad request names its id when it could be read.
        let (id, _) = parse_message(&json!({"jsonrpc": "1.0", "id": 9, "method": "x"})).unwrap_err();
        assert_eq!(id, json!(9));
    }

    #[test]
    fn modern_ladder() {
        let call = modern_params(json!({"name": "read_file"}));
        let good = headers(Some(MODERN_VERSION), Some("tools/call"), Some("read_file"));
        let old_meta = json!({"_meta": {PROTOCOL_VERSION_META_KEY: "2025-11-25", CLIENT_CAPABILITIES_META_KEY: {}}});
        let no_caps = json!({"_meta": {PROTOCOL_VERSION_META_KEY: MODERN_VERSION}});
        let mut duplicated = good.clone();
        duplicated.duplicated = Some(METHOD_HEADER);
        let encoded = headers(Some(MODERN_VERSION), Some("tools/call"), Some("=?base64?cmVhZF9maWxl?="));
        type Case<'a> = (&'a str, Option<Value>, &'a RoutingHeaders, Result<(), i64>);
        let cases: &[Case] = &[
            ("tools/call", Some(call.clone()), &good, Ok(())),
            ("tools/call", Some(call.clone()), &encoded, Ok(())),
            ("tools/call", None, &good, Err(INVALID_PARAMS)),
            ("tools/call", Some(json!({})), &good, Err(INVALID_PARAMS)),
            ("tools/call", Some(no_caps), &good, Err(INVALID_PARAMS)),
            ("tools/call", Some(call.clone()), &duplicated, Err(HEADER_MISMATCH)),
            (
                "tools/call",
                Some(call.clone()),
                &headers(None, Some("tools/call"), Some("read_file")),
                Err(HEADER_MISMATCH),
            ),
            (
                "tools/call",
                Some(call.clone()),
                &headers(Some("2025-11-25"), Some("tools/call"), Some("read_file")),
                Err(HEADER_MISMATCH),
            ),
            (
                "tools/call",
                Some(call.clone()),
                &headers(Some(MODERN_VERSION), Some("tools/list"), Some("read_file")),
                Err(HEADER_MISMATCH),
            ),
            (
                "tools/call",
                Some(call.clone()),
                &headers(Some(MODERN_VERSION), None, Some("read_file")),
                Err(HEADER_MISMATCH),
            ),
            (
                "tools/call",
                Some(call.clone()),
                &headers(Some(MODERN_VERSION), Some("tools/call"), Some("stat")),
                Err(HEADER_MISMATCH),
            ),
            (
                "tools/call",
                Some(call.clone()),
                &headers(Some(MODERN_VERSION), Some("tools/call"), None),
                Err(HEADER_MISMATCH),
            ),
            (
                "tools/list",
                Some(modern_params(json!({}))),
                &headers(Some(MODERN_VERSION), Some("tools/list"), None),
                Ok(()),
            ),
            (
                "tools/list",
                Some(old_meta),
                &headers(Some("2025-11-25"), Some("tools/list"), None),
                Err(UNSUPPORTED_PROTOCOL_VERSION),
            ),
        ];
        for (method, params, headers, want) in cases {
            let got = check_modern(method, params.as_ref(), headers).map(|_| ()).map_err(|e| e.code);
            assert_eq!(&got, want, "{method} {params:?} {headers:?}");
        }
    }

    #[test]
    fn negotiation_and_capabilities() {
        assert_eq!(negotiate(Some("2025-06-18")), "2025-06-18");
        assert_eq!(negotiate(Some("2025-03-26")), "2025-03-26");
        assert_eq!(negotiate(Some("2024-11-05")), "2025-11-25");
        assert_eq!(negotiate(Some("2026-07-28")), "2025-11-25");
        assert_eq!(negotiate(None), "2025-11-25");
        assert!(batches_allowed(Era::Legacy("2025-03-26")));
        assert!(!batches_allowed(Era::Legacy("2025-06-18")));
        assert!(!batches_allowed(Era::Modern));
        assert!(supports_form_elicitation(&json!({"elicitation": {}})));
        assert!(supports_form_elicitation(&json!({"elicitation": {"form": {}, "url": {}}})));
        assert!(!supports_form_elicitation(&json!({"elicitation": {"url": {}}})));
        assert!(!supports_form_elicitation(&json!({"sampling": {}})));
        assert!(!supports_form_elicitation(&json!({"elicitation": true})));
    }

    #[test]
    fn statuses_and_accept() {
        assert_eq!(http_status(Era::Modern, METHOD_NOT_FOUND), 404);
        assert_eq!(http_status(Era::Modern, HEADER_MISMATCH), 400);
        assert_eq!(http_status(Era::Modern, INTERNAL_ERROR), 200);
        assert_eq!(http_status(Era::Legacy("2025-11-25"), METHOD_NOT_FOUND), 200);
        assert_eq!(http_status(Era::Legacy("2025-11-25"), PARSE_ERROR), 400);
        assert!(accepts_json(None));
        assert!(accepts_json(Some("application/json, text/event-stream")));
        assert!(accepts_json(Some("text/event-stream;q=1, application/json;q=0.5")));
        assert!(accepts_json(Some("*/*")));
        assert!(!accepts_json(Some("text/event-stream")));
        assert!(!accepts_json(Some("text/html")));
        assert_eq!(decode_header_value("plain").as_deref(), Some("plain"));
        assert_eq!(decode_header_value("=?base64?aMOp?=").as_deref(), Some("hé"));
        assert_eq!(decode_header_value("=?base64?!!?="), None);
    }
}
