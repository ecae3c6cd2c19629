//! `app(state) -> Router`: every route of the contract with the layers that bound it (one
//! body limit for the whole router, request and body timeouts, the replica header, JSON error
//! bodies). No binding and no serving here, so tests drive it in-process or on port 0.

use std::time::Duration;

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use protocol::REPLICA_HEADER;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

use crate::http::{access, calls, control, device, events, grant, openapi, ops, ApiError, AppState};
use crate::mcp;

/// Longest a request may take to be answered: the longest dispatch plus a margin. Streams
/// answer at once and are not bound by it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(330);
/// Longest a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn app(state: AppState) -> Router {
    let replica = HeaderValue::from_str(&state.settings.replica_id).unwrap_or(HeaderValue::from_static("unknown"));
    let max_body = state.settings.max_body_bytes;
    Router::new()
        .route("/api/host/enroll", post(device::enroll))
        .route("/api/host/stream", get(device::stream))
        .route("/api/host/result", post(device::result))
        .route("/api/host/manifest", put(device::manifest))
        .route("/api/host/device-authorization", post(grant::device_authorization))
        .route("/api/host/token", post(grant::token))
        .route("/api/device-authorizations/{user_code}", get(grant::get_device_authorization))
        .route("/api/device-authorizations/{user_code}/approve", post(grant::approve_device_authorization))
        .route("/api/device-authorizations/{user_code}/deny", post(grant::deny_device_authorization))
        .route("/api/host/approve", post(control::approve))
        .route("/api/host/reject", post(control::reject))
        .route("/api/pairing-codes", post(control::create_pairing_code))
        .route("/api/devices", get(control::list_devices))
        .route("/api/devices/{id}", get(control::get_device).delete(control::delete_device))
        .route("/api/devices/{id}/calls", post(control::call_device))
        .route("/api/proposals", get(control::list_proposals))
        .route("/api/proposals/{id}", get(control::get_proposal))
        .route("/api/calls", get(calls::list_calls))
        .route("/api/calls/{callId}", get(calls::get_call))
        .route("/mcp/devices/{id}", post(mcp::post).get(mcp::get).delete(mcp::delete))
        .route("/api/events", get(events::events))
        .merge(crate::ui::routes())
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(|| async { ApiError::NotFound })
        .with_state(state.clone())
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state, access::log_and_count))
        .layer(SetResponseHeaderLayer::overriding(header::HeaderName::from_static(REPLICA_HEADER), replica))
}

/// Gives error responses made outside the handlers (body limit, unknown method, timeouts)
/// the contract's `{"error": …}` body. A 413 also says `Connection: close`: the unread rest of
/// the body makes the connection unusable, and a client that pools connections must know.
async fn json_errors(request: Request<Body>, next: Next) -> Response {
    let mut response = with_json_error(next.run(request).await);
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn with_json_error(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge.into_response(),
        StatusCode::NOT_FOUND => ApiError::NotFound.into_response(),
        _ => {
            let error = status.canonical_reason().unwrap_or("error").to_lowercase();
            (status, axum::Json(protocol::ErrorBody { error })).into_response()
        }
    }
}
