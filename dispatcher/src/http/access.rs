//! The access log and the HTTP metrics: one middleware around every route. Each request runs
//! in a `http.request` span of kind server, with the HTTP semantic-convention attributes
//! (`http.request.method`, `http.route`, `url.path`, `client.address`,
//! `http.response.status_code`), parented on the caller's `traceparent`; when it is answered,
//! one line is logged at info (at debug for the probes and `/metrics`, which would drown the
//! rest) and `dispatcher_http_requests_total` / `dispatcher_http_request_duration_seconds`
//! are counted by the matched route template, never the raw path.
//!
//! Outcomes are not errors: a 503 `device offline` or a 504 `device timed out` is an info line
//! like a 200. Only a 500 is logged as an error, by [`super::ApiError`] where it is made.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::telemetry::Metrics;

/// Routes logged at debug: polled by machines every few seconds.
const QUIET_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The method as a label: the standard ones by name, anything else `other`, so a client
/// inventing methods cannot grow the metrics without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

pub async fn log_and_count(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Borrowed or cheaply cloned (the matched path is shared): this runs for every request.
    let method = method_label(request.method());
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let client = super::proxy::client_ip(&request);
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        client.address = %client,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let traceparent = request.headers().get("traceparent").and_then(|v| v.to_str().ok());
    crate::telemetry::set_parent(&span, traceparent);
    if let Some(trace_id) = crate::telemetry::trace_id_of(&span) {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    let response = {
        use tracing::Instrument;
        next.run(request).instrument(span.clone()).await
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    metrics.http_request(method, route, status, elapsed);
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if QUIET_ROUTES.contains(&route) {
            tracing::debug!(target: "access", %method, %route, status, latency_ms, %client, "request");
        } else {
            tracing::info!(target: "access", %method, %route, status, latency_ms, %client, "request");
        }
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        let cases = [("GET", "GET"), ("DELETE", "DELETE"), ("BREW", "other"), ("get", "other"), ("CONNECT", "other")];
        for (method, label) in cases {
            let method = axum::http::Method::from_bytes(method.as_bytes()).expect("a method");
            assert_eq!(method_label(&method), label, "{method}");
        }
    }
}
