//! An app that embeds the dispatcher in its own axum server, as the original's apps did: the
//! app has its own users and sign-in, its own routes and its own notion of a session; the
//! dispatcher brings the device side (enrollment, the streams, results, manifests) and the
//! service layer the app's routes call to reach a device.
//!
//! ```text
//! embedded-app --listen 127.0.0.1:8090 --database-url sqlite://app.db?mode=rwc \
//!              --user alice:correct-horse --user bob:battery-staple
//! ```
//!
//! Routes of the app (JSON; errors are `{"error": "…"}`):
//!
//! | Route | Does |
//! |---|---|
//! | `POST /login` `{user, password}` | 200 `{session}`: a bearer token for the routes below, valid 12 h |
//! | `POST /pair` | 201 `{code, expiresAt, command}`: a pairing code for the signed-in user's next device |
//! | `GET /devices` | 200 `{devices: [{id, name, platform, online}]}`: the user's devices |
//! | `GET /devices/{id}/file?path=P` | 200 `{device, path, content, totalLines}`: the file, read on the device through the dispatcher (404 another user's device; 503 offline; 504 timed out; 422 the device refused) |
//! | `GET /healthz` | 200 |
//!
//! And the dispatcher's device-facing routes (`/api/host/enroll`, `/stream`, `/result`,
//! `/manifest`), so `host-agent run --server http://127.0.0.1:8090 --code <code>` enrolls here.
//!
//! Not here: the dispatcher's own control API, MCP or admin page (this app offers its users
//! its own routes instead); several replicas (an app that needs them builds the state over
//! NATS with `Settings::nats_url`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use dispatcher::config::Settings;
use dispatcher::core::Close;
use dispatcher::http::AppState;
use dispatcher::service::{self, ServiceError};
use parking_lot::Mutex;
use protocol::sse::ReconnectReason;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a pairing code minted by `/pair` lasts.
const PAIRING_TTL: Duration = Duration::from_secs(600);
/// How long `/devices/{id}/file` waits for the device.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An example app embedding the dispatcher: its own users, sign-in and routes, the
/// dispatcher's device-facing routes.
#[derive(Debug, Parser)]
#[command(name = "embedded-app", version)]
struct Args {
    /// Address to serve on.
    #[arg(long, env = "EMBEDDED_APP_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Database of the dispatcher's tables (devices, pairing codes, proposals).
    #[arg(long, env = "EMBEDDED_APP_DATABASE_URL", default_value = "sqlite://embedded-app.db?mode=rwc")]
    database_url: String,
    /// A user of the app, `name:password` (repeatable; comma-separated in the environment).
    #[arg(
        long = "user",
        value_name = "NAME:PASSWORD",
        env = "EMBEDDED_APP_USERS",
        value_delimiter = ',',
        required = true,
        hide_env_values = true
    )]
    users: Vec<String>,
}

/// The app's own state: its users, their sessions, and the embedded dispatcher.
struct App {
    dispatcher: AppState,
    /// The URL devices dial, for the command `/pair` shows.
    public_url: String,
    /// User name -> SHA-256 of (salt, password).
    users: HashMap<String, [u8; 32]>,
    salt: [u8; 16],
    /// SHA-256 of a session token -> (user, expiry).
    sessions: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl App {
    fn password_hash(&self, password: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.salt);
        hasher.update(password.as_bytes());
        hasher.finalize().into()
    }

    /// The user whose password this is, comparing in constant time.
    fn check_password(&self, user: &str, password: &str) -> bool {
        let given = self.password_hash(password);
        self.users.get(user).is_some_and(|stored| bool::from(stored.ct_eq(&given)))
    }

    fn open_session(&self, user: &str) -> String {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let mut sessions = self.sessions.lock();
        let now = Instant::now();
        sessions.retain(|_, (_, expires)| *expires > now);
        sessions.insert(Sha256::digest(token.as_bytes()).into(), (user.to_owned(), now + SESSION_TTL));
        token
    }

    fn session_user(&self, token: &str) -> Option<String> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let sessions = self.sessions.lock();
        sessions.get(&key).filter(|(_, expires)| *expires > Instant::now()).map(|(user, _)| user.clone())
    }
}

/// An app error: a status and a sentence.
struct AppError(StatusCode, String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<ServiceError> for AppError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::NotFound => AppError(StatusCode::NOT_FOUND, "no such device".into()),
            ServiceError::TooLarge => AppError(StatusCode::PAYLOAD_TOO_LARGE, "request too large".into()),
            ServiceError::Registry(err) => {
                tracing::error!("registry: {err}");
                AppError(StatusCode::SERVICE_UNAVAILABLE, "the database is not available".into())
            }
        }
    }
}

/// A signed-in user of the app (`Authorization: Bearer <session>`).
struct SignedIn(String);

impl FromRequestParts<Arc<App>> for SignedIn {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        token
            .and_then(|token| app.session_user(token))
            .map(SignedIn)
            .ok_or_else(|| AppError(StatusCode::UNAUTHORIZED, "sign in first: POST /login".into()))
    }
}

#[derive(Deserialize)]
struct Login {
    user: String,
    password: String,
}

async fn login(State(app): State<Arc<App>>, Json(login): Json<Login>) -> Result<Json<Value>, AppError> {
    if !app.check_password(&login.user, &login.password) {
        return Err(AppError(StatusCode::UNAUTHORIZED, "wrong user name or password".into()));
    }
    Ok(Json(json!({"session": app.open_session(&login.user)})))
}

async fn pair(State(app): State<Arc<App>>, SignedIn(user): SignedIn) -> Result<Response, AppError> {
    let code = app.dispatcher.registry.create_pairing_code(&user, PAIRING_TTL, None).await.map_err(|err| {
        tracing::warn!("pairing code for {user}: {err}");
        AppError(StatusCode::TOO_MANY_REQUESTS, "cannot mint a pairing code now".into())
    })?;
    let command = format!("host-agent run --server {} --code {}", app.public_url, code.code);
    let body = json!({"code": code.code, "expiresAt": code.expires_at, "command": command});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn devices(State(app): State<Arc<App>>, SignedIn(user): SignedIn) -> Result<Json<Value>, AppError> {
    let records = app.dispatcher.registry.devices(&user).await.map_err(ServiceError::from)?;
    let mut devices = Vec::new();
    for device in records.into_iter().filter(|d| !d.revoked) {
        let online = app.dispatcher.dispatcher.is_online(&device.id).await.ok().flatten().is_some();
        devices.push(json!({"id": device.id, "name": device.name, "platform": device.platform, "online": online}));
    }
    Ok(Json(json!({"devices": devices})))
}

#[derive(Deserialize)]
struct FileQuery {
    path: String,
}

/// Reads a file on one of the user's devices: the dispatcher's service layer does the owner
/// check, the dispatch and its tracing; the app shapes the answer its own way.
async fn read_file(
    State(app): State<Arc<App>>,
    SignedIn(user): SignedIn,
    Path(device): Path<String>,
    Query(query): Query<FileQuery>,
) -> Result<Json<Value>, AppError> {
    let input = json!({"path": query.path});
    let outcome = service::call_device(&app.dispatcher, &user, &device, "read_file", input, CALL_TIMEOUT, None).await?;
    let result = outcome.result;
    if !result.ok {
        let error = result.error.unwrap_or_else(|| "the device refused".into());
        let status = match error.as_str() {
            protocol::ERROR_DEVICE_OFFLINE => StatusCode::SERVICE_UNAVAILABLE,
            protocol::ERROR_DEVICE_TIMED_OUT => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        return Err(AppError(status, error));
    }
    let read = result.result.unwrap_or(Value::Null);
    Ok(Json(json!({
        "device": device,
        "path": query.path,
        "content": read["content"],
        "totalLines": read["totalLines"],
    })))
}

/// The app's users from `name:password` pairs.
fn parse_users(app_salt: &[u8; 16], pairs: &[String]) -> anyhow::Result<HashMap<String, [u8; 32]>> {
    let mut users = HashMap::new();
    for pair in pairs {
        let (name, password) = pair.split_once(':').context("--user takes name:password")?;
        anyhow::ensure!(!name.is_empty() && !password.is_empty(), "--user takes name:password, both non-empty");
        let mut hasher = Sha256::new();
        hasher.update(app_salt);
        hasher.update(password.as_bytes());
        users.insert(name.to_owned(), hasher.finalize().into());
    }
    Ok(users)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let salt: [u8; 16] = rand::random();
    let users = parse_users(&salt, &args.users)?;

    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    let background = CancellationToken::new();
    let state = dispatcher::server::build_state(Settings::embedded(&args.database_url), background.clone())
        .await
        .context("starting the dispatcher")?;
    let app = Arc::new(App {
        dispatcher: state.clone(),
        public_url: format!("http://{address}"),
        users,
        salt,
        sessions: Mutex::new(HashMap::new()),
    });

    let own_routes = Router::new()
        .route("/login", post(login))
        .route("/pair", post(pair))
        .route("/devices", get(devices))
        .route("/devices/{id}/file", get(read_file))
        .route("/healthz", get(|| async { Json(json!({"ok": true})) }))
        .with_state(app);
    let routes = own_routes.merge(dispatcher::app::device_routes().with_state(state.clone()));
    let router = dispatcher::app::bounded(routes, &state);

    // Printed on stdout once serving, for scripts and tests.
    println!("embedded-app listening on http://{address}");
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone(), state.clone()));
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    background.cancel();
    state.registry.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// On SIGINT or SIGTERM: tell the devices to reconnect (their streams would otherwise hold the
/// graceful shutdown open), then stop serving.
async fn stop_on_signal(shutdown: CancellationToken, state: AppState) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    let closed = state.dispatcher.hub().close_all(Close::Reconnect(ReconnectReason::Shutdown));
    tracing::info!(closed, "stopping: device streams closed with reconnect");
    shutdown.cancel();
}
