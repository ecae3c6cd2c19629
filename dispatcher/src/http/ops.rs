//! Operations endpoints, unauthenticated: liveness, readiness, Prometheus metrics.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::ErrorBody;
use serde::Serialize;
use utoipa::ToSchema;

use super::{ApiError, AppState};
use crate::bus::Health;

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

/// `GET /readyz`: 200 when the database and (in cluster mode) NATS answer and the replica
/// is not draining; 503 with the reason otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "This replica can serve", body = Healthy),
        (status = 503, description = "Draining, or the database or the message broker is unreachable", body = ErrorBody),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Healthy>, ApiError> {
    if state.draining.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable("draining".into()));
    }
    if state.dispatcher.bus().health() != Health::Up {
        return Err(ApiError::Unavailable("message broker unreachable".into()));
    }
    match tokio::time::timeout(Duration::from_secs(2), state.registry.ping()).await {
        Ok(Ok(())) => Ok(Json(HEALTHY)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "database unreachable");
            Err(ApiError::Unavailable("database unreachable".into()))
        }
        Err(_) => Err(ApiError::Unavailable("database did not answer".into())),
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
