//! Trace context end to end, against the real `dispatcher` binary: a dispatch joins the
//! caller's W3C trace, the device is handed that trace in its call, and with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set the spans reach an OTLP/HTTP collector (a small one
//! written here, which records what it is sent).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use axum::Router;
use e2e::device::{Answer, Control, TestDevice};
use e2e::process::Dispatcher;
use parking_lot::Mutex;
use protocol::HostCall;
use reqwest::StatusCode;
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Starts a collector on port 0; returns its base URL and the bodies it received.
async fn collector() -> (String, Arc<Mutex<Vec<(String, Bytes)>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |headers: axum::http::HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                sink.lock().push((kind, body));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// Dispatches one call with the caller's `traceparent` and returns the call the device saw.
async fn traced_call(server: &Dispatcher) -> HostCall {
    let token = server.mint_token("alice").await.expect("token");
    let control = Control::new(server.base_url(), token.clone());
    let device = TestDevice::pair(&server.base_url(), &control, "traced").await.expect("pair");
    let seen = Arc::new(Mutex::new(None));
    let keep = seen.clone();
    let answer = Answer::with(move |call: &HostCall| {
        *keep.lock() = Some(call.clone());
        Some(Answer::echo_of(call))
    });
    let _conn = device.connect(&server.base_url(), answer).await.expect("stream");
    let response = reqwest::Client::new()
        .post(format!("{}/api/devices/{}/calls", server.base_url(), device.device_id))
        .bearer_auth(&token)
        .header("traceparent", CALLER)
        .json(&json!({"tool": "stat", "input": {}}))
        .send()
        .await
        .expect("dispatch");
    assert_eq!(response.status(), StatusCode::OK);
    let call = seen.lock().clone().expect("the device saw the call");
    call
}

#[tokio::test]
async fn without_export_the_callers_context_travels_as_is() {
    let server = Dispatcher::start().await.expect("dispatcher");
    let call = traced_call(&server).await;
    assert_eq!(call.traceparent.as_deref(), Some(CALLER));
}

#[tokio::test]
async fn spans_are_exported_over_otlp_and_join_the_callers_trace() {
    let (url, received) = collector().await;
    let mut server = Dispatcher::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await
        .expect("dispatcher");
    let call = traced_call(&server).await;
    let handed = call.traceparent.expect("a traceparent for the device");
    let parts: Vec<&str> = handed.split('-').collect();
    assert_eq!(parts.len(), 4, "{handed}");
    assert_eq!(parts[1], TRACE_ID, "the device's work joins the caller's trace");
    assert_ne!(parts[2], "00f067aa0ba902b7", "under the dispatcher's own span");

    // Spans arrive in batches; a graceful stop flushes the rest.
    let started = Instant::now();
    while received.lock().is_empty() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.sigterm().expect("sigterm");
    server.wait_exit(Duration::from_secs(10)).await.expect("exits");
    let bodies = received.lock().clone();
    assert!(!bodies.is_empty(), "no OTLP export arrived");
    assert!(bodies.iter().all(|(kind, _)| kind.starts_with("application/x-protobuf")), "{:?}", bodies[0].0);
    // OTLP protobuf carries trace ids as raw bytes.
    let trace_bytes: Vec<u8> =
        (0..16).map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).expect("hex")).collect();
    let joined = bodies.iter().any(|(_, body)| body.windows(16).any(|w| w == trace_bytes.as_slice()));
    assert!(joined, "no exported span belongs to the caller's trace");
    let named = bodies.iter().any(|(_, body)| body.windows(12).any(|w| w == b"api.dispatch"));
    assert!(named, "the dispatch span was exported");
}

// ---------------------------------------------------------------------------------------------
// Metrics, logs and spans of a known workload.

/// One sample of the exposition: the sum of the series named `name` whose labels include every
/// pair of `labels` (0 when none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (bare, rest) = series.split_once('{').unwrap_or((series, "}"));
            if bare != name {
                return None;
            }
            let wanted = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

async fn scrape(server: &Dispatcher) -> String {
    let response = reqwest::get(format!("{}/metrics", server.base_url())).await.expect("scrape");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("metrics text")
}

/// A device that proposes for `write*` tools, applies in apply mode, never answers `hang`,
/// and echoes the rest.
fn workload_device() -> Answer {
    Answer::with(|call: &HostCall| {
        if call.mode == Some(protocol::CallMode::Apply) {
            return Some(protocol::HostResult::success(call.call_id.clone(), json!({"applied": true})));
        }
        match call.tool.as_str() {
            "hang" => None,
            tool if tool.starts_with("write") => Some(protocol::HostResult::proposal(
                call.call_id.clone(),
                json!({"tool": tool, "summary": "write", "diff": "", "preconditions": {"absent": true}}),
            )),
            _ => Some(Answer::echo_of(call)),
        }
    })
}

/// What the workload did, for the expected deltas.
const OK_CALLS: usize = 5;
const OFFLINE_CALLS: usize = 3;
const TIMED_OUT_CALLS: usize = 2;

/// Runs the known workload on `server` with `token` for `device`: its stream opened, N calls
/// answered, one more enrollment (a device that stays offline), M calls to it, K timed out,
/// one proposal approved and applied. Returns the device's stream.
async fn run_workload(server: &Dispatcher, token: &str, device: &TestDevice) -> e2e::DeviceConn {
    let control = Control::new(server.base_url(), token.to_owned());
    let conn = device.connect(&server.base_url(), workload_device()).await.expect("stream");
    for i in 0..OK_CALLS {
        let (status, body) = control.call(&device.device_id, "stat", json!({"i": i}), None).await.expect("call");
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Enrolled now, never connected: offline.
    let offline = TestDevice::pair(&server.base_url(), &control, "offline").await.expect("pair");
    for _ in 0..OFFLINE_CALLS {
        let (status, body) = control.call(&offline.device_id, "stat", json!({}), None).await.expect("call");
        assert_eq!((status, body["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("device offline")));
    }
    for _ in 0..TIMED_OUT_CALLS {
        let (status, body) = control.call(&device.device_id, "hang", json!({}), Some(300)).await.expect("call");
        assert_eq!((status, body["error"].as_str()), (StatusCode::GATEWAY_TIMEOUT, Some("device timed out")));
    }
    let (status, body) = control.call(&device.device_id, "write_file", json!({"path": "a"}), None).await.expect("call");
    assert_eq!((status, body["proposal"].as_bool()), (StatusCode::OK, Some(true)), "{body}");
    let proposal_id = body["proposalId"].as_str().expect("proposalId").to_owned();
    let (status, body) = control.approve(&proposal_id).await.expect("approve");
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, stored) = control.proposal(&proposal_id).await.expect("proposal");
    assert_eq!(stored["status"], "applied", "{stored}");
    conn
}

#[tokio::test]
async fn metrics_count_a_known_workload_exactly() {
    let server = Dispatcher::start().await.expect("dispatcher");
    let token = server.mint_token("alice").await.expect("token");
    let control = Control::new(server.base_url(), token.clone());
    let code = control.pairing_code().await.expect("code");
    let before = scrape(&server).await;
    let device = TestDevice::enroll(&server.base_url(), &code, "metered").await.expect("enroll");
    let conn = run_workload(&server, &token, &device).await;
    drop(conn);
    // The stream's end is counted when the server sees the connection go.
    let started = Instant::now();
    let mut after = scrape(&server).await;
    while sample(&after, "dispatcher_stream_closes_total", &[("reason", "disconnected")]) < 1.0
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = scrape(&server).await;
    }
    let delta = |name: &str, labels: &[(&str, &str)]| sample(&after, name, labels) - sample(&before, name, labels);

    let (n, m, k) = (OK_CALLS as f64, OFFLINE_CALLS as f64, TIMED_OUT_CALLS as f64);
    // Dispatches: the calls, the proposal, and the approval's apply (answered ok).
    let expected_dispatches = [("ok", n + 1.0), ("offline", m), ("timed_out", k), ("proposal", 1.0), ("error", 0.0)];
    for (outcome, want) in expected_dispatches {
        assert_eq!(delta("dispatcher_dispatches_total", &[("outcome", outcome)]), want, "dispatches {outcome}");
        assert_eq!(
            delta("dispatcher_dispatch_duration_seconds_count", &[("outcome", outcome)]),
            want,
            "dispatch latency {outcome}"
        );
    }
    let calls = "/api/devices/{id}/calls";
    let expected_requests = [
        ("POST", calls, "200", n + 1.0),
        ("POST", calls, "503", m),
        ("POST", calls, "504", k),
        ("POST", "/api/host/approve", "200", 1.0),
        ("POST", "/api/host/enroll", "201", 2.0),
        ("POST", "/api/pairing-codes", "201", 1.0),
        ("POST", "/api/host/result", "200", n + 2.0),
        ("GET", "/api/host/stream", "200", 1.0),
        ("GET", "/api/proposals/{id}", "200", 1.0),
    ];
    for (method, route, status, want) in expected_requests {
        let labels = [("method", method), ("route", route), ("status", status)];
        assert_eq!(delta("dispatcher_http_requests_total", &labels), want, "requests {labels:?}");
    }
    assert_eq!(
        delta("dispatcher_http_request_duration_seconds_count", &[("method", "POST"), ("route", calls)]),
        n + 1.0 + m + k,
        "latency histogram of the calls route"
    );
    assert!(!after.contains(&device.device_id), "raw paths never become labels");
    // Results: N answers, the proposal, the apply. The timed-out calls were never answered.
    assert_eq!(delta("dispatcher_result_deliveries_total", &[("fate", "delivered")]), n + 2.0);
    assert_eq!(delta("dispatcher_result_deliveries_total", &[("fate", "unknown")]), 0.0);
    assert_eq!(delta("dispatcher_enrollments_total", &[("outcome", "enrolled")]), 2.0);
    assert_eq!(delta("dispatcher_enrollments_total", &[("outcome", "refused")]), 0.0);
    for (transition, want) in
        [("proposed", 1.0), ("approved", 1.0), ("applied", 1.0), ("failed", 0.0), ("rejected", 0.0)]
    {
        assert_eq!(delta("dispatcher_proposals_total", &[("transition", transition)]), want, "proposals {transition}");
    }
    assert_eq!(delta("dispatcher_stream_opens_total", &[]), 1.0);
    assert_eq!(delta("dispatcher_stream_closes_total", &[("reason", "disconnected")]), 1.0);
    assert_eq!(sample(&after, "dispatcher_device_streams", &[]), 0.0);
    assert_eq!(sample(&after, "dispatcher_pending_calls", &[]), 0.0);
    assert_eq!(sample(&after, "dispatcher_draining", &[]), 0.0);
    assert_eq!(delta("dispatcher_db_errors_total", &[]), 0.0);

    // Always there: the process, the build, the pool.
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_max_fds"] {
        assert!(sample(&after, name, &[]) > 0.0, "{name}: {after}");
    }
    let start = sample(&after, "process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    assert!(start > now - 600.0 && start <= now + 1.0, "start time {start} vs now {now}");
    assert_eq!(sample(&after, "dispatcher_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0, "{after}");
    assert!(sample(&after, "dispatcher_db_pool_max_connections", &[]) >= 1.0);
    assert!(sample(&after, "dispatcher_db_pool_connections", &[("state", "idle")]) >= 0.0);
    println!(
        "workload: {n} ok, {m} offline, {k} timed out, 1 enrollment, 1 proposal applied: every delta as expected; \
         RSS {} MiB, {} descriptors",
        sample(&after, "process_resident_memory_bytes", &[]) / 1_048_576.0,
        sample(&after, "process_open_fds", &[])
    );
}

#[tokio::test]
async fn offline_and_timed_out_are_info_lines_of_the_access_log_never_errors() {
    let server = Dispatcher::start().await.expect("dispatcher");
    let token = server.mint_token("alice").await.expect("token");
    let control = Control::new(server.base_url(), token.clone());
    let device = TestDevice::pair(&server.base_url(), &control, "logged").await.expect("pair");
    let conn = run_workload(&server, &token, &device).await;
    drop(conn);
    // A 4xx or two on top.
    let (status, _) = control.device("not-a-device").await.expect("get");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = Control::new(server.base_url(), "bad").devices().await.expect("list");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let log = server.log();
    let errors: Vec<&str> = log.lines().filter(|line| line.contains("ERROR")).collect();
    assert!(errors.is_empty(), "normal outcomes logged as errors:\n{}", errors.join("\n"));
    let access: Vec<&str> = log.lines().filter(|line| line.contains(" INFO ") && line.contains("access")).collect();
    let has = |route: &str, status: u16| {
        access.iter().any(|line| line.contains(&format!("route={route}")) && line.contains(&format!("status={status}")))
    };
    for (route, status) in [
        ("/api/devices/{id}/calls", 200),
        ("/api/devices/{id}/calls", 503),
        ("/api/devices/{id}/calls", 504),
        ("/api/devices/{id}", 404),
        ("/api/devices", 401),
        ("/api/host/enroll", 201),
    ] {
        assert!(has(route, status), "no info access line for {route} {status}:\n{}", access.join("\n"));
    }
    let sample_line = access.iter().find(|line| line.contains("status=503")).expect("a 503 line");
    for field in ["method=POST", "latency_ms=", "client=127.0.0.1"] {
        assert!(sample_line.contains(field), "{field} missing from {sample_line}");
    }
    assert!(!log.contains(&format!("route=/api/devices/{}/calls", device.device_id)), "the route is the template");
}

#[tokio::test]
async fn json_logs_carry_the_trace_id_and_server_spans_have_http_attributes() {
    let (url, received) = collector().await;
    let mut server = Dispatcher::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "dispatcher-under-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("LOG_FORMAT", "json")
        .start()
        .await
        .expect("dispatcher");
    let _call = traced_call(&server).await;
    server.sigterm().expect("sigterm");
    server.wait_exit(Duration::from_secs(10)).await.expect("exits");

    // The access line of the traced dispatch is JSON carrying the caller's trace id.
    let log = server.log();
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    assert!(!lines.is_empty(), "no JSON log lines:\n{log}");
    let access = lines
        .iter()
        .find(|line| line["target"] == "access" && line["fields"]["route"] == "/api/devices/{id}/calls")
        .unwrap_or_else(|| panic!("no access line for the call:\n{log}"));
    assert_eq!(access["span"]["trace_id"], TRACE_ID, "{access}");
    assert_eq!(access["fields"]["status"], 200, "{access}");
    assert_eq!(access["level"], "INFO", "{access}");

    // Spans: the service name from the environment, a server span with the HTTP attributes.
    let bodies = received.lock().clone();
    let all: Vec<u8> = bodies.iter().flat_map(|(_, body)| body.to_vec()).collect();
    let contains = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"dispatcher-under-test"), "OTEL_SERVICE_NAME not used");
    for attribute in
        ["http.request.method", "http.route", "http.response.status_code", "url.path", "/api/devices/{id}/calls"]
    {
        assert!(contains(attribute.as_bytes()), "no {attribute} in the exported spans");
    }
    // OTLP's Span.kind (field 6, varint) = SPAN_KIND_SERVER (2): the bytes 0x30 0x02.
    assert!(contains(&[0x30, 0x02]), "no server span");
}

#[tokio::test]
async fn an_unknown_otlp_protocol_is_said_and_export_is_off() {
    let (url, _received) = collector().await;
    let server = Dispatcher::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
        .start()
        .await
        .expect("dispatcher still starts");
    let call = traced_call(&server).await;
    assert_eq!(call.traceparent.as_deref(), Some(CALLER), "without export the caller's context travels as is");
    assert!(server.log().contains("carrier-pigeon"), "the bad protocol is named:\n{}", server.log());
}

#[tokio::test]
async fn spans_go_over_otlp_grpc_when_asked() {
    // The receiving end: another dispatcher, which serves HTTP/2 without TLS (h2c) as gRPC
    // needs, and logs the path it was sent even though it has no such route.
    let receiver = Dispatcher::start().await.expect("receiver");
    let sender = Dispatcher::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base_url())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await
        .expect("sender");
    let _call = traced_call(&sender).await;
    let export = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    let started = Instant::now();
    while !receiver.log().contains(export) && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = receiver.log().lines().find(|line| line.contains(export)).map(str::to_owned);
    let line = line.unwrap_or_else(|| panic!("no gRPC export arrived:\n{}", sender.log()));
    assert!(line.contains("method=POST") || line.contains("http.request.method=POST"), "{line}");
    assert!(!sender.log().contains("panicked"), "{}", sender.log());
}
