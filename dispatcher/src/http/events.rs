//! `GET /api/events`: the caller's devices and proposals as they change anywhere in the
//! cluster, as Server-Sent Events. This door translates: it registers a listener, writes the
//! snapshot, then each frame the [`EventHub`](crate::events::EventHub) queues for it, and a
//! keepalive comment at the keepalive interval.
//!
//! When this replica hears of an api-token revocation (the NATS broadcast or the database poll),
//! and at each keepalive, the stream asks again whether its api token is still good (through the
//! same extractor as every request): a revoked token ends it within the revocation's delay. The stream also ends when its
//! listener falls behind or the replica drains; a client then reconnects and gets a fresh
//! snapshot. Not here: who hears what (`events::listeners`) or what is published (`events`).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use protocol::events::EVENT_SNAPSHOT;
use protocol::sse::KEEPALIVE_COMMENT;
use tokio::sync::watch;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use super::auth::UserCaller;
use super::{ApiError, AppState};
use crate::events::listeners::EncodedFrame;
use crate::events::{self, Subscription};

/// `GET /api/events`.
#[utoipa::path(
    get,
    path = "/api/events",
    tag = "control",
    security(("apiToken" = [])),
    responses(
        (status = 200, description = "Server-Sent Events: `snapshot` first (`{devices, proposals}`, the \
            pending proposals), then `device` (a Device, with `revoked: true` on revocation) and `proposal` \
            (a Proposal) frames as they change on any replica, and `: keepalive` comments",
            content_type = "text/event-stream", body = String),
        (status = 401, description = "No api token, or a bad or revoked one", body = protocol::ErrorBody),
        (status = 503, description = "This replica is shutting down; reconnect to another", body = protocol::ErrorBody),
    ),
)]
pub async fn events(
    State(state): State<AppState>,
    caller: UserCaller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if state.draining.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable("replica is shutting down; reconnect to another".into()));
    }
    // Listening before the snapshot is read: a change made meanwhile is in the snapshot, in
    // the queue, or both, never in neither.
    let subscription = state.events.listen(&caller.user_id);
    let snapshot = events::snapshot(&state, &caller.user_id).await?;
    let first = Event::default()
        .event(EVENT_SNAPSHOT)
        .data(serde_json::to_string(&snapshot).map_err(|e| ApiError::Internal(e.to_string()))?);
    let keepalive = state.settings.keepalive;
    let live = Live {
        closing: state.events.closing(),
        authorization: headers.get(AUTHORIZATION).cloned(),
        user_id: caller.user_id,
        ticks: tokio::time::interval_at(Instant::now() + keepalive, keepalive),
        revocations: state.dispatcher.hub().api_token_revocations(),
        subscription,
        state,
    };
    let frames = futures::stream::unfold((Some(first), Some(live)), |(first, live)| async move {
        if let Some(event) = first {
            return Some((Ok::<_, Infallible>(event), (None, live)));
        }
        let mut live = live?;
        let event = live.next().await?;
        Some((Ok(event), (None, Some(live))))
    });
    let mut response = Sse::new(frames).into_response();
    let headers = response.headers_mut();
    headers.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// An open stream after its snapshot.
struct Live {
    state: AppState,
    subscription: Subscription,
    closing: CancellationToken,
    authorization: Option<HeaderValue>,
    user_id: String,
    ticks: Interval,
    revocations: watch::Receiver<u64>,
}

impl Live {
    /// The next event to write, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Event> {
        loop {
            let listener = &mut self.subscription.listener;
            tokio::select! {
                biased;
                _ = self.closing.cancelled() => return None,
                _ = listener.dropped.cancelled() => return None,
                changed = self.revocations.changed() => {
                    if changed.is_err() || !self.authorized().await {
                        return None;
                    }
                }
                frame = listener.frames.recv() => return frame.map(|frame| event_of(&frame)),
                _ = self.ticks.tick() => {
                    return self.authorized().await.then(|| Event::default().comment(KEEPALIVE_COMMENT));
                }
            }
        }
    }

    async fn authorized(&self) -> bool {
        let authorized = still_authorized(&self.state, self.authorization.as_ref(), &self.user_id).await;
        if !authorized {
            tracing::info!("events stream ended: its api token is no longer accepted");
        }
        authorized
    }
}

fn event_of(frame: &Arc<EncodedFrame>) -> Event {
    Event::default().event(frame.event).data(frame.data.as_str())
}

/// Whether the stream's token still names `user_id`, asked the way every request is (the
/// credential cache, then the registry). A database that cannot answer right now does not end
/// the stream; a refused token does.
async fn still_authorized(state: &AppState, authorization: Option<&HeaderValue>, user_id: &str) -> bool {
    let mut request = Request::builder();
    if let Some(value) = authorization {
        request = request.header(AUTHORIZATION, value);
    }
    let Ok(request) = request.body(()) else {
        return false;
    };
    let (mut parts, ()) = request.into_parts();
    match UserCaller::from_request_parts(&mut parts, state).await {
        Ok(caller) => caller.user_id == user_id,
        Err(ApiError::Unauthorized) => false,
        Err(_) => true,
    }
}
