//! Device authorizations (RFC 8628) in the registry, against real databases: an in-memory
//! SQLite, a SQLite file and a fresh PostgreSQL database (127.0.0.1:5432, user `postgres`,
//! trust auth), each created for the test and dropped after it. The state machine (pending,
//! approved, used, denied, expired), polling pace, racing polls, unknown codes, quotas and
//! expiry.
//!
//! Not here: the OAuth wire format and the HTTP status codes (tests/tests/grant.rs).

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use dispatcher::registry::{
    AuthorizationStatus, Decision, EnrollOutcome, Limits, NewDeviceAuthorization, Registry, RegistryError, TokenOutcome,
};
use sqlx::Connection;

const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Runs `test` on each engine, on a fresh migrated database, dropping it even when it panics.
async fn on_every_engine<F, Fut>(test: F)
where
    F: Fn(Registry) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    for engine in ["sqlite-memory", "sqlite-file", "postgres"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let postgres_name = (engine == "postgres").then(|| format!("grant_{}", uuid::Uuid::new_v4().simple()));
        let url = match (engine, &postgres_name) {
            ("sqlite-memory", _) => "sqlite::memory:".to_owned(),
            ("sqlite-file", _) => format!("sqlite://{}?mode=rwc", dir.path().join("registry.db").display()),
            (_, Some(name)) => {
                let mut admin =
                    sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await.expect("PostgreSQL on 127.0.0.1:5432");
                sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
                let _ = admin.close().await;
                format!("postgres://postgres@127.0.0.1:5432/{name}")
            }
            _ => unreachable!(),
        };
        let registry = Registry::connect(&url).await.unwrap_or_else(|e| panic!("{engine}: {e}"));
        let body = test(registry.clone());
        let outcome = tokio::spawn(async move {
            body.await;
            registry.close().await;
        })
        .await;
        if let Some(name) = postgres_name {
            if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await;
                let _ = admin.close().await;
            }
        }
        if let Err(error) = outcome {
            eprintln!("failed on {engine}");
            std::panic::resume_unwind(error.into_panic());
        }
    }
}

fn request(ttl: Duration, interval: Duration) -> NewDeviceAuthorization {
    NewDeviceAuthorization {
        name: "laptop".into(),
        platform: Some("linux".into()),
        roots: vec!["/home/a/projects".into(), "/srv/data".into()],
        ttl,
        interval,
    }
}

const MINUTE: Duration = Duration::from_secs(60);

fn issued(outcome: TokenOutcome) -> protocol::EnrollResponse {
    match outcome {
        TokenOutcome::Issued(response) => response,
        other => panic!("expected a token, got {other:?}"),
    }
}

#[tokio::test]
async fn an_approved_authorization_issues_one_device_once() {
    on_every_engine(|registry| async move {
        let codes = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        assert!(codes.device_code.starts_with("dac_"));
        assert_eq!(codes.user_code.len(), 9);
        assert_eq!(registry.poll_device_authorization(&codes.device_code).await.unwrap(), TokenOutcome::Pending);

        // Typed in lower case and without the dash, by anyone holding the code.
        let typed = codes.user_code.replace('-', "").to_lowercase();
        let seen = registry.device_authorization(&typed, "bob").await.unwrap().expect("visible while pending");
        assert_eq!(seen.user_code, codes.user_code);
        assert_eq!((seen.name.as_str(), seen.platform.as_deref()), ("laptop", Some("linux")));
        assert_eq!(seen.roots, ["/home/a/projects", "/srv/data"]);
        assert_eq!(seen.status, AuthorizationStatus::Pending);

        let Decision::Approved { device_id } =
            registry.approve_device_authorization(&codes.user_code, "alice", None).await.unwrap()
        else {
            panic!("not approved");
        };
        assert!(registry.device_authorization(&codes.user_code, "bob").await.unwrap().is_none(), "alice's now");
        let mine = registry.device_authorization(&codes.user_code, "alice").await.unwrap().expect("alice sees it");
        assert_eq!((mine.status, mine.device_id.as_deref()), (AuthorizationStatus::Approved, Some(device_id.as_str())));

        let token = issued(registry.poll_device_authorization(&codes.device_code).await.unwrap());
        assert_eq!(token.device_id, device_id);
        let auth = registry.device_for_token(&token.token).await.unwrap().expect("a working device token");
        assert_eq!((auth.device_id.as_str(), auth.owner.as_str()), (device_id.as_str(), "alice"));
        let device = registry.device("alice", &device_id).await.unwrap().expect("alice's device");
        assert_eq!((device.name.as_str(), device.platform.as_deref()), ("laptop", Some("linux")));

        // Single use: the device code is spent, the user code decided.
        assert_eq!(registry.poll_device_authorization(&codes.device_code).await.unwrap(), TokenOutcome::Invalid);
        assert_eq!(
            registry.approve_device_authorization(&codes.user_code, "alice", None).await.unwrap(),
            Decision::NotPending(AuthorizationStatus::Used)
        );
        assert_eq!(registry.deny_device_authorization(&codes.user_code, "bob").await.unwrap(), Decision::NotFound);
        assert_eq!(registry.devices("alice").await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_denied_authorization_answers_access_denied() {
    on_every_engine(|registry| async move {
        let codes = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        assert_eq!(registry.deny_device_authorization(&codes.user_code, "alice").await.unwrap(), Decision::Denied);
        for _ in 0..2 {
            assert_eq!(registry.poll_device_authorization(&codes.device_code).await.unwrap(), TokenOutcome::Denied);
        }
        assert_eq!(
            registry.approve_device_authorization(&codes.user_code, "alice", None).await.unwrap(),
            Decision::NotPending(AuthorizationStatus::Denied)
        );
        let seen = registry.device_authorization(&codes.user_code, "alice").await.unwrap().expect("visible");
        assert_eq!(seen.status, AuthorizationStatus::Denied);
        assert!(registry.devices("alice").await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn codes_expire_whether_pending_or_approved_and_uncollected() {
    on_every_engine(|registry| async move {
        let ttl = Duration::from_millis(400);
        let pending = registry.create_device_authorization(&request(ttl, Duration::ZERO)).await.unwrap();
        let approved = registry.create_device_authorization(&request(ttl, Duration::ZERO)).await.unwrap();
        assert!(matches!(
            registry.approve_device_authorization(&approved.user_code, "alice", None).await.unwrap(),
            Decision::Approved { .. }
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        for codes in [&pending, &approved] {
            assert_eq!(registry.poll_device_authorization(&codes.device_code).await.unwrap(), TokenOutcome::Expired);
            let seen = registry.device_authorization(&codes.user_code, "alice").await.unwrap().expect("visible");
            assert_eq!(seen.status, AuthorizationStatus::Expired);
        }
        assert_eq!(
            registry.approve_device_authorization(&pending.user_code, "alice", None).await.unwrap(),
            Decision::NotPending(AuthorizationStatus::Expired)
        );
        assert_eq!(
            registry.deny_device_authorization(&pending.user_code, "alice").await.unwrap(),
            Decision::NotPending(AuthorizationStatus::Expired)
        );
        assert!(registry.devices("alice").await.unwrap().is_empty(), "an uncollected approval makes no device");
    })
    .await;
}

#[tokio::test]
async fn polling_faster_than_the_interval_slows_down_by_five_seconds_each_time() {
    on_every_engine(|registry| async move {
        let interval = Duration::from_millis(300);
        let codes = registry.create_device_authorization(&request(MINUTE, interval)).await.unwrap();
        assert_eq!(registry.poll_device_authorization(&codes.device_code).await.unwrap(), TokenOutcome::Pending);
        let slowed = registry.poll_device_authorization(&codes.device_code).await.unwrap();
        assert_eq!(slowed, TokenOutcome::SlowDown { interval: Duration::from_millis(5300) });
        let slower = registry.poll_device_authorization(&codes.device_code).await.unwrap();
        assert_eq!(slower, TokenOutcome::SlowDown { interval: Duration::from_millis(10_300) });

        // At the pace asked for, polls are pending, never slowed.
        let paced = registry.create_device_authorization(&request(MINUTE, interval)).await.unwrap();
        for _ in 0..3 {
            assert_eq!(registry.poll_device_authorization(&paced.device_code).await.unwrap(), TokenOutcome::Pending);
            tokio::time::sleep(interval + Duration::from_millis(20)).await;
        }
        // Approved, the next poll gets the token whatever the pace.
        assert!(matches!(
            registry.approve_device_authorization(&paced.user_code, "alice", None).await.unwrap(),
            Decision::Approved { .. }
        ));
        issued(registry.poll_device_authorization(&paced.device_code).await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn racing_polls_after_approval_issue_exactly_one_token() {
    on_every_engine(|registry| async move {
        let codes = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        registry.approve_device_authorization(&codes.user_code, "alice", None).await.unwrap();
        let polls = (0..8).map(|_| {
            let (registry, code) = (registry.clone(), codes.device_code.clone());
            tokio::spawn(async move { registry.poll_device_authorization(&code).await.unwrap() })
        });
        let outcomes: Vec<TokenOutcome> =
            futures::future::join_all(polls).await.into_iter().map(|joined| joined.expect("poll task")).collect();
        let tokens = outcomes.iter().filter(|o| matches!(o, TokenOutcome::Issued(_))).count();
        assert_eq!(tokens, 1, "{outcomes:?}");
        assert!(outcomes.iter().all(|o| matches!(o, TokenOutcome::Issued(_) | TokenOutcome::Invalid)), "{outcomes:?}");
        assert_eq!(registry.devices("alice").await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn racing_approvals_decide_once() {
    on_every_engine(|registry| async move {
        let codes = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        let users = ["alice", "bob", "carol", "dave"];
        let decisions = users.map(|user| {
            let (registry, code) = (registry.clone(), codes.user_code.clone());
            tokio::spawn(async move { registry.approve_device_authorization(&code, user, None).await.unwrap() })
        });
        let decisions: Vec<Decision> =
            futures::future::join_all(decisions).await.into_iter().map(Result::unwrap).collect();
        let approved = decisions.iter().filter(|d| matches!(d, Decision::Approved { .. })).count();
        assert_eq!(approved, 1, "{decisions:?}");
        assert!(decisions.iter().all(|d| matches!(d, Decision::Approved { .. } | Decision::NotFound)), "{decisions:?}");
    })
    .await;
}

#[tokio::test]
async fn unknown_and_malformed_codes_find_nothing() {
    on_every_engine(|registry| async move {
        let codes = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        let other_device_code = format!("dac_{}", "A".repeat(43));
        for device_code in ["", "garbage", other_device_code.as_str(), &codes.device_code[..20]] {
            assert_eq!(registry.poll_device_authorization(device_code).await.unwrap(), TokenOutcome::Invalid);
        }
        for user_code in ["", "BCDF-GHJ", "AEIO-UAEI", "not a code at all", "ZZZZ-ZZZZ"] {
            if user_code.replace('-', "").to_uppercase() == codes.user_code.replace('-', "") {
                continue;
            }
            assert!(registry.device_authorization(user_code, "alice").await.unwrap().is_none(), "{user_code}");
            assert_eq!(
                registry.approve_device_authorization(user_code, "alice", None).await.unwrap(),
                Decision::NotFound
            );
            assert_eq!(registry.deny_device_authorization(user_code, "alice").await.unwrap(), Decision::NotFound);
        }
        assert_eq!(registry.poll_device_authorization(&codes.device_code).await.unwrap(), TokenOutcome::Pending);
    })
    .await;
}

#[tokio::test]
async fn revoking_the_approving_api_token_withdraws_an_uncollected_approval() {
    on_every_engine(|registry| async move {
        let api_token = registry.create_api_token("alice", None).await.unwrap();
        let hash = hex_sha256(&api_token);
        let codes = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        registry.approve_device_authorization(&codes.user_code, "alice", Some(&hash)).await.unwrap();
        assert_eq!(registry.revoke_api_token(&api_token).await.unwrap(), vec![hash]);
        assert_eq!(registry.poll_device_authorization(&codes.device_code).await.unwrap(), TokenOutcome::Withdrawn);
        assert!(registry.devices("alice").await.unwrap().is_empty());
    })
    .await;
}

fn hex_sha256(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn the_device_quota_holds_for_devices_enrolled_by_link() {
    on_every_engine(|registry| async move {
        let registry = registry.with_limits(Limits { max_devices_per_user: 1, ..Limits::default() });
        let first = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        let second = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        registry.approve_device_authorization(&first.user_code, "alice", None).await.unwrap();
        registry.approve_device_authorization(&second.user_code, "alice", None).await.unwrap();
        issued(registry.poll_device_authorization(&first.device_code).await.unwrap());
        assert_eq!(
            registry.poll_device_authorization(&second.device_code).await.unwrap(),
            TokenOutcome::OverLimit { value: 1, max: 1 }
        );
        let third = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        let refused = registry.approve_device_authorization(&third.user_code, "alice", None).await;
        assert!(matches!(refused, Err(RegistryError::OverLimit { value: 1, max: 1, .. })), "{refused:?}");
        // And a pairing code still enrolls, within the same quota.
        let bob_code = registry.create_pairing_code("bob", MINUTE, None).await.unwrap();
        assert!(matches!(
            registry.enroll(&bob_code.code, "bob-laptop", None).await.unwrap(),
            EnrollOutcome::Enrolled(_)
        ));
    })
    .await;
}

#[tokio::test]
async fn the_janitor_deletes_expired_authorizations_and_nothing_live() {
    on_every_engine(|registry| async move {
        let short = registry.create_device_authorization(&request(Duration::from_millis(200), Duration::ZERO)).await;
        let short = short.unwrap();
        let live = registry.create_device_authorization(&request(MINUTE, Duration::ZERO)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(registry.delete_done_device_authorizations(Utc::now()).await.unwrap(), 1);
        assert_eq!(registry.delete_done_device_authorizations(Utc::now()).await.unwrap(), 0);
        assert_eq!(registry.poll_device_authorization(&short.device_code).await.unwrap(), TokenOutcome::Invalid);
        assert_eq!(registry.poll_device_authorization(&live.device_code).await.unwrap(), TokenOutcome::Pending);
    })
    .await;
}

#[tokio::test]
async fn bad_requests_store_nothing() {
    on_every_engine(|registry| async move {
        for bad in [
            NewDeviceAuthorization { name: " ".into(), ..request(MINUTE, Duration::ZERO) },
            request(Duration::ZERO, Duration::ZERO),
            request(Duration::from_secs(3601), Duration::ZERO),
        ] {
            let refused = registry.create_device_authorization(&bad).await;
            assert!(matches!(refused, Err(RegistryError::InvalidArgument(_))), "{bad:?}: {refused:?}");
        }
    })
    .await;
}
