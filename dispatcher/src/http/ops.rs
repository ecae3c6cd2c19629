//! Operations endpoints, unauthenticated: liveness, readiness, Prometheus metrics.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::ErrorBody;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, AppState};
use crate::bus::Health;
use crate::readiness::{verdict, Dependency, NotReady, Observed};

/// The body of a healthy `/healthz` or `/readyz`: `{"ok": true}`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct Healthy {
    pub ok: bool,
}

const HEALTHY: Healthy = Healthy { ok: true };

/// `GET /healthz`: 200 while the process serves.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process serves", body = Healthy)),
)]
pub async fn healthz() -> Json<Healthy> {
    Json(HEALTHY)
}

/// `GET /readyz`: 200 while this replica can serve; 503 with the reason while it drains or
/// is frozen, or once the database or NATS has been unreachable longer than the readiness
/// grace (the rule: [`crate::readiness`]). Reads memory only: the dependencies are sampled in
/// the background.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "This replica can serve", body = Healthy),
        (status = 503, description = "Draining, frozen, or the database or the message broker unreachable for longer than the readiness grace", body = ErrorBody),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Healthy>, ApiError> {
    let now = tokio::time::Instant::now();
    let observed = Observed {
        draining: state.draining.load(Ordering::Acquire),
        frozen: !state.dispatcher.hub().accepts_streams(),
        database_down_for: state.readiness.down_for(Dependency::Database, now),
        broker_down_for: state.readiness.down_for(Dependency::Broker, now),
    };
    match verdict(observed, state.settings.readiness_grace) {
        Ok(()) => Ok(Json(HEALTHY)),
        Err(NotReady(reason)) => Err(ApiError::Unavailable(reason)),
    }
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Metrics in the OpenMetrics text format", content_type = "application/openmetrics-text", body = String),
        (status = 500, description = "The metrics could not be rendered"),
    ),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let hub = state.dispatcher.hub();
    let up = state.dispatcher.bus().health() == Health::Up;
    state.metrics.set_stream_queues(hub.queued_bytes(), hub.stuck_streams());
    let snapshot = crate::telemetry::Snapshot {
        streams: hub.connected(),
        pending: hub.pending_calls(),
        broker_up: up,
        draining: state.draining.load(Ordering::Acquire),
        bus: state.dispatcher.bus().stats(),
        pool: state.registry.pool_stats(),
    };
    match state.metrics.render(snapshot) {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
