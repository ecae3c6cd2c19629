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
