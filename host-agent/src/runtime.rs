//! The device runtime: resolve credentials (enroll on first run), hold the stream, run the calls
//! pushed down it, post their results, reconnect with backoff, and stop cleanly.
//!
//! [`run`] is the whole life of `host-agent run` as a library function: the binary parses the
//! command line, picks the signals that cancel `shutdown`, and maps the [`Outcome`] to an exit
//! code. Tests drive [`run`] in-process with their own [`ToolRunner`].
//!
//! The rules it carries out:
//! - The credentials directory and files are made private (0700, 0600) first, where others
//!   could read them.
//! - Credentials are looked up under every `--server` origin; the first found is used (they
//!   are valid cluster-wide). Without any, `--code` enrolls with the first server that answers,
//!   or without a code the device enrolls by link ([`crate::grant`]); the credentials are
//!   cached under every given origin.
//! - Servers are tried in turn: every failed or dropped stream moves to the next one, after a
//!   capped, fully jittered exponential delay ([`crate::backoff`]). A stream that stayed up for
//!   a while resets the delay; a `reconnect` frame skips it (a pause of at most the base delay
//!   keeps a whole replica's devices from landing on the next one in the same instant).
//! - Two keepalive intervals without a byte mean the stream is dead: reconnect. A stream
//!   request unanswered for as long is given up too (the server may be frozen): next server.
//! - Each call runs on the blocking pool, tracked, so reading the stream never waits for a tool;
//!   a call id seen before is not run again; a call past its deadline on arrival is not run;
//!   one still running at its deadline is abandoned and nothing is posted for it (the tool
//!   itself notices the same deadline and stops, see [`crate::tools`]).
//! - Results are posted with the call's `traceparent`, retried briefly on connection errors
//!   and 5xx, moving across the servers.
//! - The device token is kept where `--credentials-store` says (the OS secret store or the
//!   file, [`crate::credentials::open_secret_store`]); one found in the other place is moved.
//! - `superseded` deletes the cached credentials (these credentials are not this process's
//!   alone any more) and ends the run ([`Outcome::Superseded`]); `revoked` or a 401 on connect
//!   deletes them and ends it ([`Outcome::Revoked`]); either deletes the token from wherever it
//!   is, file and secret store. `shutdown` ends it after the calls in hand are answered
//!   (bounded by the grace period).
//!
//! Not here: the tools and their scope ([`crate::tools`]), HTTP and SSE details
//! ([`crate::transport`]), argument parsing ([`crate::config`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use protocol::sse::ReconnectReason;
use protocol::{EnrollRequest, EnrollResponse, HostCall, HostResult, Manifest, ToolDescriptor};
use reqwest::{Client, StatusCode, Url};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::credentials::{
    open_secret_store, origin_of, CredentialStore, Credentials, CredentialsError, StoreChoice, TokenPlace,
};
use crate::dedup::RecentIds;
use crate::secret_store::Backend;
use crate::transport::{self, Delivery, Frame, FrameStream, StreamItem, TransportError};

/// Exit codes of the `host-agent` binary.
pub mod exit_code {
    /// A clean shutdown on SIGINT/SIGTERM; also a `call` whose result is `ok`.
    pub const OK: i32 = 0;
    /// Anything else that stops the agent (an unwritable credentials directory, a `call`
    /// whose result is not `ok`).
    pub const FAILURE: i32 = 1;
    /// A usage error: bad flags, a bad server URL or root.
    pub const USAGE: i32 = 2;
    /// Enrollment refused: the pairing code is unknown, expired or used (401), the request was
    /// malformed (400), or too many attempts (429); or, enrolling by link, the link was denied
    /// (`access_denied`) or expired (`expired_token`).
    pub const ENROLLMENT_REFUSED: i32 = 3;
    /// The device was revoked (a `revoked` frame or a 401 on connect); credentials deleted.
    pub const REVOKED: i32 = 4;
    /// Another process holds these credentials (a `superseded` frame).
    pub const SUPERSEDED: i32 = 5;
}

/// The tools as the runtime sees them: implemented by [`crate::tools::Toolbox`].
pub trait ToolRunner: Send + Sync + 'static {
    fn descriptors(&self) -> Vec<ToolDescriptor>;
    fn roots(&self) -> Vec<String>;
    /// Runs one call to completion; blocking; never panics outward.
    fn run(&self, call: &HostCall) -> HostResult;
}

impl ToolRunner for crate::tools::Toolbox {
    fn descriptors(&self) -> Vec<ToolDescriptor> {
        crate::tools::Toolbox::descriptors(self)
    }

    fn roots(&self) -> Vec<String> {
        crate::tools::Toolbox::roots(self)
    }

    fn run(&self, call: &HostCall) -> HostResult {
        crate::tools::Toolbox::run(self, call)
    }
}

/// Everything [`run`] needs, already validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Base URLs, tried in turn; at least one.
    pub servers: Vec<Url>,
    /// The device's human label, sent at enrollment.
    pub name: String,
    /// The pairing code, used only when no credentials are cached.
    pub code: Option<String>,
    pub credentials_dir: PathBuf,
    /// Where the device token is kept (`--credentials-store`).
    pub credentials_store: StoreChoice,
    /// An extra PEM CA to trust.
    pub ca_cert: Option<PathBuf>,
    /// The server's keepalive interval; two of them without a byte mean a dead stream.
    pub keepalive: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long a shutdown waits for the calls in hand.
    pub shutdown_grace: Duration,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `shutdown` was cancelled and the calls in hand were answered (or the grace ran out).
    Shutdown,
    /// The server revoked the device; the cached credentials were deleted.
    Revoked,
    /// A newer stream for this device opened elsewhere: another process holds the credentials;
    /// this one deleted its cached copy.
    Superseded,
    /// Enrollment was refused; the text says why and what to do.
    EnrollmentRefused(String),
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Shutdown => exit_code::OK,
            Self::Revoked => exit_code::REVOKED,
            Self::Superseded => exit_code::SUPERSEDED,
            Self::EnrollmentRefused(_) => exit_code::ENROLLMENT_REFUSED,
        }
    }
}

/// Why a run could not go on at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A configuration the user must fix (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => exit_code::USAGE,
            Self::Credentials(_) => exit_code::FAILURE,
        }
    }
}

/// A server URL as logs show it: without the trailing `/` of an empty path.
pub(crate) fn shown(url: &Url) -> &str {
    url.as_str().trim_end_matches('/')
}

/// The platform this agent reports (`linux`, `macos`, `windows`, ...).
pub fn platform() -> String {
    std::env::consts::OS.to_owned()
}

/// Runs the agent until `shutdown` is cancelled or the server ends it.
pub async fn run(
    config: AgentConfig,
    tools: Arc<dyn ToolRunner>,
    shutdown: CancellationToken,
) -> Result<Outcome, RunError> {
    if config.servers.is_empty() {
        return Err(RunError::Usage("no server given: pass --server <url> or set PULSN_URL".into()));
    }
    let mut origins = Vec::new();
    for server in &config.servers {
        let origin =
            origin_of(server).ok_or_else(|| RunError::Usage(format!("the server URL {server} has no host")))?;
        if !origins.contains(&origin) {
            origins.push(origin);
        }
    }
    let client = transport::build_client(config.ca_cert.as_deref()).map_err(|e| RunError::Usage(e.to_string()))?;
    let stream_client =
        transport::build_stream_client(config.ca_cert.as_deref()).map_err(|e| RunError::Usage(e.to_string()))?;
    let secrets = open_secret_store(config.credentials_store).map_err(RunError::Usage)?;
    let store = CredentialStore::new(&config.credentials_dir).with_secret_store(secrets);
    store.tighten();

    let credentials = match find_credentials(&store, &origins)? {
        Some(found) => {
            if config.code.is_some() {
                info!("already enrolled: --code is not needed and was not used");
            }
            info!(
                "using the cached credentials of device {} (from {}, the token in {})",
                found.device_id,
                store.dir().display(),
                store.token_place()
            );
            found
        }
        None => {
            let enrolled = match config.code.clone().filter(|c| !c.trim().is_empty()) {
                Some(code) => enroll(&client, &config, &store, &origins, &code, &shutdown).await?,
                // No code: enrollment by link (the device authorization grant).
                None => {
                    crate::grant::enroll_by_link(&client, &config, &store, &origins, tools.roots(), &shutdown).await?
                }
            };
            match enrolled {
                Enrollment::Enrolled(credentials) => credentials,
                Enrollment::Refused(why) => return Ok(Outcome::EnrollmentRefused(why)),
                Enrollment::Cancelled => return Ok(Outcome::Shutdown),
            }
        }
    };

    let manifest = Manifest {
        tools: tools.descriptors(),
        roots: tools.roots(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        platform: platform(),
    };
    info!(
        "host-agent {} serving {} tools over roots [{}]",
        manifest.version,
        manifest.tools.len(),
        manifest.roots.join(", ")
    );
    let shared = Arc::new(Shared {
        client,
        stream_client,
        servers: config.servers.clone(),
        token: credentials.token.clone(),
        device_id: credentials.device_id.clone(),
        tools,
        manifest,
        recent: Mutex::new(RecentIds::default()),
        abandon: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let keeper = shutdown.child_token();
    keep_kernel_keyring_token(&store, &origins, &keeper);
    let outcome = hold_stream(&shared, &config, &tracker, &shutdown).await;
    keeper.cancel();

    match outcome {
        Outcome::Revoked => {
            shared.abandon.cancel();
            forget_credentials(&store, &origins, &credentials.device_id);
        }
        Outcome::Superseded => {
            error!(
                "superseded: a newer stream for device {} opened elsewhere, so another process holds these \
                 credentials; deleting them here and exiting",
                credentials.device_id
            );
            forget_credentials(&store, &origins, &credentials.device_id);
        }
        _ => {}
    }
    tracker.close();
    if !tracker.is_empty() {
        info!("waiting up to {:?} for {} call(s) in hand", config.shutdown_grace, tracker.len());
    }
    if tokio::time::timeout(config.shutdown_grace, tracker.wait()).await.is_err() {
        warn!("{} call(s) still running after the grace period; abandoned", tracker.len());
    }
    Ok(outcome)
}

/// How often a token in the kernel keyring is read while the agent runs.
const KERNEL_KEYRING_REFRESH: Duration = Duration::from_secs(3600);

/// The kernel's persistent keyring, which keeps the token for the next run, expires when
/// unused (`persistent_keyring_expiry`, 3 days by default): an agent that runs for weeks would
/// find it gone at its next start. Reading the token resets that timer, so it is read every
/// [`KERNEL_KEYRING_REFRESH`] until `stop`. Other stores need nothing of the kind.
fn keep_kernel_keyring_token(store: &CredentialStore, origins: &[String], stop: &CancellationToken) {
    let Some(secrets) = store.secret_store().filter(|s| s.backend() == Backend::KernelKeyring) else {
        return;
    };
    let kept_there = TokenPlace::SecretStore(Backend::KernelKeyring);
    let origins: Vec<String> = origins
        .iter()
        .filter(|origin| store.load_placed(origin).ok().flatten().is_some_and(|(_, place)| place == kept_there))
        .cloned()
        .collect();
    let stop = stop.clone();
    tokio::spawn(async move {
        loop {
            if !sleep_or_shutdown(KERNEL_KEYRING_REFRESH, &stop).await {
                return;
            }
            for origin in &origins {
                let origin = origin.clone();
                match tokio::task::spawn_blocking(move || secrets.get(&origin)).await {
                    Ok(Ok(Some(_))) => debug!("the device token in the kernel keyring was refreshed"),
                    Ok(Ok(None)) => warn!(
                        "the device token is gone from the kernel keyring; the next start needs a new pairing code"
                    ),
                    Ok(Err(err)) => warn!("cannot refresh the device token in the kernel keyring: {err}"),
                    Err(_) => {}
                }
            }
        }
    });
}

/// What the calls share.
struct Shared {
    client: Client,
    /// The event stream's own client: a fresh HTTP/1.1 connection per stream.
    stream_client: Client,
    servers: Vec<Url>,
    token: String,
    device_id: String,
    tools: Arc<dyn ToolRunner>,
    manifest: Manifest,
    recent: Mutex<RecentIds>,
    /// Cancelled when the device is revoked: calls in hand are dropped unanswered.
    abandon: CancellationToken,
}

/// The first cached credentials among `origins`. A token found elsewhere than where this run
/// keeps tokens (`--credentials-store` changed since it was saved) is moved there.
fn find_credentials(store: &CredentialStore, origins: &[String]) -> Result<Option<Credentials>, CredentialsError> {
    for origin in origins {
        let Some((found, place)) = store.load_placed(origin)? else {
            continue;
        };
        if place != store.token_place() {
            store.save(&found)?;
            info!("moved the device token of {origin} from {place} to {}", store.token_place());
        }
        return Ok(Some(found));
    }
    Ok(None)
}

fn forget_credentials(store: &CredentialStore, origins: &[String], device_id: &str) {
    for origin in origins {
        match store.load(origin) {
            Ok(Some(found)) if found.device_id != device_id => continue,
            Ok(None) => continue,
            _ => {}
        }
        match store.delete(origin) {
            Ok(true) => info!("deleted the cached credentials of {origin} ({})", store.path_for(origin).display()),
            Ok(false) => {}
            Err(err) => error!("could not delete the revoked credentials: {err}"),
        }
    }
}

pub(crate) enum Enrollment {
    Enrolled(Credentials),
    Refused(String),
    Cancelled,
}

/// Caches a new device's credentials under every origin and prints the confirmation, the same
/// whichever way the device enrolled (a pairing code, or by link).
pub(crate) fn remember_enrollment(
    config: &AgentConfig,
    store: &CredentialStore,
    origins: &[String],
    url: &Url,
    enrolled: EnrollResponse,
) -> Result<Credentials, RunError> {
    let enrolled_origin = origin_of(url).unwrap_or_else(|| shown(url).to_owned());
    let mut saved = None;
    for origin in origins {
        let credentials = Credentials {
            device_id: enrolled.device_id.clone(),
            token: enrolled.token.clone(),
            server: origin.clone(),
        };
        let path = store.save(&credentials)?;
        if *origin == enrolled_origin || saved.is_none() {
            saved = Some(path);
        }
    }
    let saved = saved.map(|p| p.display().to_string()).unwrap_or_default();
    println!(
        "Enrolled this device.\n  name:        {}\n  device id:   {}\n  server:      {}\n  credentials: {}",
        config.name, enrolled.device_id, enrolled_origin, saved
    );
    info!("enrolled as device {} ({:?}) with {enrolled_origin}", enrolled.device_id, config.name);
    Ok(Credentials { device_id: enrolled.device_id, token: enrolled.token, server: enrolled_origin })
}

/// Trades the pairing code with the first server that answers; caches the credentials under
/// every origin. Retries (with backoff, across servers) only when no server answered.
async fn enroll(
    client: &Client,
    config: &AgentConfig,
    store: &CredentialStore,
    origins: &[String],
    code: &str,
    shutdown: &CancellationToken,
) -> Result<Enrollment, RunError> {
    let request = EnrollRequest { code: code.trim().to_owned(), name: config.name.clone(), platform: Some(platform()) };
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_cap);
    let mut index = 0usize;
    loop {
        let url = &config.servers[index % config.servers.len()];
        let server = shown(url);
        info!("enrolling as {:?} with {server}", config.name);
        let answer = tokio::select! {
            answer = transport::enroll(client, url, &request) => answer,
            () = shutdown.cancelled() => return Ok(Enrollment::Cancelled),
        };
        let err = match answer {
            Ok(enrolled) => {
                return Ok(Enrollment::Enrolled(remember_enrollment(config, store, origins, url, enrolled)?))
            }
            Err(err) => err,
        };
        let said = err.server_message().unwrap_or_default().to_owned();
        match err.status() {
            Some(StatusCode::UNAUTHORIZED) => {
                return Ok(Enrollment::Refused(format!(
                    "enrollment refused by {server}: the pairing code is unknown, expired or already used ({said}). \
                     Mint a new pairing code and run again with --code <code>"
                )))
            }
            Some(StatusCode::TOO_MANY_REQUESTS) => {
                return Ok(Enrollment::Refused(format!(
                    "enrollment refused by {server}: too many enrollment attempts (429: {said}). Wait a few minutes, \
                     then run again with a valid pairing code"
                )))
            }
            Some(status) if status.is_client_error() => {
                return Ok(Enrollment::Refused(format!(
                    "enrollment refused by {server} ({status}): {said}. Check --code and --name"
                )))
            }
            _ => {}
        }
        index += 1;
        let delay = backoff.next_delay();
        log_transport_failure(&format!("enrollment with {server} failed"), &err, delay);
        if !sleep_or_shutdown(delay, shutdown).await {
            return Ok(Enrollment::Cancelled);
        }
    }
}

pub(crate) fn log_transport_failure(what: &str, err: &TransportError, delay: Duration) {
    if matches!(err, TransportError::UntrustedCertificate(_)) {
        error!("{what}: {err}; retrying in {} ms", delay.as_millis());
    } else {
        warn!("{what}: {err}; retrying in {} ms", delay.as_millis());
    }
}

/// False when `shutdown` fired first.
pub(crate) async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = shutdown.cancelled() => false,
    }
}

/// How one stream ended.
#[derive(Debug)]
enum SessionEnd {
    /// A `reconnect` frame: go now. `paced`: the server already spaces these out (a
    /// rebalance), so no jitter is added.
    Reconnect {
        paced: bool,
    },
    Superseded,
    /// A `revoked` frame, or 401 on connect.
    Revoked,
    /// Could not open the stream, or it broke, ended or fell silent.
    Lost {
        reason: String,
        was_up: bool,
        untrusted: bool,
    },
    /// The server refused the stream for now (503, a replica full or going away) and said
    /// when to try again (`Retry-After`).
    Refused {
        reason: String,
        retry_after: Duration,
    },
}

/// Opens streams, one server after another, until one of them ends the run.
async fn hold_stream(
    shared: &Arc<Shared>,
    config: &AgentConfig,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Outcome {
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_cap);
    let mut index = 0usize;
    loop {
        let server_index = index % shared.servers.len();
        let started = Instant::now();
        let end = tokio::select! {
            end = session(shared, server_index, config.keepalive * 2, tracker) => end,
            () = shutdown.cancelled() => {
                info!("shutting down: closing the stream");
                return Outcome::Shutdown;
            }
        };
        let server = shown(&shared.servers[server_index]);
        index += 1;
        let delay = match end {
            SessionEnd::Superseded => return Outcome::Superseded,
            SessionEnd::Revoked => return Outcome::Revoked,
            SessionEnd::Reconnect { paced } => {
                backoff.reset();
                let pause = if paced { Duration::ZERO } else { backoff.jitter_only() };
                info!("{server} asked this device to reconnect; reconnecting in {} ms", pause.as_millis());
                pause
            }
            SessionEnd::Refused { reason, retry_after } => {
                let delay = after_refusal(&mut backoff, retry_after);
                warn!("{server} refused the stream: {reason}; trying again in {} ms", delay.as_millis());
                delay
            }
            SessionEnd::Lost { reason, was_up, untrusted } => {
                if was_up && started.elapsed() >= backoff.stable_after() {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                let what = if was_up { "lost the stream to" } else { "cannot open the stream to" };
                if untrusted {
                    error!("{what} {server}: {reason}; retrying in {} ms", delay.as_millis());
                } else {
                    warn!("{what} {server}: {reason}; reconnecting in {} ms", delay.as_millis());
                }
                delay
            }
        };
        if !sleep_or_shutdown(delay, shutdown).await {
            info!("shutting down");
            return Outcome::Shutdown;
        }
    }
}

/// Longest `Retry-After` honoured: a server asking for more is waited for this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The wait after a 503 with `Retry-After`: at least what the server asked (capped at
/// [`MAX_RETRY_AFTER`]) plus a jitter of up to the backoff's base, so the devices a full replica
/// refuses together do not come back together; longer when the backoff has grown longer.
fn after_refusal(backoff: &mut Backoff, retry_after: Duration) -> Duration {
    let asked = retry_after.min(MAX_RETRY_AFTER) + backoff.jitter_only();
    backoff.next_delay().max(asked)
}

/// One stream: open it, read frames until it ends, dispatching calls as they come.
async fn session(shared: &Arc<Shared>, server_index: usize, silence: Duration, tracker: &TaskTracker) -> SessionEnd {
    let url = &shared.servers[server_index];
    let server = shown(url);
    debug!("opening the stream at {server}");
    // A replica that accepts the connection but never answers (frozen, or behind a stuck
    // proxy) gets the patience of a silent stream, then the next server is tried.
    let opened =
        match tokio::time::timeout(silence, transport::open_stream(&shared.stream_client, url, &shared.token)).await {
            Ok(opened) => opened,
            Err(_) => {
                let reason = format!("no answer to the stream request within {} s", silence.as_secs_f32());
                return SessionEnd::Lost { reason, was_up: false, untrusted: false };
            }
        };
    let response = match opened {
        Ok(response) => response,
        Err(err) if err.status() == Some(StatusCode::UNAUTHORIZED) => {
            error!(
                "{server} refused this device's token (401): the device was revoked or is unknown; \
                 deleting the cached credentials"
            );
            return SessionEnd::Revoked;
        }
        Err(err) if err.status() == Some(StatusCode::SERVICE_UNAVAILABLE) && err.retry_after().is_some() => {
            let retry_after = err.retry_after().unwrap_or_default();
            return SessionEnd::Refused { reason: err.to_string(), retry_after };
        }
        Err(err) => {
            let untrusted = matches!(err, TransportError::UntrustedCertificate(_));
            return SessionEnd::Lost { reason: err.to_string(), was_up: false, untrusted };
        }
    };
    let mut frames = FrameStream::from_response(response, silence);
    let mut was_up = false;
    loop {
        let frame = match frames.next().await {
            StreamItem::Frame(frame) => frame,
            StreamItem::Silent => {
                return SessionEnd::Lost {
                    reason: format!("no keepalive for {} s, the stream is dead", silence.as_secs_f32()),
                    was_up,
                    untrusted: false,
                }
            }
            StreamItem::Ended => {
                return SessionEnd::Lost { reason: "the server closed the stream".into(), was_up, untrusted: false }
            }
            StreamItem::Failed(reason) => return SessionEnd::Lost { reason, was_up, untrusted: false },
        };
        match frame {
            Frame::Ready(ready) => {
                was_up = true;
                match ready {
                    Some(ready) => {
                        if ready.device_id != shared.device_id {
                            warn!(
                                "{server} greets device {} but these credentials are device {}",
                                ready.device_id, shared.device_id
                            );
                        }
                        info!("connected to {server} as device {} (replica {})", shared.device_id, ready.replica);
                    }
                    None => info!("connected to {server} as device {}", shared.device_id),
                }
                send_manifest(shared, server_index);
            }
            Frame::Call(call) => {
                was_up = true;
                dispatch(shared, *call, server_index, tracker);
            }
            Frame::Reconnect(reason) => {
                info!(
                    "{server} is going away ({})",
                    reason.map(|r| format!("{r:?}")).unwrap_or_else(|| "no reason".into())
                );
                return SessionEnd::Reconnect { paced: reason == Some(ReconnectReason::Rebalance) };
            }
            Frame::Superseded => return SessionEnd::Superseded,
            Frame::Revoked => {
                error!("{server} says this device was revoked; deleting the cached credentials");
                return SessionEnd::Revoked;
            }
            Frame::Unknown(event) => debug!("ignoring an unknown {event:?} frame"),
            Frame::Invalid { event, error } => warn!("skipping a {event} frame whose data is invalid: {error}"),
        }
    }
}

/// `PUT /api/host/manifest` in the background: the stream is read meanwhile.
fn send_manifest(shared: &Arc<Shared>, server_index: usize) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let url = &shared.servers[server_index];
        let server = shown(url);
        match transport::put_manifest(&shared.client, url, &shared.token, &shared.manifest).await {
            Ok(()) => info!("manifest sent to {server}: {} tools", shared.manifest.tools.len()),
            Err(err) => warn!("could not send the manifest to {server}: {err}"),
        }
    });
}

/// What becomes of a call that arrives on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Run,
    /// Its id was seen before (a redelivery): it ran, or is running, already.
    Duplicate,
    /// Its deadline passed before it arrived: nobody waits for the answer.
    Expired,
}

/// Decides whether a call runs, remembering its id either way.
pub fn admit(recent: &mut RecentIds, call: &HostCall, now: DateTime<Utc>) -> Admission {
    if !recent.insert(&call.call_id) {
        Admission::Duplicate
    } else if call.is_expired(now) {
        Admission::Expired
    } else {
        Admission::Run
    }
}

/// Accepts a call from the stream: refuses duplicates and expired calls, runs the rest.
fn dispatch(shared: &Arc<Shared>, call: HostCall, server_index: usize, tracker: &TaskTracker) {
    let admission =
        admit(&mut shared.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()), &call, Utc::now());
    match admission {
        Admission::Run => {}
        Admission::Duplicate => {
            warn!("call {} {} is a duplicate: not run again", call.call_id, call.tool);
            return;
        }
        Admission::Expired => {
            warn!("call {} {} arrived after its deadline: not run", call.call_id, call.tool);
            return;
        }
    }
    info!("call {} {} received{}", call.call_id, call.tool, if call.is_apply() { " (apply)" } else { "" });
    tracker.spawn(run_call(Arc::clone(shared), call, server_index));
}

/// Time left until `deadline`, `None` without one, zero once passed.
fn time_left(deadline: Option<DateTime<Utc>>) -> Option<Duration> {
    deadline.map(|deadline| (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

async fn run_call(shared: Arc<Shared>, call: HostCall, server_index: usize) {
    let started = Instant::now();
    let tools = Arc::clone(&shared.tools);
    let task_call = call.clone();
    let work = tokio::task::spawn_blocking(move || tools.run(&task_call));
    let at_deadline = async {
        match time_left(call.deadline) {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    };
    let mut result = tokio::select! {
        joined = work => match joined {
            Ok(result) => result,
            Err(err) => HostResult::failure(&call.call_id, format!("the tool {} failed unexpectedly: {err}", call.tool)),
        },
        () = at_deadline => {
            warn!("call {} {} abandoned: still running at its deadline, no result is sent", call.call_id, call.tool);
            return;
        }
        () = shared.abandon.cancelled() => {
            warn!("call {} {} abandoned: the device was revoked", call.call_id, call.tool);
            return;
        }
    };
    result.call_id.clone_from(&call.call_id);
    let ms = started.elapsed().as_millis();
    match (&result.error, result.ok, result.is_proposal()) {
        (_, true, true) => info!("call {} {} proposal in {ms} ms", call.call_id, call.tool),
        (_, true, false) => info!("call {} {} ok in {ms} ms", call.call_id, call.tool),
        (error, false, _) => info!(
            "call {} {} failed in {ms} ms: {}",
            call.call_id,
            call.tool,
            error.as_deref().unwrap_or("no reason given")
        ),
    }
    deliver(&shared, result, call.traceparent.as_deref(), server_index, call.deadline).await;
}

/// Attempts at posting one result before giving up.
const POST_ATTEMPTS: usize = 5;

/// Posts a result, retrying connection errors and 5xx across the servers, never after the
/// call's deadline.
async fn deliver(
    shared: &Shared,
    mut result: HostResult,
    traceparent: Option<&str>,
    first_server: usize,
    deadline: Option<DateTime<Utc>>,
) {
    let id = result.call_id.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut shrunk = false;
    let mut attempt = 0usize;
    while attempt < POST_ATTEMPTS {
        if time_left(deadline) == Some(Duration::ZERO) {
            warn!("result of call {id} not sent: its deadline passed");
            return;
        }
        let url = &shared.servers[(first_server + attempt) % shared.servers.len()];
        let server = shown(url);
        attempt += 1;
        let err = match transport::post_result(&shared.client, url, &shared.token, &result, traceparent).await {
            Ok(Delivery::Delivered) => {
                info!("result of call {id} delivered");
                return;
            }
            Ok(Delivery::NotPending) => {
                warn!("result of call {id} not delivered: the server no longer waits for it (answered, timed out or unknown)");
                return;
            }
            Err(err) => err,
        };
        if err.status() == Some(StatusCode::PAYLOAD_TOO_LARGE) && !shrunk {
            warn!("result of call {id} is larger than {server} accepts; sending a failure instead");
            result = HostResult::failure(&id, "the result is larger than the server accepts");
            shrunk = true;
            attempt -= 1;
            continue;
        }
        if !err.is_transient() {
            warn!("result of call {id} refused: {err}");
            return;
        }
        if attempt < POST_ATTEMPTS {
            let delay = backoff.next_delay();
            warn!("posting the result of call {id} failed: {err}; retrying in {} ms", delay.as_millis());
            tokio::time::sleep(delay).await;
        } else {
            warn!("posting the result of call {id} failed: {err}; giving up after {POST_ATTEMPTS} attempts");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_the_contract_exit_codes() {
        assert_eq!(Outcome::Shutdown.exit_code(), 0);
        assert_eq!(Outcome::EnrollmentRefused(String::new()).exit_code(), 3);
        assert_eq!(Outcome::Revoked.exit_code(), 4);
        assert_eq!(Outcome::Superseded.exit_code(), 5);
        assert_eq!(RunError::Usage(String::new()).exit_code(), 2);
    }

    #[test]
    fn admission_of_calls() {
        let now = Utc::now();
        let call = |id: &str, deadline_secs: Option<i64>| HostCall {
            call_id: id.into(),
            tool: "stat".into(),
            input: serde_json::json!({}),
            mode: None,
            preconditions: None,
            deadline: deadline_secs.map(|s| now + chrono::Duration::seconds(s)),
            traceparent: None,
        };
        let mut recent = RecentIds::new(8);
        let cases = [
            (call("a", None), Admission::Run),
            (call("b", Some(30)), Admission::Run),
            (call("a", None), Admission::Duplicate),
            (call("c", Some(-1)), Admission::Expired),
            (call("c", Some(30)), Admission::Duplicate),
            (call("d", Some(0)), Admission::Expired),
        ];
        for (input, want) in cases {
            assert_eq!(admit(&mut recent, &input, now), want, "{} {:?}", input.call_id, input.deadline);
        }
    }

    #[test]
    fn time_left_is_zero_once_passed() {
        assert_eq!(time_left(None), None);
        assert_eq!(time_left(Some(Utc::now() - chrono::Duration::seconds(5))), Some(Duration::ZERO));
        let left = time_left(Some(Utc::now() + chrono::Duration::seconds(60))).expect("some");
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(60));
    }
}
