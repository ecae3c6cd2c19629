//! Device-facing routes: enrollment, the SSE stream, result posts and the manifest.
//!
//! A result that no replica waits for may still be a proposal's apply whose replica died or
//! whose approval timed out: the registry records it then (`LateApply`), so the proposal shows
//! what the device really did.
//!
//! The stream writes what the hub queues for it ([`crate::core::StreamQueue`]); when the hub
//! drops a stream that does not drain, the writer ends and the connection is closed through
//! the [`ConnectionAbort`] the server attached to it.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use protocol::sse::{self, Ready, Reconnect, ReconnectReason};
use protocol::subject::DeliverAck;
use protocol::{Delivered, EnrollRequest, EnrollResponse, ErrorBody, HostResult, Manifest};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::auth::{DeviceCaller, DeviceToken};
use super::{ApiError, AppState, JsonBody, SizedJsonBody};
use crate::core::{CachedDevice, Close, Delivery, DeviceStream, Frame};
use crate::events;
use crate::registry::{EnrollOutcome, LateApply, OpenedStream, RegistryError};

const MAX_NAME_LEN: usize = 200;
/// `Retry-After` (seconds) of a stream refused because the replica holds `--max-streams`.
const STREAMS_FULL_RETRY_AFTER: u32 = 2;

/// `POST /api/host/enroll`: a pairing code for a device id and token.
#[utoipa::path(
    post,
    path = "/api/host/enroll",
    tag = "device",
    request_body = EnrollRequest,
    responses(
        (status = 201, description = "Enrolled", body = EnrollResponse),
        (status = 400, description = "Malformed body, or a blank or overlong name or platform", body = ErrorBody),
        (status = 401, description = "The code is unknown, expired or already used", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 429, description = "Too many attempts from this client address (behind `--trusted-proxies`, the \
            client they name), or the user's device quota is reached", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until another attempt is allowed"))),
    ),
)]
pub async fn enroll(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let outcome = enroll_device(&state, request).await;
    state.metrics.enrollment(match &outcome {
        Ok(_) => "enrolled",
        Err(ApiError::Unauthorized) => "refused",
        Err(ApiError::TooManyRequests { .. }) => "rate_limited",
        Err(ApiError::OverQuota(_)) => "over_quota",
        Err(error) if error.status().is_client_error() => "invalid",
        Err(_) => "error",
    });
    outcome
}

async fn enroll_device(state: &AppState, request: Request) -> Result<Response, ApiError> {
    let client = super::proxy::client_ip(&request);
    if let Err(retry_after) = state.enroll_limiter.acquire(client, Instant::now()) {
        tracing::info!(%client, "enrollment refused: too many attempts from this address");
        return Err(ApiError::TooManyRequests { retry_after });
    }
    let JsonBody(body) =
        <JsonBody<EnrollRequest> as axum::extract::FromRequest<AppState>>::from_request(request, state).await?;
    let EnrollRequest { code, name, platform } = body;
    let name = name.trim();
    if !(1..=MAX_NAME_LEN).contains(&name.chars().count()) {
        return Err(ApiError::BadRequest(format!("name: 1 to {MAX_NAME_LEN} characters")));
    }
    if code.is_empty() || code.len() > 64 {
        return Err(ApiError::Unauthorized);
    }
    if platform.as_ref().is_some_and(|p| p.chars().count() > MAX_NAME_LEN) {
        return Err(ApiError::BadRequest(format!("platform: at most {MAX_NAME_LEN} characters")));
    }
    match state.registry.enroll(&code, name, platform.as_deref()).await? {
        EnrollOutcome::Enrolled(enrolled) => {
            tracing::info!(device_id = %enrolled.device_id, %client, "device enrolled");
            events::device_enrolled(state, &enrolled.token);
            Ok((StatusCode::CREATED, Json(enrolled)).into_response())
        }
        EnrollOutcome::Refused => Err(ApiError::Unauthorized),
    }
}

/// Closes the connection a request came on, when cancelled: the server puts one in every
/// request's extensions and drops the connection when it fires. A stream that does not drain
/// is ended this way (its writer is blocked on the socket, so ending the body would not do).
#[derive(Debug, Clone, Default)]
pub struct ConnectionAbort(pub CancellationToken);

/// `GET /api/host/stream`: the device's Server-Sent-Events stream.
#[utoipa::path(
    get,
    path = "/api/host/stream",
    tag = "device",
    security(("deviceToken" = [])),
    responses(
        (status = 200, description = "Server-Sent Events: `ready` first (a `Ready`), then `call` frames (a \
            `HostCall`, `id:` its call id), `: keepalive` comments, and at most one closing frame: \
            `reconnect` (a `Reconnect`), `superseded` or `revoked` (`{}`)", content_type = "text/event-stream", body = String),
        (status = 401, description = "Bad or revoked device token", body = ErrorBody),
        (status = 503, description = "This replica is shutting down or recovering; reconnect to another", body = ErrorBody),
    ),
)]
pub async fn stream(
    State(state): State<AppState>,
    abort: Option<axum::Extension<ConnectionAbort>>,
    token: DeviceToken,
) -> Result<Response, ApiError> {
    if state.draining.load(Ordering::Acquire) {
        state.metrics.stream_refused("draining");
        return Err(ApiError::Unavailable("replica is shutting down; reconnect to another".into()));
    }
    if !state.dispatcher.hub().accepts_streams() {
        state.metrics.stream_refused("stalled");
        return Err(ApiError::Unavailable("replica is recovering from a stall; reconnect to another".into()));
    }
    // Under a cap, a place is held from here until the stream is registered; a full replica
    // refuses before any database work. A device whose stream is here already (reconnecting)
    // may replace it.
    let hub = state.dispatcher.hub();
    let _slot = match state.settings.capacity.max_streams {
        Some(max) if !cached_holder_here(&state, &token) => match hub.reserve_stream(max) {
            Some(slot) => Some(slot),
            // Not cached here (the cache is short-lived), yet maybe here all the same.
            None if holds_stream_here(&state, &token).await? => None,
            None => {
                state.metrics.stream_refused("max_streams");
                let error = ApiError::Unavailable(format!(
                    "replica holds its maximum of {max} device streams (--max-streams); reconnect to another"
                ));
                let mut response = error.into_response();
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, STREAMS_FULL_RETRY_AFTER.into());
                return Ok(response);
            }
        },
        _ => None,
    };
    // The token is checked where the epoch is issued: unknown or revoked (even if cached here,
    // since a revocation this replica has not heard of yet), no stream.
    let Some(opened) = state.registry.open_stream(&token.token, hub.route_tag()).await? else {
        return Err(ApiError::Unauthorized);
    };
    let OpenedStream { epoch, device } = opened;
    let (device_id, owner) = (device.id.clone(), device.owner.clone());
    // The device's result POSTs find its token cached.
    hub.cache_device(token.hash, CachedDevice { device_id: device_id.clone(), owner: owner.clone() });
    let stream = state.dispatcher.connect(&device_id, epoch).await?;
    if let Some(axum::Extension(ConnectionAbort(abort))) = abort {
        stream.frames.set_abort(abort);
    }
    tracing::info!(%device_id, epoch, "stream opened");
    state.metrics.stream_opened();
    events::device_row_changed(&state, device);
    let ready = Ready { device_id: device_id.clone(), replica: state.settings.replica_id.clone() };
    let events = frames(ready, stream, StreamEnd { state: state.clone(), device_id, owner, reason: None });
    let keepalive = KeepAlive::new().interval(state.settings.keepalive).text(sse::KEEPALIVE_COMMENT);
    Ok(Sse::new(events).keep_alive(keepalive).into_response())
}

/// True when `token` is cached here and its device holds a stream here.
fn cached_holder_here(state: &AppState, token: &DeviceToken) -> bool {
    let hub = state.dispatcher.hub();
    hub.cached_device(&token.hash).is_some_and(|cached| hub.holder(&cached.device_id).is_some())
}

/// True when the device of `token` holds a stream on this replica (so it may replace it on a
/// full replica). Asked only of a full replica, so a token not cached here may cost a lookup.
async fn holds_stream_here(state: &AppState, token: &DeviceToken) -> Result<bool, ApiError> {
    let hub = state.dispatcher.hub();
    let device_id = match hub.cached_device(&token.hash) {
        Some(cached) => cached.device_id,
        None => match state.registry.device_for_token(&token.token).await? {
            Some(auth) => auth.device_id,
            None => return Err(ApiError::Unauthorized),
        },
    };
    Ok(hub.holder(&device_id).is_some())
}

/// Records the end of a stream (last seen, the metric of why) when the response body is
/// dropped.
struct StreamEnd {
    state: AppState,
    device_id: String,
    owner: String,
    /// Why it ended, when the server ended it; `disconnected` otherwise.
    reason: Option<&'static str>,
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let state = self.state.clone();
        let registry = self.state.registry.clone();
        let device_id = std::mem::take(&mut self.device_id);
        let owner = std::mem::take(&mut self.owner);
        let reason = self.reason.unwrap_or("disconnected");
        self.state.metrics.stream_closed(reason);
        tracing::info!(%device_id, reason, "stream closed");
        // A draining replica closes every stream at once, and its devices reconnect elsewhere
        // (which records them as seen): no burst of writes on the way out.
        if self.state.draining.load(Ordering::Acquire) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = registry.touch_device(&device_id).await {
                    tracing::warn!(%device_id, %error, "could not record last seen");
                }
                // Offline, unless the device already holds a stream elsewhere.
                events::device_changed(&state, &owner, &device_id);
            });
        }
    }
}

fn json_event(name: &str, id: Option<&str>, data: &impl serde::Serialize) -> Event {
    let event = Event::default().event(name);
    let event = match id {
        Some(id) => event.id(id),
        None => event,
    };
    event.data(serde_json::to_string(data).unwrap_or_else(|_| "{}".into()))
}

/// `ready`, then one event per frame; a close frame is sent and ends the stream.
fn frames(ready: Ready, stream: DeviceStream, end: StreamEnd) -> impl Stream<Item = Result<Event, Infallible>> {
    let first = json_event(sse::EVENT_READY, None, &ready);
    futures::stream::unfold((Some(first), Some((stream, end))), |(first, rest)| async move {
        if let Some(event) = first {
            return Some((Ok(event), (None, rest)));
        }
        let (stream, mut end) = rest?;
        let Some(frame) = stream.frames.recv().await else {
            // Abandoned by the hub: the device stopped reading.
            end.reason = Some("stuck");
            return None;
        };
        match frame {
            Frame::Call(call) => {
                end.state.call_log.pushed(&call.call_id, &end.device_id, &end.owner);
                // Encoded when it was queued: one line of JSON.
                let event = Event::default().event(sse::EVENT_CALL).id(&call.call_id).data(call.json);
                Some((Ok(event), (None, Some((stream, end)))))
            }
            Frame::Close(close) => {
                end.reason = Some(close_reason(close));
                let event = match close {
                    Close::Superseded => json_event(sse::EVENT_SUPERSEDED, None, &serde_json::json!({})),
                    Close::Revoked => json_event(sse::EVENT_REVOKED, None, &serde_json::json!({})),
                    Close::Reconnect(reason) => json_event(sse::EVENT_RECONNECT, None, &Reconnect { reason }),
                };
                // Dropping the stream here unregisters it; the close frame is the last one.
                drop((stream, end));
                Some((Ok(event), (None, None)))
            }
        }
    })
}

/// The `reason` label of a stream the server closed with a frame.
fn close_reason(close: Close) -> &'static str {
    match close {
        Close::Superseded => "superseded",
        Close::Revoked => "revoked",
        Close::Reconnect(ReconnectReason::Shutdown) => "shutdown",
        Close::Reconnect(ReconnectReason::BrokerLost) => "broker_lost",
        Close::Reconnect(ReconnectReason::Stalled) => "stalled",
        Close::Reconnect(ReconnectReason::Rebalance) => "rebalance",
    }
}

/// `POST /api/host/result`: a device's answer to a call.
#[utoipa::path(
    post,
    path = "/api/host/result",
    tag = "device",
    security(("deviceToken" = [])),
    request_body = HostResult,
    responses(
        (status = 200, description = "Handed to the waiting dispatch, or recorded as a proposal's late apply", body = Delivered),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Bad or revoked device token", body = ErrorBody),
        (status = 403, description = "The call was dispatched to another device", body = ErrorBody),
        (status = 404, description = "No pending call with that id: `{\"delivered\": false}`", body = Delivered),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
    ),
)]
pub async fn result(
    State(state): State<AppState>,
    caller: DeviceCaller,
    headers: axum::http::HeaderMap,
    SizedJsonBody(result, bytes): SizedJsonBody<HostResult>,
) -> Result<Response, ApiError> {
    // The agent posts under the call's trace context: the hand-over joins the dispatch's trace.
    let span = tracing::info_span!("api.result", device_id = %caller.device_id, call_id = %result.call_id);
    crate::telemetry::set_parent(&span, headers.get("traceparent").and_then(|v| v.to_str().ok()));
    let outcome = deliver(&state, &caller, result, bytes, span).await;
    state.metrics.result_delivery(match &outcome {
        Ok((fate, _)) => fate,
        Err(ApiError::Forbidden(_)) => "forbidden",
        Err(_) => "error",
    });
    outcome.map(|(_, response)| response)
}

/// Hands a result over (and completes its call log record); the fate (`delivered`,
/// `late_apply`, `unknown`, `forbidden`) and the response.
async fn deliver(
    state: &AppState,
    caller: &DeviceCaller,
    result: HostResult,
    bytes: usize,
    span: tracing::Span,
) -> Result<(&'static str, Response), ApiError> {
    // The call log's part, taken before the result moves on: its outcome and size only.
    let logged = HostResult {
        call_id: result.call_id.clone(),
        ok: result.ok,
        result: None,
        proposal: None,
        error: result.error.clone(),
    };
    let log = || state.call_log.answered_by_device(&caller.device_id, &caller.owner, &logged, bytes);
    match state.dispatcher.deliver_or_keep(&caller.device_id, result).instrument(span.clone()).await {
        Delivery::Answered(DeliverAck::Delivered) => {
            log();
            Ok(("delivered", delivered(true)))
        }
        Delivery::Answered(DeliverAck::Forbidden) => Err(forbidden()),
        Delivery::Answered(DeliverAck::Unknown) => Ok(("unknown", delivered(false))),
        // Nobody waits for it: it may be the apply of a proposal whose replica died or gave up.
        // Whatever the call was, the result completes its record (the registry keeps it only
        // when the call was sent to this device).
        Delivery::Unclaimed(late) => {
            let late_apply = state.registry.complete_late_apply(&caller.device_id, &late).await;
            if !matches!(late_apply, Ok(LateApply::OtherDevice)) {
                log();
            }
            match late_apply? {
                LateApply::Recorded { proposal_id, status } => {
                    span.in_scope(
                        || tracing::info!(device_id = %caller.device_id, %proposal_id, status = status.as_str(), "late apply result recorded"),
                    );
                    state.metrics.proposal(status.as_str());
                    events::proposal_reloaded(state, &caller.owner, &proposal_id).await;
                    Ok(("late_apply", delivered(true)))
                }
                LateApply::OtherDevice => Err(forbidden()),
                LateApply::Unknown => Ok(("unknown", delivered(false))),
            }
        }
    }
}

/// `{"delivered": …}`: 200 when true, 404 when false.
fn delivered(delivered: bool) -> Response {
    let status = if delivered { StatusCode::OK } else { StatusCode::NOT_FOUND };
    (status, Json(Delivered { delivered })).into_response()
}

fn forbidden() -> ApiError {
    ApiError::Forbidden("the call was dispatched to another device".into())
}

/// `PUT /api/host/manifest`: the device's tools and roots.
#[utoipa::path(
    put,
    path = "/api/host/manifest",
    tag = "device",
    security(("deviceToken" = [])),
    request_body = Manifest,
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "Malformed body, or a tool without a name", body = ErrorBody),
        (status = 401, description = "Bad or revoked device token", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over the limit, or more tools or bytes than the manifest caps", body = ErrorBody),
    ),
)]
pub async fn manifest(
    State(state): State<AppState>,
    caller: DeviceCaller,
    JsonBody(manifest): JsonBody<Manifest>,
) -> Result<StatusCode, ApiError> {
    if manifest.tools.iter().any(|tool| tool.name.is_empty()) {
        return Err(ApiError::BadRequest("tools: every tool needs a name".into()));
    }
    match state.registry.set_manifest(&caller.device_id, &manifest).await {
        Err(RegistryError::NotFound) => return Err(ApiError::Unauthorized),
        other => other?,
    }
    events::device_changed(&state, &caller.owner, &caller.device_id);
    Ok(StatusCode::NO_CONTENT)
}
