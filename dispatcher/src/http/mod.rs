//! The HTTP API of CONTRACT.md: device-facing routes ([`device`]), the control API
//! ([`control`]) and operations ([`ops`]), described by [`openapi`]. Handlers extract, call the
//! core or the registry, and map the outcome to a response; [`ApiError`] is the one error type.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::Settings;
use crate::core::Dispatcher;
use crate::registry::Registry;
use crate::telemetry::Metrics;

pub mod auth;
pub mod control;
pub mod device;
pub mod error;
pub mod limit;
pub mod openapi;
pub mod ops;

pub use error::ApiError;

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    pub dispatcher: Dispatcher,
    pub registry: Registry,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    /// Set when a graceful shutdown began: readiness fails, new streams are refused.
    pub draining: Arc<AtomicBool>,
    pub enroll_limiter: Arc<limit::RateLimiter>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("replica", &self.settings.replica_id).finish()
    }
}

/// A JSON body whose rejections (malformed, wrong types, too large) become [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);
