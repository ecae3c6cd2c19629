//! Device streams served without hyper's connection state: the one request of a connection
//! that lives for hours and, idle, writes a keepalive comment every `--keepalive-secs`.
//!
//! Why: hyper's HTTP/1 connection keeps an 8 KiB read buffer (regrown to 16 KiB when it polls
//! for a pipelined request while the first one is still being answered) and an 8 KiB header
//! write buffer for as long as the connection lives, and neither is configurable below 8 KiB.
//! On a replica holding ten thousand idle device streams those buffers were most of the memory
//! per stream (BENCHMARKS.md, "Memory per idle stream, the connection"). Here the first request
//! of a connection is read by the listener itself; when it is a plain
//! `GET /api/host/stream` over HTTP/1.1 it goes through the same router (every layer, the same
//! handler) and its response is written here, with no buffer kept between frames. Anything
//! else (another route, HTTP/2, HTTP/1.0, a request with a body or an upgrade, a head larger
//! than [`MAX_HEAD`] or one httparse refuses) is handed to hyper with the bytes read so far, as
//! if they had never been read. After the stream's response ends, the connection is handed to
//! hyper too (HTTP/1.1 keep-alive), unless the request said `Connection: close`.
//!
//! What stays exactly as under hyper: the response bytes (status line, the router's headers,
//! `date`, chunked transfer coding), a write and flush per frame, the end of the stream when the
//! client closes or resets the connection (the response body is dropped then), the connection
//! timeouts and aborts (the listener's loop, which drives this like a hyper connection).
//!
//! Not here: what the stream sends (the handler, [`crate::http::device`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The request line this module serves itself, up to the path's end.
const STREAM_REQUEST: &[u8] = b"GET /api/host/stream";
/// The largest request head read here; a larger one goes to hyper (whose limit is larger).
pub const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed at most (hyper's default); more go to hyper, which refuses them.
const MAX_HEADERS: usize = 100;
/// The first read's buffer: a device's stream request is a few hundred bytes.
const FIRST_READ: usize = 1024;
/// Bytes a client may send while its stream is open (a pipelined request, kept for hyper);
/// more close the connection.
const MAX_PIPELINED: usize = 64 * 1024;

/// What the first bytes of a connection are.
pub enum Sniffed<I> {
    /// A device stream request, parsed: served by [`serve`].
    Stream(Box<StreamRequest<I>>),
    /// Anything else: hyper serves the connection, reading `prefix` first.
    Other { prefix: Bytes, io: I },
    /// The client closed the connection (or it failed) before a request.
    Closed,
}

/// A device stream request read from a connection, with what followed its head.
pub struct StreamRequest<I> {
    pub request: Request<Body>,
    /// False when the request said `Connection: close`.
    pub keep_alive: bool,
    pub pipelined: Bytes,
    pub io: I,
}

/// What the bytes read so far are.
#[derive(Debug)]
enum Head {
    NeedMore,
    Other,
    /// A complete stream request head of `len` bytes.
    Stream {
        len: usize,
        request: Box<Request<Body>>,
        keep_alive: bool,
    },
}

/// Reads the first request's head of a connection, as far as needed to tell whether it is a
/// device stream request. Cancel-safe for the caller only in the sense that dropping it drops
/// the connection.
pub async fn sniff<I: AsyncRead + Unpin>(mut io: I) -> Sniffed<I> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity().min(MAX_HEAD - buf.len()));
        }
        match io.read_buf(&mut buf).await {
            Ok(0) | Err(_) if buf.is_empty() => return Sniffed::Closed,
            // A partial head and then EOF or an error: hyper says what it says about that.
            Ok(0) | Err(_) => return Sniffed::Other { prefix: buf.freeze(), io },
            Ok(_) => {}
        }
        match classify(&buf) {
            Head::NeedMore => continue,
            Head::Other => return Sniffed::Other { prefix: buf.freeze(), io },
            Head::Stream { len, request, keep_alive } => {
                // Copied out, so that the read buffer is freed now rather than when hyper
                // has read what followed.
                let pipelined = Bytes::copy_from_slice(&buf[len..]);
                return Sniffed::Stream(Box::new(StreamRequest { request: *request, keep_alive, pipelined, io }));
            }
        }
    }
}

/// Whether `bytes` (the start of a connection) are a device stream request, need more bytes
/// to tell, or are for hyper.
fn classify(bytes: &[u8]) -> Head {
    let known = bytes.len().min(STREAM_REQUEST.len());
    if bytes[..known] != STREAM_REQUEST[..known] {
        return Head::Other;
    }
    match bytes.get(STREAM_REQUEST.len()) {
        None => return Head::NeedMore,
        Some(b' ' | b'?') => {}
        Some(_) => return Head::Other,
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD => return Head::NeedMore,
        Ok(httparse::Status::Partial) | Err(_) => return Head::Other,
    };
    if parsed.version != Some(1) {
        return Head::Other;
    }
    let Some(Ok(uri)) = parsed.path.map(|path| path.parse::<Uri>()) else { return Head::Other };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    let mut keep_alive = true;
    for header in parsed.headers.iter() {
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(header.name.as_bytes()), HeaderValue::from_bytes(header.value))
        else {
            return Head::Other;
        };
        // A body, an upgrade or an expectation: hyper's business.
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == UPGRADE || name == EXPECT {
            return Head::Other;
        }
        if name == CONNECTION && has_token(&value, "close") {
            keep_alive = false;
        }
        map.append(name, value);
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    Head::Stream { len, request: Box::new(request), keep_alive }
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|value| value.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
}

/// How a response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body at all (1xx, 204, 304).
    None,
    /// As many bytes as `Content-Length` says: the frames are written as they are.
    Length,
    /// Chunked transfer coding (a body of unknown length: an event stream).
    Chunked,
}

/// The response head as hyper writes it: the status line, the response's headers, then
/// `connection: close` when the connection ends after it, the body's framing and `date`.
fn encode_head<B>(response: &mut Response<B>, exact_len: Option<u64>, close: bool, date: &str) -> (Vec<u8>, Framing) {
    let status = response.status();
    let headers = response.headers_mut();
    let framing = if status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
    {
        headers.remove(CONTENT_LENGTH);
        headers.remove(TRANSFER_ENCODING);
        Framing::None
    } else if headers.contains_key(CONTENT_LENGTH) {
        Framing::Length
    } else if let Some(len) = exact_len {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        Framing::Length
    } else {
        headers.remove(TRANSFER_ENCODING);
        Framing::Chunked
    };
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if close && !response.headers().get(CONNECTION).is_some_and(|v| has_token(v, "close")) {
        head.extend_from_slice(b"connection: close\r\n");
    }
    if framing == Framing::Chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !response.headers().contains_key(http::header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(date.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    (head, framing)
}

/// `date` as HTTP says it (IMF-fixdate).
fn http_date() -> String {
    chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// The connection after a response: what the client already sent of its next request.
pub type Reusable<I> = Option<(Bytes, I)>;

/// Answers a device stream request through `respond` (the router, as the connection's hyper
/// service would call it) and writes the response until its body ends, the client goes away
/// or a write fails. The connection back, with what the client sent meanwhile, when it may
/// serve another request.
pub async fn serve<I, B, F>(stream: Box<StreamRequest<I>>, respond: impl FnOnce(Request<Body>) -> F) -> Reusable<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
    B: hyper::body::Body<Data = Bytes> + Unpin,
    F: std::future::Future<Output = Response<B>>,
{
    let StreamRequest { request, keep_alive, pipelined, mut io } = *stream;
    let mut response = respond(request).await;
    let close = !keep_alive || response.headers().get(CONNECTION).is_some_and(|v| has_token(v, "close"));
    let exact_len = response.body().size_hint().exact();
    let (head, framing) = encode_head(&mut response, exact_len, close, &http_date());
    if write_flush(&mut io, &mut Bytes::from(head)).await.is_err() {
        return None;
    }
    let mut body = response.into_body();
    let mut pipelined = BytesMut::from(pipelined);
    if framing != Framing::None {
        // Read while the body is written, as hyper does: a client that closes its end ends the
        // stream at once (and its response body is dropped, which unregisters it).
        let mut scratch = [0u8; 64];
        loop {
            tokio::select! {
                frame = body.frame() => match frame {
                    None => break,
                    Some(Err(_)) => return None,
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        if data.is_empty() {
                            continue;
                        }
                        let written = match framing {
                            Framing::Chunked => {
                                let size = Bytes::from(format!("{:x}\r\n", data.len()));
                                write_flush(&mut io, &mut size.chain(data).chain(&b"\r\n"[..])).await
                            }
                            Framing::Length | Framing::None => write_flush(&mut io, &mut { data }).await,
                        };
                        if written.is_err() {
                            return None;
                        }
                    }
                },
                read = io.read(&mut scratch) => match read {
                    Ok(0) | Err(_) => return None,
                    Ok(n) if pipelined.len() + n > MAX_PIPELINED => return None,
                    Ok(n) => pipelined.extend_from_slice(&scratch[..n]),
                },
            }
        }
        if framing == Framing::Chunked && write_flush(&mut io, &mut &b"0\r\n\r\n"[..]).await.is_err() {
            return None;
        }
    }
    drop(body);
    (!close).then(|| (pipelined.freeze(), io))
}

async fn write_flush<I: AsyncWrite + Unpin>(io: &mut I, buf: &mut impl Buf) -> std::io::Result<()> {
    io.write_all_buf(buf).await?;
    io.flush().await
}

/// A connection whose first bytes were read already: they are read again first. Hyper serves
/// it as if nothing had been read.
pub struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // An empty slice of it would still hold the whole read buffer.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const STREAM: &str = "GET /api/host/stream HTTP/1.1\r\nhost: d\r\nauthorization: Bearer t\r\n\r\n";

    fn kind(bytes: &[u8]) -> &'static str {
        match classify(bytes) {
            Head::NeedMore => "more",
            Head::Other => "other",
            Head::Stream { .. } => "stream",
        }
    }

    #[test]
    fn classification() {
        let cases: &[(&[u8], &str)] = &[
            (b"G", "more"),
            (b"GET /api/host/str", "more"),
            (b"GET /api/host/stream", "more"),
            (b"GET /api/host/stream HTTP/1.1\r\nhost: d\r\n", "more"),
            (STREAM.as_bytes(), "stream"),
            (b"GET /api/host/stream?x=1 HTTP/1.1\r\n\r\n", "stream"),
            (b"GET /api/host/streams HTTP/1.1\r\n\r\n", "other"),
            (b"GET /api/host/stream/ HTTP/1.1\r\n\r\n", "other"),
            (b"GET /healthz HTTP/1.1\r\n\r\n", "other"),
            (b"POST /api/host/stream HTTP/1.1\r\n\r\n", "other"),
            (b"HEAD /api/host/stream HTTP/1.1\r\n\r\n", "other"),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "other"),
            (b"GET /api/host/stream HTTP/1.0\r\n\r\n", "other"),
            (b"GET /api/host/stream HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc", "other"),
            (b"GET /api/host/stream HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", "other"),
            (b"GET /api/host/stream HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", "other"),
            (b"GET /api/host/stream HTTP/1.1\r\nexpect: 100-continue\r\n\r\n", "other"),
            (b"GET /api/host/stream HTTP/1.1\r\nbad header\r\n\r\n", "other"),
        ];
        for (bytes, want) in cases {
            assert_eq!(kind(bytes), *want, "{:?}", String::from_utf8_lossy(bytes));
        }
        let long = format!("GET /api/host/stream HTTP/1.1\r\nx: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(kind(long.as_bytes()), "other", "a head over the limit is hyper's");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: y\r\n")).collect();
        assert_eq!(kind(format!("GET /api/host/stream HTTP/1.1\r\n{many}\r\n").as_bytes()), "other");
    }

    #[test]
    fn the_parsed_request() {
        let bytes = format!("{STREAM}GET /next");
        let Head::Stream { len, request, keep_alive } = classify(bytes.as_bytes()) else { panic!("a stream") };
        assert_eq!(len, STREAM.len());
        assert!(keep_alive);
        assert_eq!(
            (request.method(), request.uri().path(), request.version()),
            (&Method::GET, "/api/host/stream", Version::HTTP_11)
        );
        assert_eq!(request.headers()["authorization"], "Bearer t");
        assert_eq!(request.headers()["host"], "d");
        let closing = b"GET /api/host/stream HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n";
        assert!(matches!(classify(closing), Head::Stream { keep_alive: false, .. }));
    }

    #[test]
    fn heads_as_hyper_writes_them() {
        let date = "Tue, 01 Dec 2026 13:00:00 GMT";
        let mut sse = Response::builder()
            .header("content-type", "text/event-stream")
            .header("x-replica-id", "r1")
            .body(())
            .expect("response");
        let (head, framing) = encode_head(&mut sse, None, false, date);
        assert_eq!(framing, Framing::Chunked);
        assert_eq!(
            String::from_utf8(head).expect("utf-8"),
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-replica-id: r1\r\n\
             transfer-encoding: chunked\r\ndate: Tue, 01 Dec 2026 13:00:00 GMT\r\n\r\n"
        );
        let mut refused = Response::builder().status(401).body(()).expect("response");
        let (head, framing) = encode_head(&mut refused, Some(27), true, date);
        assert_eq!(framing, Framing::Length);
        assert_eq!(
            String::from_utf8(head).expect("utf-8"),
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 27\r\nconnection: close\r\n\
             date: Tue, 01 Dec 2026 13:00:00 GMT\r\n\r\n"
        );
        let mut empty = Response::builder().status(204).header("content-length", "0").body(()).expect("response");
        let (head, framing) = encode_head(&mut empty, Some(0), false, date);
        assert_eq!(framing, Framing::None);
        assert!(!String::from_utf8(head).expect("utf-8").contains("content-length"));
    }

    /// A response body fed by a channel, as a stream's body is fed by its queue.
    fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|data| (Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(data)), rx))
        });
        (tx, Body::new(http_body_util::StreamBody::new(stream)))
    }

    async fn read_until(client: &mut tokio::io::DuplexStream, seen: &mut Vec<u8>, want: &str) {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(seen).contains(want) {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("in time")
                .expect("read");
            assert!(n > 0, "closed before {want:?}: {:?}", String::from_utf8_lossy(seen));
            seen.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_stream_is_written_in_chunks_and_the_connection_kept() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(STREAM.as_bytes()).await.expect("write");
        let Sniffed::Stream(request) = sniff(server).await else { panic!("a stream") };
        let (tx, body) = channel_body();
        let served = tokio::spawn(serve(request, move |request| {
            assert_eq!(request.uri().path(), "/api/host/stream");
            async move { Response::builder().header("content-type", "text/event-stream").body(body).expect("response") }
        }));
        let mut seen = Vec::new();
        read_until(&mut client, &mut seen, "\r\n\r\n").await;
        tx.send(Bytes::from_static(b"event: ready\ndata: {}\n\n")).await.expect("send");
        read_until(&mut client, &mut seen, "{}\n\n\r\n").await;
        // A pipelined request sent while the stream is open waits for the connection's next
        // server.
        client.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.expect("write");
        tx.send(Bytes::from_static(b": keepalive\n\n")).await.expect("send");
        drop(tx);
        read_until(&mut client, &mut seen, "0\r\n\r\n").await;
        let text = String::from_utf8(seen).expect("utf-8");
        let body = &text[text.find("\r\n\r\n").expect("head") + 4..];
        assert_eq!(body, "17\r\nevent: ready\ndata: {}\n\n\r\nd\r\n: keepalive\n\n\r\n0\r\n\r\n");
        assert!(text
            .starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\ndate: "));
        let (pipelined, io) = served.await.expect("task").expect("kept alive");
        // Read while the stream was open, or still in the socket: the next server sees it.
        let mut next = Prefixed::new(pipelined, io);
        let mut request = [0u8; 25];
        next.read_exact(&mut request).await.expect("read");
        assert_eq!(&request, b"GET /healthz HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_client_that_goes_away_drops_the_body() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(STREAM.as_bytes()).await.expect("write");
        let Sniffed::Stream(request) = sniff(server).await else { panic!("a stream") };
        let (tx, body) = channel_body();
        let served = tokio::spawn(serve(request, move |_| async move { Response::new(body) }));
        let mut seen = Vec::new();
        read_until(&mut client, &mut seen, "\r\n\r\n").await;
        drop(client);
        let reused = tokio::time::timeout(Duration::from_secs(5), served).await.expect("ends").expect("task");
        assert!(reused.is_none(), "a closed connection is not reused");
        assert!(tx.is_closed(), "the body was dropped");
    }

    #[tokio::test]
    async fn anything_else_is_read_again_by_hyper() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.expect("write");
        let Sniffed::Other { prefix, io } = sniff(server).await else { panic!("not a stream") };
        let mut replayed = Prefixed::new(prefix, io);
        let mut buf = [0u8; 10];
        replayed.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"GET /healt");
        client.write_all(b"more").await.expect("write");
        let mut rest = vec![0u8; 19];
        replayed.read_exact(&mut rest).await.expect("read");
        assert_eq!(&rest, b"hz HTTP/1.1\r\n\r\nmore");
        let (silent, server) = tokio::io::duplex(64);
        drop(silent);
        assert!(matches!(sniff(server).await, Sniffed::Closed), "closed with nothing sent");
    }
}
