//! Connection floods against the real `dispatcher` binary: connections that never send a
//! byte, HTTP/2 (h2c) connections that stop after the preface or inside a HEADERS frame,
//! keep-alive connections left idle, one address holding too many connections, and a
//! descriptor limit low enough (`prlimit`) that accepting fails. Each test prints a `FIGURE`
//! line with what it measured.
//!
//! Everything here speaks raw TCP on purpose: a client library would hide the very bytes the
//! tests are about. Timeouts are shortened through the environment (`DISPATCHER_*`), which
//! every flag also reads.
//!
//! Not here: the admission, timing and backoff decisions one by one (unit tests beside them
//! in `dispatcher/src/listener/`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use e2e::{metric, Answer, Control, Dispatcher, TestDevice};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

const SECOND: Duration = Duration::from_secs(1);
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Another loopback address (every 127.x address reaches the loopback on Linux): the
/// "attacker" in the per-address tests, so the test's own probes come from elsewhere.
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;

/// A TCP connection to `server` from the loopback address `local`.
async fn connect_from(local: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    tokio::time::timeout(2 * SECOND, socket.connect(server)).await.map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// Reads until the server closes the connection (end of file or reset) or `limit` passes:
/// what was read, and after how long it closed (`None`: still open at `limit`).
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (bytes, None),
            Ok(Ok(0) | Err(_)) => return (bytes, Some(started.elapsed())),
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// `GET /healthz` over a fresh HTTP/1.1 connection from `local`, as a prober would: the status
/// and how long the answer took, or `None` without one within `limit`.
async fn probe_healthz(local: IpAddr, server: SocketAddr, limit: Duration) -> Option<(u16, Duration)> {
    let started = Instant::now();
    let mut stream = tokio::time::timeout(limit, connect_from(local, server)).await.ok()?.ok()?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\nConnection: close\r\n\r\n").await.ok()?;
    let (bytes, _) = read_until_closed(&mut stream, limit.saturating_sub(started.elapsed())).await;
    let status = status_of(&bytes)?;
    Some((status, started.elapsed()))
}

/// The status code of a raw HTTP/1.1 response.
fn status_of(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    let line = text.lines().next()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A header of a raw HTTP/1.1 response (name case-insensitive).
fn header_of(response: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(response);
    let head = text.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
    })
}

/// The body of a raw HTTP/1.1 response as JSON.
fn json_body_of(response: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(response);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("small frame").to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The HPACK block of `GET http://flood/healthz`: indexed `:method GET` and `:scheme http`,
/// literal `:path` and `:authority` (name from the static table, not indexed).
fn h2_get_healthz_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, 8];
    block.extend_from_slice(b"/healthz");
    block.extend_from_slice(&[0x01, 5]);
    block.extend_from_slice(b"flood");
    block
}

/// The types of the HTTP/2 frames in `bytes` (a server's output read whole).
fn h2_frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        types.push(rest[3]);
        rest = rest.get(9 + len..).unwrap_or_default();
    }
    types
}

/// Lines of the replica's log that contain `needle`.
fn log_lines(server: &Dispatcher, needle: &str) -> usize {
    server.log().lines().filter(|line| line.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_healthz_keeps_answering() {
    let timeout = 3;
    let server = Dispatcher::builder()
        .fd_limit(256)
        .env("DISPATCHER_CONNECTION_TIMEOUT_SECS", timeout.to_string())
        .start()
        .await
        .expect("dispatcher starts under a 256-descriptor limit");
    let addr = server.addr();

    let mut silent = Vec::new();
    let mut refused_connects = 0;
    for _ in 0..400 {
        match connect_from(OTHER, addr).await {
            Ok(stream) => silent.push(stream),
            Err(_) => refused_connects += 1,
        }
    }
    let opened = silent.len();
    let limit = Duration::from_secs(timeout + 3);
    let mut watchers = JoinSet::new();
    for mut stream in silent {
        watchers.spawn(async move { read_until_closed(&mut stream, limit).await.1 });
    }

    // While they are held: a prober from another address, every half second.
    let mut probes = 0;
    let mut answered = 0;
    let mut slowest = Duration::ZERO;
    let probing = Instant::now();
    while probing.elapsed() < Duration::from_secs(timeout + 2) {
        probes += 1;
        match probe_healthz(LOCAL, addr, 2 * SECOND).await {
            Some((200, took)) => {
                answered += 1;
                slowest = slowest.max(took);
            }
            other => eprintln!("healthz probe {probes}: {other:?}"),
        }
        tokio::time::sleep(SECOND / 2).await;
    }

    let mut still_open = 0;
    let mut last_close = Duration::ZERO;
    while let Some(closed) = watchers.join_next().await {
        match closed.expect("watcher") {
            Some(after) => last_close = last_close.max(after),
            None => still_open += 1,
        }
    }
    eprintln!(
        "FIGURE silent flood (256 descriptors, {opened} connections held, {refused_connects} connects failed): \
         {still_open} still open after {}s (last closed at {last_close:?}); /healthz answered 200 within 2 s \
         {answered}/{probes} times (slowest {slowest:?})",
        limit.as_secs()
    );
    assert_eq!(still_open, 0, "silent connections outlived the connection timeout");
    assert_eq!(answered, probes, "/healthz stopped answering under the flood");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_stopped_after_the_preface_is_closed() {
    let timeout = 2;
    let server = Dispatcher::builder()
        .env("DISPATCHER_CONNECTION_TIMEOUT_SECS", timeout.to_string())
        .start()
        .await
        .expect("dispatcher starts");
    let mut stream = connect_from(LOCAL, server.addr()).await.expect("connect");
    stream.write_all(H2_PREFACE).await.expect("preface");
    let limit = Duration::from_secs(timeout + 4);
    let (_, closed) = read_until_closed(&mut stream, limit).await;
    eprintln!("FIGURE h2c stopped after the preface: closed after {closed:?} (None: still open after {limit:?})");
    assert!(closed.is_some(), "an h2c connection that stopped after the preface is still open after {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_stopped_mid_headers_is_closed() {
    let timeout = 2;
    let server = Dispatcher::builder()
        .env("DISPATCHER_CONNECTION_TIMEOUT_SECS", timeout.to_string())
        .start()
        .await
        .expect("dispatcher starts");
    let block = h2_get_healthz_block();
    // One stops inside the HEADERS frame's payload; the other sends the whole frame without
    // END_HEADERS, so the server waits for a CONTINUATION that never comes.
    let mut inside = [H2_PREFACE.to_vec(), h2_frame(FRAME_SETTINGS, 0, 0, &[])].concat();
    inside.extend_from_slice(&h2_frame(FRAME_HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, 1, &block)[..9 + 4]);
    let no_end =
        [H2_PREFACE.to_vec(), h2_frame(FRAME_SETTINGS, 0, 0, &[]), h2_frame(FRAME_HEADERS, FLAG_END_STREAM, 1, &block)]
            .concat();
    let limit = Duration::from_secs(timeout + 4);
    for (label, bytes) in [("inside a HEADERS frame", inside), ("HEADERS without END_HEADERS", no_end)] {
        let mut stream = connect_from(LOCAL, server.addr()).await.expect("connect");
        stream.write_all(&bytes).await.expect("write");
        let (_, closed) = read_until_closed(&mut stream, limit).await;
        eprintln!("FIGURE h2c stopped {label}: closed after {closed:?} (None: still open after {limit:?})");
        assert!(closed.is_some(), "an h2c connection stopped {label} is still open after {limit:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let idle = 2;
    let server = Dispatcher::builder()
        .env("DISPATCHER_IDLE_TIMEOUT_SECS", idle.to_string())
        .start()
        .await
        .expect("dispatcher starts");
    let limit = Duration::from_secs(idle + 4);

    // HTTP/1.1: one request, then nothing.
    let mut stream = connect_from(LOCAL, server.addr()).await.expect("connect");
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n\r\n").await.expect("request");
    let (bytes, closed) = read_until_closed(&mut stream, limit).await;
    eprintln!("FIGURE idle HTTP/1.1 keep-alive: closed after {closed:?} (None: still open after {limit:?})");
    assert_eq!(status_of(&bytes), Some(200), "{}", String::from_utf8_lossy(&bytes));
    assert!(closed.is_some(), "an idle HTTP/1.1 connection is still open after {limit:?}");

    // h2c is served (prior knowledge), and an h2c connection left idle is closed with GOAWAY.
    let client = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    let response = client.get(format!("{}/healthz", server.base_url())).send().await.expect("h2c request");
    assert_eq!((response.status().as_u16(), response.version()), (200, reqwest::Version::HTTP_2));
    drop(client);
    let mut stream = connect_from(LOCAL, server.addr()).await.expect("connect");
    let request = [
        H2_PREFACE.to_vec(),
        h2_frame(FRAME_SETTINGS, 0, 0, &[]),
        h2_frame(FRAME_HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, 1, &h2_get_healthz_block()),
    ]
    .concat();
    stream.write_all(&request).await.expect("request");
    let (bytes, closed) = read_until_closed(&mut stream, limit).await;
    let types = h2_frame_types(&bytes);
    eprintln!("FIGURE idle h2c: closed after {closed:?} (None: still open after {limit:?}); frames {types:?}");
    assert!(types.contains(&FRAME_HEADERS), "no response HEADERS over h2c: {types:?}");
    assert!(closed.is_some(), "an idle h2c connection is still open after {limit:?}");
    assert!(types.contains(&FRAME_GOAWAY), "an idle h2c connection closed without GOAWAY: {types:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_its_cap_is_refused_with_503() {
    let cap = 4;
    let server = Dispatcher::builder()
        .env("DISPATCHER_MAX_CONNECTIONS_PER_IP", cap.to_string())
        .env("DISPATCHER_CONNECTION_TIMEOUT_SECS", "30")
        .start()
        .await
        .expect("dispatcher starts");
    let addr = server.addr();
    // Four requests in flight from one address: bodies that never finish arriving.
    let mut held = Vec::new();
    for _ in 0..cap {
        let mut stream = connect_from(OTHER, addr).await.expect("connect");
        let head = "POST /api/host/enroll HTTP/1.1\r\nHost: flood\r\nContent-Type: application/json\r\n\
                    Content-Length: 100\r\n\r\n{\"code\":";
        stream.write_all(head.as_bytes()).await.expect("write");
        held.push(stream);
    }
    tokio::time::sleep(SECOND / 5).await;
    let mut over = connect_from(OTHER, addr).await.expect("connect");
    let started = Instant::now();
    let (bytes, closed) = read_until_closed(&mut over, 3 * SECOND).await;
    eprintln!(
        "FIGURE connection {} from one address (cap {cap}): {:?} then closed after {closed:?} ({:?} after connecting)",
        cap + 1,
        String::from_utf8_lossy(&bytes).lines().next(),
        started.elapsed()
    );
    assert_eq!(status_of(&bytes), Some(503), "{}", String::from_utf8_lossy(&bytes));
    assert!(header_of(&bytes, "retry-after").is_some_and(|v| v.parse::<u64>().is_ok()), "no Retry-After");
    let body = json_body_of(&bytes).expect("a JSON body");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("address")), "{body}");
    assert!(closed.is_some(), "the refused connection was left open");

    // Others are served meanwhile, and the refusal is counted.
    let healthz = probe_healthz(LOCAL, addr, 2 * SECOND).await;
    assert_eq!(healthz.map(|(status, _)| status), Some(200));
    let refused = metric(&server.base_url(), "connections_refused_total").await;
    assert_eq!(refused, Some(1.0));

    // An address at its cap with silent connections gives up its oldest one instead.
    let third = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let mut silent = Vec::new();
    for _ in 0..cap {
        silent.push(connect_from(third, addr).await.expect("connect"));
    }
    tokio::time::sleep(SECOND / 5).await;
    let mut newest = connect_from(third, addr).await.expect("connect");
    let (_, oldest_closed) = read_until_closed(&mut silent[0], 2 * SECOND).await;
    let (_, newest_closed) = read_until_closed(&mut newest, SECOND / 2).await;
    assert!(oldest_closed.is_some(), "the oldest silent connection of the address was not evicted");
    assert!(newest_closed.is_none(), "the newest connection was closed");
    assert_eq!(metric(&server.base_url(), "connections_refused_total").await, Some(1.0));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_streams_count_toward_the_cap_and_outlive_the_idle_timeout() {
    let server = Dispatcher::builder()
        .keepalive_secs(1)
        .env("DISPATCHER_MAX_CONNECTIONS", "3")
        .env("DISPATCHER_CONNECTION_TIMEOUT_SECS", "1")
        .env("DISPATCHER_IDLE_TIMEOUT_SECS", "1")
        .start()
        .await
        .expect("dispatcher starts");
    let base = server.base_url();
    let control = Control::new(&base, server.mint_token("user-a").await.expect("token"));
    let mut devices = Vec::new();
    for name in ["one", "two", "three"] {
        devices.push(TestDevice::pair(&base, &control, name).await.expect("pair"));
    }
    let mut streams = Vec::new();
    for device in &devices {
        streams.push(device.connect(&base, Answer::Echo).await.expect("stream"));
    }

    // Three streams fill the cap of three connections, and none of them can be evicted.
    tokio::time::sleep(SECOND / 2).await;
    let mut over = connect_from(LOCAL, server.addr()).await.expect("connect");
    let (bytes, closed) = read_until_closed(&mut over, 3 * SECOND).await;
    eprintln!(
        "FIGURE a 4th connection with 3 streams held (cap 3): {:?}",
        String::from_utf8_lossy(&bytes).lines().next()
    );
    assert_eq!(status_of(&bytes), Some(503), "{}", String::from_utf8_lossy(&bytes));
    assert!(closed.is_some());

    // Well past the idle and connection timeouts, the streams live and carry calls.
    tokio::time::sleep(3 * SECOND).await;
    assert!(streams.iter().all(|stream| !stream.is_closed()), "a stream was closed by a connection timeout");
    // The call and the device's result POST each need a connection: leave room for them.
    streams.truncate(1);
    tokio::time::sleep(SECOND / 2).await;
    let (status, body) =
        control.call(&devices[0].device_id, "stat", json!({"path": "."}), Some(5_000)).await.expect("call");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ok"], json!(true), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failures_back_off_and_log_rarely() {
    let timeout = 4;
    // A cap above what 256 descriptors allow: accepting fails with EMFILE under the flood.
    let server = Dispatcher::builder()
        .fd_limit(256)
        .env("DISPATCHER_MAX_CONNECTIONS", "1000")
        .env("DISPATCHER_CONNECTION_TIMEOUT_SECS", timeout.to_string())
        .start()
        .await
        .expect("dispatcher starts under a 256-descriptor limit");
    let addr = server.addr();
    let before = log_lines(&server, "accept failed");
    let flood = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..400 {
        if let Ok(stream) = connect_from(OTHER, addr).await {
            silent.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(timeout)).await;
    let window = flood.elapsed();
    let lines = log_lines(&server, "accept failed") - before;
    drop(silent);
    let per_second = lines as f64 / window.as_secs_f64();
    let mut errors = None;
    let waiting = Instant::now();
    while errors.is_none() && waiting.elapsed() < Duration::from_secs(timeout + 10) {
        errors = metric(&server.base_url(), "accept_errors_total").await;
        tokio::time::sleep(SECOND / 5).await;
    }
    eprintln!(
        "FIGURE accept failures under 400 connections and 256 descriptors: {lines} `accept failed` log lines in \
         {window:?} ({per_second:.1} a second); accept errors counted: {errors:?}"
    );
    assert!(errors.is_some_and(|n| n >= 1.0), "the flood never made accept fail: {errors:?}");
    assert!(per_second <= 1.0, "{lines} `accept failed` lines in {window:?}");
}
