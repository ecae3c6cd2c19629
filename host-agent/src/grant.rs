//! Enrollment by link, device side (RFC 8628, the device authorization grant): what
//! `host-agent run` does with no cached credentials and no `--code`.
//!
//! 1. `POST /api/host/device-authorization` (a form: `client_id=host-agent`, the device's name,
//!    platform and roots) to the first server that answers.
//! 2. Print one link (`verification_uri_complete`) and the user code, on stdout.
//! 3. Poll `POST /api/host/token` every `interval` seconds; `slow_down` adds 5 seconds for
//!    good; a server that cannot be reached is retried at the same pace, moving across the
//!    servers (the device code is valid on every replica).
//! 4. Approved: the credentials are cached and confirmed exactly like a pairing-code
//!    enrollment (`runtime::remember_enrollment`). `access_denied`, `expired_token`
//!    or any other refusal ends the run as `Enrollment::Refused` (exit code 3).
//!
//! Not here: the credential store, the stream that follows, TLS (the client is built once by
//! the runtime; an untrusted certificate is described by [`crate::transport`], naming
//! `--ca-cert`).

use std::time::Duration;

use protocol::grant::oauth_error;
use protocol::{
    DeviceAuthorizationResponse, EnrollResponse, OAuthError, TokenResponse, DEVICE_CODE_GRANT_TYPE,
    HOST_AGENT_CLIENT_ID,
};
use reqwest::{Client, StatusCode, Url};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::credentials::CredentialStore;
use crate::runtime::{
    log_transport_failure, platform, remember_enrollment, shown, sleep_or_shutdown, AgentConfig, Enrollment, RunError,
};
use crate::transport::{self, TransportError, REQUEST_TIMEOUT};

/// How much `slow_down` adds to the interval (RFC 8628 section 3.5).
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// The interval when the server names none (RFC 8628 section 3.2: 5 seconds).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// How long past the codes' expiry an unreachable server is still retried.
const EXPIRY_GRACE: Duration = Duration::from_secs(30);

/// What one OAuth request came to.
#[derive(Debug)]
enum Answer<T> {
    Ok(T),
    /// The server answered with an RFC 6749 error body (or another refusal, described).
    Refused {
        status: StatusCode,
        error: String,
        description: String,
        interval: Option<u64>,
    },
    /// No answer, or a 5xx: try again.
    Failed(TransportError),
}

/// Posts `form` to `path` of `base` and reads the answer as `T`, or as an OAuth error.
async fn post_form<T: DeserializeOwned>(client: &Client, base: &Url, path: &str, form: &[(&str, &str)]) -> Answer<T> {
    let url = transport::endpoint(base, path);
    let response = match client.post(url.clone()).timeout(REQUEST_TIMEOUT).form(form).send().await {
        Ok(response) => response,
        Err(err) => return Answer::Failed(TransportError::from_reqwest(err)),
    };
    let status = response.status();
    let body = match response.text().await {
        Ok(body) => body,
        Err(err) => return Answer::Failed(TransportError::from_reqwest(err)),
    };
    if status.is_success() {
        return match serde_json::from_str::<T>(&body) {
            Ok(value) => Answer::Ok(value),
            Err(err) => Answer::Failed(TransportError::Status {
                url: url.to_string(),
                status: StatusCode::BAD_GATEWAY,
                message: format!("unreadable answer: {err}"),
                retry_after: None,
            }),
        };
    }
    if status.is_server_error() {
        let message = body.trim().chars().take(200).collect();
        return Answer::Failed(TransportError::Status { url: url.to_string(), status, message, retry_after: None });
    }
    match serde_json::from_str::<OAuthError>(&body) {
        Ok(error) => Answer::Refused {
            status,
            description: error.error_description.unwrap_or_else(|| error.error.clone()),
            error: error.error,
            interval: error.interval,
        },
        Err(_) => Answer::Refused {
            status,
            error: String::new(),
            description: format!("{status}: {}", body.trim().chars().take(200).collect::<String>()),
            interval: None,
        },
    }
}

/// Enrolls by link: asks for an authorization, shows the link, polls until the user decides
/// (or the codes expire), then caches the credentials under every origin.
pub(crate) async fn enroll_by_link(
    client: &Client,
    config: &AgentConfig,
    store: &CredentialStore,
    origins: &[String],
    roots: Vec<String>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Enrollment, RunError> {
    let roots = serde_json::to_string(&roots).unwrap_or_else(|_| "[]".into());
    let platform = platform();
    let form = [
        ("client_id", HOST_AGENT_CLIENT_ID),
        ("name", config.name.as_str()),
        ("platform", platform.as_str()),
        ("roots", roots.as_str()),
    ];
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_cap);
    let mut index = 0usize;
    let (authorization, server_index) = loop {
        let url = &config.servers[index % config.servers.len()];
        let server = shown(url);
        info!("asking {server} for an enrollment link for {:?}", config.name);
        let answer = tokio::select! {
            answer = post_form::<DeviceAuthorizationResponse>(client, url, "api/host/device-authorization", &form) => answer,
            () = shutdown.cancelled() => return Ok(Enrollment::Cancelled),
        };
        let err = match answer {
            Answer::Ok(authorization) => break (authorization, index % config.servers.len()),
            Answer::Refused { status: StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED, .. } => {
                return Ok(Enrollment::Refused(format!(
                    "{server} does not offer enrollment by link: pass a pairing code with --code <code> \
                     (or FUSION_HOST_CODE) on the first run"
                )))
            }
            Answer::Refused { status: StatusCode::TOO_MANY_REQUESTS, .. } => TransportError::Status {
                url: server.to_owned(),
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "too many enrollment requests from this address".into(),
                retry_after: None,
            },
            Answer::Refused { description, .. } => {
                return Ok(Enrollment::Refused(format!(
                    "{server} refused to start enrollment by link: {description}. Check --name, or pass a pairing \
                     code with --code <code>"
                )))
            }
            Answer::Failed(err) => err,
        };
        index += 1;
        let delay = backoff.next_delay();
        log_transport_failure(&format!("asking {server} for an enrollment link failed"), &err, delay);
        if !sleep_or_shutdown(delay, shutdown).await {
            return Ok(Enrollment::Cancelled);
        }
    };
    show_link(&authorization);

    let expires = Instant::now() + Duration::from_secs(authorization.expires_in);
    let mut interval = match authorization.interval {
        0 => DEFAULT_INTERVAL,
        secs => Duration::from_secs(secs),
    };
    let mut index = server_index;
    let token_form = [
        ("grant_type", DEVICE_CODE_GRANT_TYPE),
        ("device_code", authorization.device_code.as_str()),
        ("client_id", HOST_AGENT_CLIENT_ID),
    ];
    loop {
        if !sleep_or_shutdown(interval, shutdown).await {
            return Ok(Enrollment::Cancelled);
        }
        let url = &config.servers[index % config.servers.len()];
        let server = shown(url);
        let answer = tokio::select! {
            answer = post_form::<TokenResponse>(client, url, "api/host/token", &token_form) => answer,
            () = shutdown.cancelled() => return Ok(Enrollment::Cancelled),
        };
        match answer {
            Answer::Ok(token) => {
                let enrolled = EnrollResponse { device_id: token.device_id, token: token.access_token };
                return Ok(Enrollment::Enrolled(remember_enrollment(config, store, origins, url, enrolled)?));
            }
            Answer::Refused { error, description, interval: told, status } => match error.as_str() {
                oauth_error::AUTHORIZATION_PENDING => {}
                oauth_error::SLOW_DOWN => {
                    let slower = interval + SLOW_DOWN_STEP;
                    interval = told.map(Duration::from_secs).filter(|t| *t > slower).unwrap_or(slower);
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        warn!(
                            "{server} asks this device to slow down ({description}); polling every {} s",
                            interval.as_secs()
                        );
                    } else {
                        info!("{server} asks this device to slow down; polling every {} s", interval.as_secs());
                    }
                }
                oauth_error::ACCESS_DENIED => {
                    return Ok(Enrollment::Refused(format!(
                        "enrollment refused by {server}: the link was not approved ({description}). Run again for a \
                         new link, or pass a pairing code with --code <code>"
                    )))
                }
                oauth_error::EXPIRED_TOKEN => {
                    return Ok(Enrollment::Refused(format!(
                        "enrollment by link expired: nobody approved the link in time ({description}). Run again \
                         for a new link"
                    )))
                }
                _ => {
                    return Ok(Enrollment::Refused(format!(
                        "enrollment by link refused by {server}: {description}. Run again for a new link, or pass a \
                         pairing code with --code <code>"
                    )))
                }
            },
            Answer::Failed(err) => {
                if Instant::now() > expires + EXPIRY_GRACE {
                    return Ok(Enrollment::Refused(format!(
                        "enrollment by link expired while no server answered (last: {err}). Run again for a new link"
                    )));
                }
                log_transport_failure(&format!("polling {server} for the approval failed"), &err, interval);
                index += 1;
            }
        }
    }
}

/// The link and the code, on stdout, where a person running the agent looks.
fn show_link(authorization: &DeviceAuthorizationResponse) {
    let minutes = authorization.expires_in.div_ceil(60);
    println!(
        "To connect this device, open this link and approve it (signed in to the admin page):\n\n    {}\n\n\
         Or open {} and enter the code {}.\n\
         The link works once and expires in {} minute{}. Waiting for approval...",
        authorization.verification_uri_complete,
        authorization.verification_uri,
        authorization.user_code,
        minutes,
        if minutes == 1 { "" } else { "s" }
    );
    info!(
        "waiting for the enrollment link to be approved: {} (code {})",
        authorization.verification_uri_complete, authorization.user_code
    );
}
