//! The enrollment-by-link door (RFC 8628, the device authorization grant): the two OAuth
//! endpoints a device uses (`POST /api/host/device-authorization`, `POST /api/host/token`:
//! form-encoded requests, the RFC's field names, error codes and error bodies) and the three
//! control endpoints a signed-in user decides with (`/api/device-authorizations/{user_code}`,
//! its `approve` and `deny`).
//!
//! This module translates: it reads forms, builds the links (`--public-url`, or the request's
//! `Host`), maps registry outcomes to the RFC's answers, and rate-limits guessing (device
//! codes per client address, user codes per user; only wrong codes are charged, so honest
//! polling and deciding never are). The state machine and the device it makes are the
//! registry's ([`crate::registry::Registry::poll_device_authorization`] creates the device
//! through the same function as a pairing-code enrollment).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::header::{CACHE_CONTROL, HOST, PRAGMA, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use protocol::grant::oauth_error;
use protocol::{
    DeviceAuthorizationApproved, DeviceAuthorizationForm, DeviceAuthorizationResponse, DeviceAuthorizationStatus,
    DeviceAuthorizationView, ErrorBody, OAuthError, TokenForm, TokenResponse, DEVICE_CODE_GRANT_TYPE,
    HOST_AGENT_CLIENT_ID,
};

use super::auth::UserCaller;
use super::limit::RateLimiter;
use super::{ApiError, AppState};
use crate::events;
use crate::registry::{AuthorizationStatus, Decision, DeviceAuthorization, NewDeviceAuthorization, TokenOutcome};

const MAX_NAME_CHARS: usize = 200;
/// Most roots a device may list, and the longest one, in characters.
const MAX_ROOTS: usize = 64;
const MAX_ROOT_CHARS: usize = 4096;
/// Attempts a client address (or a user) gets at once, and the refill interval: as enrollment.
const GUESS_BURST: u32 = 10;
const GUESS_REFILL: Duration = Duration::from_secs(3);

/// The rate limits of this door.
#[derive(Debug)]
pub struct GrantLimits {
    /// Per client address: new authorizations, and token polls with a device code that is not one.
    pub by_address: RateLimiter<IpAddr>,
    /// Per user: lookups, approvals and denials with a user code that is not one (of theirs).
    pub by_user: RateLimiter<String>,
}

impl Default for GrantLimits {
    fn default() -> Self {
        Self {
            by_address: RateLimiter::new(GUESS_BURST, GUESS_REFILL),
            by_user: RateLimiter::new(GUESS_BURST, GUESS_REFILL),
        }
    }
}

/// An answer of the two OAuth endpoints that is not a success: the RFC 6749 section 5.2 body.
#[derive(Debug)]
struct OAuthFailure {
    status: StatusCode,
    body: OAuthError,
}

impl OAuthFailure {
    fn new(status: StatusCode, error: &str, description: impl Into<String>) -> Self {
        Self {
            status,
            body: OAuthError { error: error.to_owned(), error_description: Some(description.into()), interval: None },
        }
    }

    fn bad(error: &str, description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, description)
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::bad(oauth_error::INVALID_REQUEST, description)
    }

    fn too_many() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            oauth_error::SLOW_DOWN,
            "too many attempts from this address; wait a few seconds and try again",
        )
    }
}

impl IntoResponse for OAuthFailure {
    fn into_response(self) -> Response {
        let too_many = self.status == StatusCode::TOO_MANY_REQUESTS;
        let mut response = no_store((self.status, Json(self.body)).into_response());
        if too_many {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(GUESS_REFILL.as_secs()));
        }
        response
    }
}

/// RFC 6749 section 5.1: answers carrying secrets are not cached.
fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response.headers_mut().insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// The client, behind `--trusted-proxies` the one they name (see [`super::proxy`]).
fn client_ip(request: &Request) -> IpAddr {
    super::proxy::client_ip(request)
}

/// A form body, any rejection (wrong content type, bad encoding, a field twice) answered
/// `invalid_request`, and a body over the limit 413 as everywhere.
async fn read_form<T: serde::de::DeserializeOwned>(request: Request, state: &AppState) -> Result<T, Response> {
    match Form::<T>::from_request(request, state).await {
        Ok(Form(form)) => Ok(form),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::PayloadTooLarge.into_response())
        }
        Err(rejection) => Err(OAuthFailure::invalid_request(format!(
            "expected a form body (Content-Type: application/x-www-form-urlencoded): {}",
            rejection.body_text()
        ))
        .into_response()),
    }
}

/// The client must be named, and be the host agent (a public client: no secret).
fn check_client(client_id: Option<&str>) -> Result<(), OAuthFailure> {
    match client_id {
        None | Some("") => Err(OAuthFailure::invalid_request("client_id is required")),
        Some(HOST_AGENT_CLIENT_ID) => Ok(()),
        // 400, as the contract's table says; RFC 6749 (5.2) requires 401 only of a client that
        // authenticated with an Authorization header, which this public client never does.
        Some(_) => Err(OAuthFailure::new(
            StatusCode::BAD_REQUEST,
            oauth_error::INVALID_CLIENT,
            format!("unknown client_id: the one client is {HOST_AGENT_CLIENT_ID}"),
        )),
    }
}

/// The roots a device lists: a JSON array of non-empty strings, bounded.
fn parse_roots(text: Option<&str>) -> Result<Vec<String>, OAuthFailure> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Ok(Vec::new());
    };
    let roots: Vec<String> = serde_json::from_str(text)
        .map_err(|_| OAuthFailure::invalid_request("roots: expected a JSON array of strings"))?;
    if roots.len() > MAX_ROOTS {
        return Err(OAuthFailure::invalid_request(format!("roots: at most {MAX_ROOTS}")));
    }
    if roots.iter().any(|root| !(1..=MAX_ROOT_CHARS).contains(&root.chars().count())) {
        return Err(OAuthFailure::invalid_request(format!("roots: each 1 to {MAX_ROOT_CHARS} characters")));
    }
    Ok(roots)
}

/// Where links point: `--public-url`, or else the request's own origin (its `Host`, https when
/// `X-Forwarded-Proto` or the request line says so). `None` when the request names no usable
/// host.
pub fn public_base(public_url: Option<&str>, headers: &HeaderMap, uri: &Uri) -> Option<String> {
    if let Some(url) = public_url {
        return Some(url.to_owned());
    }
    let host = uri.authority().map(|a| a.as_str()).or_else(|| headers.get(HOST).and_then(|v| v.to_str().ok()))?;
    let host_ok = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_'));
    if !host_ok {
        return None;
    }
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let scheme = match (uri.scheme_str(), forwarded.as_deref()) {
        (Some("https"), _) | (_, Some("https")) => "https",
        _ => "http",
    };
    Some(format!("{scheme}://{host}"))
}

/// `POST /api/host/device-authorization`: a device asks to be enrolled by link (RFC 8628
/// section 3.1, 3.2).
#[utoipa::path(
    post,
    path = "/api/host/device-authorization",
    tag = "device",
    operation_id = "device_authorization",
    request_body(content = DeviceAuthorizationForm, content_type = "application/x-www-form-urlencoded",
        description = "`client_id=host-agent`, `name`, and optionally `platform` and `roots` (a JSON array of strings)"),
    responses(
        (status = 200, description = "The codes and the link to show", body = DeviceAuthorizationResponse),
        (status = 400, description = "`invalid_request`: not a form, a missing or bad field, or no host to make the link \
            from; `invalid_client`: a client_id other than host-agent", body = OAuthError),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 429, description = "`slow_down`: too many requests from this address", body = OAuthError),
    ),
)]
pub async fn device_authorization(State(state): State<AppState>, request: Request) -> Response {
    if !state.grant_limits.by_address.try_acquire(client_ip(&request), Instant::now()) {
        return OAuthFailure::too_many().into_response();
    }
    let base = public_base(state.settings.grant.public_url.as_deref(), request.headers(), request.uri());
    let form: DeviceAuthorizationForm = match read_form(request, &state).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    match authorize(&state, form, base).await {
        Ok(answer) => no_store(Json(answer).into_response()),
        Err(failure) => failure.into_response(),
    }
}

async fn authorize(
    state: &AppState,
    form: DeviceAuthorizationForm,
    base: Option<String>,
) -> Result<DeviceAuthorizationResponse, OAuthFailure> {
    check_client(form.client_id.as_deref())?;
    let name = form.name.as_deref().map(str::trim).unwrap_or_default();
    if !(1..=MAX_NAME_CHARS).contains(&name.chars().count()) {
        return Err(OAuthFailure::invalid_request(format!("name: 1 to {MAX_NAME_CHARS} characters")));
    }
    let platform = form.platform.as_deref().map(str::trim).filter(|p| !p.is_empty());
    if platform.is_some_and(|p| p.chars().count() > MAX_NAME_CHARS) {
        return Err(OAuthFailure::invalid_request(format!("platform: at most {MAX_NAME_CHARS} characters")));
    }
    let roots = parse_roots(form.roots.as_deref())?;
    let base = base.ok_or_else(|| {
        OAuthFailure::invalid_request("the request names no usable Host to make the link from (see --public-url)")
    })?;
    let grant = &state.settings.grant;
    let request = NewDeviceAuthorization {
        name: name.to_owned(),
        platform: platform.map(str::to_owned),
        roots,
        ttl: grant.ttl,
        interval: grant.interval,
    };
    let issued = state.registry.create_device_authorization(&request).await.map_err(|error| {
        tracing::error!(%error, "device authorization not stored");
        OAuthFailure::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error")
    })?;
    tracing::info!(name = %request.name, "device authorization requested");
    let verification_uri = format!("{base}/ui/activate");
    Ok(DeviceAuthorizationResponse {
        verification_uri_complete: format!("{verification_uri}?code={}", issued.user_code),
        verification_uri,
        device_code: issued.device_code,
        user_code: issued.user_code,
        expires_in: grant.ttl.as_secs(),
        interval: issued.interval.as_secs(),
    })
}

/// `POST /api/host/token`: a device polls with its device code (RFC 8628 section 3.4, 3.5).
#[utoipa::path(
    post,
    path = "/api/host/token",
    tag = "device",
    operation_id = "device_token",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded",
        description = "`grant_type=urn:ietf:params:oauth:grant-type:device_code`, `device_code`, `client_id=host-agent`"),
    responses(
        (status = 200, description = "Approved: the device's id and token (once; the device code is used up)", body = TokenResponse),
        (status = 400, description = "`authorization_pending`, `slow_down` (the interval grows by 5 s), `access_denied`, \
            `expired_token`, `invalid_grant` (unknown or used device code), `unsupported_grant_type`, `invalid_request`, \
            or `invalid_client` (a client_id other than host-agent)", body = OAuthError),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 429, description = "`slow_down`: too many wrong device codes from this address", body = OAuthError),
    ),
)]
pub async fn token(State(state): State<AppState>, request: Request) -> Response {
    let client = client_ip(&request);
    let form: TokenForm = match read_form(request, &state).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    match exchange(&state, client, form).await {
        Ok(answer) => no_store(Json(answer).into_response()),
        Err(failure) => failure.into_response(),
    }
}

async fn exchange(state: &AppState, client: IpAddr, form: TokenForm) -> Result<TokenResponse, OAuthFailure> {
    match form.grant_type.as_deref() {
        None | Some("") => return Err(OAuthFailure::invalid_request("grant_type is required")),
        Some(DEVICE_CODE_GRANT_TYPE) => {}
        Some(_) => {
            return Err(OAuthFailure::bad(
                oauth_error::UNSUPPORTED_GRANT_TYPE,
                format!("the one grant_type is {DEVICE_CODE_GRANT_TYPE}"),
            ))
        }
    }
    check_client(form.client_id.as_deref())?;
    let device_code = form.device_code.as_deref().unwrap_or_default();
    if device_code.is_empty() {
        return Err(OAuthFailure::invalid_request("device_code is required"));
    }
    let limits = &state.grant_limits.by_address;
    if !limits.allows(&client, Instant::now()) {
        return Err(OAuthFailure::too_many());
    }
    let outcome = state.registry.poll_device_authorization(device_code).await.map_err(|error| {
        tracing::error!(%error, "device token poll failed");
        OAuthFailure::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error")
    })?;
    match outcome {
        TokenOutcome::Issued(enrolled) => {
            tracing::info!(device_id = %enrolled.device_id, "device enrolled by link");
            events::device_enrolled(state, &enrolled.token);
            Ok(TokenResponse {
                access_token: enrolled.token,
                token_type: "Bearer".into(),
                device_id: enrolled.device_id,
            })
        }
        TokenOutcome::Pending => Err(OAuthFailure::bad(
            oauth_error::AUTHORIZATION_PENDING,
            "waiting for a user to approve this device at the link",
        )),
        TokenOutcome::SlowDown { interval } => {
            let mut failure = OAuthFailure::bad(
                oauth_error::SLOW_DOWN,
                format!("polled faster than the interval; wait {} s between polls from now on", interval.as_secs()),
            );
            failure.body.interval = Some(interval.as_secs());
            Err(failure)
        }
        TokenOutcome::Denied => Err(OAuthFailure::bad(oauth_error::ACCESS_DENIED, "the user denied this device")),
        TokenOutcome::Withdrawn => Err(OAuthFailure::bad(
            oauth_error::ACCESS_DENIED,
            "the approval was withdrawn: the api token that gave it has been revoked",
        )),
        TokenOutcome::Expired => Err(OAuthFailure::bad(
            oauth_error::EXPIRED_TOKEN,
            "the device code expired before it was approved and collected; start again",
        )),
        TokenOutcome::OverLimit { value, max } => Err(OAuthFailure::bad(
            oauth_error::ACCESS_DENIED,
            format!(
                "device limit reached: the approving user has {value} devices and the limit is {max} \
                 (--max-devices-per-user); revoke one and enroll again"
            ),
        )),
        TokenOutcome::Invalid => {
            limits.try_acquire(client, Instant::now());
            Err(OAuthFailure::bad(oauth_error::INVALID_GRANT, "unknown or already used device code"))
        }
    }
}

fn view(authorization: DeviceAuthorization) -> DeviceAuthorizationView {
    DeviceAuthorizationView {
        user_code: authorization.user_code,
        name: authorization.name,
        platform: authorization.platform,
        roots: authorization.roots,
        expires_at: authorization.expires_at,
        status: wire_status(authorization.status),
    }
}

fn wire_status(status: AuthorizationStatus) -> DeviceAuthorizationStatus {
    match status {
        AuthorizationStatus::Pending => DeviceAuthorizationStatus::Pending,
        AuthorizationStatus::Approved => DeviceAuthorizationStatus::Approved,
        AuthorizationStatus::Denied => DeviceAuthorizationStatus::Denied,
        AuthorizationStatus::Expired => DeviceAuthorizationStatus::Expired,
        AuthorizationStatus::Used => DeviceAuthorizationStatus::Used,
    }
}

/// 429 when `caller` has guessed wrong too often; otherwise nothing.
fn check_guessing(state: &AppState, caller: &UserCaller) -> Result<(), ApiError> {
    if state.grant_limits.by_user.allows(&caller.user_id, Instant::now()) {
        Ok(())
    } else {
        Err(ApiError::TooManyRequests { retry_after: GUESS_REFILL })
    }
}

/// A wrong user code: charged to the caller, answered 404.
fn wrong_code(state: &AppState, caller: &UserCaller) -> ApiError {
    state.grant_limits.by_user.try_acquire(caller.user_id.clone(), Instant::now());
    ApiError::NotFound
}

fn not_pending(status: AuthorizationStatus) -> ApiError {
    ApiError::Conflict(format!("the device authorization is {}, not pending", status.as_str()))
}

/// `GET /api/device-authorizations/{user_code}`: what the device asked to be.
#[utoipa::path(
    get,
    path = "/api/device-authorizations/{user_code}",
    tag = "control",
    operation_id = "get_device_authorization",
    security(("apiToken" = [])),
    params(("user_code" = String, Path, description = "The user code, in any case, with or without its dash")),
    responses(
        (status = 200, description = "The device's name, platform and roots, and where the authorization stands", body = DeviceAuthorizationView),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such user code, or another user decided it", body = ErrorBody),
        (status = 429, description = "Too many wrong user codes from this user", body = ErrorBody),
    ),
)]
pub async fn get_device_authorization(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(user_code): Path<String>,
) -> Result<Json<DeviceAuthorizationView>, ApiError> {
    check_guessing(&state, &caller)?;
    match state.registry.device_authorization(&user_code, &caller.user_id).await? {
        Some(found) => Ok(Json(view(found))),
        None => Err(wrong_code(&state, &caller)),
    }
}

/// `POST /api/device-authorizations/{user_code}/approve`: the device becomes the caller's.
#[utoipa::path(
    post,
    path = "/api/device-authorizations/{user_code}/approve",
    tag = "control",
    operation_id = "approve_device_authorization",
    security(("apiToken" = [])),
    params(("user_code" = String, Path, description = "The user code, in any case, with or without its dash")),
    responses(
        (status = 200, description = "Approved: the device gets this id when it collects its token", body = DeviceAuthorizationApproved),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such user code, or another user decided it", body = ErrorBody),
        (status = 409, description = "Decided already, used, or expired", body = ErrorBody),
        (status = 429, description = "Too many wrong user codes from this user, or the user's device quota is reached", body = ErrorBody),
    ),
)]
pub async fn approve_device_authorization(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(user_code): Path<String>,
) -> Result<Json<DeviceAuthorizationApproved>, ApiError> {
    check_guessing(&state, &caller)?;
    let decision =
        state.registry.approve_device_authorization(&user_code, &caller.user_id, Some(&caller.token_hash_hex())).await;
    match decision {
        Ok(Decision::Approved { device_id }) => {
            tracing::info!(%device_id, "device authorization approved");
            Ok(Json(DeviceAuthorizationApproved { device_id }))
        }
        Ok(Decision::NotPending(status)) => Err(not_pending(status)),
        Ok(Decision::NotFound | Decision::Denied) => Err(wrong_code(&state, &caller)),
        Err(error) => Err(error.into()),
    }
}

/// `POST /api/device-authorizations/{user_code}/deny`: the device's polls answer
/// `access_denied`.
#[utoipa::path(
    post,
    path = "/api/device-authorizations/{user_code}/deny",
    tag = "control",
    operation_id = "deny_device_authorization",
    security(("apiToken" = [])),
    params(("user_code" = String, Path, description = "The user code, in any case, with or without its dash")),
    responses(
        (status = 204, description = "Denied"),
        (status = 401, description = "Missing, bad or revoked api token", body = ErrorBody),
        (status = 404, description = "No such user code, or another user decided it", body = ErrorBody),
        (status = 409, description = "Decided already, used, or expired", body = ErrorBody),
        (status = 429, description = "Too many wrong user codes from this user", body = ErrorBody),
    ),
)]
pub async fn deny_device_authorization(
    State(state): State<AppState>,
    caller: UserCaller,
    Path(user_code): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_guessing(&state, &caller)?;
    match state.registry.deny_device_authorization(&user_code, &caller.user_id).await? {
        Decision::Denied => {
            tracing::info!("device authorization denied");
            Ok(StatusCode::NO_CONTENT)
        }
        Decision::NotPending(status) => Err(not_pending(status)),
        Decision::NotFound | Decision::Approved { .. } => Err(wrong_code(&state, &caller)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_come_from_the_public_url_or_the_request() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            }
            map
        };
        let path: Uri = "/api/host/device-authorization".parse().unwrap();
        type Case<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            (Some("https://d.example/p"), &[("host", "ignored:1")], Some("https://d.example/p")),
            (None, &[("host", "127.0.0.1:8080")], Some("http://127.0.0.1:8080")),
            (None, &[("host", "d.example"), ("x-forwarded-proto", "https")], Some("https://d.example")),
            (None, &[("host", "d.example"), ("x-forwarded-proto", "HTTPS, http")], Some("https://d.example")),
            (None, &[("host", "[::1]:80")], Some("http://[::1]:80")),
            (None, &[("host", "evil.example/path?x")], None),
            (None, &[("host", "a b")], None),
            (None, &[], None),
        ];
        for (public, pairs, want) in cases {
            assert_eq!(public_base(*public, &headers(pairs), &path).as_deref(), *want, "{public:?} {pairs:?}");
        }
        let absolute: Uri = "https://h2.example/api/host/device-authorization".parse().unwrap();
        assert_eq!(public_base(None, &HeaderMap::new(), &absolute).as_deref(), Some("https://h2.example"));
    }

    #[test]
    fn roots_are_a_bounded_json_array_of_strings() {
        assert_eq!(parse_roots(None).unwrap(), Vec::<String>::new());
        assert_eq!(parse_roots(Some(" ")).unwrap(), Vec::<String>::new());
        assert_eq!(parse_roots(Some(r#"["/home/a","C:\\x"]"#)).unwrap(), ["/home/a", "C:\\x"]);
        let many = serde_json::to_string(&vec!["/r"; MAX_ROOTS + 1]).unwrap();
        for bad in [r#"{"a":1}"#, "[1]", r#"[""]"#, "/home/a", many.as_str()] {
            assert!(parse_roots(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_host_agent_client() {
        assert!(check_client(Some("host-agent")).is_ok());
        assert_eq!(check_client(None).unwrap_err().body.error, "invalid_request");
        assert_eq!(check_client(Some("")).unwrap_err().body.error, "invalid_request");
        let other = check_client(Some("other")).unwrap_err();
        assert_eq!((other.status, other.body.error.as_str()), (StatusCode::BAD_REQUEST, "invalid_client"));
    }
}
