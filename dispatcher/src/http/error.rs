//! One error type for every handler, and its one mapping to a response: a status and the
//! contract's `{"error": "…"}` body. Mapping has no side effects; internals never leak (a
//! database error is logged by the handler's span and answered as a generic 500).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::ErrorBody;

use crate::bus::BusError;
use crate::registry::{Limit, PageError, RegistryError};
use crate::service::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("request body larger than the limit")]
    PayloadTooLarge,
    /// Something to store is over a size cap (413), with what and which cap.
    #[error("{0}")]
    TooLarge(String),
    /// A rate limit (429), with how long until the next attempt is allowed.
    #[error("too many attempts; slow down")]
    TooManyRequests { retry_after: std::time::Duration },
    /// A per-user quota is reached (429), naming it.
    #[error("{0}")]
    OverQuota(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge | Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests { .. } | Self::OverQuota(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let retry_after = self.retry_after_secs();
        let mut response = (self.status(), Json(ErrorBody { error: self.to_string() })).into_response();
        if let Some(secs) = retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// `Retry-After` of a quota refusal: a quota frees up when a code is used or expires or a device
/// is revoked, which no clock predicts; a client should not ask again sooner.
const QUOTA_RETRY_AFTER_SECS: u64 = 60;

impl ApiError {
    /// Whole seconds for `Retry-After`, on every 429 (at least 1).
    fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::TooManyRequests { retry_after } => Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
            Self::OverQuota(_) => Some(QUOTA_RETRY_AFTER_SECS),
            _ => None,
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::NotFound => Self::NotFound,
            RegistryError::OverLimit { limit, value, max } => over_limit(limit, value, max),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// The message of a cap or quota, naming the setting that sets it.
fn over_limit(limit: Limit, value: u64, max: u64) -> ApiError {
    match limit {
        Limit::ManifestBytes => ApiError::TooLarge(format!(
            "manifest too large: {value} bytes of JSON, over the limit of {max} (--max-manifest-bytes)"
        )),
        Limit::ManifestTools => {
            ApiError::TooLarge(format!("manifest has {value} tools, over the limit of {max} tools"))
        }
        Limit::ProposalBytes => ApiError::TooLarge(format!(
            "proposal too large to store: its input and plan are {value} bytes of JSON, over the limit of {max} \
             (--max-proposal-bytes); nothing was stored"
        )),
        Limit::LivePairingCodes => ApiError::OverQuota(format!(
            "too many live pairing codes: this user holds {value} unused, unexpired codes and the limit is {max} \
             (--max-pairing-codes-per-user); use one or let one expire"
        )),
        Limit::DevicesPerUser => ApiError::OverQuota(format!(
            "device limit reached: this user has {value} devices and the limit is {max} (--max-devices-per-user); \
             revoke one to enroll another. The pairing code was not used: it stays valid until it expires"
        )),
    }
}

impl From<PageError> for ApiError {
    fn from(error: PageError) -> Self {
        Self::BadRequest(error.to_string())
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::NotFound => Self::NotFound,
            ServiceError::TooLarge => Self::PayloadTooLarge,
            ServiceError::Registry(error) => error.into(),
        }
    }
}

impl From<BusError> for ApiError {
    fn from(error: BusError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::PayloadTooLarge;
        }
        Self::BadRequest(rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest(rejection.body_text())
    }
}
