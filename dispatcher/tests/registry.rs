//! The registry against real databases: every test runs on an in-memory SQLite, a SQLite file
//! and a fresh PostgreSQL database (127.0.0.1:5432, user `postgres`, trust auth), created for
//! the test and dropped after it.
//!
//! Not here: the HTTP mapping of these results (status codes, bodies), and caching.

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use dispatcher::bus::StreamRoute;
use dispatcher::registry::{
    Cursor, EnrollOutcome, Expired, Expiry, LateApply, Limit, Limits, NewProposal, PageRequest, Registry, RegistryError,
};
use protocol::{HostResult, Manifest, ProposalStatus, ToolClass, ToolDescriptor};
use serde_json::json;
use sqlx::Connection;

const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The databases a test can run on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    SqliteMemory,
    SqliteFile,
    Postgres,
}

const EVERY_ENGINE: [Kind; 3] = [Kind::SqliteMemory, Kind::SqliteFile, Kind::Postgres];

/// One fresh, empty database, and how to get rid of it.
struct TestDatabase {
    engine: &'static str,
    url: String,
    postgres_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    async fn create(kind: Kind) -> Self {
        match kind {
            Kind::SqliteMemory => {
                Self { engine: "sqlite-memory", url: "sqlite::memory:".into(), postgres_name: None, _dir: None }
            }
            Kind::SqliteFile => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("registry.db").display());
                Self { engine: "sqlite-file", url, postgres_name: None, _dir: Some(dir) }
            }
            Kind::Postgres => {
                let name = format!("reg_{}", uuid::Uuid::new_v4().simple());
                let mut admin =
                    sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await.expect("PostgreSQL on 127.0.0.1:5432");
                sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
                let _ = admin.close().await;
                let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
                Self { engine: "postgres", url, postgres_name: Some(name), _dir: None }
            }
        }
    }

    /// Drops the PostgreSQL database (closing whatever connections are left); a temp dir goes
    /// with `self`.
    async fn drop_database(self) {
        if let Some(name) = &self.postgres_name {
            if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await;
                let _ = admin.close().await;
            }
        }
    }

    /// Runs `body` as a task on this database, then drops the database, then re-raises the
    /// task's panic, if any, naming the engine.
    async fn run<Fut>(self, body: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let outcome = tokio::spawn(body).await;
        let engine = self.engine;
        self.drop_database().await;
        if let Err(error) = outcome {
            eprintln!("failed on {engine}");
            std::panic::resume_unwind(error.into_panic());
        }
    }
}

/// Runs `test` once per engine, each time on a fresh migrated database, and cleans up even when
/// it panics.
async fn on_every_engine<F, Fut>(test: F)
where
    F: Fn(Registry) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    for kind in EVERY_ENGINE {
        let database = TestDatabase::create(kind).await;
        let url = database.url.clone();
        let engine = database.engine;
        let registry = Registry::connect(&url).await;
        let registry = match registry {
            Ok(registry) => registry,
            Err(error) => {
                database.drop_database().await;
                panic!("{engine}: {error}");
            }
        };
        let test = test(registry.clone());
        database
            .run(async move {
                test.await;
                registry.close().await;
            })
            .await;
    }
}

fn enrolled(outcome: EnrollOutcome) -> protocol::EnrollResponse {
    match outcome {
        EnrollOutcome::Enrolled(response) => response,
        EnrollOutcome::Refused => panic!("enrollment refused"),
    }
}

/// A device of `owner`'s, enrolled through a fresh pairing code: its id and token.
async fn enroll_device(registry: &Registry, owner: &str, name: &str) -> (String, String) {
    let code = registry.create_pairing_code(owner, Duration::from_secs(600), None).await.expect("pairing code");
    let response = enrolled(registry.enroll(&code.code, name, Some("linux")).await.expect("enroll"));
    (response.device_id, response.token)
}

fn new_proposal(owner: &str, device_id: &str, tool: &str, path: &str) -> NewProposal {
    NewProposal {
        id: uuid::Uuid::new_v4().to_string(),
        device_id: device_id.into(),
        owner: owner.into(),
        tool: tool.into(),
        input: json!({ "path": path, "content": "hello" }),
        plan: json!({ "tool": tool, "summary": format!("write {path}"), "preconditions": { "absent": path } }),
        preconditions: json!({ "absent": path }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_are_named_by_the_url_and_answer_pings() {
    on_every_engine(|registry| async move {
        registry.ping().await.expect("ping");
        assert!(["sqlite", "postgres"].contains(&registry.engine()));
    })
    .await;
    for url in ["", "mysql://localhost/db", "dispatcher.db", "http://x"] {
        match Registry::connect(url).await {
            Err(RegistryError::InvalidUrl(message)) => assert!(!message.contains("localhost"), "{message}"),
            other => panic!("{url:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_migrate_one_database() {
    for kind in [Kind::SqliteFile, Kind::Postgres] {
        let database = TestDatabase::create(kind).await;
        let url = database.url.clone();
        database
            .run(async move {
                let connects: Vec<_> = (0..6)
                    .map(|_| {
                        let url = url.clone();
                        tokio::spawn(async move { Registry::connect(&url).await })
                    })
                    .collect();
                let mut registries = Vec::new();
                for connect in connects {
                    registries.push(connect.await.expect("task").expect("connect"));
                }
                let token = registries[0].create_api_token("alice", None).await.expect("token");
                for registry in &registries {
                    assert_eq!(registry.user_for_api_token(&token).await.expect("lookup").as_deref(), Some("alice"));
                    registry.close().await;
                }
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_are_created_looked_up_and_revoked_by_prefix() {
    on_every_engine(|registry| async move {
        let alice = registry.create_api_token("alice", Some("laptop")).await.expect("token");
        let bob = registry.create_api_token("bob", None).await.expect("token");
        assert!(alice.starts_with("pat_") && alice.len() == 47, "{alice}");
        assert_ne!(alice, bob);
        assert_eq!(registry.user_for_api_token(&alice).await.expect("lookup").as_deref(), Some("alice"));
        assert_eq!(registry.user_for_api_token(&bob).await.expect("lookup").as_deref(), Some("bob"));

        let forged = format!("pat_{}", "A".repeat(43));
        let huge = "pat_".to_string() + &"x".repeat(1 << 20);
        for odd in ["", "pat_", forged.as_str(), huge.as_str(), "dev_abc", "' OR 1=1 --"] {
            assert_eq!(registry.user_for_api_token(odd).await.expect("lookup"), None, "{odd:.20}");
        }

        // Eight characters are enough; the other user's token is untouched.
        assert_eq!(registry.revoke_api_token(&alice[..8]).await.expect("revoke").len(), 1);
        assert_eq!(registry.user_for_api_token(&alice).await.expect("lookup"), None);
        assert_eq!(registry.user_for_api_token(&bob).await.expect("lookup").as_deref(), Some("bob"));
        assert_eq!(registry.revoke_api_token(&alice[..12]).await.expect("revoke again").len(), 0);

        // A whole token revokes itself.
        assert_eq!(registry.revoke_api_token(&bob).await.expect("revoke by token").len(), 1);
        assert_eq!(registry.user_for_api_token(&bob).await.expect("lookup"), None);

        // The prefix is matched exactly: `_` is no wildcard, case matters.
        let carol = registry.create_api_token("carol", None).await.expect("token");
        let mut other_case = carol[..12].to_string();
        let flipped: String = other_case[4..]
            .chars()
            .map(|c| if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
            .collect();
        other_case.replace_range(4.., &flipped);
        if other_case != carol[..12] {
            assert_eq!(registry.revoke_api_token(&other_case).await.expect("revoke").len(), 0);
        }
        assert_eq!(registry.revoke_api_token("pat_%%%%%%%%").await.expect("revoke").len(), 0);
        assert_eq!(registry.revoke_api_token("pat_________").await.expect("revoke").len(), 0);
        assert_eq!(registry.user_for_api_token(&carol).await.expect("lookup").as_deref(), Some("carol"));

        assert!(matches!(registry.create_api_token("", None).await, Err(RegistryError::InvalidArgument(_))));
    })
    .await;
}

/// SHA-256 of a token as the registry stores it.
fn stored_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_api_token_names_it_and_voids_its_unused_codes() {
    on_every_engine(|registry| async move {
        let alice = registry.create_api_token("alice", None).await.expect("token");
        let other = registry.create_api_token("alice", None).await.expect("token");
        let (hash, other_hash) = (stored_hash(&alice), stored_hash(&other));
        let ttl = Duration::from_secs(600);
        let used = registry.create_pairing_code("alice", ttl, Some(&hash)).await.expect("code");
        enrolled(registry.enroll(&used.code, "before", None).await.expect("enroll"));
        let unused = registry.create_pairing_code("alice", ttl, Some(&hash)).await.expect("code");
        let by_other = registry.create_pairing_code("alice", ttl, Some(&other_hash)).await.expect("code");
        let unlinked = registry.create_pairing_code("alice", ttl, None).await.expect("code");
        let since = Utc::now().timestamp_millis() - 1;
        assert!(registry.api_tokens_revoked_since(since).await.expect("poll").is_empty());

        assert_eq!(registry.revoke_api_token(&alice[..12]).await.expect("revoke"), vec![hash.clone()]);
        assert_eq!(registry.api_tokens_revoked_since(since).await.expect("poll"), vec![hash.clone()]);
        assert!(registry
            .api_tokens_revoked_since(Utc::now().timestamp_millis() + 1000)
            .await
            .expect("poll")
            .is_empty());
        // Its unused code is void; the other token's, and a code minted by no token, still enroll.
        assert_eq!(registry.enroll(&unused.code, "late", None).await.expect("enroll"), EnrollOutcome::Refused);
        enrolled(registry.enroll(&by_other.code, "other", None).await.expect("enroll"));
        enrolled(registry.enroll(&unlinked.code, "unlinked", None).await.expect("enroll"));
        // A code minted with the token after its revocation (a replica that had not heard yet)
        // does not enroll either.
        let racing = registry.create_pairing_code("alice", ttl, Some(&hash)).await.expect("code");
        assert_eq!(registry.enroll(&racing.code, "racing", None).await.expect("enroll"), EnrollOutcome::Refused);
        assert_eq!(registry.devices("alice").await.expect("devices").len(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_short_token_prefixes_are_refused() {
    on_every_engine(|registry| async move {
        let token = registry.create_api_token("alice", None).await.expect("token");
        for short in ["", "pat_", &token[..7], "       pat_abc   ", "ééééééé"] {
            assert!(
                matches!(registry.revoke_api_token(short).await, Err(RegistryError::PrefixTooShort { min: 8 })),
                "{short:?}"
            );
        }
        assert_eq!(registry.user_for_api_token(&token).await.expect("lookup").as_deref(), Some("alice"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pairing_code_enrolls_one_device_once() {
    on_every_engine(|registry| async move {
        let before = Utc::now();
        let code = registry.create_pairing_code("alice", Duration::from_secs(600), None).await.expect("code");
        let groups: Vec<&str> = code.code.split('-').collect();
        assert_eq!(groups.len(), 3, "{}", code.code);
        for group in groups {
            assert_eq!(group.len(), 4, "{}", code.code);
            assert!(group.bytes().all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b)), "{}", code.code);
        }
        let ttl = code.expires_at - before;
        assert!(ttl >= chrono::Duration::seconds(599) && ttl <= chrono::Duration::seconds(601), "{ttl}");

        let response = enrolled(registry.enroll(&code.code, "laptop", Some("macos")).await.expect("enroll"));
        assert!(protocol::subject::is_uuid(&response.device_id), "{}", response.device_id);
        assert!(response.token.starts_with("dev_") && response.token.len() == 47, "{}", response.token);
        assert_eq!(registry.enroll(&code.code, "again", None).await.expect("enroll"), EnrollOutcome::Refused);

        let device = registry.device("alice", &response.device_id).await.expect("device").expect("exists");
        assert_eq!(device.name, "laptop");
        assert_eq!(device.platform.as_deref(), Some("macos"));
        assert_eq!(device.owner, "alice");
        assert!(!device.revoked);
        assert_eq!(registry.devices("alice").await.expect("devices").len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_unknown_pairing_codes_are_refused() {
    on_every_engine(|registry| async move {
        let code = registry.create_pairing_code("alice", Duration::from_millis(1), None).await.expect("code");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(registry.enroll(&code.code, "late", None).await.expect("enroll"), EnrollOutcome::Refused);

        let huge = "A".repeat(1 << 20);
        for odd in ["", "0000-0000-0000", "UUUU-UUUU-UUUU", "ABCD-EFGH-JKM", "ABCD-EFGH-JKMNP", huge.as_str()] {
            assert_eq!(registry.enroll(odd, "x", None).await.expect("enroll"), EnrollOutcome::Refused, "{odd:.20}");
        }
        assert!(registry.devices("alice").await.expect("devices").is_empty());

        assert!(matches!(
            registry.create_pairing_code("alice", Duration::from_secs(400 * 24 * 3600), None).await,
            Err(RegistryError::InvalidArgument(_))
        ));
        assert!(matches!(
            registry.create_pairing_code("", Duration::from_secs(60), None).await,
            Err(RegistryError::InvalidArgument(_))
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_pairing_codes_are_normalized() {
    on_every_engine(|registry| async move {
        // Lowercase, no hyphens.
        let code = registry.create_pairing_code("alice", Duration::from_secs(600), None).await.expect("code");
        let typed = code.code.replace('-', "").to_lowercase();
        enrolled(registry.enroll(&typed, "one", None).await.expect("enroll"));

        // Spaces, and the letters people type for 0 and 1.
        let code = registry.create_pairing_code("alice", Duration::from_secs(600), None).await.expect("code");
        let typed: String = code
            .code
            .chars()
            .enumerate()
            .map(|(i, c)| match (c, i % 2) {
                ('0', 0) => 'o',
                ('0', _) => 'O',
                ('1', 0) => 'l',
                ('1', _) => 'I',
                ('-', _) => ' ',
                (c, _) => c.to_ascii_lowercase(),
            })
            .collect();
        enrolled(registry.enroll(&format!("  {typed} "), "two", None).await.expect("enroll"));
        assert_eq!(registry.devices("alice").await.expect("devices").len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enrollments_with_one_code_enroll_exactly_one_device() {
    on_every_engine(|registry| async move {
        let code = registry.create_pairing_code("alice", Duration::from_secs(600), None).await.expect("code");
        let attempts: Vec<_> = (0..100)
            .map(|i| {
                let registry = registry.clone();
                let code = code.code.clone();
                tokio::spawn(async move { registry.enroll(&code, &format!("racer {i}"), None).await })
            })
            .collect();
        let mut enrolled = Vec::new();
        for attempt in attempts {
            if let EnrollOutcome::Enrolled(response) = attempt.await.expect("task").expect("enroll") {
                enrolled.push(response);
            }
        }
        assert_eq!(enrolled.len(), 1, "{enrolled:?}");
        let devices = registry.devices("alice").await.expect("devices");
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].id, enrolled[0].device_id);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_tokens_identify_their_device() {
    on_every_engine(|registry| async move {
        let (laptop, laptop_token) = enroll_device(&registry, "alice", "laptop").await;
        let (desktop, desktop_token) = enroll_device(&registry, "bob", "desktop").await;
        let auth = registry.device_for_token(&laptop_token).await.expect("lookup").expect("known");
        assert_eq!((auth.device_id.as_str(), auth.owner.as_str()), (laptop.as_str(), "alice"));
        let auth = registry.device_for_token(&desktop_token).await.expect("lookup").expect("known");
        assert_eq!((auth.device_id.as_str(), auth.owner.as_str()), (desktop.as_str(), "bob"));

        let api_token = registry.create_api_token("alice", None).await.expect("token");
        let forged = format!("dev_{}", "A".repeat(43));
        let huge = "dev_".to_string() + &"x".repeat(1 << 20);
        for odd in ["", "dev_", api_token.as_str(), forged.as_str(), huge.as_str()] {
            assert_eq!(registry.device_for_token(odd).await.expect("lookup"), None, "{odd:.20}");
        }
        // Nor is a device token an api token.
        assert_eq!(registry.user_for_api_token(&laptop_token).await.expect("lookup"), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_tokens_are_refused() {
    on_every_engine(|registry| async move {
        let (laptop, token) = enroll_device(&registry, "alice", "laptop").await;
        let (kept, kept_token) = enroll_device(&registry, "alice", "kept").await;
        assert!(!registry.revoke_device("bob", &laptop).await.expect("revoke"), "another owner cannot revoke");
        assert!(registry.device_for_token(&token).await.expect("lookup").is_some());

        assert!(registry.revoke_device("alice", &laptop).await.expect("revoke"));
        assert_eq!(registry.device_for_token(&token).await.expect("lookup"), None);
        assert!(!registry.revoke_device("alice", &laptop).await.expect("revoke again"));
        assert_eq!(registry.device("alice", &laptop).await.expect("device"), None);
        let devices = registry.devices("alice").await.expect("devices");
        assert_eq!(devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), [kept.as_str()]);
        assert!(registry.device_for_token(&kept_token).await.expect("lookup").is_some());

        assert!(matches!(registry.touch_device(&laptop).await, Err(RegistryError::NotFound)));
        for odd in ["", "not-a-uuid", "00000000-0000-4000-8000-000000000000"] {
            assert!(!registry.revoke_device("alice", odd).await.expect("revoke"), "{odd:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_scoped_to_their_owner() {
    on_every_engine(|registry| async move {
        let (first, _) = enroll_device(&registry, "alice", "first").await;
        let (second, _) = enroll_device(&registry, "alice", "second").await;
        let (bobs, _) = enroll_device(&registry, "bob", "bob's").await;

        assert_eq!(registry.device("bob", &first).await.expect("device"), None);
        assert_eq!(registry.device("alice", &bobs).await.expect("device"), None);
        assert_eq!(registry.device("bob", &bobs).await.expect("device").expect("own device").name, "bob's");
        let alices: Vec<String> = registry.devices("alice").await.expect("devices").into_iter().map(|d| d.id).collect();
        assert_eq!(alices, [first.clone(), second.clone()], "oldest first");
        assert!(registry.devices("carol").await.expect("devices").is_empty());

        let huge = "x".repeat(1 << 20);
        for odd in ["", "not-a-uuid", "00000000-0000-4000-8000-000000000000", "' OR '1'='1", huge.as_str()] {
            assert_eq!(registry.device("alice", odd).await.expect("device"), None, "{odd:.20}");
        }
        assert_eq!(registry.device("", &first).await.expect("device"), None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_and_last_seen_round_trip() {
    on_every_engine(|registry| async move {
        let (id, _) = enroll_device(&registry, "alice", "laptop").await;
        let device = registry.device("alice", &id).await.expect("device").expect("exists");
        assert_eq!((device.manifest, device.last_seen_at), (None, None));

        let manifest = Manifest {
            tools: vec![ToolDescriptor {
                name: "read_file".into(),
                description: "Read a file — «quoted» 'text'".into(),
                input_schema: json!({ "type": "object", "properties": { "path": { "type": "string" } } }),
                class: ToolClass::Read,
            }],
            roots: vec!["/home/alice".into(), "C:\\Users\\alice".into()],
            version: "0.1.0".into(),
            platform: "linux".into(),
        };
        registry.set_manifest(&id, &manifest).await.expect("set manifest");
        let before = Utc::now() - chrono::Duration::seconds(1);
        registry.touch_device(&id).await.expect("touch");
        let device = registry.device("alice", &id).await.expect("device").expect("exists");
        assert_eq!(device.manifest.as_ref(), Some(&manifest));
        let seen = device.last_seen_at.expect("last seen");
        assert!(seen >= before && seen <= Utc::now() + chrono::Duration::seconds(1), "{seen}");
        assert_eq!(registry.devices("alice").await.expect("devices")[0].manifest.as_ref(), Some(&manifest));

        let updated = Manifest { tools: vec![], ..manifest };
        registry.set_manifest(&id, &updated).await.expect("replace manifest");
        let device = registry.device("alice", &id).await.expect("device").expect("exists");
        assert_eq!(device.manifest, Some(updated.clone()));

        for odd in ["", "not-a-uuid", "00000000-0000-4000-8000-000000000000"] {
            assert!(matches!(registry.set_manifest(odd, &updated).await, Err(RegistryError::NotFound)), "{odd:?}");
            assert!(matches!(registry.touch_device(odd).await, Err(RegistryError::NotFound)), "{odd:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_are_listed_newest_first_and_filtered_by_status() {
    on_every_engine(|registry| async move {
        let (device, _) = enroll_device(&registry, "alice", "laptop").await;
        let (bobs_device, _) = enroll_device(&registry, "bob", "desktop").await;

        let mut made = Vec::new();
        for path in ["a.txt", "b.txt", "c.txt"] {
            let new = new_proposal("alice", &device, "write_file", path);
            let proposal = registry.create_proposal(new.clone()).await.expect("create");
            assert_eq!(proposal.status, ProposalStatus::Pending);
            assert_eq!((&proposal.input, &proposal.proposal), (&new.input, &new.plan));
            made.push(proposal);
        }
        let bobs = registry.create_proposal(new_proposal("bob", &bobs_device, "delete", "x")).await.expect("create");

        let ids = |list: Vec<protocol::Proposal>| list.into_iter().map(|p| p.id).collect::<Vec<_>>();
        let all = registry.proposals("alice", None).await.expect("list");
        assert_eq!(all, made.iter().rev().cloned().collect::<Vec<_>>(), "newest first, as created");

        assert!(registry
            .transition_proposal(&made[1].id, ProposalStatus::Pending, ProposalStatus::Rejected, None)
            .await
            .expect("reject"));
        let pending = registry.proposals("alice", Some(ProposalStatus::Pending)).await.expect("list");
        assert_eq!(ids(pending), [made[2].id.as_str(), made[0].id.as_str()]);
        let rejected = registry.proposals("alice", Some(ProposalStatus::Rejected)).await.expect("list");
        assert_eq!(ids(rejected), [made[1].id.as_str()]);
        assert!(registry.proposals("alice", Some(ProposalStatus::Applied)).await.expect("list").is_empty());
        assert_eq!(ids(registry.proposals("bob", None).await.expect("list")), [bobs.id.as_str()]);

        let stored = registry.proposal("alice", &made[1].id).await.expect("read").expect("exists");
        assert_eq!(stored.owner, "alice");
        assert_eq!(stored.preconditions, json!({ "absent": "b.txt" }));
        assert_eq!(stored.proposal.status, ProposalStatus::Rejected);
        assert!(stored.proposal.decided_at.is_some());
        assert_eq!(stored.proposal.result, None);

        // Owner scoping, odd ids.
        assert_eq!(registry.proposal("bob", &made[0].id).await.expect("read"), None);
        assert_eq!(registry.proposal("alice", &bobs.id).await.expect("read"), None);
        let huge = "x".repeat(1 << 20);
        for odd in ["", "nope", "00000000-0000-4000-8000-000000000000", huge.as_str()] {
            assert_eq!(registry.proposal("alice", odd).await.expect("read"), None, "{odd:.20}");
            assert!(!registry
                .transition_proposal(odd, ProposalStatus::Pending, ProposalStatus::Applying, None)
                .await
                .expect("transition"));
        }

        // A proposal only for a live device of its owner's, under a UUID.
        let not_owner = new_proposal("bob", &device, "write_file", "z");
        assert!(matches!(registry.create_proposal(not_owner).await, Err(RegistryError::NotFound)));
        let no_device = new_proposal("alice", "00000000-0000-4000-8000-000000000000", "write_file", "z");
        assert!(matches!(registry.create_proposal(no_device).await, Err(RegistryError::NotFound)));
        let bad_id = NewProposal { id: "not-a-uuid".into(), ..new_proposal("alice", &device, "write_file", "z") };
        assert!(matches!(registry.create_proposal(bad_id).await, Err(RegistryError::InvalidArgument(_))));
        assert!(registry.revoke_device("alice", &device).await.expect("revoke"));
        let revoked = new_proposal("alice", &device, "write_file", "z");
        assert!(matches!(registry.create_proposal(revoked).await, Err(RegistryError::NotFound)));
        assert_eq!(registry.proposals("alice", None).await.expect("list").len(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_approvals_move_a_proposal_once() {
    on_every_engine(|registry| async move {
        let (device, _) = enroll_device(&registry, "alice", "laptop").await;
        let proposal =
            registry.create_proposal(new_proposal("alice", &device, "write_file", "a.txt")).await.expect("create");

        let approvals: Vec<_> = (0..20)
            .map(|_| {
                let registry = registry.clone();
                let id = proposal.id.clone();
                tokio::spawn(async move {
                    registry.transition_proposal(&id, ProposalStatus::Pending, ProposalStatus::Applying, None).await
                })
            })
            .collect();
        let mut moved = 0;
        for approval in approvals {
            if approval.await.expect("task").expect("transition") {
                moved += 1;
            }
        }
        assert_eq!(moved, 1);

        let stored = registry.proposal("alice", &proposal.id).await.expect("read").expect("exists");
        assert_eq!(stored.proposal.status, ProposalStatus::Applying);
        assert!(stored.proposal.decided_at.is_some());

        // Finishing the apply stores its result; the transition cannot be replayed.
        let result = HostResult::success("call-1", json!({ "written": 5 }));
        assert!(registry
            .transition_proposal(&proposal.id, ProposalStatus::Applying, ProposalStatus::Applied, Some(&result))
            .await
            .expect("finish"));
        assert!(!registry
            .transition_proposal(&proposal.id, ProposalStatus::Applying, ProposalStatus::Failed, Some(&result))
            .await
            .expect("replay"));
        assert!(!registry
            .transition_proposal(&proposal.id, ProposalStatus::Pending, ProposalStatus::Applying, None)
            .await
            .expect("approve again"));
        let stored = registry.proposal("alice", &proposal.id).await.expect("read").expect("exists");
        assert_eq!(stored.proposal.status, ProposalStatus::Applied);
        assert_eq!(stored.proposal.result, Some(result));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_epochs_only_increase_and_never_repeat() {
    on_every_engine(|registry| async move {
        let (device, _) = enroll_device(&registry, "alice", "laptop").await;
        let (other, _) = enroll_device(&registry, "alice", "desktop").await;
        assert_eq!(registry.last_stream(&device).await.expect("read"), None, "no stream opened yet");
        let first = registry.next_stream_epoch(&device, 7).await.expect("epoch");
        assert_eq!(registry.last_stream(&device).await.expect("read"), Some(StreamRoute { route: 7, epoch: first }));
        let second = registry.next_stream_epoch(&device, u32::MAX).await.expect("epoch");
        assert!(second > first, "{first} then {second}");
        assert_eq!(
            registry.last_stream(&device).await.expect("read"),
            Some(StreamRoute { route: u32::MAX, epoch: second }),
            "the route of the newest epoch, the whole u32 range"
        );

        let draws: Vec<_> = (0..20u32)
            .map(|route| {
                let registry = registry.clone();
                let device = device.clone();
                tokio::spawn(async move { (route, registry.next_stream_epoch(&device, route).await) })
            })
            .collect();
        let mut epochs = Vec::new();
        for draw in draws {
            let (route, epoch) = draw.await.expect("task");
            epochs.push((epoch.expect("epoch"), route));
        }
        epochs.sort_unstable();
        let newest = *epochs.last().expect("twenty");
        epochs.dedup_by_key(|(epoch, _)| *epoch);
        assert_eq!(epochs.len(), 20, "every concurrent stream gets its own epoch");
        assert!(epochs[0].0 > second);
        // Whichever draw came last, the stored route is the one issued with the largest epoch.
        assert_eq!(
            registry.last_stream(&device).await.expect("read"),
            Some(StreamRoute { route: newest.1, epoch: newest.0 })
        );
        // Another device's counter is its own business.
        assert!(registry.next_stream_epoch(&other, 1).await.expect("epoch") >= 1);

        assert!(registry.revoke_device("alice", &device).await.expect("revoke"));
        assert_eq!(registry.last_stream(&device).await.expect("read"), None, "a revoked device is nowhere");
        for gone in [device.as_str(), "", "not-a-uuid", "00000000-0000-4000-8000-000000000000"] {
            assert!(matches!(registry.next_stream_epoch(gone, 1).await, Err(RegistryError::NotFound)), "{gone:?}");
            assert_eq!(registry.last_stream(gone).await.expect("read"), None, "{gone:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_verifies_the_token_and_issues_the_next_epoch() {
    on_every_engine(|registry| async move {
        let (device, token) = enroll_device(&registry, "alice", "laptop").await;
        let before = registry.next_stream_epoch(&device, 1).await.expect("epoch");
        let opened = registry.open_stream(&token, u32::MAX).await.expect("open").expect("a live device's token opens");
        assert!(opened.epoch > before, "{before} then {}", opened.epoch);
        assert_eq!(
            registry.last_stream(&device).await.expect("read"),
            Some(StreamRoute { route: u32::MAX, epoch: opened.epoch }),
            "the open records its replica's route beside its epoch"
        );
        assert_eq!(opened.device.id, device);
        assert_eq!(opened.device.owner, "alice");
        assert_eq!(opened.device.name, "laptop");
        assert!(opened.device.last_seen_at.is_some(), "the open marks the device as seen");
        assert!(!opened.device.revoked);
        // The two ways of issuing epochs share one counter.
        assert!(registry.next_stream_epoch(&device, 1).await.expect("epoch") > opened.epoch);

        // Not a device token, or no device's: no stream, and nothing is looked up for the odd ones.
        let pat = registry.create_api_token("alice", None).await.expect("api token");
        let unknown = format!("dev_{}", "A".repeat(token.len() - 4));
        for bad in ["", "dev_", "nonsense", pat.as_str(), unknown.as_str()] {
            assert!(registry.open_stream(bad, 1).await.expect("open").is_none(), "{bad:?}");
        }
        assert!(registry.revoke_device("alice", &device).await.expect("revoke"));
        assert!(registry.open_stream(&token, 1).await.expect("open").is_none(), "a revoked device gets no stream");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stream_opens_share_statements_but_never_an_epoch() {
    on_every_engine(|registry| async move {
        let mut devices = Vec::new();
        for n in 0..12 {
            devices.push(enroll_device(&registry, "alice", &format!("device {n}")).await);
        }
        let (revoked, revoked_token) = enroll_device(&registry, "alice", "gone").await;
        assert!(registry.revoke_device("alice", &revoked).await.expect("revoke"));
        // Many opens at once, several per device (so batches meet the same token twice), from
        // two routes (two replicas on one registry), and some of a revoked device, mixed.
        let mut opens = Vec::new();
        for round in 0..5u32 {
            for (device, token) in &devices {
                let (registry, token, device) = (registry.clone(), token.clone(), device.clone());
                let route = round % 2;
                opens.push(tokio::spawn(
                    async move { (Some((device, route)), registry.open_stream(&token, route).await) },
                ));
            }
            if round % 2 == 0 {
                let (registry, token) = (registry.clone(), revoked_token.clone());
                opens.push(tokio::spawn(async move { (None, registry.open_stream(&token, 0).await) }));
            }
        }
        let mut epochs: std::collections::HashMap<String, Vec<(u64, u32)>> = Default::default();
        for open in opens {
            match open.await.expect("task") {
                (Some((device, route)), answer) => {
                    let opened = answer.expect("open").expect("a live device opens");
                    assert_eq!(opened.device.id, device, "each open gets its own device's row");
                    epochs.entry(device).or_default().push((opened.epoch, route));
                }
                (None, answer) => assert!(answer.expect("open").is_none(), "a revoked device gets no stream"),
            }
        }
        for (device, mut issued) in epochs {
            issued.sort_unstable();
            let (epoch, route) = *issued.last().expect("five");
            issued.dedup_by_key(|(epoch, _)| *epoch);
            assert_eq!(issued.len(), 5, "{device}: every open of a device gets an epoch of its own: {issued:?}");
            assert_eq!(
                registry.last_stream(&device).await.expect("read"),
                Some(StreamRoute { route, epoch }),
                "{device}: the stored route is that of the newest epoch"
            );
        }
    })
    .await;
}

// ---- applies that outlive their replica -------------------------------------------------------

/// A pending proposal of a fresh device of alice's: (registry's proposal id, device id).
async fn pending_proposal(registry: &Registry, path: &str) -> (String, String) {
    let (device, _) = enroll_device(registry, "alice", "laptop").await;
    let proposal = registry.create_proposal(new_proposal("alice", &device, "write_file", path)).await.expect("create");
    (proposal.id, device)
}

fn call_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn status_of(registry: &Registry, id: &str) -> protocol::Proposal {
    registry.proposal("alice", id).await.expect("read").expect("exists").proposal
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_applies_are_swept_once_and_late_results_complete_them() {
    on_every_engine(|registry| async move {
        let (stuck, device) = pending_proposal(&registry, "stuck.txt").await;
        let (fresh, fresh_device) = pending_proposal(&registry, "fresh.txt").await;
        let (stuck_call, fresh_call) = (call_id(), call_id());
        let now = Utc::now();
        assert!(registry.begin_apply(&stuck, &stuck_call, now - chrono::Duration::seconds(60)).await.expect("begin"));
        assert!(registry.begin_apply(&fresh, &fresh_call, now + chrono::Duration::seconds(60)).await.expect("begin"));
        assert!(!registry.begin_apply(&stuck, &call_id(), now).await.expect("approve twice"), "applies once");

        // Sweeps racing on several replicas fail the stale one once between them.
        let sweeps: Vec<_> = (0..4)
            .map(|_| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.fail_stale_applies(Utc::now()).await })
            })
            .collect();
        let mut failed = Vec::new();
        for sweep in sweeps {
            failed.extend(sweep.await.expect("task").expect("sweep"));
        }
        assert_eq!(failed, std::slice::from_ref(&stuck), "only the stale apply, once");
        let swept = status_of(&registry, &stuck).await;
        assert_eq!(swept.status, ProposalStatus::Failed);
        assert_eq!(swept.result, Some(HostResult::timed_out(&stuck_call)));
        assert!(swept.decided_at.is_some());
        assert_eq!(status_of(&registry, &fresh).await.status, ProposalStatus::Applying, "its deadline is ahead");
        assert!(!registry.begin_apply(&stuck, &call_id(), now).await.expect("approve"), "never pushed again");

        // The device's late result records the real outcome, once, and only from that device.
        let (other, _) = enroll_device(&registry, "alice", "other").await;
        let late = HostResult::success(&stuck_call, json!({"written": 5}));
        assert_eq!(registry.complete_late_apply(&other, &late).await.expect("late"), LateApply::OtherDevice);
        assert_eq!(status_of(&registry, &stuck).await.status, ProposalStatus::Failed, "unchanged");
        let recorded = registry.complete_late_apply(&device, &late).await.expect("late");
        assert_eq!(recorded, LateApply::Recorded { proposal_id: stuck.clone(), status: ProposalStatus::Applied });
        let completed = status_of(&registry, &stuck).await;
        assert_eq!((completed.status, completed.result.as_ref()), (ProposalStatus::Applied, Some(&late)));
        let again = HostResult::failure(&stuck_call, "changed my mind");
        assert_eq!(registry.complete_late_apply(&device, &again).await.expect("late"), LateApply::Unknown);
        assert_eq!(status_of(&registry, &stuck).await, completed, "recorded once");

        // A late result while still applying (its replica gone, not swept yet) completes it too.
        let refused = HostResult::failure(&fresh_call, "the target changed since the proposal");
        assert_eq!(registry.complete_late_apply(&device, &refused).await.expect("late"), LateApply::OtherDevice);
        let recorded = registry.complete_late_apply(&fresh_device, &refused).await.expect("late");
        assert_eq!(recorded, LateApply::Recorded { proposal_id: fresh.clone(), status: ProposalStatus::Failed });
        assert_eq!(status_of(&registry, &fresh).await.result, Some(refused));
        assert!(registry.fail_stale_applies(Utc::now() + chrono::Duration::hours(1)).await.expect("sweep").is_empty());

        // Results of calls that were no apply, or odd ids, find nothing.
        for odd in [call_id(), "not-a-call".into(), String::new()] {
            let result = HostResult::success(&odd, json!(1));
            assert_eq!(registry.complete_late_apply(&device, &result).await.expect("late"), LateApply::Unknown);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approving_replica_records_its_apply_unless_overtaken() {
    on_every_engine(|registry| async move {
        let later = Utc::now() + chrono::Duration::seconds(30);
        // Offline: nothing pushed, pending again, approvable again with a new call.
        let (offline, _) = pending_proposal(&registry, "a").await;
        let first = call_id();
        assert!(registry.begin_apply(&offline, &first, later).await.expect("begin"));
        let recorded = registry.finish_apply(&offline, &first, &HostResult::offline(&first)).await.expect("finish");
        assert_eq!(recorded, Some(ProposalStatus::Pending));
        let pending = status_of(&registry, &offline).await;
        assert_eq!((pending.status, pending.decided_at, pending.result), (ProposalStatus::Pending, None, None));
        let late = HostResult::success(&first, json!(1));
        let device = pending.device_id.clone();
        assert_eq!(registry.complete_late_apply(&device, &late).await.expect("late"), LateApply::Unknown);
        let second = call_id();
        assert!(registry.begin_apply(&offline, &second, later).await.expect("approve again"));
        let done = HostResult::success(&second, json!({"written": 1}));
        assert_eq!(
            registry.finish_apply(&offline, &second, &done).await.expect("finish"),
            Some(ProposalStatus::Applied)
        );
        assert_eq!(registry.finish_apply(&offline, &second, &done).await.expect("finish"), None, "once");

        // Timed out: failed; the late answer replaces the timeout.
        let (timed_out, device) = pending_proposal(&registry, "b").await;
        let call = call_id();
        assert!(registry.begin_apply(&timed_out, &call, later).await.expect("begin"));
        let recorded = registry.finish_apply(&timed_out, &call, &HostResult::timed_out(&call)).await.expect("finish");
        assert_eq!(recorded, Some(ProposalStatus::Failed));
        assert_eq!(status_of(&registry, &timed_out).await.result, Some(HostResult::timed_out(&call)));
        let late = HostResult::success(&call, json!({"late": true}));
        assert!(matches!(
            registry.complete_late_apply(&device, &late).await.expect("late"),
            LateApply::Recorded { .. }
        ));
        assert_eq!(status_of(&registry, &timed_out).await.status, ProposalStatus::Applied);

        // Swept first: the approving replica's own answer still lands (it is the device's).
        let (swept, _) = pending_proposal(&registry, "c").await;
        let call = call_id();
        assert!(registry.begin_apply(&swept, &call, Utc::now() - chrono::Duration::seconds(1)).await.expect("begin"));
        assert_eq!(registry.fail_stale_applies(Utc::now()).await.expect("sweep"), std::slice::from_ref(&swept));
        let answer = HostResult::success(&call, json!({"written": 2}));
        assert_eq!(registry.finish_apply(&swept, &call, &answer).await.expect("finish"), Some(ProposalStatus::Applied));
        // ... but its own timeout does not overwrite a late answer.
        let (overtaken, device) = pending_proposal(&registry, "d").await;
        let call = call_id();
        assert!(registry.begin_apply(&overtaken, &call, later).await.expect("begin"));
        let late = HostResult::success(&call, json!({"written": 3}));
        assert!(matches!(
            registry.complete_late_apply(&device, &late).await.expect("late"),
            LateApply::Recorded { .. }
        ));
        assert_eq!(
            registry.finish_apply(&overtaken, &call, &HostResult::timed_out(&call)).await.expect("finish"),
            None
        );
        assert_eq!(status_of(&registry, &overtaken).await.result, Some(late));
        // Another call's outcome changes nothing.
        assert_eq!(registry.finish_apply(&overtaken, &call_id(), &answer).await.expect("finish"), None);
    })
    .await;
}

// ---- bounded storage --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_proposals_and_manifests_are_refused_and_nothing_is_stored() {
    on_every_engine(|registry| async move {
        let limits = Limits {
            max_proposal_bytes: 10_000,
            max_manifest_bytes: 2_000,
            max_manifest_tools: 3,
            ..Limits::default()
        };
        let registry = registry.with_limits(limits);
        let (device, _) = enroll_device(&registry, "alice", "laptop").await;
        let big = |input: usize, plan: usize| NewProposal {
            input: json!({"path": "x", "content": "a".repeat(input)}),
            plan: json!({"summary": "s", "diff": "+".repeat(plan)}),
            ..new_proposal("alice", &device, "write_file", "x")
        };
        registry.create_proposal(big(4_000, 4_000)).await.expect("under the cap");
        match registry.create_proposal(big(6_000, 6_000)).await {
            Err(RegistryError::OverLimit { limit: Limit::ProposalBytes, value, max: 10_000 }) => {
                assert!(value > 12_000, "{value}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            registry.create_proposal(big(11_000, 0)).await,
            Err(RegistryError::OverLimit { limit: Limit::ProposalBytes, .. })
        ));
        assert_eq!(registry.proposals("alice", None).await.expect("list").len(), 1, "nothing else stored");

        let tool = |name: &str, description: usize| ToolDescriptor {
            name: name.into(),
            description: "d".repeat(description),
            input_schema: json!({"type": "object"}),
            class: ToolClass::Read,
        };
        let manifest = |tools: Vec<ToolDescriptor>| Manifest {
            tools,
            roots: vec!["/home/a".into(), "/srv".into()],
            version: "1".into(),
            platform: "linux".into(),
        };
        let fits = manifest(vec![tool("a", 10), tool("b", 10)]);
        registry.set_manifest(&device, &fits).await.expect("fits");
        let too_big = manifest(vec![tool("a", 3_000)]);
        assert!(matches!(
            registry.set_manifest(&device, &too_big).await,
            Err(RegistryError::OverLimit { limit: Limit::ManifestBytes, max: 2_000, .. })
        ));
        let too_many = manifest((0..4).map(|i| tool(&format!("t{i}"), 1)).collect());
        assert!(matches!(
            registry.set_manifest(&device, &too_many).await,
            Err(RegistryError::OverLimit { limit: Limit::ManifestTools, value: 4, max: 3 })
        ));
        let stored = registry.device("alice", &device).await.expect("device").expect("exists");
        assert_eq!(stored.manifest, Some(fits.clone()), "the last manifest that fit stays");

        // A list without manifests has roots and counts, and reads no manifest.
        let page = registry.devices_page("alice", &PageRequest::default(), false).await.expect("page");
        let listed = &page.items[0];
        assert_eq!((listed.manifest.as_ref(), listed.tool_count), (None, Some(2)));
        assert_eq!(listed.roots.as_deref(), Some(&fits.roots[..]));
        let page = registry.devices_page("alice", &PageRequest::default(), true).await.expect("page");
        assert_eq!(page.items[0].manifest, Some(fits));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_pairing_codes_are_limited_per_user_even_when_minted_at_once() {
    on_every_engine(|registry| async move {
        let registry = registry.with_limits(Limits { max_live_pairing_codes: 5, ..Limits::default() });
        let ttl = Duration::from_secs(600);
        // 40 at once from one user, on what could be several replicas: exactly five.
        let mints: Vec<_> = (0..40)
            .map(|_| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.create_pairing_code("alice", ttl, None).await })
            })
            .collect();
        let (mut minted, mut refused) = (Vec::new(), 0);
        for mint in mints {
            match mint.await.expect("task") {
                Ok(code) => minted.push(code),
                Err(RegistryError::OverLimit { limit: Limit::LivePairingCodes, value: 5, max: 5 }) => refused += 1,
                Err(other) => panic!("{other:?}"),
            }
        }
        assert_eq!((minted.len(), refused), (5, 35));
        registry.create_pairing_code("bob", ttl, None).await.expect("another user has a quota of its own");

        // A used code and an expired one are not live: room for two more.
        enrolled(registry.enroll(&minted[0].code, "laptop", None).await.expect("enroll"));
        assert!(registry.create_pairing_code("alice", ttl, None).await.is_ok());
        assert!(registry.create_pairing_code("alice", ttl, None).await.is_err());
        let short = registry.with_limits(Limits { max_live_pairing_codes: 6, ..Limits::default() });
        short.create_pairing_code("alice", Duration::from_millis(1), None).await.expect("a sixth, short-lived");
        tokio::time::sleep(Duration::from_millis(20)).await;
        short.create_pairing_code("alice", ttl, None).await.expect("the expired one does not count");
        assert!(short.create_pairing_code("alice", ttl, None).await.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_limited_per_user_at_enrollment_and_the_code_is_kept() {
    on_every_engine(|registry| async move {
        let registry = registry.with_limits(Limits { max_devices_per_user: 2, ..Limits::default() });
        let (first, _) = enroll_device(&registry, "alice", "one").await;
        enroll_device(&registry, "alice", "two").await;
        let code = registry.create_pairing_code("alice", Duration::from_secs(600), None).await.expect("code");
        match registry.enroll(&code.code, "three", None).await {
            Err(RegistryError::OverLimit { limit: Limit::DevicesPerUser, value: 2, max: 2 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(registry.devices("alice").await.expect("devices").len(), 2);
        enroll_device(&registry, "bob", "bob's").await;

        // Revoking one makes room, and the refused code still works.
        assert!(registry.revoke_device("alice", &first).await.expect("revoke"));
        let third = enrolled(registry.enroll(&code.code, "three", None).await.expect("enroll"));
        assert!(registry.device("alice", &third.device_id).await.expect("device").is_some());
        assert_eq!(registry.enroll(&code.code, "four", None).await.expect("enroll"), EnrollOutcome::Refused);

        // Many enrollments at once with codes of one user: never past the quota.
        let registry = registry.with_limits(Limits { max_devices_per_user: 6, ..Limits::default() });
        let mut codes = Vec::new();
        for _ in 0..8 {
            codes.push(registry.create_pairing_code("carol", Duration::from_secs(600), None).await.expect("code").code);
        }
        let enrollments: Vec<_> = codes
            .into_iter()
            .map(|code| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.enroll(&code, "racer", None).await })
            })
            .collect();
        let mut results = Vec::new();
        for enrollment in enrollments {
            results.push(enrollment.await.expect("task"));
        }
        let enrolled = results.iter().filter(|r| matches!(r, Ok(EnrollOutcome::Enrolled(_)))).count();
        let refused = results.iter().filter(|r| matches!(r, Err(RegistryError::OverLimit { .. }))).count();
        assert_eq!((enrolled, refused), (6, 2), "{results:?}");
        assert_eq!(registry.devices("carol").await.expect("devices").len(), 6);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_deletes_decided_proposals_and_done_codes_and_nothing_else() {
    on_every_engine(|registry| async move {
        let started = Utc::now() - chrono::Duration::seconds(1);
        let (device, _) = enroll_device(&registry, "alice", "laptop").await; // its code is used
        let make = |path: &str| registry.create_proposal(new_proposal("alice", &device, "write_file", path));
        let pending = make("pending").await.expect("create").id;
        let applying = make("applying").await.expect("create").id;
        let applied = make("applied").await.expect("create").id;
        let failed = make("failed").await.expect("create").id;
        let rejected = make("rejected").await.expect("create").id;
        let later = Utc::now() + chrono::Duration::seconds(60);
        for (id, call) in [(&applying, call_id()), (&applied, call_id()), (&failed, call_id())] {
            assert!(registry.begin_apply(id, &call, later).await.expect("begin"));
            let result = match id == &applied {
                true => HostResult::success(&call, json!(1)),
                false if id == &failed => HostResult::failure(&call, "refused"),
                false => continue,
            };
            registry.finish_apply(id, &call, &result).await.expect("finish");
        }
        assert!(registry
            .transition_proposal(&rejected, ProposalStatus::Pending, ProposalStatus::Rejected, None)
            .await
            .expect("reject"));
        let live = registry.create_pairing_code("alice", Duration::from_secs(600), None).await.expect("code");
        registry.create_pairing_code("alice", Duration::from_millis(1), None).await.expect("soon expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let bobs = registry.create_pairing_code("bob", Duration::from_secs(600), None).await.expect("code");

        // Cutoffs before everything: nothing goes.
        let none = Expiry { proposals_decided_before: started, codes_done_before: started };
        assert_eq!(registry.delete_expired(none).await.expect("expire"), Expired::default());
        assert_eq!(registry.proposals("alice", None).await.expect("list").len(), 5);

        // Cutoffs after everything: the decided proposals, the used and the expired code.
        let all = Expiry {
            proposals_decided_before: Utc::now() + chrono::Duration::seconds(1),
            codes_done_before: Utc::now() + chrono::Duration::seconds(1),
        };
        let expired = registry.delete_expired(all).await.expect("expire");
        assert_eq!(expired, Expired { proposals: 3, pairing_codes: 2 });
        let mut left: Vec<String> =
            registry.proposals("alice", None).await.expect("list").into_iter().map(|p| p.id).collect();
        left.sort();
        let mut want = vec![pending.clone(), applying.clone()];
        want.sort();
        assert_eq!(left, want, "pending and applying proposals stay");
        assert_eq!(registry.delete_expired(all).await.expect("again"), Expired::default(), "idempotent");
        assert!(registry.device("alice", &device).await.expect("device").is_some(), "devices stay");
        enrolled(registry.enroll(&live.code, "live code", None).await.expect("live codes stay"));
        enrolled(registry.enroll(&bobs.code, "bob's live code", None).await.expect("live codes stay"));
    })
    .await;
}

/// Pages of `page_size` walked with `next` until the end: the ids in order.
async fn walk_proposals(
    registry: &Registry,
    owner: &str,
    status: Option<ProposalStatus>,
    size: usize,
) -> (Vec<String>, usize) {
    let mut request = PageRequest { limit: size, after: None };
    let (mut ids, mut pages) = (Vec::new(), 0);
    loop {
        let page = registry.proposals_page(owner, status, &request).await.expect("page");
        pages += 1;
        assert!(page.items.len() <= size);
        ids.extend(page.items.into_iter().map(|p| p.id));
        match page.next {
            Some(next) => request.after = Some(next),
            None => return (ids, pages),
        }
        assert!(pages < 1000, "no end");
    }
}

async fn walk_devices(registry: &Registry, owner: &str, size: usize) -> Vec<String> {
    let mut request = PageRequest { limit: size, after: None };
    let mut ids = Vec::new();
    loop {
        let page = registry.devices_page(owner, &request, false).await.expect("page");
        ids.extend(page.items.into_iter().map(|d| d.id));
        match page.next {
            Some(next) => request.after = Some(next),
            None => return ids,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_every_row_once_in_order_and_within_the_byte_budget() {
    on_every_engine(|registry| async move {
        let (device, _) = enroll_device(&registry, "alice", "laptop").await;
        let mut made = Vec::new();
        for i in 0..12 {
            made.push(
                registry
                    .create_proposal(new_proposal("alice", &device, "write_file", &format!("{i}")))
                    .await
                    .expect("create")
                    .id,
            );
        }
        let newest_first: Vec<String> = made.iter().rev().cloned().collect();
        for size in [1, 5, 11, 12, 13, 500] {
            let (ids, pages) = walk_proposals(&registry, "alice", None, size).await;
            assert_eq!(ids, newest_first, "pages of {size}");
            assert_eq!(pages, 12usize.div_ceil(size).max(1), "pages of {size}");
        }
        assert!(registry
            .transition_proposal(&made[3], ProposalStatus::Pending, ProposalStatus::Rejected, None)
            .await
            .expect("reject"));
        let (pending, _) = walk_proposals(&registry, "alice", Some(ProposalStatus::Pending), 4).await;
        assert_eq!(pending, newest_first.iter().filter(|id| **id != made[3]).cloned().collect::<Vec<_>>());
        let (rejected, _) = walk_proposals(&registry, "alice", Some(ProposalStatus::Rejected), 4).await;
        assert_eq!(rejected, [made[3].clone()]);
        assert_eq!(walk_proposals(&registry, "bob", None, 4).await, (vec![], 1));

        // A byte budget cuts a page short; one row always goes.
        let tight = registry.clone().with_limits(Limits { max_page_bytes: 1, ..Limits::default() });
        let (ids, pages) = walk_proposals(&tight, "alice", None, 100).await;
        assert_eq!((ids, pages), (newest_first.clone(), 12));
        let stored = registry.proposal("alice", &made[11]).await.expect("read").expect("exists");
        let one = serde_json::to_string(&stored.proposal.input).unwrap().len()
            + serde_json::to_string(&stored.proposal.proposal).unwrap().len();
        let three = registry.clone().with_limits(Limits { max_page_bytes: 3 * one + 1, ..Limits::default() });
        let first = three.proposals_page("alice", None, &PageRequest::default()).await.expect("page");
        assert_eq!(first.items.len(), 3);

        // Devices, oldest first.
        let mut devices = vec![device.clone()];
        for i in 0..6 {
            devices.push(enroll_device(&registry, "alice", &format!("d{i}")).await.0);
        }
        for size in [1, 2, 7, 100] {
            assert_eq!(walk_devices(&registry, "alice", size).await, devices, "pages of {size}");
        }
        // A cursor past the end is an empty last page.
        let past = Cursor { at_ms: 0, id: uuid::Uuid::new_v4().to_string() };
        let page =
            registry.proposals_page("alice", None, &PageRequest { limit: 5, after: Some(past) }).await.expect("page");
        assert_eq!((page.items.len(), page.next), (0, None));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_rows_that_share_a_time_exactly_once() {
    // Rows made on several replicas can share a millisecond: give every row the same time.
    for kind in [Kind::SqliteFile, Kind::Postgres] {
        let database = TestDatabase::create(kind).await;
        let url = database.url.clone();
        database
            .run(async move {
                let registry = Registry::connect(&url).await.expect("connect");
                let (device, _) = enroll_device(&registry, "alice", "laptop").await;
                let mut proposals = Vec::new();
                for i in 0..23 {
                    let new = new_proposal("alice", &device, "write_file", &format!("{i}"));
                    proposals.push(registry.create_proposal(new).await.expect("create").id);
                }
                let mut devices = vec![device];
                for i in 0..9 {
                    devices.push(enroll_device(&registry, "alice", &format!("d{i}")).await.0);
                }
                sqlx::any::install_default_drivers();
                let pool = sqlx::AnyPool::connect(&url).await.expect("raw pool");
                sqlx::query("UPDATE proposals SET created_at = 1767225600000").execute(&pool).await.expect("tie");
                sqlx::query("UPDATE devices SET created_at = 1767225600000").execute(&pool).await.expect("tie");
                pool.close().await;

                proposals.sort();
                proposals.reverse(); // newest first, then by id descending
                devices.sort();
                for size in [1, 4, 22, 23, 24] {
                    let (walked, _) = walk_proposals(&registry, "alice", None, size).await;
                    assert_eq!(walked, proposals, "proposals in pages of {size}");
                    assert_eq!(walk_devices(&registry, "alice", size).await, devices, "devices in pages of {size}");
                }
                registry.close().await;
            })
            .await;
    }
}
