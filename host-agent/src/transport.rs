//! The wire, device side: the HTTP client, the four device-facing endpoints, and the SSE
//! stream turned into [`Frame`]s with a watchdog for silence.
//!
//! - [`build_client`]: reqwest over rustls, trusting the system's roots, the bundled web roots
//!   and, with `--ca-cert`, one more PEM CA.
//! - [`enroll`], [`open_stream`], [`put_manifest`], [`post_result`]: one request each; a non-2xx
//!   answer becomes [`TransportError::Status`] carrying the server's `{"error"}` text.
//! - [`classify`]: a parsed SSE event to a [`Frame`] (pure, table-tested).
//! - [`FrameStream`]: bytes in, frames out; reports [`StreamItem::Silent`] when no byte at all
//!   (not even a keepalive comment) arrived for the silence limit.
//! - [`describe_error`]: a reqwest error as one line a user can act on; an untrusted server
//!   certificate says so and names `--ca-cert`.
//!
//! Not here: what to do about any of it (retry, reconnect, exit): the runtime decides.

use std::error::Error as StdError;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use protocol::sse::{self, Ready, ReconnectReason};
use protocol::{EnrollRequest, EnrollResponse, ErrorBody, HostCall, HostResult, Manifest};
use reqwest::{header, Client, StatusCode, Url};
use tokio::time::Instant;

/// Timeout of every request except the stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of establishing a connection (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// `--ca-cert` names no usable PEM certificate.
    #[error("cannot use the CA certificate {path}: {reason}")]
    CaCert { path: String, reason: String },
    /// The server's certificate chains to no trusted root.
    #[error("{0}")]
    UntrustedCertificate(String),
    /// No HTTP answer: DNS, TCP, TLS, timeout, a dropped connection.
    #[error("{0}")]
    Connection(String),
    /// An HTTP answer other than the expected success; `retry_after` is its `Retry-After`
    /// in seconds, when it gave one.
    #[error("{url} answered {status}: {message}")]
    Status { url: String, status: StatusCode, message: String, retry_after: Option<Duration> },
}

impl TransportError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the server asked to wait (`Retry-After` in seconds), when it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The server's own words (`{"error"}`), when it answered.
    pub fn server_message(&self) -> Option<&str> {
        match self {
            Self::Status { message, .. } => Some(message),
            _ => None,
        }
    }

    /// True for failures worth retrying elsewhere or later: no answer, or a 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connection(_) | Self::UntrustedCertificate(_) => true,
            Self::Status { status, .. } => status.is_server_error(),
            Self::CaCert { .. } => false,
        }
    }

    pub(crate) fn from_reqwest(err: reqwest::Error) -> Self {
        let text = describe_error(&err);
        if is_untrusted_certificate(&err) {
            Self::UntrustedCertificate(text)
        } else {
            Self::Connection(text)
        }
    }
}

/// The HTTP client of the agent: rustls, the system's trust roots plus the bundled web roots,
/// plus the PEM certificates in `ca_cert` when given.
pub fn build_client(ca_cert: Option<&Path>) -> Result<Client, TransportError> {
    finish(client_builder(ca_cert)?)
}

/// The client the agent opens its event stream with: the same trust as [`build_client`], HTTP/1.1
/// only, and a new connection for every stream (nothing pooled). A stream lives for hours on its
/// connection; alone on a fresh HTTP/1.1 connection, it is served by the dispatcher without an
/// HTTP library's per-connection buffers (a few KiB per idle device instead of about 25). A
/// stream on a shared or HTTP/2 connection works as well, at that cost.
pub fn build_stream_client(ca_cert: Option<&Path>) -> Result<Client, TransportError> {
    finish(client_builder(ca_cert)?.http1_only().pool_max_idle_per_host(0))
}

fn client_builder(ca_cert: Option<&Path>) -> Result<reqwest::ClientBuilder, TransportError> {
    let mut builder = Client::builder()
        .use_rustls_tls()
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Duration::from_secs(30))
        .user_agent(concat!("host-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_cert {
        let shown = path.display().to_string();
        let pem =
            std::fs::read(path).map_err(|e| TransportError::CaCert { path: shown.clone(), reason: e.to_string() })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| TransportError::CaCert { path: shown.clone(), reason: e.to_string() })?;
        if certs.is_empty() {
            return Err(TransportError::CaCert { path: shown, reason: "no PEM certificate found in the file".into() });
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

fn finish(builder: reqwest::ClientBuilder) -> Result<Client, TransportError> {
    builder
        .build()
        .map_err(|e| TransportError::Connection(format!("cannot build the HTTP client: {}", error_chain(&e))))
}

/// `base` joined with an API path, keeping any path prefix of `base`
/// (`https://h/pulsn` + `api/host/stream` is `https://h/pulsn/api/host/stream`).
pub fn endpoint(base: &Url, path: &str) -> Url {
    let mut base = base.clone();
    if !base.path().ends_with('/') {
        let with_slash = format!("{}/", base.path());
        base.set_path(&with_slash);
    }
    base.set_query(None);
    base.set_fragment(None);
    base.join(path.trim_start_matches('/')).unwrap_or(base)
}

/// `POST /api/host/enroll`: trades a pairing code for the device's id and token.
pub async fn enroll(client: &Client, base: &Url, request: &EnrollRequest) -> Result<EnrollResponse, TransportError> {
    let url = endpoint(base, "api/host/enroll");
    let response = client
        .post(url.clone())
        .timeout(REQUEST_TIMEOUT)
        .json(request)
        .send()
        .await
        .map_err(TransportError::from_reqwest)?;
    let response = expect_success(&url, response).await?;
    response.json::<EnrollResponse>().await.map_err(|e| TransportError::Status {
        url: url.to_string(),
        status: StatusCode::BAD_GATEWAY,
        message: format!("unreadable enrollment answer: {}", error_chain(&e)),
        retry_after: None,
    })
}

/// `GET /api/host/stream`: the open response, its body being the event stream.
pub async fn open_stream(client: &Client, base: &Url, token: &str) -> Result<reqwest::Response, TransportError> {
    let url = endpoint(base, "api/host/stream");
    let response = client
        .get(url.clone())
        .bearer_auth(token)
        .header(header::ACCEPT, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .send()
        .await
        .map_err(TransportError::from_reqwest)?;
    expect_success(&url, response).await
}

/// `PUT /api/host/manifest`: what this device offers.
pub async fn put_manifest(client: &Client, base: &Url, token: &str, manifest: &Manifest) -> Result<(), TransportError> {
    let url = endpoint(base, "api/host/manifest");
    let response = client
        .put(url.clone())
        .bearer_auth(token)
        .timeout(REQUEST_TIMEOUT)
        .json(manifest)
        .send()
        .await
        .map_err(TransportError::from_reqwest)?;
    expect_success(&url, response).await.map(drop)
}

/// How the server took a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// 200: the waiting dispatch got it.
    Delivered,
    /// 404: nobody waits for that call any more (answered, timed out or unknown).
    NotPending,
}

/// `POST /api/host/result`, with the call's W3C trace context as the `traceparent` header.
pub async fn post_result(
    client: &Client,
    base: &Url,
    token: &str,
    result: &HostResult,
    traceparent: Option<&str>,
) -> Result<Delivery, TransportError> {
    let url = endpoint(base, "api/host/result");
    let mut request = client.post(url.clone()).bearer_auth(token).timeout(REQUEST_TIMEOUT).json(result);
    if let Some(traceparent) = traceparent.filter(|t| is_header_safe(t)) {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.map_err(TransportError::from_reqwest)?;
    if response.status() == StatusCode::NOT_FOUND {
        return Ok(Delivery::NotPending);
    }
    expect_success(&url, response).await.map(|_| Delivery::Delivered)
}

fn is_header_safe(value: &str) -> bool {
    !value.is_empty() && value.len() <= 512 && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

async fn expect_success(url: &Url, response: reqwest::Response) -> Result<reqwest::Response, TransportError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after =
        response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let body = response.text().await.unwrap_or_default();
    let message = match serde_json::from_str::<ErrorBody>(&body) {
        Ok(parsed) => parsed.error,
        Err(_) if body.trim().is_empty() => status.canonical_reason().unwrap_or("no reason given").to_owned(),
        Err(_) => body.trim().chars().take(200).collect(),
    };
    Err(TransportError::Status { url: url.to_string(), status, message, retry_after })
}

/// A `Retry-After` given in seconds (the HTTP-date form is not used by the dispatcher and is
/// ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Every error in `err`'s chain, outermost first, joined with `": "`, with repeats dropped.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

/// True when `err` is a TLS handshake that failed because the server's certificate does not
/// chain to a trusted root (rustls `UnknownIssuer`, or a self-signed CA used as the leaf).
pub fn is_untrusted_certificate(err: &(dyn StdError + 'static)) -> bool {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        let rustls_error = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|inner| inner.downcast_ref())
        });
        if let Some(rustls::Error::InvalidCertificate(cert_error)) = rustls_error {
            return matches!(cert_error, rustls::CertificateError::UnknownIssuer)
                || format!("{cert_error:?}").contains("CaUsedAsEndEntity");
        }
        current = e.source();
    }
    let text = error_chain(err);
    text.contains("UnknownIssuer") || text.contains("CaUsedAsEndEntity")
}

/// One line a user can act on. An untrusted certificate says exactly that and names
/// `--ca-cert`; anything else is the error chain.
pub fn describe_error(err: &(dyn StdError + 'static)) -> String {
    let chain = error_chain(err);
    if is_untrusted_certificate(err) {
        format!(
            "the server's TLS certificate is not trusted (it is not signed by a known certificate authority; {chain}). \
             If the server uses a private or self-signed CA, pass that CA's PEM certificate with --ca-cert <file> \
             (or FUSION_HOST_CA_CERT)"
        )
    } else {
        chain
    }
}

/// One frame of the device stream, as the runtime acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// First frame; `None` when its data did not parse (the stream is still usable).
    Ready(Option<Ready>),
    /// A call to run.
    Call(Box<HostCall>),
    /// The replica goes away: reconnect at once, elsewhere if possible.
    Reconnect(Option<ReconnectReason>),
    /// A newer stream for this device opened elsewhere.
    Superseded,
    /// The device was revoked.
    Revoked,
    /// An event this agent does not know: ignored (newer servers may add some).
    Unknown(String),
    /// A known event whose data did not parse: logged and skipped.
    Invalid { event: String, error: String },
}

/// What an SSE event means to the agent.
pub fn classify(event: &Event) -> Frame {
    match event.event.as_str() {
        sse::EVENT_READY => Frame::Ready(serde_json::from_str(&event.data).ok()),
        sse::EVENT_CALL => match serde_json::from_str::<HostCall>(&event.data) {
            Ok(call) => Frame::Call(Box::new(call)),
            Err(err) => Frame::Invalid { event: event.event.clone(), error: err.to_string() },
        },
        sse::EVENT_RECONNECT => {
            Frame::Reconnect(serde_json::from_str::<sse::Reconnect>(&event.data).ok().map(|r| r.reason))
        }
        sse::EVENT_SUPERSEDED => Frame::Superseded,
        sse::EVENT_REVOKED => Frame::Revoked,
        other => Frame::Unknown(other.to_owned()),
    }
}

/// What reading the stream produced next.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Frame(Frame),
    /// Nothing at all, not even a keepalive, for the silence limit: the stream is dead.
    Silent,
    /// The server closed the stream.
    Ended,
    /// The connection broke, or the bytes were not an event stream.
    Failed(String),
}

type EventResult = Result<Event, eventsource_stream::EventStreamError<String>>;

/// An SSE byte stream read as [`Frame`]s, with a watchdog: any byte (a keepalive comment is
/// enough) proves the stream alive; `silence` without one reports [`StreamItem::Silent`].
pub struct FrameStream {
    events: Pin<Box<dyn Stream<Item = EventResult> + Send>>,
    last_byte: Arc<Mutex<Instant>>,
    silence: Duration,
}

impl FrameStream {
    pub fn new<S, E>(bytes: S, silence: Duration) -> Self
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let last_byte = Arc::new(Mutex::new(Instant::now()));
        let touch = Arc::clone(&last_byte);
        let events = bytes
            .map(move |chunk| {
                *touch.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
                chunk.map_err(|e| e.to_string())
            })
            .eventsource();
        Self { events: Box::pin(events), last_byte, silence }
    }

    /// An open response's body as frames.
    pub fn from_response(response: reqwest::Response, silence: Duration) -> Self {
        Self::new(response.bytes_stream().map(|chunk| chunk.map_err(|e| describe_error(&e))), silence)
    }

    fn last_byte(&self) -> Instant {
        *self.last_byte.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next frame, or why there is none.
    pub async fn next(&mut self) -> StreamItem {
        loop {
            let deadline = self.last_byte() + self.silence;
            tokio::select! {
                item = self.events.next() => return match item {
                    Some(Ok(event)) => StreamItem::Frame(classify(&event)),
                    Some(Err(err)) => StreamItem::Failed(err.to_string()),
                    None => StreamItem::Ended,
                },
                () = tokio::time::sleep_until(deadline) => {
                    if self.last_byte() + self.silence <= Instant::now() {
                        return StreamItem::Silent;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, data: &str) -> Event {
        Event { event: name.into(), data: data.into(), id: String::new(), retry: None }
    }

    #[test]
    fn frames_by_event_name() {
        let call = r#"{"callId":"c1","tool":"stat","input":{"path":"."},"deadline":"2030-01-01T00:00:00Z","extra":1}"#;
        let cases: Vec<(Event, Frame)> = vec![
            (
                event("ready", r#"{"deviceId":"d1","replica":"r1"}"#),
                Frame::Ready(Some(Ready { device_id: "d1".into(), replica: "r1".into() })),
            ),
            (event("ready", "{}"), Frame::Ready(None)),
            (
                event("call", call),
                Frame::Call(Box::new(HostCall {
                    call_id: "c1".into(),
                    tool: "stat".into(),
                    input: json!({"path": "."}),
                    mode: None,
                    preconditions: None,
                    deadline: Some("2030-01-01T00:00:00Z".parse().expect("time")),
                    traceparent: None,
                })),
            ),
            (event("reconnect", r#"{"reason":"shutdown"}"#), Frame::Reconnect(Some(ReconnectReason::Shutdown))),
            (event("reconnect", r#"{"reason":"new-reason"}"#), Frame::Reconnect(None)),
            (event("superseded", "{}"), Frame::Superseded),
            (event("revoked", "{}"), Frame::Revoked),
            (event("message", "hello"), Frame::Unknown("message".into())),
        ];
        for (input, want) in cases {
            assert_eq!(classify(&input), want, "{input:?}");
        }
    }

    #[test]
    fn a_bad_call_is_invalid_not_a_crash() {
        for data in ["not json", r#"{"tool":"stat"}"#, r#"{"callId":5,"tool":"x","input":null}"#, "[]"] {
            match classify(&event("call", data)) {
                Frame::Invalid { event, .. } => assert_eq!(event, "call"),
                other => panic!("{data}: {other:?}"),
            }
        }
    }

    #[test]
    fn endpoints_keep_the_base_path() {
        let cases = [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/api/host/stream"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/api/host/stream"),
            ("https://h.example/pulsn", "https://h.example/pulsn/api/host/stream"),
            ("https://h.example/pulsn/?x=1#f", "https://h.example/pulsn/api/host/stream"),
        ];
        for (base, want) in cases {
            let base = Url::parse(base).expect("url");
            assert_eq!(endpoint(&base, "api/host/stream").as_str(), want);
        }
    }

    fn chunks(parts: &[&str]) -> impl Stream<Item = Result<Bytes, String>> + Send + 'static {
        let owned: Vec<Result<Bytes, String>> = parts.iter().map(|p| Ok(Bytes::from(p.to_string()))).collect();
        futures::stream::iter(owned)
    }

    #[tokio::test]
    async fn frames_from_bytes_split_anywhere() {
        let text = "event: ready\ndata: {\"deviceId\":\"d\",\"replica\":\"r\"}\n\n: keepalive\n\nevent: call\nid: c1\ndata: {\"callId\":\"c1\",\"tool\":\"stat\",\"input\":{}}\n\nevent: revoked\ndata: {}\n\n";
        for split in [1, 3, 7, 64, text.len()] {
            let parts: Vec<String> =
                text.as_bytes().chunks(split).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let mut frames = FrameStream::new(chunks(&refs), Duration::from_secs(30));
            assert!(matches!(frames.next().await, StreamItem::Frame(Frame::Ready(Some(_)))), "split {split}");
            match frames.next().await {
                StreamItem::Frame(Frame::Call(call)) => assert_eq!(call.call_id, "c1"),
                other => panic!("split {split}: {other:?}"),
            }
            assert_eq!(frames.next().await, StreamItem::Frame(Frame::Revoked));
            assert_eq!(frames.next().await, StreamItem::Ended);
        }
    }

    #[tokio::test]
    async fn transport_errors_end_the_stream() {
        let items: Vec<Result<Bytes, String>> =
            vec![Ok(Bytes::from("event: ready\ndata: {}\n\n")), Err("reset".into())];
        let mut frames = FrameStream::new(futures::stream::iter(items), Duration::from_secs(30));
        assert_eq!(frames.next().await, StreamItem::Frame(Frame::Ready(None)));
        assert!(matches!(frames.next().await, StreamItem::Failed(text) if text.contains("reset")));
    }

    #[tokio::test]
    async fn keepalives_keep_a_stream_alive_and_silence_kills_it() {
        let ms = Duration::from_millis;
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, String>>();
        let mut frames = FrameStream::new(rx, ms(400));
        let feeder = tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(ms(150)).await;
                let _ = tx.unbounded_send(Ok(Bytes::from(": keepalive\n\n")));
            }
            let _ = tx.unbounded_send(Ok(Bytes::from("event: superseded\ndata: {}\n\n")));
            // Then silence, with the sender kept open.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tx);
        });
        let start = Instant::now();
        assert_eq!(frames.next().await, StreamItem::Frame(Frame::Superseded));
        assert!(start.elapsed() >= ms(850), "comments alone kept the stream up past the silence limit");
        let last_byte = Instant::now();
        assert_eq!(frames.next().await, StreamItem::Silent);
        let silent_after = last_byte.elapsed();
        assert!(silent_after >= ms(380) && silent_after < ms(1500), "dead after the limit: {silent_after:?}");
        feeder.abort();
    }

    #[test]
    fn untrusted_certificates_name_the_flag() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert!(is_untrusted_certificate(&io));
        let text = describe_error(&io);
        assert!(text.contains("not trusted") && text.contains("--ca-cert"), "{text}");

        let other = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert!(!is_untrusted_certificate(&other));
        assert!(!describe_error(&other).contains("--ca-cert"));
    }

    #[test]
    fn ca_cert_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate").expect("write");
        let err = build_client(Some(&path)).expect_err("no certs");
        assert!(matches!(err, TransportError::CaCert { .. }), "{err}");
        let missing = build_client(Some(&dir.path().join("missing.pem"))).expect_err("missing");
        assert!(missing.to_string().contains("missing.pem"), "{missing}");
    }
}
