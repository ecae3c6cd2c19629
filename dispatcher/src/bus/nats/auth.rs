//! How a process of this project proves who it is to NATS and secures the link: one of a
//! credentials file (a user JWT and its nkey seed, as `nsc` writes them), an nkey seed file, a
//! user and password, or a token; and TLS with a private CA and, optionally, a client
//! certificate. [`NatsAuth`] is the validated settings; [`connect_options`] turns them into
//! async-nats options (reading the files); [`describe_connect_error`] words a refusal for an
//! operator.
//!
//! Not here: the flags (see [`crate::config`]) or what the connection carries (see [`super`]).

use std::path::{Path, PathBuf};

use async_nats::{ConnectErrorKind, ConnectOptions};

use crate::bus::BusError;

/// How to authenticate to NATS: at most one of these (the server's `authorization` or
/// operator configuration decides which it expects).
#[derive(Clone, PartialEq, Eq, Default)]
pub enum NatsCredentials {
    /// None besides what the URLs carry (`nats://user:pass@host`, `nats://token@host`).
    #[default]
    None,
    /// A `.creds` file: a user JWT and the nkey seed that signs the server's nonce.
    CredsFile(PathBuf),
    /// A file holding an nkey seed (`SU…`): the server knows the user by its public key.
    NkeySeedFile(PathBuf),
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
}

impl std::fmt::Debug for NatsCredentials {
    // Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::CredsFile(path) => f.debug_tuple("CredsFile").field(path).finish(),
            Self::NkeySeedFile(path) => f.debug_tuple("NkeySeedFile").field(path).finish(),
            Self::UserPassword { user, .. } => {
                f.debug_struct("UserPassword").field("user", user).finish_non_exhaustive()
            }
            Self::Token(_) => f.write_str("Token(…)"),
        }
    }
}

impl NatsCredentials {
    /// The flags that set these credentials, for error messages.
    pub fn flags(&self) -> &'static str {
        match self {
            Self::None => {
                "no NATS credentials were given (--nats-creds-file, --nats-nkey-seed-file, --nats-user \
                           and --nats-password, or --nats-token)"
            }
            Self::CredsFile(_) => "check --nats-creds-file (NATS_CREDS_FILE)",
            Self::NkeySeedFile(_) => "check --nats-nkey-seed-file (NATS_NKEY_SEED_FILE)",
            Self::UserPassword { .. } => "check --nats-user and --nats-password (NATS_USER, NATS_PASSWORD)",
            Self::Token(_) => "check --nats-token (NATS_TOKEN)",
        }
    }
}

/// TLS to NATS. With a CA file, only that CA is trusted (not the system's roots) and TLS is
/// required: a server that offers none is refused. Without one, a server that requires TLS
/// (or a `tls://` URL) is checked against the system's roots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsTls {
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM chain) and its key, for servers that verify clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Validated authentication and TLS settings of a NATS client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsAuth {
    pub credentials: NatsCredentials,
    pub tls: NatsTls,
}

impl NatsAuth {
    /// A short description for the log: which kind of credentials, whether TLS; no secret.
    pub fn describe(&self) -> String {
        let credentials = match &self.credentials {
            NatsCredentials::None => "none",
            NatsCredentials::CredsFile(_) => "credentials file",
            NatsCredentials::NkeySeedFile(_) => "nkey",
            NatsCredentials::UserPassword { .. } => "user and password",
            NatsCredentials::Token(_) => "token",
        };
        let tls = match (&self.tls.ca_file, &self.tls.client) {
            (None, None) => "when the server asks",
            (Some(_), None) => "required, private CA",
            (None, Some(_)) => "client certificate",
            (Some(_), Some(_)) => "required, private CA, client certificate",
        };
        format!("credentials: {credentials}; TLS: {tls}")
    }
}

/// Base options carrying `auth`: credentials read from their files, TLS files checked.
pub async fn connect_options(auth: &NatsAuth) -> Result<ConnectOptions, BusError> {
    let mut options = ConnectOptions::new();
    match &auth.credentials {
        NatsCredentials::None => {}
        NatsCredentials::CredsFile(path) => {
            let text = read_secret(path, "--nats-creds-file").await?;
            options = options
                .credentials(&text)
                .map_err(|error| refused(format!("--nats-creds-file {}: {error}", path.display())))?;
        }
        NatsCredentials::NkeySeedFile(path) => {
            let seed = read_secret(path, "--nats-nkey-seed-file").await?;
            let seed = seed.trim();
            if !is_nkey_seed(seed) {
                return Err(refused(format!(
                    "--nats-nkey-seed-file {}: not an nkey seed (one line starting with \"SU\")",
                    path.display()
                )));
            }
            options = options.nkey(seed.to_owned());
        }
        NatsCredentials::UserPassword { user, password } => {
            options = options.user_and_password(user.clone(), password.clone());
        }
        NatsCredentials::Token(token) => options = options.token(token.clone()),
    }
    if let Some(ca) = &auth.tls.ca_file {
        readable(ca, "--nats-tls-ca-file").await?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &auth.tls.client {
        readable(cert, "--nats-tls-cert-file").await?;
        readable(key, "--nats-tls-key-file").await?;
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// True for an error that retrying will not cure: the server refused the credentials, they
/// could not be used, or TLS failed (an unknown CA, a name mismatch, no TLS offered).
pub fn is_refusal(error: &async_nats::ConnectError) -> bool {
    matches!(error.kind(), ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication)
        || is_tls_failure(error)
}

/// A TLS failure, whether async-nats reports it as such or as the I/O error of a handshake
/// (a certificate that does not verify arrives that way).
fn is_tls_failure(error: &async_nats::ConnectError) -> bool {
    if error.kind() == ConnectErrorKind::Tls {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.downcast_ref::<async_nats::rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.downcast_ref::<async_nats::rustls::Error>().is_some()) {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// One line for an operator: what NATS (at `servers`) said and which flags to check.
pub fn describe_connect_error(error: &async_nats::ConnectError, servers: &str, auth: &NatsAuth) -> String {
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation => format!(
            "NATS at {servers} refused this client's credentials (authorization violation); {}",
            auth.credentials.flags()
        ),
        ConnectErrorKind::Authentication => {
            format!("could not sign NATS's challenge with the given key ({error}); {}", auth.credentials.flags())
        }
        _ if is_tls_failure(error) => format!(
            "TLS with NATS at {servers} failed ({error}); check --nats-tls-ca-file, --nats-tls-cert-file and \
             --nats-tls-key-file, and that the server's certificate names the host in --nats-url"
        ),
        _ => format!("could not connect to NATS at {servers}: {error}"),
    }
}

/// A refusal wording for a client error event of a running client (which carries only the
/// kind of error), or `None` for one worth no more than a debug line.
pub fn describe_client_error(error: &str, auth: &NatsAuth) -> Option<String> {
    if error.contains("authorization violation") {
        Some(format!("NATS refused this replica's credentials (authorization violation); {}", auth.credentials.flags()))
    } else if error.contains("failed signing nonce") {
        Some(format!("could not sign NATS's challenge with the given key; {}", auth.credentials.flags()))
    } else if error.contains("TLS error") {
        Some("TLS with NATS failed; check --nats-tls-ca-file and the server's certificate".into())
    } else {
        None
    }
}

/// `SU` and base32: the shape of a user nkey seed (async-nats checks the rest when signing).
fn is_nkey_seed(seed: &str) -> bool {
    seed.len() >= 50 && seed.starts_with("SU") && seed.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

fn refused(message: String) -> BusError {
    BusError::Refused(message)
}

async fn read_secret(path: &Path, flag: &str) -> Result<String, BusError> {
    tokio::fs::read_to_string(path).await.map_err(|error| refused(format!("{flag} {}: {error}", path.display())))
}

async fn readable(path: &Path, flag: &str) -> Result<(), BusError> {
    tokio::fs::File::open(path).await.map(drop).map_err(|error| refused(format!("{flag} {}: {error}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let auth = NatsAuth {
            credentials: NatsCredentials::UserPassword { user: "dispatcher".into(), password: "hunter2".into() },
            tls: NatsTls::default(),
        };
        let printed = format!("{auth:?}");
        assert!(printed.contains("dispatcher") && !printed.contains("hunter2"), "{printed}");
        let printed = format!("{:?}", NatsCredentials::Token("s3cret-token".into()));
        assert!(!printed.contains("s3cret"), "{printed}");
    }

    #[test]
    fn nkey_seed_shape() {
        assert!(is_nkey_seed("SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"));
        assert!(!is_nkey_seed("UAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"));
        assert!(!is_nkey_seed("SU"));
        assert!(!is_nkey_seed("sUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"));
    }

    #[test]
    fn client_errors_worth_an_error_line() {
        let auth = NatsAuth { credentials: NatsCredentials::Token("t".into()), tls: NatsTls::default() };
        let line = describe_client_error("authorization violation", &auth).expect("a refusal");
        assert!(line.contains("--nats-token"), "{line}");
        assert!(describe_client_error("IO error", &auth).is_none());
        assert!(describe_client_error("TLS error", &auth).is_some());
    }
}
