//! The device token in the OS secret store (`host-agent run --credentials-store`), end to end
//! with both real binaries: the Linux kernel keyring (keyutils), a real Secret Service (a
//! private D-Bus session bus with GNOME Keyring, started headless by the test), and the file.
//!
//! What each test shows: the agent enrolls, the credentials file keeps the device id and server
//! but not the token, a restarted agent reconnects on the token from the store, changing the
//! store moves the token, and revocation and superseding delete it from the file and the store.
//! The token in the store is read back with `host_agent::secret_store` (the kernel keyring) and
//! with libsecret's `secret-tool` (the Secret Service), a client that is not ours.
//!
//! Needs on the machine (scripts/test.sh installs them): a kernel with keyutils, `dbus-daemon`,
//! `gnome-keyring-daemon` and `secret-tool`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{Agent, Control, Dispatcher};
use host_agent::secret_store::{Backend, SecretStore};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECOND: Duration = Duration::from_secs(1);

struct Env {
    dispatcher: Dispatcher,
    control: Control,
    root: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        let dispatcher = Dispatcher::start().await.expect("dispatcher starts");
        let token = dispatcher.mint_token("keyring-user").await.expect("token create");
        let control = Control::new(dispatcher.base_url(), token);
        let root = tempfile::Builder::new().prefix("e2e-root-").tempdir().expect("root");
        std::fs::write(root.path().join("hello.txt"), "hello\nworld\n").unwrap();
        Env { dispatcher, control, root }
    }

    /// The agent's builder for this replica and root, with `--credentials-store store`.
    fn agent(&self, store: &str) -> e2e::process::AgentBuilder {
        Agent::builder(self.dispatcher.base_url()).root(self.root.path()).flag("--credentials-store", store)
    }

    async fn code(&self) -> String {
        self.control.pairing_code().await.expect("pairing code")
    }

    /// The server origin credentials are kept under.
    fn origin(&self) -> String {
        let url = reqwest::Url::parse(&self.dispatcher.base_url()).expect("url");
        host_agent::credentials::origin_of(&url).expect("origin")
    }

    /// The id of the one device of this user, once it is online.
    async fn online_device(&self, agent: &mut Agent) -> String {
        self.control.first_online_device(agent, 20 * SECOND).await
    }

    /// `read_file hello.txt` through the control API answers the file.
    async fn assert_serves(&self, id: &str, agent: &Agent) {
        let (status, read) =
            self.control.call(id, "read_file", json!({"path": "hello.txt"}), Some(10_000)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{read}\n{}", agent.log_tail(40));
        assert_eq!(read["result"]["content"], "hello\nworld\n", "{read}");
    }
}

/// The one credentials file of `dir`: its text and its JSON.
fn credentials_file(dir: &Path) -> (String, Value) {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("credentials dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = std::fs::read_to_string(&files[0]).expect("read");
    let json = serde_json::from_str(&text).expect("json");
    (text, json)
}

fn kernel_token(origin: &str) -> Option<String> {
    SecretStore::unprobed(Backend::KernelKeyring).get(origin).expect("the kernel keyring answers")
}

/// Removes what a failed test may have left in the kernel keyring (its keys are per user).
struct KernelKey(String);

impl Drop for KernelKey {
    fn drop(&mut self) {
        let _ = SecretStore::unprobed(Backend::KernelKeyring).delete(&self.0);
    }
}

/// `--credentials-store keyring` on a machine without a Secret Service: the kernel keyring
/// holds the token, the file does not; a restarted agent (another process) reconnects on it;
/// revoking the device deletes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_keyring_keeps_the_token_and_revocation_deletes_it() {
    let env = Env::start().await;
    let _cleanup = KernelKey(env.origin());
    let mut agent = env.agent("keyring").code(env.code().await).spawn().expect("agent spawns");
    let id = env.online_device(&mut agent).await;
    assert!(
        agent.log().contains("credentials store: the Linux kernel keyring (--credentials-store keyring)"),
        "{}",
        agent.log_tail(40)
    );
    assert!(agent.log().contains("forgets the device token at reboot"), "the log warns: {}", agent.log_tail(40));

    let token = kernel_token(&env.origin()).expect("the token is in the kernel keyring");
    assert!(token.len() >= 32, "a device token: {} characters", token.len());
    let (text, file) = credentials_file(agent.credentials_dir());
    assert!(!text.contains(&token), "the token is not in the file: {text}");
    assert_eq!(file["tokenStore"], "kernel-keyring", "{text}");
    assert_eq!(file["deviceId"], id.as_str(), "{text}");
    assert!(file.get("token").is_none(), "{text}");
    assert!(!agent.log().contains(&token), "the token is never logged");

    agent.sigterm().unwrap();
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 0, "{}", agent.log_tail(40));

    // A new process, no code: it reads the token from the kernel keyring.
    let credentials = agent.credentials_dir().to_owned();
    let mut again = env.agent("keyring").credentials_dir(&credentials).spawn().expect("agent spawns");
    assert_eq!(env.online_device(&mut again).await, id, "the same device");
    assert!(again.log().contains("the token in the Linux kernel keyring"), "{}", again.log_tail(40));
    env.assert_serves(&id, &again).await;

    let (status, _) = env.control.delete_device(&id).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(again.exit_code(20 * SECOND).await.unwrap(), 4, "{}", again.log_tail(40));
    assert!(again.credential_files().is_empty(), "the file is deleted");
    assert_eq!(kernel_token(&env.origin()), None, "the token is deleted from the kernel keyring");
}

/// `auto` without a Secret Service keeps the token in the file; a run with `keyring` moves it
/// into the kernel keyring; a newer agent on the same credentials supersedes the first, which
/// deletes the token from the file and the keyring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_store_moves_the_token_and_superseding_deletes_it() {
    let env = Env::start().await;
    let _cleanup = KernelKey(env.origin());
    let mut agent = env.agent("auto").code(env.code().await).spawn().expect("agent spawns");
    let id = env.online_device(&mut agent).await;
    assert!(agent.log().contains("credentials store: file (--credentials-store auto: no OS secret store answered"));
    let (_, file) = credentials_file(agent.credentials_dir());
    let token = file["token"].as_str().expect("auto without a secret store: the token is in the file").to_owned();
    assert_eq!(file.get("tokenStore"), None);
    assert_eq!(kernel_token(&env.origin()), None, "auto never picks the kernel keyring");
    agent.sigterm().unwrap();
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 0);

    let credentials = agent.credentials_dir().to_owned();
    let mut moved = env.agent("keyring").credentials_dir(&credentials).spawn().expect("agent spawns");
    assert_eq!(env.online_device(&mut moved).await, id);
    assert!(moved.log().contains("moved the device token of"), "{}", moved.log_tail(40));
    let (text, file) = credentials_file(&credentials);
    assert!(!text.contains(&token) && file["tokenStore"] == "kernel-keyring", "{text}");
    assert_eq!(kernel_token(&env.origin()).as_deref(), Some(token.as_str()), "the same token, moved");

    let mut newer = env.agent("keyring").credentials_dir(&credentials).spawn().expect("agent spawns");
    assert_eq!(moved.exit_code(20 * SECOND).await.unwrap(), 5, "{}", moved.log_tail(40));
    assert!(moved.credential_files().is_empty(), "superseded: the file is deleted");
    assert_eq!(kernel_token(&env.origin()), None, "superseded: the token is deleted from the keyring");
    assert!(newer.is_running(), "the newer agent keeps serving\n{}", newer.log_tail(40));
    env.assert_serves(&id, &newer).await;
    newer.sigterm().unwrap();
    assert_eq!(newer.exit_code(20 * SECOND).await.unwrap(), 0);
}

/// A private D-Bus session bus with GNOME Keyring's Secret Service on it, its login collection
/// unlocked with a throwaway password: what a desktop session offers, started headless.
struct SecretService {
    address: String,
    home: tempfile::TempDir,
    bus: Child,
    keyring: Child,
}

impl SecretService {
    fn start() -> SecretService {
        let home = tempfile::Builder::new().prefix("e2e-secret-service-").tempdir().expect("home");
        let socket = home.path().join("bus");
        let address = format!("unix:path={}", socket.display());
        let bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", &format!("--address={address}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon starts (scripts/test.sh installs it)");
        let started = Instant::now();
        while !socket.exists() {
            assert!(started.elapsed() < 10 * SECOND, "dbus-daemon made no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut keyring = Command::new("gnome-keyring-daemon")
            .args(["--foreground", "--unlock", "--components=secrets"])
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .env("HOME", home.path())
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gnome-keyring-daemon starts (scripts/test.sh installs it)");
        {
            use std::io::Write;
            let mut stdin = keyring.stdin.take().expect("stdin");
            stdin.write_all(b"e2e-keyring-password").expect("unlock password");
        }
        let service = SecretService { address, home, bus, keyring };
        let started = Instant::now();
        while !service.owns_secrets() {
            assert!(started.elapsed() < 15 * SECOND, "nobody owns org.freedesktop.secrets on the test bus");
            std::thread::sleep(Duration::from_millis(50));
        }
        service
    }

    fn owns_secrets(&self) -> bool {
        Command::new("dbus-send")
            .args([
                &format!("--bus={}", self.address),
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                "string:org.freedesktop.secrets",
            ])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("boolean true"))
    }

    /// The token `secret-tool` finds for `origin` (service `fusion-host`, account the origin).
    fn lookup(&self, origin: &str) -> Option<String> {
        let out = Command::new("secret-tool")
            .args(["lookup", "service", "fusion-host", "username", origin])
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .env("HOME", self.home.path())
            .output()
            .expect("secret-tool runs (scripts/test.sh installs it)");
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !token.is_empty()).then_some(token)
    }
}

impl Drop for SecretService {
    fn drop(&mut self) {
        for child in [&mut self.keyring, &mut self.bus] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `auto` where a Secret Service answers: the token goes there (GNOME Keyring, seen by
/// `secret-tool`), not into the file; a restarted agent reconnects on it; revocation deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_service_keeps_the_token_when_a_session_bus_answers() {
    let env = Env::start().await;
    let secrets = SecretService::start();
    let with_bus =
        |builder: e2e::process::AgentBuilder| builder.env("DBUS_SESSION_BUS_ADDRESS", secrets.address.clone());
    let mut agent = with_bus(env.agent("auto").code(env.code().await)).spawn().expect("agent spawns");
    let id = env.online_device(&mut agent).await;
    assert!(
        agent.log().contains("credentials store: the Secret Service (D-Bus) (--credentials-store auto)"),
        "{}",
        agent.log_tail(40)
    );
    let token = secrets.lookup(&env.origin()).expect("secret-tool finds the token");
    let (text, file) = credentials_file(agent.credentials_dir());
    assert!(!text.contains(&token), "the token is not in the file: {text}");
    assert_eq!(file["tokenStore"], "secret-service", "{text}");
    assert_eq!(kernel_token(&env.origin()), None, "only one store holds it");
    agent.sigterm().unwrap();
    assert_eq!(agent.exit_code(20 * SECOND).await.unwrap(), 0, "{}", agent.log_tail(40));

    let credentials = agent.credentials_dir().to_owned();
    let mut again = with_bus(env.agent("keyring").credentials_dir(&credentials)).spawn().expect("agent spawns");
    assert_eq!(env.online_device(&mut again).await, id);
    assert!(again.log().contains("the token in the Secret Service (D-Bus)"), "{}", again.log_tail(40));
    env.assert_serves(&id, &again).await;

    let (status, _) = env.control.delete_device(&id).await.unwrap();
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(again.exit_code(20 * SECOND).await.unwrap(), 4, "{}", again.log_tail(40));
    assert!(again.credential_files().is_empty(), "the file is deleted");
    assert_eq!(secrets.lookup(&env.origin()), None, "the token is deleted from the Secret Service");
}
