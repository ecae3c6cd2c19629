//! The flags of the secured edges: how the dispatcher authenticates to NATS and encrypts that
//! link ([`NatsAuthArgs`], for `serve` and `token revoke`), and how its HTTP listener serves TLS
//! and which proxies in front of it are believed ([`ListenerArgs`]). Validation is pure: files
//! are read when they are used.

use std::path::PathBuf;

use clap::Args;

use crate::bus::nats::{NatsAuth, NatsCredentials, NatsTls};
use crate::http::proxy::TrustedProxies;

#[derive(Clone, Default, Args)]
pub struct NatsAuthArgs {
    /// NATS credentials file (a user JWT and its nkey seed, as `nsc` writes it).
    #[arg(long, value_name = "FILE", env = "NATS_CREDS_FILE")]
    pub nats_creds_file: Option<PathBuf>,
    /// File holding an nkey seed (`SU…`) the NATS server knows by its public key.
    #[arg(long, value_name = "FILE", env = "NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// NATS user name (with --nats-password).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// PEM file of the CA(s) that sign the NATS servers' certificates: TLS becomes required
    /// and only these CAs are trusted.
    #[arg(long, value_name = "PEM", env = "NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM chain) for NATS servers that verify clients (with
    /// --nats-tls-key-file).
    #[arg(long, value_name = "PEM", env = "NATS_TLS_CERT_FILE")]
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --nats-tls-cert-file.
    #[arg(long, value_name = "PEM", env = "NATS_TLS_KEY_FILE")]
    pub nats_tls_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for NatsAuthArgs {
    // Never prints the password or the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuthArgs")
            .field("nats_creds_file", &self.nats_creds_file)
            .field("nats_nkey_seed_file", &self.nats_nkey_seed_file)
            .field("nats_user", &self.nats_user)
            .field("nats_password", &self.nats_password.as_ref().map(|_| "…"))
            .field("nats_token", &self.nats_token.as_ref().map(|_| "…"))
            .field("nats_tls_ca_file", &self.nats_tls_ca_file)
            .field("nats_tls_cert_file", &self.nats_tls_cert_file)
            .field("nats_tls_key_file", &self.nats_tls_key_file)
            .finish()
    }
}

/// An empty value counts as unset (a manifest may set an optional variable to "").
fn given<T: AsRef<std::ffi::OsStr> + Clone>(value: &Option<T>) -> Option<T> {
    value.as_ref().filter(|v| !v.as_ref().is_empty()).cloned()
}

impl NatsAuthArgs {
    pub fn nats_auth(&self) -> Result<NatsAuth, String> {
        let creds = given(&self.nats_creds_file);
        let seed = given(&self.nats_nkey_seed_file);
        let user = given(&self.nats_user);
        let password = given(&self.nats_password);
        let token = given(&self.nats_token);
        let kinds = [creds.is_some(), seed.is_some(), user.is_some() || password.is_some(), token.is_some()];
        if kinds.iter().filter(|&&kind| kind).count() > 1 {
            return Err("NATS credentials: give one of --nats-creds-file, --nats-nkey-seed-file, --nats-user with \
                        --nats-password, or --nats-token"
                .into());
        }
        let credentials = match (creds, seed, user, password, token) {
            (Some(path), ..) => NatsCredentials::CredsFile(path),
            (_, Some(path), ..) => NatsCredentials::NkeySeedFile(path),
            (_, _, Some(user), Some(password), _) => NatsCredentials::UserPassword { user, password },
            (_, _, Some(_), None, _) => return Err("--nats-user needs --nats-password".into()),
            (_, _, None, Some(_), _) => return Err("--nats-password needs --nats-user".into()),
            (.., Some(token)) => NatsCredentials::Token(token),
            _ => NatsCredentials::None,
        };
        let client = match (given(&self.nats_tls_cert_file), given(&self.nats_tls_key_file)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err("--nats-tls-cert-file and --nats-tls-key-file go together".into()),
        };
        Ok(NatsAuth { credentials, tls: NatsTls { ca_file: given(&self.nats_tls_ca_file), client } })
    }
}

#[derive(Debug, Clone, Default, Args)]
pub struct ListenerArgs {
    /// Serve HTTPS with this certificate chain (PEM; with --tls-key): HTTP/2 and HTTP/1.1.
    /// Re-read when the file changes.
    #[arg(long, value_name = "PEM", env = "DISPATCHER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, value_name = "PEM", env = "DISPATCHER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Proxies whose `X-Forwarded-For`/`Forwarded` headers are believed: comma-separated CIDRs
    /// or addresses (e.g. the load balancer's subnet). Rate limits and logs then key on the
    /// client they name.
    #[arg(long, value_name = "CIDRS", env = "DISPATCHER_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
}

/// The certificate and key files of the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ListenerArgs {
    pub fn tls(&self) -> Result<Option<TlsFiles>, String> {
        match (given(&self.tls_cert), given(&self.tls_key)) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
            (None, None) => Ok(None),
            _ => Err("--tls-cert and --tls-key go together".into()),
        }
    }

    pub fn trusted_proxies(&self) -> Result<TrustedProxies, String> {
        TrustedProxies::parse(self.trusted_proxies.as_deref().unwrap_or_default())
            .map_err(|error| format!("--trusted-proxies: {error}"))
    }
}
