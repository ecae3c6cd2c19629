//! The registry: everything the dispatcher keeps in its database. Api tokens, pairing codes and
//! enrollment, devices (token hash, owner, manifest, last seen) and proposals, in one schema that
//! runs on SQLite (one replica, the embedded default) and PostgreSQL (every replica shares it),
//! picked by the URL's scheme.
//!
//! It bounds what it stores: manifests and proposals have size caps, a user's live pairing codes
//! and devices have quotas ([`Limits`]), lists come in pages cut to a byte budget, and
//! [`Registry::delete_expired`] removes what is past keeping.
//!
//! It does not cache: the hot path's in-memory token and ownership cache, and its eviction on
//! revocation, belong to the caller. It does not rate-limit enrollment attempts (the HTTP layer
//! answers 429), speak HTTP, talk to NATS, or schedule its own upkeep (the janitor does).
//!
//! Layout:
//! - `mod.rs`: [`Registry`], connecting, migrating, the error type and the shared helpers.
//! - `secret.rs`: minting, normalizing, hashing and comparing tokens and pairing codes (pure).
//! - `tokens.rs`: api tokens.
//! - `devices.rs`: pairing codes, enrollment, devices.
//! - `streams.rs`: stream opens: a device token verified and its stream's epoch issued in one
//!   statement, concurrent opens grouped into one statement.
//! - `grants.rs`: device authorizations (RFC 8628): their codes, approval, polls, the device
//!   they make.
//! - `proposals.rs`: proposals, their one-way status transitions, and the life of an apply
//!   (its call, its deadline, the sweep of stuck applies, a late result).
//! - `page.rs`: cursors and pages (pure), shared by every list.
//! - `calls.rs`: the call log: records assembled from parts written by several replicas,
//!   listed, swept to `unknown`, expired.
//! - `dispatcher/migrations/`: the schema, embedded in the binary and run at [`Registry::connect`].
//!
//! Portability: queries go through sqlx's Any driver with `$n` placeholders (both engines accept
//! them; the call log's batch upsert gives SQLite `?` instead, see `calls.rs`), times are BIGINT unix milliseconds, JSON is TEXT, ids are TEXT. Every race that matters
//! (a pairing code used twice, a proposal applied twice) is settled by one conditional UPDATE, so
//! it holds across replicas, not just within one.

mod calls;
mod devices;
mod grants;
pub mod page;
mod proposals;
mod secret;
mod streams;
mod tokens;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::AnyPool;

pub use calls::{outcome_rank, CallFilter, CallPart, Dispatched, Finished, Pushed};
pub use grants::{
    AuthorizationStatus, Decision, DeviceAuthorization, IssuedAuthorization, NewDeviceAuthorization, TokenOutcome,
    DEVICE_CODE_PREFIX, MAX_AUTHORIZATION_TTL, SLOW_DOWN_STEP,
};
pub use page::{Cursor, Page, PageError, PageRequest};
pub use proposals::{ApplyOutcome, LateApply};
pub use secret::{API_TOKEN_PREFIX, DEVICE_TOKEN_PREFIX};
pub use streams::{stream_open_statements, OpenedStream};

/// The schema. `migrate!` embeds the files; a new file is picked up on the next rebuild of this
/// crate (touch this file if cargo does not notice it).
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Fewest characters [`Registry::revoke_api_token`] accepts, so a slip cannot revoke many tokens.
pub const MIN_REVOKE_PREFIX_CHARS: usize = 8;
/// Longest pairing code lifetime [`Registry::create_pairing_code`] accepts.
pub const MAX_PAIRING_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Connections per pool. SQLite has one writer at a time whatever the pool, and an in-memory
/// database lives in exactly one connection.
const POSTGRES_MAX_CONNECTIONS: u32 = 10;
const SQLITE_MAX_CONNECTIONS: u32 = 8;
/// How many times SQLite migrations are tried before giving up (see [`migrate`]).
const SQLITE_MIGRATE_ATTEMPTS: u32 = 5;
/// How long a query waits for a free connection before it fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled connection idle at least this long is pinged before it is handed out; one used
/// more recently is handed out as it is (see [`ping_if_idle`]).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The registry's handle: cheap to clone (the pool and the clock are shared).
#[derive(Debug, Clone)]
pub struct Registry {
    pool: AnyPool,
    engine: Engine,
    clock: Arc<Clock>,
    limits: Limits,
    /// Stream opens waiting for their statement (shared by the clones).
    opens: Arc<streams::OpenQueue>,
}

/// What the registry agrees to store: size caps and per-user quotas. Every replica sharing a
/// database should use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest manifest, in bytes of JSON.
    pub max_manifest_bytes: usize,
    /// Most tools in a manifest.
    pub max_manifest_tools: usize,
    /// Largest proposal: its input and plan together, in bytes of JSON.
    pub max_proposal_bytes: usize,
    /// Most unused, unexpired pairing codes one user may hold.
    pub max_live_pairing_codes: u64,
    /// Most devices (not revoked) one user may have.
    pub max_devices_per_user: u64,
    /// A page of a list stops before this many bytes of stored rows (one row always goes).
    pub max_page_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 256 * 1024,
            max_manifest_tools: 512,
            max_proposal_bytes: 2 * 1024 * 1024,
            max_live_pairing_codes: 50,
            max_devices_per_user: 1000,
            max_page_bytes: 8 * 1024 * 1024,
        }
    }
}

/// A cap or quota of [`Limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    ManifestBytes,
    ManifestTools,
    ProposalBytes,
    LivePairingCodes,
    DevicesPerUser,
}

impl Limit {
    /// True for a quota of a user (try again later), false for a size cap (never fits).
    pub fn is_quota(self) -> bool {
        matches!(self, Self::LivePairingCodes | Self::DevicesPerUser)
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ManifestBytes => "manifest bytes",
            Self::ManifestTools => "manifest tools",
            Self::ProposalBytes => "proposal bytes",
            Self::LivePairingCodes => "live pairing codes per user",
            Self::DevicesPerUser => "devices per user",
        })
    }
}

/// What [`Registry::delete_expired`] deletes: rows done with before these times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Proposals applied, failed or rejected before this.
    pub proposals_decided_before: DateTime<Utc>,
    /// Pairing codes used, or expired, before this.
    pub codes_done_before: DateTime<Utc>,
}

/// How many rows [`Registry::delete_expired`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    pub proposals: u64,
    pub pairing_codes: u64,
}

/// What can go wrong in the registry, by kind.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Counted in [`database_errors`].
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The URL names no supported engine; the text never repeats the URL (it may hold a password).
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// The row to change does not exist, is not the caller's, or is revoked.
    #[error("not found")]
    NotFound,
    #[error("a token prefix needs at least {min} characters")]
    PrefixTooShort { min: usize },
    /// An argument the registry cannot store (an empty user id, a non-UUID proposal id, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// Storing this would pass a cap or quota of [`Limits`]: `value` against `max`. Nothing was
    /// stored (for enrollment: the pairing code was not used).
    #[error("{limit}: {value} is over the limit of {max}")]
    OverLimit { limit: Limit, value: u64, max: u64 },
    /// A stored value could not be read back (bad JSON, an unknown status, a time out of range).
    #[error("stored data could not be read: {0}")]
    Corrupt(String),
    /// A statement that served several callers at once (a batch of stream opens) failed, or
    /// was abandoned; each caller gets the text of the one error (counted once, in
    /// [`database_errors`]).
    #[error("database error: {0}")]
    Batch(String),
}

/// Database errors in this process so far (every `sqlx` error that became a
/// [`RegistryError`]), for `/metrics`.
static DATABASE_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn database_errors() -> u64 {
    DATABASE_ERRORS.load(Ordering::Relaxed)
}

impl From<sqlx::Error> for RegistryError {
    fn from(error: sqlx::Error) -> Self {
        DATABASE_ERRORS.fetch_add(1, Ordering::Relaxed);
        Self::Database(error)
    }
}

/// The pool's connections now: open, of which idle, and its limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub size: usize,
    pub idle: usize,
    pub max: usize,
}

/// Who a device token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    pub device_id: String,
    pub owner: String,
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub platform: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// The last manifest; `None` when there is none, or in a list read without tools.
    pub manifest: Option<protocol::Manifest>,
    /// The last manifest's roots and tool count (also in a list read without tools).
    pub roots: Option<Vec<String>>,
    pub tool_count: Option<usize>,
    pub revoked: bool,
}

/// A mutation's dry run, to be stored as a pending proposal.
#[derive(Debug, Clone, PartialEq)]
pub struct NewProposal {
    /// A UUID, chosen by the caller.
    pub id: String,
    pub device_id: String,
    /// The user whose device made the proposal; must be the device's owner.
    pub owner: String,
    pub tool: String,
    /// The input the apply will use.
    pub input: Value,
    /// The device's plan (the `result` of its proposal HostResult).
    pub plan: Value,
    /// What the apply verifies first; sent with the `apply` call.
    pub preconditions: Value,
}

/// A proposal with what the wire type does not show.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredProposal {
    pub proposal: protocol::Proposal,
    pub owner: String,
    pub preconditions: Value,
}

/// The result of presenting a pairing code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollOutcome {
    Enrolled(protocol::EnrollResponse),
    /// The code is unknown, expired or already used (which one is not told).
    Refused,
}

/// The database behind a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    fn of_url(url: &str) -> Result<Self, RegistryError> {
        let scheme = url.split_once(':').map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("sqlite") => Ok(Self::Sqlite),
            Some("postgres" | "postgresql") => Ok(Self::Postgres),
            _ => Err(RegistryError::InvalidUrl("expected a sqlite:// or postgres:// URL".into())),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// True for the SQLite URLs that name an in-memory database (`sqlite::memory:`,
/// `sqlite://?mode=memory`, ...).
fn is_sqlite_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// Unix milliseconds that never repeat or go backwards within one [`Registry`]: the wall clock,
/// nudged forward by a millisecond when two stamps would tie, so rows made one after the other
/// sort in that order ("newest first", "oldest first") even within one millisecond.
#[derive(Debug, Default)]
struct Clock {
    last: AtomicI64,
}

impl Clock {
    fn now_ms(&self) -> i64 {
        let wall = Utc::now().timestamp_millis();
        let mut previous = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(previous.saturating_add(1));
            match self.last.compare_exchange_weak(previous, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(actual) => previous = actual,
            }
        }
    }
}

impl Registry {
    /// Connects to `url` (`sqlite://…`, `sqlite::memory:` or `postgres://…`) and brings the schema
    /// up to date. Replicas starting at once against one PostgreSQL take turns: the migrator holds
    /// an advisory lock while it works.
    pub async fn connect(url: &str) -> Result<Self, RegistryError> {
        Self::connect_with_pool(url, None).await
    }

    /// [`Registry::connect`] with a pool of `pool_size` connections (`None`: the engine's
    /// default; an in-memory SQLite database always has one).
    pub async fn connect_with_pool(url: &str, pool_size: Option<u32>) -> Result<Self, RegistryError> {
        let engine = Engine::of_url(url)?;
        sqlx::any::install_default_drivers();
        let in_memory = engine == Engine::Sqlite && is_sqlite_in_memory(url);
        let options = AnyPoolOptions::new()
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .before_acquire(ping_if_idle);
        let options = match engine {
            // Each connection to `:memory:` would be a database of its own: keep exactly one,
            // forever.
            Engine::Sqlite if in_memory => {
                options.max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None)
            }
            Engine::Sqlite => options.max_connections(pool_size.unwrap_or(SQLITE_MAX_CONNECTIONS)),
            Engine::Postgres => options.max_connections(pool_size.unwrap_or(POSTGRES_MAX_CONNECTIONS)),
        };
        let pool = options.connect(url).await?;
        if engine == Engine::Sqlite && !in_memory {
            // Readers no longer block the writer; the mode is stored in the file. Switching it
            // needs the file to itself: another process opening it at the same moment answers
            // "database is locked", so it is tried again like the migrations.
            let mut attempt = 1;
            while let Err(error) = sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await {
                if attempt >= SQLITE_MIGRATE_ATTEMPTS {
                    return Err(error.into());
                }
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                attempt += 1;
            }
        }
        migrate(&pool, engine).await?;
        Ok(Self { pool, engine, clock: Arc::new(Clock::default()), limits: Limits::default(), opens: Arc::default() })
    }

    /// The same registry (sharing the pool) storing within `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Succeeds when the database answers a trivial query (for `/readyz`).
    pub async fn ping(&self) -> Result<(), RegistryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The pool's connections now.
    pub fn pool_stats(&self) -> PoolStats {
        PoolStats {
            size: self.pool.size() as usize,
            idle: self.pool.num_idle(),
            max: self.pool.options().get_max_connections() as usize,
        }
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn engine(&self) -> &'static str {
        self.engine.name()
    }

    /// Closes the pool: waits for connections in use to come back, then closes them all. Every
    /// clone of this registry is closed with it.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Deletes what is past keeping: proposals decided before `expiry.proposals_decided_before`
    /// and pairing codes used or expired before `expiry.codes_done_before`, in small batches.
    /// Nothing else: pending and applying proposals and live codes stay. Idempotent, and cheap
    /// when there is nothing to delete (each DELETE walks an index).
    pub async fn delete_expired(&self, expiry: Expiry) -> Result<Expired, RegistryError> {
        Ok(Expired {
            proposals: self.delete_decided_proposals(&expiry).await?,
            pairing_codes: self.delete_done_pairing_codes(&expiry).await?,
        })
    }
}

/// Pings made by [`ping_if_idle`] in this process, for `/metrics`.
static PINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn database_pings() -> u64 {
    PINGS.load(Ordering::Relaxed)
}

/// The pool's check of a connection it is about to hand out. sqlx's default
/// (`test_before_acquire`) pings every connection on every acquire: a round trip to the
/// database before each query, which doubled the round trips of a reconnecting herd. A
/// connection that answered a moment ago ([`PING_IF_IDLE_FOR`]) is trusted; one that sat idle
/// longer, and may have been dropped by the server, a proxy or the network meanwhile, is
/// pinged, and discarded (a new one is opened) if it does not answer.
fn ping_if_idle(
    connection: &mut sqlx::AnyConnection,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> futures::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        if meta.idle_for < PING_IF_IDLE_FOR {
            return Ok(true);
        }
        PINGS.fetch_add(1, Ordering::Relaxed);
        sqlx::Connection::ping(connection).await?;
        Ok(true)
    })
}

/// Runs the embedded migrations.
///
/// On PostgreSQL the migrator holds an advisory lock meanwhile, so replicas starting together
/// take turns. Should a migration fail, [`Registry::connect`] fails and drops the pool: its
/// connections close, and any lock still held goes with them.
///
/// SQLite has no such lock: two processes opening a fresh file at once (a server and a
/// `dispatcher token create`) may both try to apply a migration, and the loser's transaction
/// fails and rolls back whole. It then tries again, and finds the migration applied.
async fn migrate(pool: &AnyPool, engine: Engine) -> Result<(), RegistryError> {
    let mut attempt = 1;
    loop {
        // Through the pool rather than `&mut conn`, whose `Acquire` bound makes the future
        // impossible to spawn ("implementation of `Acquire` is not general enough").
        match MIGRATOR.run(pool).await {
            Ok(()) => return Ok(()),
            Err(_) if engine == Engine::Sqlite && attempt < SQLITE_MIGRATE_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Serializes one user's quota check and insert across replicas: on PostgreSQL an advisory
/// lock held until the transaction ends, keyed by the quota's kind and the user; SQLite needs
/// none (a write transaction holds the database's one write lock).
async fn lock_user_quota(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    engine: Engine,
    limit: Limit,
    user_id: &str,
) -> Result<(), RegistryError> {
    if engine != Engine::Postgres {
        return Ok(());
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{limit}\n{user_id}").as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    // Read through COUNT: the lock function returns `void`, a type the Any driver cannot read.
    let _: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock($1)) AS locked")
        .bind(i64::from_be_bytes(key))
        .fetch_one(&mut **tx)
        .await?;
    Ok(())
}

/// A count or size as the `u64` of [`RegistryError::OverLimit`].
fn as_u64(n: impl TryInto<u64>) -> u64 {
    n.try_into().unwrap_or(u64::MAX)
}

/// A stored time back as a UTC time.
fn time_of(ms: i64) -> Result<DateTime<Utc>, RegistryError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| RegistryError::Corrupt(format!("time out of range: {ms}")))
}

fn optional_time_of(ms: Option<i64>) -> Result<Option<DateTime<Utc>>, RegistryError> {
    ms.map(time_of).transpose()
}

/// A value as stored JSON text.
fn json_text<T: serde::Serialize>(value: &T) -> Result<String, RegistryError> {
    serde_json::to_string(value).map_err(|_| RegistryError::InvalidArgument("value cannot be encoded as JSON"))
}

/// Stored JSON text back as a value.
fn from_json_text<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, RegistryError> {
    serde_json::from_str(text).map_err(|error| RegistryError::Corrupt(format!("{what}: {error}")))
}
