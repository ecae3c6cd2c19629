//! HTTPS on the listener, for installs without a TLS-terminating proxy: the certificate chain
//! and key of `--tls-cert`/`--tls-key` (PEM), offered with ALPN `h2` and `http/1.1`, TLS 1.2
//! and 1.3 (rustls with ring).
//!
//! The files are read at start (a bad file stops the start with a message naming it) and
//! looked at again every [`RELOAD_INTERVAL`]: when either changed (a renewal, a Kubernetes
//! secret update), the pair is loaded again and new handshakes use it; a pair that does not
//! load is logged and the one in use kept.
//!
//! Not here: the handshake's deadline and what is served after it (see [`super`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;

/// How often the certificate files are checked for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The protocols offered in ALPN, preferred first.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The certificate in use, and how to tell when its files changed.
#[derive(Debug)]
pub struct CertificateSource {
    files: TlsFiles,
    current: RwLock<(Arc<CertifiedKey>, Stamp)>,
}

/// Modification time and length of both files.
type Stamp = [Option<(SystemTime, u64)>; 2];

impl CertificateSource {
    /// Loads the pair; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let stamp = stamp(&files);
        let key = certified_key(&files)?;
        Ok(Arc::new(Self { files, current: RwLock::new((key, stamp)) }))
    }

    /// Loads the pair again if either file changed since it was last loaded. `Ok(true)` when a
    /// new pair is in use.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let stamp = stamp(&self.files);
        if self.current.read().1 == stamp {
            return Ok(false);
        }
        let loaded = certified_key(&self.files);
        let mut current = self.current.write();
        // Tried once per change: a half-written pair is retried when it changes again.
        current.1 = stamp;
        current.0 = loaded?;
        Ok(true)
    }

    /// An acceptor with this source's certificate, offering `alpn` (see [`ALPN`]).
    pub fn acceptor(self: &Arc<Self>, alpn: &[&[u8]]) -> TlsAcceptor {
        let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }

    /// Checks the files every [`RELOAD_INTERVAL`] until `cancel`.
    pub async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        let mut interval = tokio::time::interval(RELOAD_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = interval.tick() => {}
            }
            let source = self.clone();
            match tokio::task::spawn_blocking(move || source.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "TLS certificate changed but could not be loaded; keeping the one in use")
                }
                Err(error) => tracing::warn!(%error, "TLS certificate check failed"),
            }
        }
    }
}

impl ResolvesServerCert for CertificateSource {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().0.clone())
    }
}

fn stamp(files: &TlsFiles) -> Stamp {
    let of = |path: &Path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    [of(&files.cert), of(&files.key)]
}

fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, String> {
    let cert_path = files.cert.display();
    let key_path = files.key.display();
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("--tls-cert {cert_path}: {error}"))?;
    if certs.is_empty() {
        return Err(format!("--tls-cert {cert_path}: no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| format!("--tls-key {key_path}: {error}"))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    CertifiedKey::from_der(certs, key, &provider)
        .map(Arc::new)
        .map_err(|error| format!("--tls-cert {cert_path} with --tls-key {key_path}: {error}"))
}
