//! `app(state) -> Router`: every route of the contract with the layers that bound it (one
//! body limit for the whole router, request and body timeouts, the replica header, JSON error
//! bodies). No binding and no serving here, so tests drive it in-process or on port 0.
//!
//! An app that embeds the dispatcher takes the parts it needs instead: [`device_routes`] (what
//! devices talk to) beside its own routes, then [`bounded`] around the whole.

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

use crate::http::{access, calls, control, device, events, grant, openapi, ops, proxy, ApiError, AppState};
use crate::mcp;

/// Longest a request may take to be answered: the longest dispatch plus a margin. Streams
/// answer at once and are not bound by it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(330);
/// Longest a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The whole server: every route of the contract, [`bounded`].
pub fn app(state: AppState) -> Router {
    let router = device_routes()
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
        .with_state(state.clone());
    bounded(router, &state)
}

/// The device-facing routes of the contract, for an app that serves its devices itself:
/// `POST /api/host/enroll`, `GET /api/host/stream`, `POST /api/host/result` and
/// `PUT /api/host/manifest`, authenticated with device tokens. A device enrolls with a pairing
/// code the app minted for one of its users ([`crate::registry::Registry::create_pairing_code`]);
/// the app then reaches it through [`crate::service::call_device`] or [`crate::core::Dispatcher`].
///
/// ```
/// use axum::body::Body;
/// use axum::http::{Request, StatusCode};
/// use axum::routing::get;
/// use axum::Router;
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let settings = dispatcher::config::Settings::embedded("sqlite::memory:");
/// let cancel = tokio_util::sync::CancellationToken::new();
/// let state = dispatcher::server::build_state(settings, cancel.clone()).await?;
///
/// // The app's own routes beside the devices' ones, all under the dispatcher's limits.
/// let routes = Router::new()
///     .route("/hello", get(|| async { "the app's own route" }))
///     .merge(dispatcher::app::device_routes().with_state(state.clone()));
/// let app = dispatcher::app::bounded(routes, &state);
///
/// let enroll = Request::post("/api/host/enroll")
///     .header("content-type", "application/json")
///     .body(Body::from(r#"{"code": "NOPE-NOPE-NOPE", "name": "laptop"}"#))?;
/// let answer = app.oneshot(enroll).await?;
/// assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "no such pairing code");
/// cancel.cancel();
/// # Ok(())
/// # }
/// ```
pub fn device_routes() -> Router<AppState> {
    Router::new()
        .route("/api/host/enroll", post(device::enroll))
        .route("/api/host/stream", get(device::stream))
        .route("/api/host/result", post(device::result))
        .route("/api/host/manifest", put(device::manifest))
}

/// `router` with the layers every route of the dispatcher runs under: one body limit for the
/// whole router (`max_body_bytes`), request and body timeouts, `{"error": …}` bodies for errors
/// made outside the handlers, a trace span per request, and the `X-Replica-Id` header.
pub fn bounded(router: Router, state: &AppState) -> Router {
    let replica = HeaderValue::from_str(&state.settings.replica_id).unwrap_or(HeaderValue::from_static("unknown"));
    let max_body = state.settings.max_body_bytes;
    router
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .layer(middleware::from_fn(json_errors))
        // Each middleware is handed only what it reads: its state is cloned for every request,
        // and a whole AppState is a score of reference counts to bump and drop.
        .layer(middleware::from_fn_with_state(state.metrics.clone(), access::log_and_count))
        .layer(middleware::from_fn_with_state(state.settings.clone(), proxy::resolve_client))
        .layer(middleware::map_response(proxy::unbuffered_event_streams))
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
