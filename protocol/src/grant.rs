//! Enrollment by link: the device authorization grant of RFC 8628. The two OAuth endpoints
//! (`POST /api/host/device-authorization`, `POST /api/host/token`) take form-encoded bodies and
//! answer with the RFC's snake_case field names and its error bodies; the control endpoints
//! under `/api/device-authorizations/{user_code}` use this contract's camelCase JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The `grant_type` of a device code token request (RFC 8628 section 3.4).
pub const DEVICE_CODE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// The one client: the host agent, a public client (no secret).
pub const HOST_AGENT_CLIENT_ID: &str = "host-agent";
/// Default lifetime of a device authorization's codes, and the default polling interval.
pub const DEVICE_CODE_TTL_DEFAULT_SECS: u64 = 600;
pub const DEVICE_CODE_INTERVAL_DEFAULT_SECS: u64 = 5;

/// The RFC 8628 and RFC 6749 error codes the two OAuth endpoints answer.
pub mod oauth_error {
    pub const INVALID_REQUEST: &str = "invalid_request";
    pub const INVALID_CLIENT: &str = "invalid_client";
    pub const INVALID_GRANT: &str = "invalid_grant";
    pub const UNSUPPORTED_GRANT_TYPE: &str = "unsupported_grant_type";
    pub const AUTHORIZATION_PENDING: &str = "authorization_pending";
    pub const SLOW_DOWN: &str = "slow_down";
    pub const ACCESS_DENIED: &str = "access_denied";
    pub const EXPIRED_TOKEN: &str = "expired_token";
}

/// `POST /api/host/device-authorization`, form-encoded. Every field is optional here so that
/// a missing one is answered `invalid_request` naming it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceAuthorizationForm {
    /// `host-agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The device's name, shown to the approving user (1 to 200 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The roots the device will serve, as a JSON array of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots: Option<String>,
}

/// The answer of `POST /api/host/device-authorization` (RFC 8628 section 3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceAuthorizationResponse {
    pub device_code: String,
    /// `XXXX-XXXX`.
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    /// Seconds until both codes expire.
    pub expires_in: u64,
    /// Seconds to wait between polls.
    pub interval: u64,
}

/// `POST /api/host/token`, form-encoded (RFC 8628 section 3.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenForm {
    /// `urn:ietf:params:oauth:grant-type:device_code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_code: Option<String>,
    /// `host-agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// The answer of `POST /api/host/token` once the authorization is approved: the device's
/// token, as a pairing-code enrollment hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenResponse {
    pub access_token: String,
    /// `Bearer`.
    pub token_type: String,
    pub device_id: String,
}

/// The error body of the two OAuth endpoints (RFC 6749 section 5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OAuthError {
    /// `invalid_request`, `invalid_client`, `invalid_grant`, `unsupported_grant_type`,
    /// `authorization_pending`, `slow_down`, `access_denied` or `expired_token`.
    pub error: String,
    /// What happened, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    /// With `slow_down`: the interval to keep from now on, in seconds (an extension; the RFC's
    /// rule of adding 5 seconds gives the same number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
}

/// Where a device authorization stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DeviceAuthorizationStatus {
    Pending,
    Approved,
    Denied,
    Expired,
    Used,
}

/// `GET /api/device-authorizations/{user_code}`: what the device asked to be, before deciding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeviceAuthorizationView {
    /// `XXXX-XXXX`.
    pub user_code: String,
    pub name: String,
    pub platform: Option<String>,
    pub roots: Vec<String>,
    pub expires_at: DateTime<Utc>,
    pub status: DeviceAuthorizationStatus,
}

/// `POST /api/device-authorizations/{user_code}/approve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeviceAuthorizationApproved {
    /// The id the device gets when it collects its token.
    pub device_id: String,
}
