//! The command line and environment of the `dispatcher` binary (clap derive, `env =` on every
//! flag; the flag wins). Validation is pure: [`ServeArgs::settings`] turns arguments into
//! [`Settings`] or a message, and touches nothing.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::registry::Limits;

mod security;
pub use security::{ListenerArgs, NatsAuthArgs, TlsFiles};

pub const DEFAULT_DATABASE_URL: &str = "sqlite://dispatcher.db?mode=rwc";

#[derive(Debug, Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "Routes tool calls to devices' streams; one replica or many over NATS."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API.
    Serve(Box<ServeArgs>),
    /// Run the database migrations and exit (for a Kubernetes Job before a rollout; `serve`
    /// also runs them at start).
    Migrate(DatabaseArgs),
    /// Manage api tokens (the app backend's credentials).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The operator CLI: clients of the control API of any replica.
    #[command(flatten)]
    Operator(crate::cli::OperatorCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint an api token for a user; prints it as the only line on stdout.
    Create {
        /// The user the token acts for.
        #[arg(long)]
        user: String,
        /// A label to recognise the token by.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Revoke the api tokens starting with a prefix (at least 8 characters). Replicas refuse
    /// them within a second; with a NATS URL (as a replica's pod has it) they hear at once.
    Revoke {
        prefix: String,
        #[command(flatten)]
        database: DatabaseArgs,
        /// NATS server URLs of the cluster, comma-separated: the revocation is published there
        /// too. Without it (or when the publish fails) replicas read it from the database.
        #[arg(long, env = "NATS_URL")]
        nats_url: Option<String>,
        /// Prefix of every NATS subject (as the replicas have it).
        #[arg(long, env = "DISPATCHER_SUBJECT_PREFIX", default_value = protocol::subject::DEFAULT_PREFIX)]
        subject_prefix: String,
        #[command(flatten)]
        nats_auth: Box<NatsAuthArgs>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `sqlite://…` or `postgres://…`; migrations run at start.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "DISPATCHER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// NATS server URLs, comma-separated (all servers of a NATS cluster). Without it: one
    /// replica, in-memory bus.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    #[command(flatten)]
    pub nats_auth: Box<NatsAuthArgs>,
    #[command(flatten)]
    pub listener: Box<ListenerArgs>,
    /// This replica's name in responses, logs and presence [default: host name + random suffix].
    #[arg(long, env = "DISPATCHER_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Prefix of every NATS subject.
    #[arg(long, env = "DISPATCHER_SUBJECT_PREFIX", default_value = protocol::subject::DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// Seconds between keepalive comments on device streams.
    #[arg(long, env = "DISPATCHER_KEEPALIVE_SECS", default_value_t = 15)]
    pub keepalive_secs: u64,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "DISPATCHER_MAX_BODY_BYTES", default_value_t = 8_388_608)]
    pub max_body_bytes: usize,
    /// Seconds a graceful shutdown waits for calls in flight.
    #[arg(long, env = "DISPATCHER_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
    /// Seconds between failing readiness and closing streams on shutdown, while the load
    /// balancer stops sending traffic here.
    #[arg(long, env = "DISPATCHER_DRAIN_DELAY_SECS", default_value_t = 2)]
    pub drain_delay_secs: u64,
    /// Seconds without NATS before this replica closes its streams so devices move elsewhere.
    #[arg(long, env = "DISPATCHER_BROKER_GRACE_SECS", default_value_t = 5)]
    pub broker_grace_secs: u64,
    /// Seconds the database or NATS may be unreachable before `/readyz` fails: a shorter
    /// outage, which every replica sees at once, leaves the replicas in the load balancer.
    #[arg(long, env = "DISPATCHER_READINESS_GRACE_SECS", default_value_t = 10)]
    pub readiness_grace_secs: u64,
    /// Seconds a connection may take to send a request's headers, and may sit idle between
    /// requests.
    #[arg(long, env = "DISPATCHER_HEADER_TIMEOUT_SECS", default_value_t = 30)]
    pub header_timeout_secs: u64,
    /// Seconds from accepting a connection to its first request's headers, whatever the
    /// protocol (HTTP/2's preface and first HEADERS included); closed unanswered beyond.
    #[arg(long, env = "DISPATCHER_CONNECTION_TIMEOUT_SECS", default_value_t = 10)]
    pub connection_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in flight (HTTP/2 gets a GOAWAY).
    /// A device stream is a request in flight for as long as it lasts.
    #[arg(long, env = "DISPATCHER_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Open connections at most, device streams included; beyond, the connection idle the
    /// longest is closed, or the new one refused with 503 [default: the descriptor limit less
    /// 128, at most 65536].
    #[arg(long, env = "DISPATCHER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections at most from one client address (503 beyond) [default:
    /// --max-connections].
    #[arg(long, env = "DISPATCHER_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// How long an MCP `tools/call` waits for the device, in milliseconds (1 to 300000).
    #[arg(long, env = "DISPATCHER_MCP_CALL_TIMEOUT_MS", default_value_t = protocol::CALL_TIMEOUT_DEFAULT_MS)]
    pub mcp_call_timeout_ms: u64,
    /// Bytes of call JSON a device stream may have waiting to be written; calls beyond wait
    /// for room. A stream that does not drain for two keepalive intervals is dropped.
    #[arg(long, env = "DISPATCHER_STREAM_QUEUE_BYTES", default_value_t = crate::core::hub::STREAM_QUEUE_BYTES)]
    pub stream_queue_bytes: usize,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    #[command(flatten)]
    pub grant: GrantArgs,
}

/// How much one replica takes on: its database pool, its device streams, and how it sheds
/// streams to the rest of the cluster when it holds far more than its share.
#[derive(Debug, Clone, Args)]
pub struct CapacityArgs {
    /// Connections of this replica's database pool [default: 10 for PostgreSQL, 8 for SQLite].
    #[arg(long, env = "DISPATCHER_DB_POOL_SIZE")]
    pub db_pool_size: Option<u32>,
    /// Device streams this replica holds at most; a new stream beyond is answered 503 with
    /// `Retry-After`, and the device tries again (through the load balancer, elsewhere)
    /// [default: no cap].
    #[arg(long, env = "DISPATCHER_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// Rebalancing starts when this replica holds more than the cluster's average streams by
    /// this percentage (and by at least 2 streams); 0 turns rebalancing off.
    #[arg(long, env = "DISPATCHER_REBALANCE_THRESHOLD_PERCENT", default_value_t = 25)]
    pub rebalance_threshold_percent: u32,
    /// Devices asked to reconnect elsewhere at most per second while rebalancing.
    #[arg(long, env = "DISPATCHER_REBALANCE_RATE", default_value_t = 5)]
    pub rebalance_rate: u32,
}

/// Validated [`CapacityArgs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub db_pool_size: Option<u32>,
    pub max_streams: Option<usize>,
    /// `None`: rebalancing is off.
    pub rebalance: Option<crate::rebalance::Policy>,
}

impl CapacityArgs {
    pub fn capacity(&self) -> Result<Capacity, String> {
        if self.db_pool_size.is_some_and(|n| !(1..=1000).contains(&n)) {
            return Err("--db-pool-size: between 1 and 1000".into());
        }
        if self.max_streams == Some(0) {
            return Err("--max-streams: at least 1".into());
        }
        if self.rebalance_threshold_percent > 1000 {
            return Err("--rebalance-threshold-percent: between 0 (off) and 1000".into());
        }
        if !(1..=1000).contains(&self.rebalance_rate) {
            return Err("--rebalance-rate: between 1 and 1000".into());
        }
        let rebalance = (self.rebalance_threshold_percent > 0).then(|| crate::rebalance::Policy {
            threshold_percent: self.rebalance_threshold_percent,
            per_second: self.rebalance_rate,
            ..crate::rebalance::Policy::default()
        });
        Ok(Capacity { db_pool_size: self.db_pool_size, max_streams: self.max_streams, rebalance })
    }
}

/// What the registry stores and for how long: size caps, per-user quotas, pages, expiry, and
/// the timing of applies (so none is left `applying`).
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Largest manifest a device may store, in bytes of JSON (413 beyond; at most 512 tools).
    #[arg(long, env = "DISPATCHER_MAX_MANIFEST_BYTES", default_value_t = 262_144)]
    pub max_manifest_bytes: usize,
    /// Largest proposal stored, its input and plan together in bytes of JSON (the call answers
    /// 413 beyond, and nothing is stored).
    #[arg(long, env = "DISPATCHER_MAX_PROPOSAL_BYTES", default_value_t = 2_097_152)]
    pub max_proposal_bytes: usize,
    /// A page of `GET /api/devices` or `GET /api/proposals` stops before this many bytes of
    /// stored rows (one row always goes).
    #[arg(long, env = "DISPATCHER_MAX_PAGE_BYTES", default_value_t = 8_388_608)]
    pub max_page_bytes: usize,
    /// Unused, unexpired pairing codes one user may hold (429 beyond).
    #[arg(long, env = "DISPATCHER_MAX_PAIRING_CODES_PER_USER", default_value_t = 50)]
    pub max_pairing_codes_per_user: u64,
    /// Devices (not revoked) one user may have; checked at enrollment (429, the code unused).
    #[arg(long, env = "DISPATCHER_MAX_DEVICES_PER_USER", default_value_t = 1000)]
    pub max_devices_per_user: u64,
    /// Days a proposal is kept after it was applied, failed or rejected.
    #[arg(long, env = "DISPATCHER_PROPOSAL_RETENTION_DAYS", default_value_t = 30)]
    pub proposal_retention_days: u64,
    /// Seconds an approval waits for the device's apply (504 and `failed` beyond).
    #[arg(long, env = "DISPATCHER_APPLY_TIMEOUT_SECS", default_value_t = 30)]
    pub apply_timeout_secs: u64,
    /// A proposal still `applying` this many seconds past its apply's deadline (its replica
    /// died) is failed with `device timed out`, and a call log record still pending is marked
    /// `unknown`; every replica checks this often.
    #[arg(long, env = "DISPATCHER_STALE_APPLY_SECS", default_value_t = 10)]
    pub stale_apply_secs: u64,
    /// Days a call log record is kept.
    #[arg(long, env = "DISPATCHER_CALL_LOG_DAYS", default_value_t = 30)]
    pub call_log_days: u64,
}

/// Validated [`StorageArgs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    pub limits: Limits,
    pub proposal_retention: Duration,
    /// How long used or expired pairing codes are kept.
    pub pairing_code_retention: Duration,
    pub apply_timeout: Duration,
    pub stale_apply: Duration,
    /// How long call log records are kept.
    pub call_log_retention: Duration,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            proposal_retention: Duration::from_secs(30 * DAY_SECS),
            pairing_code_retention: Duration::from_secs(DAY_SECS),
            apply_timeout: Duration::from_secs(30),
            stale_apply: Duration::from_secs(10),
            call_log_retention: Duration::from_secs(30 * DAY_SECS),
        }
    }
}

const DAY_SECS: u64 = 24 * 60 * 60;

impl StorageArgs {
    pub fn storage(&self) -> Result<Storage, String> {
        if self.max_manifest_bytes < 1024 {
            return Err("--max-manifest-bytes: at least 1024".into());
        }
        if self.max_proposal_bytes < 1024 {
            return Err("--max-proposal-bytes: at least 1024".into());
        }
        if self.max_page_bytes < self.max_manifest_bytes.max(self.max_proposal_bytes) {
            return Err("--max-page-bytes: at least --max-manifest-bytes and --max-proposal-bytes".into());
        }
        if self.max_pairing_codes_per_user == 0 || self.max_devices_per_user == 0 {
            return Err("--max-pairing-codes-per-user and --max-devices-per-user: at least 1".into());
        }
        if !(1..=36_500).contains(&self.proposal_retention_days) {
            return Err("--proposal-retention-days: between 1 and 36500".into());
        }
        if !(1..=protocol::CALL_TIMEOUT_MAX_MS / 1000).contains(&self.apply_timeout_secs) {
            return Err(format!("--apply-timeout-secs: between 1 and {}", protocol::CALL_TIMEOUT_MAX_MS / 1000));
        }
        if !(1..=3600).contains(&self.stale_apply_secs) {
            return Err("--stale-apply-secs: between 1 and 3600".into());
        }
        if !(1..=36_500).contains(&self.call_log_days) {
            return Err("--call-log-days: between 1 and 36500".into());
        }
        Ok(Storage {
            limits: Limits {
                max_manifest_bytes: self.max_manifest_bytes,
                max_proposal_bytes: self.max_proposal_bytes,
                max_page_bytes: self.max_page_bytes,
                max_live_pairing_codes: self.max_pairing_codes_per_user,
                max_devices_per_user: self.max_devices_per_user,
                ..Limits::default()
            },
            proposal_retention: Duration::from_secs(self.proposal_retention_days * DAY_SECS),
            apply_timeout: Duration::from_secs(self.apply_timeout_secs),
            stale_apply: Duration::from_secs(self.stale_apply_secs),
            call_log_retention: Duration::from_secs(self.call_log_days * DAY_SECS),
            ..Storage::default()
        })
    }
}

/// Enrollment by link (RFC 8628): where the links point, and the codes' timing.
#[derive(Debug, Clone, Args)]
pub struct GrantArgs {
    /// The URL users reach this service at (`https://dispatch.example.com`, any path prefix
    /// kept): enrollment links are `{public URL}/ui/activate?code=…`. Without it, each link is
    /// made from the request: its `Host` header, and https when `X-Forwarded-Proto` says so.
    #[arg(long, env = "DISPATCHER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// For tests: seconds a device authorization's codes live (1 to 3600).
    #[arg(long, env = "DISPATCHER_DEVICE_CODE_TTL_SECS", default_value_t = protocol::DEVICE_CODE_TTL_DEFAULT_SECS, hide = true)]
    pub device_code_ttl_secs: u64,
    /// For tests: the polling interval a device authorization starts with, in seconds (1 to 60).
    #[arg(long, env = "DISPATCHER_DEVICE_CODE_INTERVAL_SECS", default_value_t = protocol::DEVICE_CODE_INTERVAL_DEFAULT_SECS, hide = true)]
    pub device_code_interval_secs: u64,
}

/// Validated [`GrantArgs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `scheme://host[:port][/prefix]`, without a trailing slash.
    pub public_url: Option<String>,
    pub ttl: Duration,
    pub interval: Duration,
}

impl Default for Grant {
    fn default() -> Self {
        Self {
            public_url: None,
            ttl: Duration::from_secs(protocol::DEVICE_CODE_TTL_DEFAULT_SECS),
            interval: Duration::from_secs(protocol::DEVICE_CODE_INTERVAL_DEFAULT_SECS),
        }
    }
}

impl GrantArgs {
    pub fn grant(&self) -> Result<Grant, String> {
        let public_url = match self.public_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            None => None,
            Some(text) => {
                let url =
                    reqwest::Url::parse(text).map_err(|e| format!("--public-url: {text:?} is not a URL ({e})"))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
                    return Err(format!("--public-url: {text:?} must be an http or https URL with a host"));
                }
                if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
                    return Err(format!("--public-url: {text:?} must have no query, fragment or user"));
                }
                Some(url.as_str().trim_end_matches('/').to_owned())
            }
        };
        if !(1..=3600).contains(&self.device_code_ttl_secs) {
            return Err("--device-code-ttl-secs: between 1 and 3600".into());
        }
        if !(1..=60).contains(&self.device_code_interval_secs) {
            return Err("--device-code-interval-secs: between 1 and 60".into());
        }
        Ok(Grant {
            public_url,
            ttl: Duration::from_secs(self.device_code_ttl_secs),
            interval: Duration::from_secs(self.device_code_interval_secs),
        })
    }
}

/// Validated settings of `dispatcher serve`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database_url: String,
    pub nats_url: Option<String>,
    pub replica_id: String,
    pub subject_prefix: String,
    pub keepalive: Duration,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub drain_delay: Duration,
    pub broker_grace: Duration,
    pub readiness_grace: Duration,
    pub header_timeout: Duration,
    pub connection_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: derived from the descriptor limit at start.
    pub max_connections: Option<usize>,
    /// `None`: the overall cap.
    pub max_connections_per_ip: Option<usize>,
    pub storage: Storage,
    pub mcp_call_timeout: Duration,
    pub stream_queue_bytes: usize,
    pub nats_auth: crate::bus::nats::NatsAuth,
    /// `Some`: the listener serves HTTPS.
    pub tls: Option<TlsFiles>,
    pub trusted_proxies: crate::http::proxy::TrustedProxies,
    pub capacity: Capacity,
    pub grant: Grant,
}

impl ServeArgs {
    /// Checks the arguments; `host_name` and `suffix` make the default replica id.
    pub fn settings(&self, host_name: &str, suffix: &str) -> Result<Settings, String> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| format!("--listen: {:?} is not an address like 127.0.0.1:8080", self.listen))?;
        if !(self.database.database_url.starts_with("sqlite:")
            || self.database.database_url.starts_with("postgres://")
            || self.database.database_url.starts_with("postgresql://"))
        {
            return Err("--database-url: expected sqlite://… or postgres://…".into());
        }
        if let Some(url) = &self.nats_url {
            if url.split(',').all(|part| part.trim().is_empty()) {
                return Err("--nats-url: empty".into());
            }
        }
        if !protocol::subject::is_valid_prefix(&self.subject_prefix) {
            return Err(format!(
                "--subject-prefix: {:?} must be dot-separated tokens of letters, digits, '-' and '_'",
                self.subject_prefix
            ));
        }
        let replica_id = match &self.replica_id {
            Some(id) => id.clone(),
            None => format!("{host_name}-{suffix}"),
        };
        if replica_id.is_empty() || replica_id.len() > 128 || !replica_id.chars().all(|c| c.is_ascii_graphic()) {
            return Err("--replica-id: 1 to 128 visible ASCII characters".into());
        }
        if !(1..=3600).contains(&self.keepalive_secs) {
            return Err("--keepalive-secs: between 1 and 3600".into());
        }
        if self.readiness_grace_secs > 3600 {
            return Err("--readiness-grace-secs: at most 3600".into());
        }
        if self.max_body_bytes < 1024 {
            return Err("--max-body-bytes: at least 1024".into());
        }
        if self.header_timeout_secs == 0 {
            return Err("--header-timeout-secs: at least 1".into());
        }
        if !(1..=3600).contains(&self.connection_timeout_secs) {
            return Err("--connection-timeout-secs: between 1 and 3600".into());
        }
        if !(1..=86_400).contains(&self.idle_timeout_secs) {
            return Err("--idle-timeout-secs: between 1 and 86400".into());
        }
        if self.max_connections == Some(0) {
            return Err("--max-connections: at least 1".into());
        }
        if self.max_connections_per_ip == Some(0) {
            return Err("--max-connections-per-ip: at least 1".into());
        }
        if let (Some(total), Some(per_ip)) = (self.max_connections, self.max_connections_per_ip) {
            if per_ip > total {
                return Err(format!("--max-connections-per-ip: {per_ip} is more than --max-connections {total}"));
            }
        }
        let storage = self.storage.storage()?;
        let capacity = self.capacity.capacity()?;
        if !(1..=protocol::CALL_TIMEOUT_MAX_MS).contains(&self.mcp_call_timeout_ms) {
            return Err(format!("--mcp-call-timeout-ms: between 1 and {}", protocol::CALL_TIMEOUT_MAX_MS));
        }
        if self.stream_queue_bytes < 65_536 {
            return Err("--stream-queue-bytes: at least 65536".into());
        }
        let nats_auth = self.nats_auth.nats_auth()?;
        let tls = self.listener.tls()?;
        let trusted_proxies = self.listener.trusted_proxies()?;
        Ok(Settings {
            listen,
            database_url: self.database.database_url.clone(),
            nats_url: self.nats_url.clone(),
            replica_id,
            subject_prefix: self.subject_prefix.clone(),
            keepalive: Duration::from_secs(self.keepalive_secs),
            max_body_bytes: self.max_body_bytes,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            drain_delay: Duration::from_secs(self.drain_delay_secs),
            broker_grace: Duration::from_secs(self.broker_grace_secs),
            readiness_grace: Duration::from_secs(self.readiness_grace_secs),
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            connection_timeout: Duration::from_secs(self.connection_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            storage,
            mcp_call_timeout: Duration::from_millis(self.mcp_call_timeout_ms),
            stream_queue_bytes: self.stream_queue_bytes,
            nats_auth,
            tls,
            trusted_proxies,
            capacity,
            grant: self.grant.grant()?,
        })
    }
}

impl Settings {
    /// Settings for a dispatcher embedded in an app's own server: one process (the in-memory
    /// bus), the dispatcher's tables in `database_url` (`sqlite://…`, `sqlite::memory:` or
    /// `postgres://…`), and otherwise the defaults of `dispatcher serve`. `listen` is unused
    /// there (the app binds); change any field before building the state.
    ///
    /// ```
    /// let settings = dispatcher::config::Settings::embedded("sqlite://app.db?mode=rwc");
    /// assert_eq!(settings.nats_url, None);
    /// assert_eq!(settings.keepalive, std::time::Duration::from_secs(15));
    /// ```
    pub fn embedded(database_url: impl Into<String>) -> Self {
        let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "app".into());
        Self {
            replica_id: format!("{host}-{:04x}", rand::random::<u16>()),
            shutdown_grace: Duration::from_secs(20),
            drain_delay: Duration::ZERO,
            ..Self::for_tests(database_url)
        }
    }

    /// Settings for an embedded replica in tests and examples: in-memory bus, the given
    /// database, short timings.
    pub fn for_tests(database_url: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: database_url.into(),
            nats_url: None,
            replica_id: format!("test-{:04x}", rand::random::<u16>()),
            subject_prefix: protocol::subject::DEFAULT_PREFIX.into(),
            keepalive: Duration::from_secs(15),
            max_body_bytes: 8_388_608,
            shutdown_grace: Duration::from_secs(5),
            drain_delay: Duration::ZERO,
            broker_grace: Duration::from_secs(5),
            readiness_grace: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            connection_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            max_connections_per_ip: None,
            storage: Storage::default(),
            mcp_call_timeout: Duration::from_millis(protocol::CALL_TIMEOUT_DEFAULT_MS),
            stream_queue_bytes: crate::core::hub::STREAM_QUEUE_BYTES,
            nats_auth: Default::default(),
            tls: None,
            trusted_proxies: Default::default(),
            capacity: Capacity::default(),
            grant: Grant::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["dispatcher", "serve"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Serve(serve) => serve.settings("host", "abcd"),
            Command::Token { .. } | Command::Migrate(_) | Command::Operator(_) => Err("not serve".into()),
        }
    }

    #[test]
    fn defaults() {
        let settings = parse(&[]).expect("defaults are valid");
        assert_eq!(settings.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.replica_id, "host-abcd");
        assert_eq!(settings.subject_prefix, "pulsn.host");
        assert_eq!(settings.keepalive, Duration::from_secs(15));
        assert_eq!(settings.max_body_bytes, 8_388_608);
        assert_eq!(settings.shutdown_grace, Duration::from_secs(20));
        assert!(settings.nats_url.is_none());
        assert_eq!(settings.mcp_call_timeout, Duration::from_millis(30_000));
        assert_eq!(settings.connection_timeout, Duration::from_secs(10));
        assert_eq!(settings.idle_timeout, Duration::from_secs(60));
        assert_eq!((settings.max_connections, settings.max_connections_per_ip), (None, None));
        assert_eq!(settings.storage, Storage::default());
        assert_eq!(settings.storage.limits.max_manifest_bytes, 262_144);
        assert_eq!(settings.storage.limits.max_proposal_bytes, 2_097_152);
        assert_eq!(settings.storage.limits.max_live_pairing_codes, 50);
        assert_eq!(settings.storage.limits.max_devices_per_user, 1000);
        assert_eq!(settings.storage.proposal_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(settings.storage.call_log_retention, Duration::from_secs(30 * 86_400));
    }

    #[test]
    fn security_flags() {
        use crate::bus::nats::NatsCredentials;
        let settings = parse(&[
            "--tls-cert",
            "/etc/tls/tls.crt",
            "--tls-key",
            "/etc/tls/tls.key",
            "--trusted-proxies",
            "10.0.0.0/8, 192.168.0.1",
            "--nats-user",
            "dispatcher",
            "--nats-password",
            "pw",
            "--nats-tls-ca-file",
            "/ca.pem",
            "--nats-tls-cert-file",
            "/c.pem",
            "--nats-tls-key-file",
            "/k.pem",
        ])
        .expect("valid");
        let tls = settings.tls.expect("tls");
        assert_eq!((tls.cert.to_str(), tls.key.to_str()), (Some("/etc/tls/tls.crt"), Some("/etc/tls/tls.key")));
        assert!(settings.trusted_proxies.trusts("10.1.2.3".parse().expect("ip")));
        assert!(settings.trusted_proxies.trusts("192.168.0.1".parse().expect("ip")));
        assert!(!settings.trusted_proxies.trusts("192.168.0.2".parse().expect("ip")));
        assert_eq!(
            settings.nats_auth.credentials,
            NatsCredentials::UserPassword { user: "dispatcher".into(), password: "pw".into() }
        );
        assert_eq!(settings.nats_auth.tls.ca_file.as_deref().and_then(|p| p.to_str()), Some("/ca.pem"));
        assert!(settings.nats_auth.tls.client.is_some());
        let token = parse(&["--nats-token", "t0k", "--nats-user", ""]).expect("an empty value is unset");
        assert_eq!(token.nats_auth.credentials, NatsCredentials::Token("t0k".into()));
        let defaults = parse(&[]).expect("defaults");
        assert_eq!((defaults.tls, defaults.trusted_proxies.is_empty()), (None, true));
        let cli = Cli::try_parse_from(["dispatcher", "serve", "--nats-user", "u", "--nats-password", "pw-secret"])
            .expect("parses");
        assert!(!format!("{cli:?}").contains("pw-secret"), "no secret in debug output");
        assert_eq!(defaults.nats_auth.credentials, NatsCredentials::None);
    }

    #[test]
    fn storage_flags() {
        let settings = parse(&[
            "--max-manifest-bytes",
            "4096",
            "--max-proposal-bytes",
            "8192",
            "--max-page-bytes",
            "8192",
            "--max-pairing-codes-per-user",
            "3",
            "--max-devices-per-user",
            "2",
            "--proposal-retention-days",
            "7",
            "--apply-timeout-secs",
            "2",
            "--stale-apply-secs",
            "1",
            "--call-log-days",
            "2",
        ])
        .expect("valid");
        let storage = settings.storage;
        assert_eq!(
            (storage.limits.max_manifest_bytes, storage.limits.max_proposal_bytes, storage.limits.max_page_bytes),
            (4096, 8192, 8192)
        );
        assert_eq!((storage.limits.max_live_pairing_codes, storage.limits.max_devices_per_user), (3, 2));
        assert_eq!(storage.proposal_retention, Duration::from_secs(7 * 86_400));
        assert_eq!((storage.apply_timeout, storage.stale_apply), (Duration::from_secs(2), Duration::from_secs(1)));
        assert_eq!(storage.call_log_retention, Duration::from_secs(2 * 86_400));
    }

    #[test]
    fn grant_flags() {
        assert_eq!(parse(&[]).expect("defaults").grant, Grant::default());
        let settings = parse(&[
            "--public-url",
            "https://dispatch.example.com/pulsn/",
            "--device-code-ttl-secs",
            "3",
            "--device-code-interval-secs",
            "1",
        ])
        .expect("valid");
        assert_eq!(settings.grant.public_url.as_deref(), Some("https://dispatch.example.com/pulsn"));
        assert_eq!((settings.grant.ttl, settings.grant.interval), (Duration::from_secs(3), Duration::from_secs(1)));
    }

    #[test]
    fn capacity_flags() {
        let settings = parse(&[]).expect("defaults");
        assert_eq!((settings.capacity.db_pool_size, settings.capacity.max_streams), (None, None));
        let policy = settings.capacity.rebalance.expect("rebalancing is on by default");
        assert_eq!((policy.threshold_percent, policy.per_second), (25, 5));
        let settings = parse(&["--db-pool-size", "25", "--max-streams", "5000", "--rebalance-threshold-percent", "0"])
            .expect("valid");
        assert_eq!(settings.capacity.db_pool_size, Some(25));
        assert_eq!(settings.capacity.max_streams, Some(5000));
        assert!(settings.capacity.rebalance.is_none(), "0 turns it off");
    }

    #[test]
    fn invalid_values_are_refused() {
        let cases: &[&[&str]] = &[
            &["--listen", "nowhere"],
            &["--database-url", "mysql://x"],
            &["--subject-prefix", "a.>"],
            &["--keepalive-secs", "0"],
            &["--max-body-bytes", "10"],
            &["--replica-id", "has space"],
            &["--nats-url", ","],
            &["--keepalive-secs", "-1"],
            &["--connection-timeout-secs", "0"],
            &["--idle-timeout-secs", "0"],
            &["--max-connections", "0"],
            &["--max-connections", "-5"],
            &["--max-connections-per-ip", "0"],
            &["--max-connections", "10", "--max-connections-per-ip", "11"],
            &["--max-manifest-bytes", "10"],
            &["--max-proposal-bytes", "0"],
            &["--max-page-bytes", "1024"],
            &["--max-pairing-codes-per-user", "0"],
            &["--max-devices-per-user", "0"],
            &["--proposal-retention-days", "0"],
            &["--apply-timeout-secs", "0"],
            &["--apply-timeout-secs", "301"],
            &["--stale-apply-secs", "0"],
            &["--call-log-days", "0"],
            &["--mcp-call-timeout-ms", "0"],
            &["--mcp-call-timeout-ms", "300001"],
            &["--stream-queue-bytes", "1000"],
            &["--tls-cert", "/c.pem"],
            &["--tls-key", "/k.pem"],
            &["--trusted-proxies", "10.0.0.0/33"],
            &["--trusted-proxies", "proxy.example"],
            &["--nats-user", "u"],
            &["--nats-password", "p"],
            &["--nats-token", "t", "--nats-user", "u", "--nats-password", "p"],
            &["--nats-creds-file", "/a.creds", "--nats-nkey-seed-file", "/seed"],
            &["--nats-tls-cert-file", "/c.pem"],
            &["--db-pool-size", "0"],
            &["--max-streams", "0"],
            &["--rebalance-rate", "0"],
            &["--rebalance-threshold-percent", "5000"],
            &["--public-url", "ftp://x"],
            &["--public-url", "https://x/?a=1"],
            &["--public-url", "not a url"],
            &["--device-code-ttl-secs", "0"],
            &["--device-code-interval-secs", "61"],
        ];
        for args in cases {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}
