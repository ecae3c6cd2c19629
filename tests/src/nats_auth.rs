//! NATS servers that demand credentials, for the suites that test the dispatcher's NATS
//! authentication: [`NatsAuthSetup::new`] writes a `nats-server` configuration for one kind of
//! credentials ([`AuthKind`]), optionally with TLS (and client certificates), and gives the
//! environment a replica needs to pass (`NATS_USER`, `NATS_CREDS_FILE`, …).
//!
//! Credentials files need an operator, an account and a user signed as JWTs: they are made
//! here with the `nkeys` crate (ed25519), in the shape `nsc` writes, and loaded into the server
//! with a memory resolver.
//!
//! Not here: starting the server (see [`crate::nats`]).

use std::path::PathBuf;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nkeys::KeyPair;
use serde_json::{json, Value};

use crate::tls::{Issued, TestCa};

/// Which kind of credentials the server demands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    UserPassword,
    Token,
    Nkey,
    /// Operator mode: a `.creds` file (user JWT and nkey seed).
    CredsFile,
}

/// TLS of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    /// TLS required; clients trust the test CA.
    On,
    /// TLS required, and every client must show a certificate of the test CA.
    VerifyClients,
}

/// A server configuration and what a replica passes to satisfy it.
#[derive(Debug)]
pub struct NatsAuthSetup {
    /// The `nats-server` configuration text (see [`crate::nats::NatsOptions::config`]).
    pub server_config: String,
    /// Environment of a replica that authenticates correctly.
    pub env: Vec<(String, String)>,
    /// The CA of the server's certificate, when TLS is on.
    pub ca: Option<TestCa>,
    dir: tempfile::TempDir,
}

impl NatsAuthSetup {
    pub fn new(kind: AuthKind, tls: TlsMode) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("e2e-nats-auth-").tempdir()?;
        let mut env: Vec<(String, String)> = Vec::new();
        let mut config = String::new();
        match kind {
            AuthKind::UserPassword => {
                config
                    .push_str("authorization {\n  users = [ { user: \"dispatcher\", password: \"s3cret-pw\" } ]\n}\n");
                env.push(("NATS_USER".into(), "dispatcher".into()));
                env.push(("NATS_PASSWORD".into(), "s3cret-pw".into()));
            }
            AuthKind::Token => {
                config.push_str("authorization {\n  token: \"t0ken-of-the-dispatchers\"\n}\n");
                env.push(("NATS_TOKEN".into(), "t0ken-of-the-dispatchers".into()));
            }
            AuthKind::Nkey => {
                let user = KeyPair::new_user();
                config
                    .push_str(&format!("authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}\n", user.public_key()));
                let seed = dir.path().join("dispatcher.nk");
                std::fs::write(&seed, format!("{}\n", user.seed()?))?;
                env.push(("NATS_NKEY_SEED_FILE".into(), seed.display().to_string()));
            }
            AuthKind::CredsFile => {
                let operator = KeyPair::new_operator();
                let account = KeyPair::new_account();
                let user = KeyPair::new_user();
                let operator_jwt =
                    jwt(&operator, &operator, "e2e-operator", json!({"type": "operator", "version": 2}))?;
                let limits = json!({
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1
                });
                let account_jwt = jwt(
                    &operator,
                    &account,
                    "dispatch",
                    json!({"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}),
                )?;
                let user_jwt = jwt(
                    &account,
                    &user,
                    "dispatcher",
                    json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
                )?;
                config.push_str(&format!(
                    "operator: \"{operator_jwt}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{account_jwt}\"\n}}\n",
                    account.public_key()
                ));
                let creds = dir.path().join("dispatcher.creds");
                std::fs::write(&creds, creds_file(&user_jwt, &user.seed()?))?;
                env.push(("NATS_CREDS_FILE".into(), creds.display().to_string()));
            }
        }
        let ca = match tls {
            TlsMode::Off => None,
            TlsMode::On | TlsMode::VerifyClients => {
                let ca = TestCa::new("e2e NATS CA")?;
                let Issued { cert, key } = ca.server("nats")?;
                let verify = if tls == TlsMode::VerifyClients { "  verify: true\n" } else { "" };
                config.push_str(&format!(
                    "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n{verify}  timeout: 5\n}}\n",
                    cert.display(),
                    key.display(),
                    ca.cert().display()
                ));
                env.push(("NATS_TLS_CA_FILE".into(), ca.cert().display().to_string()));
                if tls == TlsMode::VerifyClients {
                    let client = ca.client("dispatcher")?;
                    env.push(("NATS_TLS_CERT_FILE".into(), client.cert.display().to_string()));
                    env.push(("NATS_TLS_KEY_FILE".into(), client.key.display().to_string()));
                }
                Some(ca)
            }
        };
        Ok(Self { server_config: config, env, ca, dir })
    }

    /// The value of one variable of [`NatsAuthSetup::env`].
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// A directory for more files of the test.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

/// A JWT of NATS (`ed25519-nkey`): `claims` under `nats`, issued by `issuer` about `subject`.
fn jwt(issuer: &KeyPair, subject: &KeyPair, name: &str, nats: Value) -> anyhow::Result<String> {
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let issued_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let claims = json!({
        "jti": jti(),
        "iat": issued_at,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject.public_key(),
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
    );
    let signature = issuer.sign(signed.as_bytes())?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// A unique id of a JWT (base32 letters and digits, as `nsc` makes them).
fn jti() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..52).map(|_| char::from(ALPHABET[rand::random::<u32>() as usize % ALPHABET.len()])).collect()
}

/// A `.creds` file as `nsc` writes it.
fn creds_file(user_jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}
