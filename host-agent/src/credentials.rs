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
//! The token never reaches a log: [`Credentials`]' `Debug` redacts it.
//!
//! Not here: deciding when to enroll or forget (the runtime), the OS secret store (a later
//! step: Keychain / DPAPI).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use reqwest::Url;
use serde::{Deserialize, Serialize};

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

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot access the credentials at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the credentials file {path} is unreadable ({source}); delete it and enroll again with --code")]
    Corrupt { path: PathBuf, source: serde_json::Error },
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

/// The directory of cached credentials.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    dir: PathBuf,
}

impl CredentialStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
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
        let path = self.path_for(origin);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CredentialsError::Io { path, source }),
        };
        tighten_file_mode(&path);
        serde_json::from_str(&text).map(Some).map_err(|source| CredentialsError::Corrupt { path, source })
    }

    /// Stores `credentials` under `credentials.server`, atomically, readable only by the user.
    /// Returns the file's path.
    pub fn save(&self, credentials: &Credentials) -> Result<PathBuf, CredentialsError> {
        let path = self.path_for(&credentials.server);
        let io_err = |source| CredentialsError::Io { path: path.clone(), source };
        create_private_dir(&self.dir).map_err(io_err)?;
        let body = serde_json::to_vec_pretty(credentials).map_err(io::Error::other).map_err(io_err)?;
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
        Ok(path)
    }

    /// Forgets the credentials of `origin`. True when a file was removed.
    pub fn delete(&self, origin: &str) -> Result<bool, CredentialsError> {
        let path = self.path_for(origin);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(CredentialsError::Io { path, source }),
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

    #[test]
    fn debug_never_shows_the_token() {
        let shown = format!("{:?}", creds("http://x:1"));
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(shown.contains("dev-1"));
    }
}
