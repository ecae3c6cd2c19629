//! The command line and environment of the `dispatcher` binary (clap derive, `env =` on every
//! flag; the flag wins). Validation is pure: [`ServeArgs::settings`] turns arguments into
//! [`Settings`] or a message, and touches nothing.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
    Serve(ServeArgs),
    /// Manage api tokens (the app backend's credentials).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
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
    /// Seconds a connection may take to send a request's headers, and may sit idle between
    /// requests.
    #[arg(long, env = "DISPATCHER_HEADER_TIMEOUT_SECS", default_value_t = 30)]
    pub header_timeout_secs: u64,
    /// Bytes of call JSON a device stream may have waiting to be written; calls beyond wait
    /// for room. A stream that does not drain for two keepalive intervals is dropped.
    #[arg(long, env = "DISPATCHER_STREAM_QUEUE_BYTES", default_value_t = crate::core::hub::STREAM_QUEUE_BYTES)]
    pub stream_queue_bytes: usize,
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
    pub header_timeout: Duration,
    pub stream_queue_bytes: usize,
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
        if self.max_body_bytes < 1024 {
            return Err("--max-body-bytes: at least 1024".into());
        }
        if self.header_timeout_secs == 0 {
            return Err("--header-timeout-secs: at least 1".into());
        }
        if self.stream_queue_bytes < 65_536 {
            return Err("--stream-queue-bytes: at least 65536".into());
        }
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
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            stream_queue_bytes: self.stream_queue_bytes,
        })
    }
}

impl Settings {
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
            header_timeout: Duration::from_secs(30),
            stream_queue_bytes: crate::core::hub::STREAM_QUEUE_BYTES,
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
            Command::Token { .. } => Err("not serve".into()),
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
            &["--stream-queue-bytes", "1000"],
        ];
        for args in cases {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}
