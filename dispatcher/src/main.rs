//! The `dispatcher` binary: parse the command line, set up logging, then serve (binding the
//! listener and mapping SIGINT/SIGTERM to a graceful shutdown), manage api tokens, or run an
//! operator command against a server's control API (`dispatcher::cli`).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dispatcher::bus::nats::publish_api_token_revocation;
use dispatcher::bus::BusError;
use dispatcher::config::{Cli, Command, TokenCommand};
use dispatcher::registry::{Registry, RegistryError};
use dispatcher::server::ServeError;
use protocol::subject::Subjects;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

/// The global allocator, by Cargo feature: mimalloc by default, jemalloc with `--features
/// jemalloc`, the system's with neither. After a burst of large calls mimalloc gives the memory
/// back to the system, where glibc's malloc keeps most of it (BENCHMARKS.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest `token revoke` spends publishing the revocation on NATS.
const REVOKE_PUBLISH_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let host =
                hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "dispatcher".into());
            let suffix = format!("{:04x}", rand::random::<u16>());
            let settings = match args.settings(&host, &suffix) {
                Ok(settings) => settings,
                Err(message) => {
                    eprintln!("error: {message}");
                    std::process::exit(2);
                }
            };
            let _telemetry = dispatcher::telemetry::init(&settings.replica_id);
            let listener = tokio::net::TcpListener::bind(settings.listen)
                .await
                .with_context(|| format!("binding {}", settings.listen))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(signal_shutdown(shutdown.clone()));
            let database_url = settings.database_url.clone();
            if let Err(error) = dispatcher::server::run(settings, listener, shutdown).await {
                // One line an operator can act on (a database that refuses, a certificate, NATS
                // credentials), on stderr, and a non-zero exit.
                let message = match &error {
                    ServeError::Registry(inner) => database_error_line(&database_url, inner).await,
                    // Refused credentials or TLS: the message names the flags to check.
                    ServeError::Bus(inner @ BusError::Refused(_)) => format!("message broker: {inner}"),
                    ServeError::Bus(inner) => format!("message broker: {inner}; check --nats-url (NATS_URL)"),
                    other => other.to_string(),
                };
                eprintln!("error: {message}");
                std::process::exit(1);
            }
        }
        Command::Migrate(database) => {
            dispatcher::telemetry::init_logging();
            match Registry::connect(&database.database_url).await {
                Ok(registry) => {
                    registry.close().await;
                    eprintln!("database {}: migrations applied", redacted(&database.database_url));
                }
                Err(error) => {
                    eprintln!("error: {}", database_error_line(&database.database_url, &error).await);
                    std::process::exit(1);
                }
            }
        }
        Command::Token { command: TokenCommand::Create { user, name, database } } => {
            dispatcher::telemetry::init_logging();
            let user = user.trim();
            anyhow::ensure!(!user.is_empty(), "--user must not be empty");
            let registry = Registry::connect(&database.database_url).await.context("opening the database")?;
            let token = registry.create_api_token(user, name.as_deref()).await?;
            println!("{token}");
            registry.close().await;
        }
        Command::Token { command: TokenCommand::Revoke { prefix, database, nats_url, subject_prefix, nats_auth } } => {
            dispatcher::telemetry::init_logging();
            let nats_auth = match nats_auth.nats_auth() {
                Ok(auth) => auth,
                Err(message) => {
                    eprintln!("error: {message}");
                    std::process::exit(2);
                }
            };
            anyhow::ensure!(
                protocol::subject::is_valid_prefix(&subject_prefix),
                "--subject-prefix: {subject_prefix:?} must be dot-separated tokens of letters, digits, '-' and '_'"
            );
            let registry = Registry::connect(&database.database_url).await.context("opening the database")?;
            let revoked = registry.revoke_api_token(&prefix).await?;
            registry.close().await;
            anyhow::ensure!(!revoked.is_empty(), "no active api token starts with {prefix:?}");
            eprintln!("revoked {} api token(s)", revoked.len());
            if let Some(urls) = nats_url.filter(|urls| !urls.trim().is_empty()) {
                let subjects = Subjects::new(subject_prefix);
                match publish_api_token_revocation(&urls, &nats_auth, &subjects, &revoked, REVOKE_PUBLISH_TIMEOUT).await
                {
                    Ok(()) => eprintln!("published the revocation on NATS"),
                    // Committed all the same: the replicas poll the database for it.
                    Err(error) => eprintln!(
                        "warning: could not publish the revocation on NATS ({error}); replicas read it from \
                         the database within a second"
                    ),
                }
            }
        }
        Command::Operator(command) => std::process::exit(dispatcher::cli::run(command).await),
    }
    Ok(())
}

/// One line saying why the database at `url` could not be used. A pool that timed out hides
/// the cause (sqlx retries until its acquire timeout), so one direct connection is tried to
/// name it (refused, unknown host, bad password, ...).
async fn database_error_line(url: &str, error: &RegistryError) -> String {
    let mut line = format!("database {}: {error}", redacted(url));
    if matches!(error, RegistryError::Database(sqlx::Error::PoolTimedOut)) {
        let attempt = tokio::time::timeout(Duration::from_secs(5), sqlx::AnyConnection::connect(url)).await;
        if let Ok(Err(cause)) = attempt {
            line.push_str(&format!(" (the last attempt: {cause})"));
        }
    }
    line.push_str("; check --database-url (DATABASE_URL)");
    line.replace('\n', " ")
}

/// A database URL fit for a log line: a password in it is replaced by `***`, and a query
/// string (which may carry one too) is left out.
fn redacted(url: &str) -> String {
    let url = url.split('?').next().unwrap_or(url);
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => format!("{scheme}://{credentials}@{host}{path}"),
        },
        None => url.to_owned(),
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn signal_shutdown(shutdown: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        _ = terminate => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn database_urls_lose_their_passwords() {
        for (url, shown) in [
            ("postgres://app:s3cret@db:5432/app?sslmode=require", "postgres://app:***@db:5432/app"),
            ("postgres://app@db/app", "postgres://app@db/app"),
            ("postgres://db:5432/app", "postgres://db:5432/app"),
            ("postgres://a:b:c@db/app", "postgres://a:***@db/app"),
            ("sqlite://dispatcher.db?mode=rwc", "sqlite://dispatcher.db"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }
}
