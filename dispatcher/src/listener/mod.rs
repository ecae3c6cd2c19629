//! The serving loop: accepts TCP connections, admits or refuses each, serves the admitted ones
//! (HTTP/1.1, and HTTP/2 over cleartext with prior knowledge; with `--tls-cert`, both over TLS
//! with ALPN, see [`tls`]) and closes those that hold a descriptor for nothing. Device streams
//! are the one kind of connection meant to live long; every other one is bounded:
//!
//! - from the accept to its first request's headers, whatever the protocol (the TLS handshake,
//!   the version sniff, the HTTP/2 preface and HEADERS included): `--connection-timeout-secs`;
//! - with no request in flight: `--idle-timeout-secs` (HTTP/2 gets a GOAWAY); HTTP/1's own
//!   header timeout (hyper's) also runs between requests;
//! - when the overall cap is reached, the connection idle the longest is evicted; when every
//!   slot serves a request, or the client's address holds its cap, the new connection gets a
//!   `503` with `Retry-After` written on the socket, then is closed;
//! - HTTP/2: keepalive pings, at most [`H2_MAX_STREAMS`] streams and a
//!   [`H2_MAX_HEADER_LIST`]-byte header list.
//!
//! A failing accept (out of descriptors) backs off exponentially and is logged once per
//! interval with a count. The decisions live in [`admission`] and [`timing`], sync and
//! table-tested; this module only carries them out. Not here: what requests do (the router).

pub mod admission;
mod device_stream;
mod service;
pub mod timing;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::Metrics;
use admission::{Caps, ConnectionTable, Refusal};
use timing::{Backoff, Closing, LogLimiter, Timeouts, Verdict};

/// Concurrent streams on one HTTP/2 connection.
pub const H2_MAX_STREAMS: u32 = 100;
/// Largest HTTP/2 header list accepted, in bytes (as hyper's default, said explicitly).
pub const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
/// An HTTP/2 keepalive ping not answered within this closes the connection.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Backoff of a failing accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// One log line per this, for a repeated accept failure or refusal.
const LOG_INTERVAL: Duration = Duration::from_secs(5);
/// `Retry-After` of a refusal, in seconds.
const RETRY_AFTER_SECS: u64 = 1;
/// How long writing a refusal may take, and how long the socket then lingers to read what the
/// client sent (closing with unread bytes would reset the connection before the client reads
/// the answer).
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;
/// An idle connection told to close (HTTP/2: GOAWAY) is dropped after this at most.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the loop enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub timeouts: Timeouts,
    /// HTTP/1: a request's headers, and the wait for a keep-alive connection's next request.
    pub header_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings.
    pub keepalive: Duration,
    pub caps: Caps,
    /// Sent as `X-Replica-Id` on refusals, like every response.
    pub replica_id: String,
    /// `Some`: every connection is TLS, with this certificate.
    pub tls: Option<Arc<tls::CertificateSource>>,
}

struct Shared {
    builder: auto::Builder<TokioExecutor>,
    router: Router,
    table: Arc<ConnectionTable>,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tls: Option<TlsAcceptor>,
    /// For refusals, which are written as HTTP/1.1: offers only `http/1.1` in ALPN.
    refusal_tls: Option<TlsAcceptor>,
}

/// The descriptor limit of this process (`None`: unlimited), after raising the soft limit to
/// the hard one (as the Go runtime does): more room for connections.
pub fn raise_descriptor_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        if limit.current < limit.maximum || (limit.current.is_some() && limit.maximum.is_none()) {
            let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                return getrlimit(Resource::Nofile).current;
            }
        }
        limit.current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Serves `router` on `listener` until `stop` fires, then asks every connection to finish
/// (graceful shutdown) and waits for them until `grace_end()` (asked once `stop` fired: the
/// end of the shutdown's one grace period, not a second one). False when some did not finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    grace_end: impl FnOnce() -> tokio::time::Instant,
) -> bool {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.keepalive)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST);
    let table = ConnectionTable::new(limits.caps);
    let shared = Arc::new(Shared {
        builder,
        router,
        table: table.clone(),
        timeouts: limits.timeouts,
        metrics: metrics.clone(),
        stop: stop.clone(),
        tls: limits.tls.as_ref().map(|source| source.acceptor(tls::ALPN)),
        refusal_tls: limits.tls.as_ref().map(|source| source.acceptor(&tls::ALPN[1..])),
    });
    let replica_id: Arc<str> = limits.replica_id.into();
    let refusing = Arc::new(Semaphore::new(admission::MAX_REFUSING));
    let tracker = TaskTracker::new();
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
    let mut accept_log = LogLimiter::new(LOG_INTERVAL);
    let mut refusal_log = LogLimiter::new(LOG_INTERVAL);

    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            // The client gave up before it was accepted: nothing to wait for.
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                // Out of descriptors and the like: wait, longer each time, and say so rarely.
                metrics.accept_failed();
                let wait = backoff.failed();
                if let Some(left_out) = accept_log.allow(Instant::now()) {
                    tracing::warn!(%error, left_out, retry_in_ms = wait.as_millis() as u64, "accept failed");
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
        };
        match table.admit(peer.ip(), Instant::now()) {
            Ok(admitted) => {
                tracker.spawn(serve_connection(stream, peer, admitted, shared.clone()));
            }
            Err(refusal) => {
                metrics.connection_refused(refusal.label());
                if let Some(left_out) = refusal_log.allow(Instant::now()) {
                    tracing::warn!(client = %peer.ip(), reason = refusal.label(), left_out, open = table.open(), "connection refused");
                }
                // A bounded number answered at once; beyond, closed unanswered.
                if let Ok(slot) = refusing.clone().try_acquire_owned() {
                    let replica_id = replica_id.clone();
                    let tls = shared.refusal_tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => refuse(stream, refusal, &replica_id).await,
                            Some(acceptor) => {
                                if let Ok(Ok(stream)) =
                                    tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, acceptor.accept(stream)).await
                                {
                                    refuse(stream, refusal, &replica_id).await;
                                }
                            }
                        }
                        drop(slot);
                    });
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tokio::time::timeout_at(grace_end(), tracker.wait()).await.is_ok()
}

/// Errors of one connection that went away before it was accepted, as opposed to errors of
/// the listener (out of descriptors, out of memory).
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(error.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted)
}

/// Counts a connection in `dispatcher_connections_open` while it lives.
struct OpenGauge(Arc<Metrics>);

impl OpenGauge {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.connection_opened();
        Self(metrics.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.connection_ended();
    }
}

/// Serves one admitted connection until it ends, is evicted, or times out; a TLS connection
/// first completes its handshake within the first request's deadline.
async fn serve_connection(stream: TcpStream, peer: SocketAddr, admitted: admission::Admitted, shared: Arc<Shared>) {
    let _open = OpenGauge::new(&shared.metrics);
    let _ = stream.set_nodelay(true);
    match shared.tls.clone() {
        None => serve_io(stream, peer, admitted, shared).await,
        // Boxed: the handshake's state would otherwise size the task of every connection.
        Some(acceptor) => Box::pin(serve_tls(acceptor, stream, peer, admitted, shared)).await,
    }
}

/// Completes a TLS handshake within the first request's deadline, then serves HTTP over it.
async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    admitted: admission::Admitted,
    shared: Arc<Shared>,
) {
    let Some(activity) = shared.table.activity(admitted.id()) else { return };
    let deadline = activity.accepted + shared.timeouts.first_request;
    let evicted = admitted.evicted().clone();
    tokio::select! {
        handshake = tokio::time::timeout_at(deadline.into(), acceptor.accept(stream)) => match handshake {
            Ok(Ok(stream)) => serve_io(stream, peer, admitted, shared).await,
            Ok(Err(error)) => {
                shared.metrics.connection_closed(TLS_HANDSHAKE_FAILED);
                tracing::debug!(client = %peer.ip(), %error, "TLS handshake failed");
            }
            Err(_) => shared.metrics.connection_closed(Closing::NoRequest.label()),
        },
        () = evicted.cancelled() => shared.metrics.connection_closed(Closing::Evicted.label()),
        () = shared.stop.cancelled() => {}
    }
}

/// The `dispatcher_connections_closed_total` reason of a connection whose TLS handshake failed.
const TLS_HANDSHAKE_FAILED: &str = "tls_handshake";

/// What a connection is doing: the stages of [`serve_io`]. Each is boxed, so that the
/// connection's task is as small as the loop around them and a stage's state exists only while
/// it runs (a device stream served here has no hyper connection at all).
enum Stage<I> {
    /// Reading the first request's head: a device stream request is served here, anything
    /// else by hyper.
    Sniff(Pin<Box<dyn Future<Output = device_stream::Sniffed<I>> + Send>>),
    /// Writing a device stream's response.
    Stream(Pin<Box<dyn Future<Output = device_stream::Reusable<I>> + Send>>),
    /// Hyper serves the connection from here on.
    Hyper(Pin<Box<HyperConnection<I>>>),
}

type HyperConnection<I> = hyper_util::server::conn::auto::UpgradeableConnection<
    'static,
    TokioIo<device_stream::Prefixed<I>>,
    service::Tracked,
    TokioExecutor,
>;

/// A stage's end.
enum Step<I> {
    Sniffed(device_stream::Sniffed<I>),
    Streamed(device_stream::Reusable<I>),
    /// Hyper's connection ended.
    Ended,
}

impl<I> Stage<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(&mut self) -> Step<I> {
        match self {
            Stage::Sniff(sniff) => Step::Sniffed(sniff.await),
            Stage::Stream(stream) => Step::Streamed(stream.await),
            Stage::Hyper(connection) => {
                let _ = connection.as_mut().await;
                Step::Ended
            }
        }
    }
}

/// Serves HTTP on an admitted connection (plain or TLS) until it ends, is evicted, or times out.
async fn serve_io<I>(io: I, peer: SocketAddr, admitted: admission::Admitted, shared: Arc<Shared>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let abort = crate::http::device::ConnectionAbort::default();
    let service =
        service::Tracked::new(shared.router.clone(), peer, shared.table.clone(), admitted.id(), abort.clone());
    let hyper = |prefix, io| -> Stage<I> {
        let io = TokioIo::new(device_stream::Prefixed::new(prefix, io));
        Stage::Hyper(Box::pin(shared.builder.serve_connection_with_upgrades(io, service.clone()).into_owned()))
    };
    let mut stage: Stage<I> = Stage::Sniff(Box::pin(device_stream::sniff(io)));
    let evicted = admitted.evicted().clone();
    let became_idle = admitted.became_idle().clone();
    // The connection's own child of the replica's stop token: the loop below looks at its
    // tokens at every wake-up, and a token's state sits behind a lock that every connection
    // looking at the one shared token would contend for.
    let stop = shared.stop.child_token();
    let mut check_at = Instant::now();
    let mut stopping = false;
    loop {
        tokio::select! {
            // The connection's own progress first: the rest rarely fires.
            biased;
            step = stage.run() => match step {
                Step::Sniffed(device_stream::Sniffed::Stream(request)) => {
                    shared.metrics.stream_request_unbuffered();
                    let service = service.clone();
                    stage = Stage::Stream(Box::pin(device_stream::serve(request, move |request| service.respond(request))));
                }
                Step::Sniffed(device_stream::Sniffed::Other { prefix, io }) => stage = hyper(prefix, io),
                // Kept alive for another request, unless the replica is stopping (as hyper
                // does after a graceful shutdown began).
                Step::Streamed(Some((pipelined, io))) if !stopping => stage = hyper(pipelined, io),
                Step::Sniffed(device_stream::Sniffed::Closed) | Step::Streamed(_) | Step::Ended => return,
            },
            // The last request ended: time the idle period from now (a look taken while the
            // first request was still arriving would otherwise wait out the first-request timeout).
            () = became_idle.notified() => check_at = Instant::now(),
            // A device stream that does not drain: its writes are blocked for good.
            () = abort.0.cancelled() => return,
            () = evicted.cancelled() => {
                shared.metrics.connection_closed(Closing::Evicted.label());
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                match &mut stage {
                    Stage::Hyper(connection) => connection.as_mut().graceful_shutdown(),
                    // No request yet: nothing to finish (hyper, reading the version, does the same).
                    Stage::Sniff(_) => return,
                    // A response in progress finishes (the stream's close frame), then the
                    // connection closes.
                    Stage::Stream(_) => {}
                }
            }
            () = tokio::time::sleep_until(check_at.into()) => {
                let Some(activity) = shared.table.activity(admitted.id()) else { return };
                match timing::verdict(&activity, Instant::now(), shared.timeouts) {
                    Verdict::CheckAt(at) => check_at = at,
                    Verdict::Close(closing) => {
                        shared.metrics.connection_closed(closing.label());
                        if let (Closing::Idle, Stage::Hyper(connection)) = (closing, &mut stage) {
                            // HTTP/2 says GOAWAY; HTTP/1 closes at once.
                            connection.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await;
                        }
                        return;
                    }
                }
            }
        }
    }
}

/// Writes a `503` with `Retry-After` and a JSON error on a refused socket, lingers briefly to
/// read what the client sent, and closes it; a few seconds at most.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, refusal: Refusal, replica_id: &str) {
    let body = serde_json::json!({ "error": refusal.message() }).to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\n{}: {replica_id}\r\n\r\n{body}",
        body.len(),
        protocol::REPLICA_HEADER,
    );
    let written = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}
