//! The OS secret store that can hold a device token instead of the credentials file: the macOS
//! Keychain, the Windows Credential Manager, and on Linux the Secret Service (GNOME Keyring,
//! KWallet, KeePassXC over D-Bus) or the kernel keyring (keyutils), through the `keyring` crate.
//!
//! A token is one entry, service [`SERVICE`] and account the server origin
//! (`https://pulsn.internal:443`), so a machine enrolled with several servers keeps one token
//! per server. [`SecretStore::probe`] writes, reads back and deletes a throwaway entry: a store
//! answers only when all three work, in bounded time. Every operation runs on a helper thread
//! and is given up after [`PATIENCE`], because a Secret Service may wait on an unlock prompt
//! nobody answers on a headless machine.
//!
//! The kernel keyring keeps keys in memory: a reboot clears it, and its per-user persistent
//! keyring expires after `/proc/sys/kernel/keys/persistent_keyring_expiry` seconds (3 days by
//! default) without use. So [`Backend::durable`] is false for it: `auto` never picks it, and
//! `keyring` picks it only where no Secret Service answers, with a warning. Its keys are put in
//! the process's session keyring (a fresh one when the agent was started without one, as from
//! cron or a container) and linked into the persistent keyring, where the next run of the agent
//! finds them.
//!
//! Not here: which store a run uses and where the rest of the credentials live
//! ([`crate::credentials`]), and the command line ([`crate::config`]).

use std::fmt;
use std::sync::mpsc;
use std::time::Duration;

use keyring::Entry;

/// The service name every token entry is stored under; the account is the server origin.
pub const SERVICE: &str = "fusion-host";

/// How long one operation on a secret store may take before it counts as not answering.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// One kind of OS secret store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The freedesktop.org Secret Service over the D-Bus session bus (Linux, BSD).
    SecretService,
    /// The Linux kernel's key retention service (keyutils): session and persistent keyrings.
    KernelKeyring,
    /// The macOS login Keychain.
    Keychain,
    /// The Windows Credential Manager.
    CredentialManager,
}

impl Backend {
    /// Every backend this build can use on this OS, the preferred first.
    pub fn available() -> &'static [Backend] {
        if cfg!(target_os = "linux") {
            &[Backend::SecretService, Backend::KernelKeyring]
        } else if cfg!(target_os = "macos") {
            &[Backend::Keychain]
        } else if cfg!(windows) {
            &[Backend::CredentialManager]
        } else {
            &[]
        }
    }

    /// Whether a token kept here survives a reboot.
    pub fn durable(self) -> bool {
        !matches!(self, Backend::KernelKeyring)
    }

    /// The name the credentials file records and the logs show.
    pub fn id(self) -> &'static str {
        match self {
            Backend::SecretService => "secret-service",
            Backend::KernelKeyring => "kernel-keyring",
            Backend::Keychain => "keychain",
            Backend::CredentialManager => "credential-manager",
        }
    }

    /// The backend named `id` (see [`Backend::id`]).
    pub fn from_id(id: &str) -> Option<Backend> {
        [Backend::SecretService, Backend::KernelKeyring, Backend::Keychain, Backend::CredentialManager]
            .into_iter()
            .find(|backend| backend.id() == id)
    }

    /// What a person calls it.
    pub fn describe(self) -> &'static str {
        match self {
            Backend::SecretService => "the Secret Service (D-Bus)",
            Backend::KernelKeyring => "the Linux kernel keyring",
            Backend::Keychain => "the macOS Keychain",
            Backend::CredentialManager => "the Windows Credential Manager",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why a secret store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretStoreError {
    /// The store is not there, refused, or failed.
    #[error("{backend} failed: {message}")]
    Failed { backend: Backend, message: String },
    /// The store did not answer within [`PATIENCE`] (a locked keyring waiting on a prompt).
    #[error("{backend} did not answer within {} s", PATIENCE.as_secs())]
    NoAnswer { backend: Backend },
}

/// A secret store that answered a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretStore {
    backend: Backend,
}

impl SecretStore {
    /// `backend` as a store, without probing it (for reading or deleting a token recorded
    /// there).
    pub fn unprobed(backend: Backend) -> Self {
        Self { backend }
    }

    /// Writes, reads back and deletes a throwaway entry in `backend`: the store if all three
    /// work within [`PATIENCE`] each.
    pub fn probe(backend: Backend) -> Result<Self, SecretStoreError> {
        let store = Self { backend };
        let account = format!("probe-{}-{:016x}", std::process::id(), rand::random::<u64>());
        let value = format!("{:032x}", rand::random::<u128>());
        store.set(&account, &value)?;
        let read = store.get(&account);
        let deleted = store.delete(&account);
        match read? {
            Some(back) if back == value => {}
            Some(_) => return Err(store.failed("the probe entry read back different from what was written")),
            None => return Err(store.failed("the probe entry was gone right after it was written")),
        }
        deleted?;
        Ok(store)
    }

    /// The first of `backends` that answers a probe, with the failures of those before it.
    pub fn first_answering(backends: &[Backend]) -> (Option<Self>, Vec<SecretStoreError>) {
        let mut failures = Vec::new();
        for &backend in backends {
            match Self::probe(backend) {
                Ok(store) => return (Some(store), failures),
                Err(err) => failures.push(err),
            }
        }
        (None, failures)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The token stored for `origin`, or `None` when there is none.
    pub fn get(&self, origin: &str) -> Result<Option<String>, SecretStoreError> {
        let backend = self.backend;
        let origin = origin.to_owned();
        self.bounded(move || match entry(backend, &origin)?.get_password() {
            Ok(token) => Ok(Some(token)),
            Err(keyring::Error::NoEntry) => Ok(None),
            Err(err) => Err(err),
        })
    }

    /// Stores `token` for `origin`, replacing any token stored before.
    pub fn set(&self, origin: &str, token: &str) -> Result<(), SecretStoreError> {
        let backend = self.backend;
        let (origin, token) = (origin.to_owned(), token.to_owned());
        self.bounded(move || entry(backend, &origin)?.set_password(&token))
    }

    /// Deletes the token of `origin`. True when there was one.
    pub fn delete(&self, origin: &str) -> Result<bool, SecretStoreError> {
        let backend = self.backend;
        let origin = origin.to_owned();
        self.bounded(move || match entry(backend, &origin)?.delete_credential() {
            Ok(()) => Ok(true),
            Err(keyring::Error::NoEntry) => Ok(false),
            Err(err) => Err(err),
        })
    }

    fn failed(&self, message: impl Into<String>) -> SecretStoreError {
        SecretStoreError::Failed { backend: self.backend, message: message.into() }
    }

    /// Runs `work` on a helper thread and waits at most [`PATIENCE`] for it. A thread that
    /// does not finish is left behind (it holds no lock of ours).
    fn bounded<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, keyring::Error> + Send + 'static,
    ) -> Result<T, SecretStoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new().name("secret-store".into()).spawn(move || {
            let _ = tx.send(work().map_err(|err| err.to_string()));
        });
        if let Err(err) = spawned {
            return Err(self.failed(format!("cannot start a thread: {err}")));
        }
        match rx.recv_timeout(PATIENCE) {
            Ok(done) => done.map_err(|message| self.failed(message)),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(SecretStoreError::NoAnswer { backend: self.backend }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.failed("the operation panicked")),
        }
    }
}

/// The `keyring` entry of `origin`'s token in `backend`.
fn entry(backend: Backend, origin: &str) -> Result<Entry, keyring::Error> {
    match backend {
        #[cfg(target_os = "linux")]
        Backend::SecretService => Ok(Entry::new_with_credential(Box::new(
            keyring::secret_service::SsCredential::new_with_target(None, SERVICE, origin)?,
        ))),
        #[cfg(target_os = "linux")]
        Backend::KernelKeyring => Ok(Entry::new_with_credential(Box::new(kernel::credential(origin)?))),
        #[cfg(target_os = "macos")]
        Backend::Keychain => Entry::new(SERVICE, origin),
        #[cfg(windows)]
        Backend::CredentialManager => Entry::new(SERVICE, origin),
        #[allow(unreachable_patterns)]
        other => Err(keyring::Error::NoStorageAccess(format!("{other} is not available on this OS").into())),
    }
}

#[cfg(target_os = "linux")]
mod kernel {
    use keyring::keyutils::KeyutilsCredential;
    use linux_keyutils::{KeyError, KeyRing, KeyRingIdentifier};

    /// The kernel keyring credential of `origin`: the key `keyring-rs:{origin}@fusion-host` in
    /// the process's session keyring, linked into the user's persistent keyring.
    ///
    /// Unlike `keyring`'s own constructor, a process without a session keyring gets a fresh one
    /// rather than the user's shared default, which a container may not let it search; and the
    /// persistent keyring is required, since without it the key would die with this process.
    pub fn credential(origin: &str) -> Result<KeyutilsCredential, keyring::Error> {
        let session = KeyRing::from_special_id(KeyRingIdentifier::Session, true).map_err(failure)?;
        let persistent = KeyRing::get_persistent(KeyRingIdentifier::Session).map_err(|err| {
            keyring::Error::NoStorageAccess(
                format!("no persistent keyring ({err}): a key would not outlive this process").into(),
            )
        })?;
        Ok(KeyutilsCredential {
            session,
            persistent: Some(persistent),
            description: format!("keyring-rs:{origin}@{}", super::SERVICE),
        })
    }

    fn failure(err: KeyError) -> keyring::Error {
        keyring::Error::PlatformFailure(format!("{err:?}").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for backend in [Backend::SecretService, Backend::KernelKeyring, Backend::Keychain, Backend::CredentialManager] {
            assert_eq!(Backend::from_id(backend.id()), Some(backend));
        }
        assert_eq!(Backend::from_id("file"), None);
    }

    #[test]
    fn only_the_kernel_keyring_forgets_at_reboot() {
        assert!(!Backend::KernelKeyring.durable());
        assert!(
            Backend::SecretService.durable() && Backend::Keychain.durable() && Backend::CredentialManager.durable()
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_prefers_the_secret_service() {
        assert_eq!(Backend::available(), [Backend::SecretService, Backend::KernelKeyring]);
    }

    /// The kernel keyring round trip: every Linux machine the project is tested on has one.
    #[cfg(target_os = "linux")]
    #[test]
    fn kernel_keyring_round_trip() {
        let store = SecretStore::probe(Backend::KernelKeyring).expect("the kernel keyring answers");
        let origin = format!("http://unit-test-{:x}:1", rand::random::<u64>());
        assert_eq!(store.get(&origin).expect("get"), None);
        store.set(&origin, "first").expect("set");
        store.set(&origin, "second").expect("replace");
        assert_eq!(store.get(&origin).expect("get").as_deref(), Some("second"));
        assert!(store.delete(&origin).expect("delete"));
        assert_eq!(store.get(&origin).expect("get after delete"), None);
        assert!(!store.delete(&origin).expect("delete twice"));
    }
}
