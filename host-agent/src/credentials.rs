//! The credential cache: one small JSON file per server origin, readable only by the user.
//!
//! Enrollment trades a one-time pairing code for a durable `{deviceId, token}`; this module keeps
//! that pair on disk so later runs need no code. Files live in the credentials directory
//! (default `~/.fusion-host`, created with mode 0700; an existing one that others can enter or
//! read, and credentials files others can read, are tightened when the agent starts, see
//! [`CredentialStore::tighten`]) and are named after the server's origin
//! (`scheme://host:port`, e.g. `https_pulsn.internal_443.json`). Each is written atomically (a
//! fresh temporary file created with mode 0600 in the same directory, synced, then renamed over
//! the old one), so a crash never leaves a half-written token behind.
//!
//! With an OS secret store ([`CredentialStore::with_secret_store`], `--credentials-store`), the
//! token goes there instead ([`crate::secret_store`], keyed by the same origin) and the file keeps
//! only what is not secret: the device id, the origin, and which store holds the token
//! (`"tokenStore": "secret-service"`). A file that holds a token and a file that points to a
//! store both load, whichever store the run was given, so changing `--credentials-store` moves
//! the token at the next start ([`CredentialStore::save`] writes it where the run keeps tokens
//! and removes it from the other place). [`CredentialStore::delete`] removes the token from
//! wherever it may be: the file, the store the file names, and every secret store of this OS.
//!
//! The token never reaches a log: [`Credentials`]' `Debug` redacts it.
//!
//! Not here: deciding when to enroll or forget (the runtime), talking to the OS secret stores
//! ([`crate::secret_store`]).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::secret_store::{Backend, SecretStore, SecretStoreError};

/// What a device needs to dial its server: the id the server gave it and its bearer token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub device_id: String,
    pub token: String,
    /// The origin these credentials are cached under (`scheme://host:port`).
    pub server: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("device_id", &self.device_id)
            .field("token", &"<redacted>")
            .field("server", &self.server)
            .finish()
    }
}

/// What a credentials file holds: the token itself, or the name of the secret store that
/// does (never both).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileRecord {
    device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_store: Option<String>,
}

/// Where a device token is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPlace {
    /// In the credentials file itself (mode 0600).
    File,
    /// In an OS secret store; the file names it.
    SecretStore(Backend),
}

impl fmt::Display for TokenPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenPlace::File => f.write_str("the credentials file"),
            TokenPlace::SecretStore(backend) => backend.fmt(f),
        }
    }
}

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot access the credentials at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the credentials file {path} is unreadable ({source}); delete it and enroll again with --code")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error(
        "the credentials file {path} names an unknown token store {store:?}; delete it and enroll again with --code"
    )]
    UnknownStore { path: PathBuf, store: String },
    #[error("cannot keep the device token in the OS secret store: {0}")]
    SecretStore(#[from] SecretStoreError),
}

/// Where `host-agent run` keeps device tokens (`--credentials-store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StoreChoice {
    /// The OS secret store where one answers and keeps tokens across reboots; the file
    /// otherwise.
    #[default]
    Auto,
    /// The OS secret store, or fail; on Linux the kernel keyring when no Secret Service
    /// answers.
    Keyring,
    /// The credentials file (mode 0600).
    File,
}

impl StoreChoice {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreChoice::Auto => "auto",
            StoreChoice::Keyring => "keyring",
            StoreChoice::File => "file",
        }
    }
}

/// The OS secret store a run with `choice` keeps tokens in (`None`: the file), probing the
/// candidates of this OS in order; logs which it picked and why. An error (for `keyring` when
/// no store answers) says what to do instead.
pub fn open_secret_store(choice: StoreChoice) -> Result<Option<SecretStore>, String> {
    let candidates: Vec<Backend> = match choice {
        StoreChoice::File => {
            tracing::info!(
                "credentials store: file (--credentials-store file): device tokens are kept in mode 0600 files"
            );
            return Ok(None);
        }
        StoreChoice::Auto => Backend::available().iter().copied().filter(|b| b.durable()).collect(),
        StoreChoice::Keyring => Backend::available().to_vec(),
    };
    let (found, failures) = SecretStore::first_answering(&candidates);
    let reasons = failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    match (choice, found) {
        (_, Some(store)) => {
            let backend = store.backend();
            tracing::info!(
                "credentials store: {} (--credentials-store {}): device tokens are kept there, the device id and \
                 server in the credentials file",
                backend,
                choice.as_str()
            );
            if !backend.durable() {
                tracing::warn!(
                    "{backend} forgets the device token at reboot, and when the persistent keyring expires unused \
                     (/proc/sys/kernel/keys/persistent_keyring_expiry): enroll again then, or run a Secret Service \
                     (GNOME Keyring, KWallet) to keep it{}",
                    if reasons.is_empty() { String::new() } else { format!(" (none answered: {reasons})") }
                );
            }
            Ok(Some(store))
        }
        (StoreChoice::Keyring, None) => Err(format!(
            "--credentials-store keyring: no OS secret store answered{}; use --credentials-store auto or file",
            if reasons.is_empty() {
                " (this OS has none this build can use)".to_owned()
            } else {
                format!(": {reasons}")
            }
        )),
        (_, None) => {
            tracing::info!(
                "credentials store: file (--credentials-store auto: no OS secret store answered{}): device tokens \
                 are kept in mode 0600 files",
                if reasons.is_empty() { String::new() } else { format!(": {reasons}") }
            );
            Ok(None)
        }
    }
}

/// `scheme://host:port` of a server URL, with the scheme's default port made explicit, so
/// `https://a.example` and `https://a.example:443/` share credentials. `None` for URLs without
/// a host.
pub fn origin_of(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    Some(format!("{}://{}:{}", url.scheme(), host.to_ascii_lowercase(), port))
}

/// The file name an origin's credentials are stored under: its characters outside
/// `[A-Za-z0-9.-]` become `_`, and `://` and `:` separate the parts.
pub fn file_name_for(origin: &str) -> String {
    let cleaned: String = origin
        .replacen("://", "_", 1)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect();
    format!("{cleaned}.json")
}

/// The directory of cached credentials, and the OS secret store that holds their tokens, if
/// any.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    dir: PathBuf,
    secrets: Option<SecretStore>,
}

impl CredentialStore {
    /// Credentials in `dir`, tokens included (the `file` store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), secrets: None }
    }

    /// Keeps the tokens saved from now on in `secrets` (the file keeps the rest), or in the
    /// file when `None`.
    pub fn with_secret_store(mut self, secrets: Option<SecretStore>) -> Self {
        self.secrets = secrets;
        self
    }

    /// The OS secret store that new tokens go to, if any.
    pub fn secret_store(&self) -> Option<SecretStore> {
        self.secrets
    }

    /// Where [`Self::save`] puts a token.
    pub fn token_place(&self) -> TokenPlace {
        self.secrets.map_or(TokenPlace::File, |store| TokenPlace::SecretStore(store.backend()))
    }

    /// The default directory: `~/.fusion-host`.
    pub fn default_dir() -> Option<PathBuf> {
        home_dir().map(|home| home.join(".fusion-host"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes group and other permissions off the directory (to 0700) and off every credentials
    /// file in it (to 0600), saying so in the log, where they were looser; best effort (a failure
    /// is logged, and the run goes on). Returns how many were tightened.
    pub fn tighten(&self) -> usize {
        let mut tightened = usize::from(tighten_mode(&self.dir, "directory"));
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.filter_map(Result::ok) {
                let is_credentials = entry.file_name().to_string_lossy().ends_with(".json");
                if is_credentials && entry.file_type().is_ok_and(|kind| kind.is_file()) {
                    tightened += usize::from(tighten_mode(&entry.path(), "file"));
                }
            }
        }
        tightened
    }

    /// Where the credentials of `origin` live.
    pub fn path_for(&self, origin: &str) -> PathBuf {
        self.dir.join(file_name_for(origin))
    }

    /// The cached credentials for `origin`, or `None` when there are none.
    pub fn load(&self, origin: &str) -> Result<Option<Credentials>, CredentialsError> {
        Ok(self.load_placed(origin)?.map(|(credentials, _)| credentials))
    }

    /// The cached credentials for `origin` and where their token was found, or `None` when
    /// there are none. A file that points to a secret store which no longer holds the token
    /// (the kernel keyring is cleared at reboot) counts as none, with a warning.
    pub fn load_placed(&self, origin: &str) -> Result<Option<(Credentials, TokenPlace)>, CredentialsError> {
        let path = self.path_for(origin);
        let Some(record) = self.read_record(&path)? else {
            return Ok(None);
        };
        let (token, place) = match (record.token, record.token_store) {
            (Some(token), _) => (token, TokenPlace::File),
            (None, Some(id)) => {
                let Some(backend) = Backend::from_id(&id) else {
                    return Err(CredentialsError::UnknownStore { path, store: id });
                };
                match SecretStore::unprobed(backend).get(origin)? {
                    Some(token) => (token, TokenPlace::SecretStore(backend)),
                    None => {
                        tracing::warn!(
                            "{} says the device token of {origin} is in {backend}, but it is not there any more{}",
                            path.display(),
                            if backend.durable() { "" } else { " (it is cleared at reboot)" }
                        );
                        return Ok(None);
                    }
                }
            }
            (None, None) => {
                let source = serde::de::Error::missing_field("token");
                return Err(CredentialsError::Corrupt { path, source });
            }
        };
        let credentials = Credentials { device_id: record.device_id, token, server: record.server };
        Ok(Some((credentials, place)))
    }

    /// The file of `path`, or `None` when there is none.
    fn read_record(&self, path: &Path) -> Result<Option<FileRecord>, CredentialsError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CredentialsError::Io { path: path.to_owned(), source }),
        };
        tighten_file_mode(path);
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| CredentialsError::Corrupt { path: path.to_owned(), source })
    }

    /// Stores `credentials` under `credentials.server`: the token in the secret store when
    /// there is one (then the file without it), else in the file. The file is written
    /// atomically, readable only by the user. A token left in the other place (an older file,
    /// or the secret store a file named) is removed. Returns the file's path.
    pub fn save(&self, credentials: &Credentials) -> Result<PathBuf, CredentialsError> {
        let path = self.path_for(&credentials.server);
        let io_err = |source| CredentialsError::Io { path: path.clone(), source };
        create_private_dir(&self.dir).map_err(io_err)?;
        let before = self.read_record(&path).ok().flatten().and_then(|record| record.token_store);
        let record = match self.secrets {
            Some(store) => {
                store.set(&credentials.server, &credentials.token)?;
                FileRecord {
                    device_id: credentials.device_id.clone(),
                    token: None,
                    server: credentials.server.clone(),
                    token_store: Some(store.backend().id().to_owned()),
                }
            }
            None => FileRecord {
                device_id: credentials.device_id.clone(),
                token: Some(credentials.token.clone()),
                server: credentials.server.clone(),
                token_store: None,
            },
        };
        let body = serde_json::to_vec_pretty(&record).map_err(io::Error::other).map_err(io_err)?;
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            file_name_for(&credentials.server),
            std::process::id(),
            rand_suffix()
        ));
        let written = write_private_file(&tmp, &body).and_then(|()| fs::rename(&tmp, &path));
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(source));
        }
        sync_dir(&self.dir);
        let stale =
            before.as_deref().and_then(Backend::from_id).filter(|&old| Some(old) != self.secrets.map(|s| s.backend()));
        if let Some(old) = stale {
            if let Err(err) = SecretStore::unprobed(old).delete(&credentials.server) {
                tracing::warn!("could not remove the earlier token of {} from {old}: {err}", credentials.server);
            }
        }
        Ok(path)
    }

    /// Forgets the credentials of `origin`: removes the file, and the token from wherever it
    /// is kept (the secret store the file names, and the store this run keeps tokens in). True
    /// when a file or a token was removed. A secret store that cannot be reached is reported
    /// in the log and skipped: the file goes all the same.
    pub fn delete(&self, origin: &str) -> Result<bool, CredentialsError> {
        let path = self.path_for(origin);
        let named = self.read_record(&path).ok().flatten().and_then(|r| r.token_store);
        let mut backends: Vec<Backend> = named.as_deref().and_then(Backend::from_id).into_iter().collect();
        backends.extend(self.secrets.map(|store| store.backend()).filter(|b| !backends.contains(b)));
        let mut removed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(err) if err.kind() == io::ErrorKind::NotFound => false,
            Err(source) => return Err(CredentialsError::Io { path, source }),
        };
        for backend in backends {
            match SecretStore::unprobed(backend).delete(origin) {
                Ok(true) => {
                    tracing::info!("deleted the device token of {origin} from {backend}");
                    removed = true;
                }
                Ok(false) => {}
                Err(err) => tracing::warn!("could not delete the device token of {origin}: {err}"),
            }
        }
        Ok(removed)
    }

    /// [`Self::delete`], then the token of `origin` from every other secret store of this OS
    /// too (for `host-agent forget`): nothing of it is left anywhere this agent may have put
    /// it. True when anything was removed; an error names a store that could not be asked.
    pub fn delete_everywhere(&self, origin: &str) -> Result<bool, CredentialsError> {
        let path = self.path_for(origin);
        let named =
            self.read_record(&path).ok().flatten().and_then(|r| r.token_store).and_then(|id| Backend::from_id(&id));
        let mut removed = self.delete(origin)?;
        let mut failure = None;
        for &backend in Backend::available() {
            if named == Some(backend) || self.secrets.is_some_and(|s| s.backend() == backend) {
                continue;
            }
            match SecretStore::unprobed(backend).delete(origin) {
                Ok(found) => removed |= found,
                // One that does not answer may hold a token still: say so.
                Err(err @ SecretStoreError::NoAnswer { .. }) => failure = Some(err),
                // One that is not there (no session bus) holds nothing.
                Err(err) => tracing::debug!("{err}"),
            }
        }
        match failure {
            Some(err) => Err(err.into()),
            None => Ok(removed),
        }
    }
}

/// The user's home directory, from `HOME` (or `USERPROFILE` on Windows).
pub fn home_dir() -> Option<PathBuf> {
    let var = if cfg!(windows) { "USERPROFILE" } else { "HOME" };
    std::env::var_os(var).filter(|home| !home.is_empty()).map(PathBuf::from)
}

fn rand_suffix() -> u64 {
    rand::random()
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        tighten_mode(dir, "directory");
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
}

#[cfg(unix)]
fn write_private_file(path: &Path, body: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(body)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private_file(path: &Path, body: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(body)?;
    file.sync_all()
}

/// A credentials file someone made group- or world-readable is put back to 0600.
fn tighten_file_mode(path: &Path) {
    tighten_mode(path, "file");
}

/// The mode a credentials file or directory is put back to, when others have any access to it:
/// the owner's bits alone (0755 → 0700, 0644 → 0600). `None` when it is private already.
pub fn private_mode(mode: u32) -> Option<u32> {
    (mode & 0o077 != 0).then_some(mode & 0o7700)
}

/// Applies [`private_mode`] to `path` (not following a symlink), logging what it changed. True
/// when it tightened something.
#[cfg(unix)]
fn tighten_mode(path: &Path, what: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    let mode = meta.permissions().mode() & 0o7777;
    let Some(private) = private_mode(mode).filter(|_| !meta.file_type().is_symlink()) else {
        return false;
    };
    match fs::set_permissions(path, fs::Permissions::from_mode(private)) {
        Ok(()) => {
            tracing::warn!(
                "credentials {what} {} was open to others (mode {mode:o}); reset it to mode {private:o}",
                path.display()
            );
            true
        }
        Err(err) => {
            tracing::warn!(
                "credentials {what} {} is open to others (mode {mode:o}) and cannot be tightened: {err}",
                path.display()
            );
            false
        }
    }
}

#[cfg(not(unix))]
fn tighten_mode(_path: &Path, _what: &str) -> bool {
    false
}

/// Makes the rename durable where the OS allows syncing a directory.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(handle) = fs::File::open(dir) {
        let _ = handle.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).expect("test url")
    }

    fn creds(server: &str) -> Credentials {
        Credentials { device_id: "dev-1".into(), token: "secret-token".into(), server: server.into() }
    }

    #[test]
    fn origins_make_the_default_port_explicit() {
        let cases = [
            ("https://pulsn.internal", "https://pulsn.internal:443"),
            ("https://PULSN.internal:443/api/", "https://pulsn.internal:443"),
            ("http://127.0.0.1:8080/x?y", "http://127.0.0.1:8080"),
            ("http://localhost", "http://localhost:80"),
            ("http://[::1]:9000", "http://[::1]:9000"),
        ];
        for (input, want) in cases {
            assert_eq!(origin_of(&url(input)).as_deref(), Some(want), "{input}");
        }
        assert_eq!(origin_of(&url("unix:/run/sock")), None);
    }

    #[test]
    fn one_file_per_origin() {
        assert_eq!(file_name_for("https://pulsn.internal:443"), "https_pulsn.internal_443.json");
        assert_eq!(file_name_for("http://[::1]:9000"), "http____1__9000.json");
        assert_ne!(file_name_for("http://a:1"), file_name_for("http://a:2"));
        assert_ne!(file_name_for("http://a:1"), file_name_for("https://a:1"));
        assert!(!file_name_for("http://../..:1").contains('/'));
    }

    #[test]
    fn save_load_delete_per_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CredentialStore::new(dir.path().join("nested").join(".fusion-host"));
        let a = creds("https://a.example:443");
        let b = Credentials { device_id: "dev-2".into(), ..creds("https://b.example:443") };
        assert_eq!(store.load(&a.server).expect("load"), None);
        store.save(&a).expect("save a");
        store.save(&b).expect("save b");
        assert_eq!(store.load(&a.server).expect("load a"), Some(a.clone()));
        assert_eq!(store.load(&b.server).expect("load b"), Some(b.clone()));
        assert_eq!(store.load("https://c.example:443").expect("load c"), None);

        let a2 = Credentials { token: "rotated".into(), ..a.clone() };
        store.save(&a2).expect("overwrite");
        assert_eq!(store.load(&a.server).expect("reload"), Some(a2));

        assert!(store.delete(&a.server).expect("delete"));
        assert!(!store.delete(&a.server).expect("delete twice"));
        assert_eq!(store.load(&a.server).expect("after delete"), None);
        assert_eq!(store.load(&b.server).expect("b untouched"), Some(b));
        let leftovers: Vec<_> = fs::read_dir(store.dir())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary files left behind");
    }

    #[cfg(unix)]
    #[test]
    fn files_are_0600_and_the_dir_0700() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CredentialStore::new(dir.path().join("creds"));
        let path = store.save(&creds("http://127.0.0.1:8080")).expect("save");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "file mode {mode:o}");
        let dir_mode = fs::metadata(store.dir()).expect("meta").permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700, "dir mode {dir_mode:o}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        store.load("http://127.0.0.1:8080").expect("load");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "loading tightens a loosened file");
    }

    #[test]
    fn private_modes_keep_the_owner_bits_only() {
        let cases = [
            (0o755, Some(0o700)),
            (0o750, Some(0o700)),
            (0o701, Some(0o700)),
            (0o644, Some(0o600)),
            (0o666, Some(0o600)),
            (0o604, Some(0o600)),
            (0o1777, Some(0o1700)),
            (0o700, None),
            (0o600, None),
            (0o500, None),
            (0o400, None),
        ];
        for (mode, want) in cases {
            assert_eq!(private_mode(mode), want, "{mode:o}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn an_open_directory_and_its_files_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path| fs::metadata(path).expect("meta").permissions().mode() & 0o777;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CredentialStore::new(dir.path().join("creds"));
        let a = store.save(&creds("http://a:1")).expect("save");
        let b = store.save(&creds("http://b:1")).expect("save");
        let other = store.dir().join("notes.txt");
        fs::write(&other, "not credentials").expect("write");
        for (path, loose) in
            [(store.dir(), 0o755), (a.as_path(), 0o644), (b.as_path(), 0o640), (other.as_path(), 0o644)]
        {
            fs::set_permissions(path, fs::Permissions::from_mode(loose)).expect("chmod");
        }
        assert_eq!(store.tighten(), 3);
        assert_eq!((mode(store.dir()), mode(&a), mode(&b)), (0o700, 0o600, 0o600));
        assert_eq!(mode(&other), 0o644, "only credentials files are touched");
        assert_eq!(store.tighten(), 0, "nothing left to do");

        // Saving into an existing open directory tightens it too.
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o755)).expect("chmod");
        store.save(&creds("http://c:1")).expect("save");
        assert_eq!(mode(store.dir()), 0o700);
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CredentialStore::new(dir.path());
        fs::write(store.path_for("http://x:1"), b"{not json").expect("write");
        let err = store.load("http://x:1").expect_err("corrupt");
        assert!(err.to_string().contains("--code"), "{err}");
    }

    /// A store whose tokens go to the kernel keyring (every Linux test machine has one).
    #[cfg(target_os = "linux")]
    fn keyring_store(dir: &Path) -> CredentialStore {
        let secrets = SecretStore::probe(Backend::KernelKeyring).expect("the kernel keyring answers");
        CredentialStore::new(dir).with_secret_store(Some(secrets))
    }

    #[cfg(target_os = "linux")]
    fn unique_origin() -> String {
        format!("http://credentials-test-{:016x}:1", rand::random::<u64>())
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn with_a_secret_store_the_file_has_no_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = keyring_store(dir.path());
        let kernel = SecretStore::unprobed(Backend::KernelKeyring);
        let origin = unique_origin();
        let saved = creds(&origin);
        let path = store.save(&saved).expect("save");
        let text = fs::read_to_string(&path).expect("read");
        assert!(!text.contains("secret-token"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["tokenStore"], "kernel-keyring");
        assert_eq!(json["deviceId"], "dev-1");
        assert_eq!(kernel.get(&origin).expect("get").as_deref(), Some("secret-token"));
        let placed = store.load_placed(&origin).expect("load");
        assert_eq!(placed, Some((saved.clone(), TokenPlace::SecretStore(Backend::KernelKeyring))));
        // A file-only store reads it too: the file names where the token is.
        assert_eq!(CredentialStore::new(dir.path()).load(&origin).expect("load"), Some(saved));

        assert!(store.delete(&origin).expect("delete"));
        assert!(!path.exists());
        assert_eq!(kernel.get(&origin).expect("get"), None, "the token left the keyring too");
        assert_eq!(store.load(&origin).expect("load"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn changing_stores_moves_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file_store = CredentialStore::new(dir.path());
        let keyring = keyring_store(dir.path());
        let kernel = SecretStore::unprobed(Backend::KernelKeyring);
        let origin = unique_origin();
        let saved = creds(&origin);

        // file -> keyring: the file is rewritten without the token.
        let path = file_store.save(&saved).expect("save to the file");
        assert!(fs::read_to_string(&path).expect("read").contains("secret-token"));
        assert_eq!(keyring.load_placed(&origin).expect("load").map(|(_, place)| place), Some(TokenPlace::File));
        keyring.save(&saved).expect("move to the keyring");
        assert!(!fs::read_to_string(&path).expect("read").contains("secret-token"));
        assert_eq!(kernel.get(&origin).expect("get").as_deref(), Some("secret-token"));

        // keyring -> file: the keyring entry is removed.
        file_store.save(&saved).expect("move back to the file");
        assert!(fs::read_to_string(&path).expect("read").contains("secret-token"));
        assert_eq!(kernel.get(&origin).expect("get"), None, "no copy left in the keyring");
        assert!(file_store.delete(&origin).expect("delete"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_token_gone_from_the_keyring_is_no_credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = keyring_store(dir.path());
        let origin = unique_origin();
        store.save(&creds(&origin)).expect("save");
        // What a reboot does to the kernel keyring.
        assert!(SecretStore::unprobed(Backend::KernelKeyring).delete(&origin).expect("delete"));
        assert_eq!(store.load(&origin).expect("load"), None);
        assert!(store.delete(&origin).expect("the file is deleted all the same"));
        assert!(!store.path_for(&origin).exists());
    }

    #[test]
    fn a_file_naming_an_unknown_store_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CredentialStore::new(dir.path());
        let body = r#"{"deviceId":"d","server":"http://x:1","tokenStore":"vault"}"#;
        fs::write(store.path_for("http://x:1"), body).expect("write");
        let err = store.load("http://x:1").expect_err("unknown store");
        assert!(err.to_string().contains("vault") && err.to_string().contains("--code"), "{err}");
        fs::write(store.path_for("http://x:1"), r#"{"deviceId":"d","server":"http://x:1"}"#).expect("write");
        assert!(matches!(store.load("http://x:1"), Err(CredentialsError::Corrupt { .. })));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let shown = format!("{:?}", creds("http://x:1"));
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(shown.contains("dev-1"));
    }
}
