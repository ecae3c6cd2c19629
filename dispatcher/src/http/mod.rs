//! The HTTP API of CONTRACT.md: device-facing routes ([`device`]), the control API
//! ([`control`]), the call log ([`calls`]), its live events ([`events`]), enrollment by link
//! ([`grant`]) and operations ([`ops`]), described by [`openapi`].
//! Handlers extract, call the core, the service layer or the registry, and map the outcome to a
//! response; [`ApiError`] is the one error type.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::Settings;
use crate::core::Dispatcher;
use crate::registry::Registry;
use crate::telemetry::Metrics;

pub mod access;
pub mod auth;
pub mod calls;
pub mod control;
pub mod device;
pub mod error;
pub mod events;
pub mod grant;
pub mod limit;
pub mod openapi;
pub mod ops;
pub mod proxy;

pub use error::ApiError;

/// What every handler may use: [`AppParts`] behind one reference count, since axum clones the
/// state for every handler and extractor of every request.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of an [`AppState`].
pub struct AppParts {
    pub dispatcher: Dispatcher,
    pub registry: Registry,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    /// Set when a graceful shutdown began: readiness fails, new streams are refused.
    pub draining: Arc<AtomicBool>,
    pub enroll_limiter: Arc<limit::RateLimiter>,
    /// Rate limits of enrollment by link (guessing of device and user codes).
    pub grant_limits: Arc<grant::GrantLimits>,
    /// This replica's listeners of `GET /api/events`.
    pub events: Arc<crate::events::EventHub>,
    /// This replica's writer of the call log.
    pub call_log: crate::calllog::CallLog,
    /// How long the database and NATS have been unreachable, for `/readyz`.
    pub readiness: Arc<crate::readiness::Readiness>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("replica", &self.settings.replica_id).finish()
    }
}

/// A JSON object body whose rejections (malformed, wrong types, not an object, too large)
/// become [`ApiError`]s. Only an object is taken: serde would otherwise read a struct from an
/// array of its fields (`[]`, `["code", "name"]`), which no client means.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        SizedJsonBody::from_request(request, state).await.map(|SizedJsonBody(value, _)| Self(value))
    }
}

/// A [`JsonBody`] with the size of the body in bytes (the call log records a result's size).
#[derive(Debug, Clone, Copy, Default)]
pub struct SizedJsonBody<T>(pub T, pub usize);

impl<S, T> axum::extract::FromRequest<S> for SizedJsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json_content_type(request.headers()) {
            return Err(ApiError::BadRequest("expected a body with Content-Type: application/json".into()));
        }
        let bytes = bytes::Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest(rejection.body_text())
            }
        })?;
        if !is_json_object(&bytes) {
            return Err(ApiError::BadRequest("expected a JSON object".into()));
        }
        let axum::Json(value) = axum::Json::<T>::from_bytes(&bytes)?;
        Ok(Self(value, bytes.len()))
    }
}

/// `application/json`, or a `+json` type, with any parameters.
fn is_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// True when the text's first non-blank byte opens a JSON object (the parser judges the rest).
pub fn is_json_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_objects_only() {
        let cases: &[(&[u8], bool)] = &[
            (b"{}", true),
            (b" \n\t{\"a\":1}", true),
            (b"{", true),
            (b"[]", false),
            (b"[\"code\",\"name\"]", false),
            (b"null", false),
            (b"1", false),
            (b"\"{}\"", false),
            (b"", false),
            (b"   ", false),
        ];
        for (bytes, want) in cases {
            assert_eq!(is_json_object(bytes), *want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn json_content_types() {
        let cases = [
            (Some("application/json"), true),
            (Some("Application/JSON; charset=utf-8"), true),
            (Some("application/merge-patch+json"), true),
            (Some("text/plain"), false),
            (Some("application/jsonx"), false),
            (None, false),
        ];
        for (value, want) in cases {
            let mut headers = axum::http::HeaderMap::new();
            if let Some(value) = value {
                headers.insert(axum::http::header::CONTENT_TYPE, value.parse().expect("header"));
            }
            assert_eq!(is_json_content_type(&headers), want, "{value:?}");
        }
    }
}
