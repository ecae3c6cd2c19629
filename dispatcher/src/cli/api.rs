//! The operator CLI's HTTP client of the control API: reqwest over rustls (the bundled web
//! roots, plus `--ca-cert`), one bearer token, a request per call with a timeout, and lists
//! read to their end by following the `next` cursor when the server pages them.
//!
//! Thin on purpose: it sends, reads the status and the body as JSON, and turns "no answer at
//! all" into [`CliError::Unreachable`]. What a status means is [`super::exit`]'s business.

use std::error::Error as StdError;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::args::ServerArgs;
use super::exit::{self, Answer, CliError};

/// Timeout of establishing a connection (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of a request that does not wait for a device.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to a device's own timeout, for the server's way there and back.
pub const DEVICE_MARGIN: Duration = Duration::from_secs(30);
/// Pages read at most for one list (a server whose cursors never end is not followed forever).
const MAX_PAGES: usize = 10_000;

/// An answer of the server: its status and its body as JSON (`null` when empty, a JSON string
/// when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    pub fn answer(&self) -> Answer {
        exit::classify(self.status.as_u16(), &self.body)
    }

    /// The body of a success; any other answer as its error.
    pub fn success(self) -> Result<Value, CliError> {
        match self.answer() {
            Answer::Success => Ok(self.body),
            _ => Err(exit::failure(self.status.as_u16(), &self.body)),
        }
    }
}

/// The control API of one server, for one api token.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: Url,
    token: String,
}

/// Checks `--server`: an absolute http(s) URL that can take a path.
pub fn parse_server(server: &str) -> Result<Url, CliError> {
    let usage = || CliError::Usage(format!("--server: {server:?} is not an http(s) URL like http://127.0.0.1:8080"));
    let url = Url::parse(server.trim()).map_err(|_| usage())?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() || url.host_str().is_none() {
        return Err(usage());
    }
    Ok(url)
}

/// Checks `--token`: present, and fit for an `Authorization` header.
pub fn check_token(token: Option<&str>) -> Result<String, CliError> {
    let token = token.map(str::trim).unwrap_or_default();
    if token.is_empty() {
        return Err(CliError::Usage(
            "no api token: pass --token or set DISPATCHER_TOKEN (mint one with `dispatcher token create --user <id>`)"
                .into(),
        ));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(CliError::Usage("--token: an api token is visible ASCII characters only".into()));
    }
    Ok(token.to_owned())
}

/// The URL of `segments` under `base`, keeping any path prefix of `base` and percent-encoding
/// each segment (a device name may hold any character).
pub fn endpoint(base: &Url, segments: &[&str], query: &[(&str, &str)]) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    url
}

/// The cursor of the next page of a list answer: its `next` field, unless absent, empty, or
/// one already followed (a server repeating itself is not followed around in circles).
pub fn next_cursor(page: &Value, followed: &[String]) -> Option<String> {
    let next = page.get("next")?.as_str()?;
    if next.is_empty() || followed.iter().any(|seen| seen == next) {
        return None;
    }
    Some(next.to_owned())
}

/// One line about a failed request that a person can act on: the error chain, and for a
/// certificate no trusted root signed, the flag that fixes it.
pub fn describe_unreachable(url: &str, chain: &str) -> String {
    let untrusted = ["UnknownIssuer", "unknown issuer", "invalid peer certificate", "self-signed", "self signed"]
        .iter()
        .any(|needle| chain.contains(needle));
    let hint = if untrusted {
        "; the server's TLS certificate is not trusted: pass its CA's PEM certificate with --ca-cert <file> \
         (DISPATCHER_CA_CERT)"
    } else {
        ""
    };
    format!("cannot reach the server at {url}: {chain}{hint}")
}

fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

impl Api {
    /// A client for `--server` with `--token`, trusting `--ca-cert` too when given.
    pub fn new(args: &ServerArgs) -> Result<Self, CliError> {
        let base = parse_server(&args.server)?;
        let token = check_token(args.token.as_deref())?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("dispatcher-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &args.ca_cert {
            let usage = |reason: String| CliError::Usage(format!("--ca-cert {}: {reason}", path.display()));
            let pem = std::fs::read(path).map_err(|e| usage(e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| usage(e.to_string()))?;
            if certs.is_empty() {
                return Err(usage("no PEM certificate found in the file".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| CliError::Unreachable(format!("cannot set up the HTTP client: {}", error_chain(&e))))?;
        Ok(Self { http, base, token })
    }

    /// Sends one request and reads its whole answer, within `timeout`.
    pub async fn request(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Reply, CliError> {
        let url = endpoint(&self.base, segments, query);
        let mut request = self.http.request(method, url.clone()).bearer_auth(&self.token).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |error: reqwest::Error| {
            // reqwest's own top line repeats the URL; its causes say what happened.
            let chain = match error.source() {
                _ if error.is_timeout() => format!("no answer within {} s", timeout.as_secs()),
                Some(cause) => error_chain(cause),
                None => error.to_string(),
            };
            CliError::Unreachable(describe_unreachable(self.base.as_str(), &chain))
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        let body = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok(Reply { status, body })
    }

    /// `GET` of a list endpoint, every page of it: the rows of `field` of each page, in order,
    /// following `next` (sent back as `cursor=`) until a page has none.
    pub async fn list(&self, segments: &[&str], query: &[(&str, &str)], field: &str) -> Result<Vec<Value>, CliError> {
        let mut rows = Vec::new();
        let mut followed: Vec<String> = Vec::new();
        loop {
            let mut page_query = query.to_vec();
            if let Some(cursor) = followed.last() {
                page_query.push(("cursor", cursor.as_str()));
            }
            let page = self.request(Method::GET, segments, &page_query, None, REQUEST_TIMEOUT).await?.success()?;
            match page.get(field) {
                Some(Value::Array(items)) => rows.extend(items.iter().cloned()),
                _ => return Err(CliError::Unexpected(format!("no {field:?} list in {}", segments.join("/")))),
            }
            match next_cursor(&page, &followed) {
                Some(next) if followed.len() < MAX_PAGES => followed.push(next),
                _ => return Ok(rows),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn servers() {
        for good in ["http://127.0.0.1:8080", "https://d.example/pulsn/", " http://h "] {
            assert!(parse_server(good).is_ok(), "{good}");
        }
        for bad in ["", "127.0.0.1:8080", "ftp://h", "mailto:a@b", "http://", "not a url"] {
            let error = parse_server(bad).expect_err(bad);
            assert_eq!(error.exit_code(), crate::cli::ExitCode::Usage, "{bad}");
        }
    }

    #[test]
    fn tokens() {
        assert_eq!(check_token(Some(" tok_abc \n")), Ok("tok_abc".into()));
        for bad in [None, Some(""), Some("  "), Some("a b"), Some("tok\r\nX-Injected: 1"), Some("é")] {
            assert!(matches!(check_token(bad), Err(CliError::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn endpoints_keep_the_prefix_and_encode_segments() {
        let base = parse_server("https://d.example/pulsn/").unwrap();
        assert_eq!(endpoint(&base, &["api", "devices"], &[]).as_str(), "https://d.example/pulsn/api/devices");
        let bare = parse_server("http://h:8080").unwrap();
        assert_eq!(
            endpoint(&bare, &["api", "devices", "my box/../x?y#z"], &[]).as_str(),
            "http://h:8080/api/devices/my%20box%2F..%2Fx%3Fy%23z"
        );
        assert_eq!(
            endpoint(&bare, &["api", "proposals"], &[("status", "pending"), ("cursor", "a&b=c")]).as_str(),
            "http://h:8080/api/proposals?status=pending&cursor=a%26b%3Dc"
        );
        let with_query = parse_server("http://h/p?x=1#f").unwrap();
        assert_eq!(endpoint(&with_query, &["api"], &[]).as_str(), "http://h/p/api");
    }

    #[test]
    fn cursors_are_followed_until_absent_or_repeated() {
        let followed = vec!["c1".to_owned()];
        assert_eq!(next_cursor(&json!({"devices": []}), &[]), None);
        assert_eq!(next_cursor(&json!({"devices": [], "next": null}), &[]), None);
        assert_eq!(next_cursor(&json!({"devices": [], "next": ""}), &[]), None);
        assert_eq!(next_cursor(&json!({"devices": [], "next": 7}), &[]), None);
        assert_eq!(next_cursor(&json!({"devices": [], "next": "c1"}), &[]), Some("c1".into()));
        assert_eq!(next_cursor(&json!({"devices": [], "next": "c1"}), &followed), None);
        assert_eq!(next_cursor(&json!({"devices": [], "next": "c2"}), &followed), Some("c2".into()));
    }

    #[test]
    fn unreachable_servers_are_described() {
        let refused = describe_unreachable("http://127.0.0.1:9/", "error sending request: connection refused");
        assert_eq!(
            refused,
            "cannot reach the server at http://127.0.0.1:9/: error sending request: connection refused"
        );
        let untrusted = describe_unreachable("https://h/", "invalid peer certificate: UnknownIssuer");
        assert!(untrusted.ends_with("pass its CA's PEM certificate with --ca-cert <file> (DISPATCHER_CA_CERT)"));
    }

    #[test]
    fn replies() {
        let ok = Reply { status: StatusCode::OK, body: json!({"devices": []}) };
        assert_eq!(ok.success(), Ok(json!({"devices": []})));
        let refused =
            Reply { status: StatusCode::UNAUTHORIZED, body: json!({"error": "missing or invalid credentials"}) };
        assert_eq!(refused.success().unwrap_err().exit_code(), crate::cli::ExitCode::Refused);
    }

    #[test]
    fn a_ca_file_without_certificates_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for path in [empty, dir.path().join("missing.pem")] {
            let args = ServerArgs {
                server: "https://h".into(),
                token: Some("t".into()),
                ca_cert: Some(path.clone()),
                json: false,
            };
            let error = Api::new(&args).expect_err("refused");
            assert_eq!(error.exit_code(), crate::cli::ExitCode::Usage, "{path:?}: {error}");
            assert!(error.to_string().starts_with("--ca-cert "), "{error}");
        }
    }
}
