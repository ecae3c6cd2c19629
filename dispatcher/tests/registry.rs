//! The registry against real databases: every test runs on an in-memory SQLite, a SQLite file
//! and a fresh PostgreSQL database (127.0.0.1:5432, user `postgres`, trust auth), created for
//! the test and dropped after it.
//!
//! Not here: the HTTP mapping of these results (status codes, bodies), and caching.

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use dispatcher::registry::{EnrollOutcome, NewProposal, Registry, RegistryError};
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
        let first = registry.next_stream_epoch(&device).await.expect("epoch");
        let second = registry.next_stream_epoch(&device).await.expect("epoch");
        assert!(second > first, "{first} then {second}");

        let draws: Vec<_> = (0..20)
            .map(|_| {
                let registry = registry.clone();
                let device = device.clone();
                tokio::spawn(async move { registry.next_stream_epoch(&device).await })
            })
            .collect();
        let mut epochs = Vec::new();
        for draw in draws {
            epochs.push(draw.await.expect("task").expect("epoch"));
        }
        epochs.sort_unstable();
        epochs.dedup();
        assert_eq!(epochs.len(), 20, "every concurrent stream gets its own epoch");
        assert!(epochs[0] > second);
        // Another device's counter is its own business.
        assert!(registry.next_stream_epoch(&other).await.expect("epoch") >= 1);

        assert!(registry.revoke_device("alice", &device).await.expect("revoke"));
        for gone in [device.as_str(), "", "not-a-uuid", "00000000-0000-4000-8000-000000000000"] {
            assert!(matches!(registry.next_stream_epoch(gone).await, Err(RegistryError::NotFound)), "{gone:?}");
        }
    })
    .await;
}
