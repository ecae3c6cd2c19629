//! The call log's table against real databases: every test runs on an in-memory SQLite, a
//! SQLite file and a fresh PostgreSQL database (dropped after it). Parts of a record written in
//! any order and batch, owner scoping, filters and pages, the sweep to `unknown`, retention.
//!
//! Not here: who writes the parts (the end-to-end suite `tests/tests/call_log.rs` does that
//! through the real binaries).

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dispatcher::registry::{CallFilter, CallPart, Dispatched, Finished, PageRequest, Pushed, Registry};
use protocol::{CallMode, CallOutcome, CallRecord, ToolClass};

/// Runs `test` on each engine, on a fresh migrated database.
async fn on_every_engine<F, Fut>(test: F)
where
    F: Fn(Registry) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    for engine in ["sqlite-memory", "sqlite-file", "postgres"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let postgres = match engine {
            "postgres" => Some(e2e::postgres::TestDatabase::create().await.expect("PostgreSQL on 127.0.0.1:5432")),
            _ => None,
        };
        let url = match (engine, &postgres) {
            ("sqlite-memory", _) => "sqlite::memory:".to_owned(),
            ("sqlite-file", _) => format!("sqlite://{}?mode=rwc", dir.path().join("log.db").display()),
            (_, Some(database)) => database.url().to_owned(),
            _ => unreachable!(),
        };
        let registry = Registry::connect(&url).await.unwrap_or_else(|e| panic!("{engine}: {e}"));
        let outcome = tokio::spawn(test(registry.clone())).await;
        registry.close().await;
        if let Some(database) = postgres {
            let _ = database.cleanup().await;
        }
        if let Err(error) = outcome {
            eprintln!("failed on {engine}");
            std::panic::resume_unwind(error.into_panic());
        }
    }
}

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn dispatch(call: &str, device: &str, owner: &str, tool: &str, deadline: DateTime<Utc>) -> CallPart {
    let mut part = CallPart::new(call, device, owner);
    part.dispatched =
        Some(Dispatched { tool: tool.into(), mode: CallMode::Auto, at: Utc::now(), by: "replica-a".into(), deadline });
    part
}

fn push(call: &str, device: &str, owner: &str) -> CallPart {
    let mut part = CallPart::new(call, device, owner);
    part.pushed = Some(Pushed { at: Utc::now(), by: "replica-b".into() });
    part
}

fn finish(call: &str, device: &str, owner: &str, outcome: CallOutcome, bytes: Option<u64>) -> CallPart {
    let mut part = CallPart::new(call, device, owner);
    let error = match outcome {
        CallOutcome::Error => Some("no such file".to_owned()),
        CallOutcome::TimedOut => Some(protocol::ERROR_DEVICE_TIMED_OUT.to_owned()),
        CallOutcome::Offline => Some(protocol::ERROR_DEVICE_OFFLINE.to_owned()),
        _ => None,
    };
    part.finished = Some(Finished { outcome, error, at: Some(Utc::now()), result_bytes: bytes });
    part
}

fn later(secs: i64) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(secs)
}

async fn record(registry: &Registry, owner: &str, call: &str) -> CallRecord {
    registry.call_record(owner, call).await.expect("read").unwrap_or_else(|| panic!("no record of {call}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_written_in_any_order_make_one_record() {
    on_every_engine(|registry| async move {
        let device = id();
        // In one batch, in separate batches, and in reverse order.
        let (a, b, c) = (id(), id(), id());
        registry
            .record_calls(vec![
                dispatch(&a, &device, "alice", "stat", later(30)),
                push(&a, &device, "alice"),
                finish(&a, &device, "alice", CallOutcome::Ok, Some(42)),
            ])
            .await
            .expect("one batch");
        for part in [
            dispatch(&b, &device, "alice", "stat", later(30)),
            push(&b, &device, "alice"),
            finish(&b, &device, "alice", CallOutcome::Ok, Some(42)),
        ] {
            registry.record_calls(vec![part]).await.expect("a part");
        }
        for part in [
            finish(&c, &device, "alice", CallOutcome::Ok, Some(42)),
            push(&c, &device, "alice"),
            dispatch(&c, &device, "alice", "stat", later(30)),
        ] {
            registry.record_calls(vec![part]).await.expect("a part");
        }
        for call in [&a, &b, &c] {
            let got = record(&registry, "alice", call).await;
            assert_eq!(got.call_id, *call);
            assert_eq!((got.tool.as_str(), got.mode, got.outcome), ("stat", CallMode::Auto, CallOutcome::Ok));
            assert_eq!(got.dispatched_by, "replica-a");
            assert_eq!(got.pushed_by.as_deref(), Some("replica-b"));
            assert!(got.pushed_at.is_some() && got.finished_at.is_some(), "{got:?}");
            assert_eq!(got.result_bytes, Some(42));
            assert!(got.duration_ms.is_some(), "{got:?}");
            assert_eq!(got.error, None);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_devices_word_is_final_and_other_devices_are_ignored() {
    on_every_engine(|registry| async move {
        let device = id();
        let call = id();
        registry.record_calls(vec![dispatch(&call, &device, "alice", "hash_file", later(30))]).await.expect("dispatch");
        registry.record_calls(vec![finish(&call, &device, "alice", CallOutcome::TimedOut, None)]).await.expect("504");
        let got = record(&registry, "alice", &call).await;
        assert_eq!((got.outcome, got.error.as_deref()), (CallOutcome::TimedOut, Some("device timed out")));

        // Another device cannot complete it; its owner cannot either.
        let forged = finish(&call, &id(), "alice", CallOutcome::Ok, Some(1));
        let other_owner = finish(&call, &device, "mallory", CallOutcome::Ok, Some(1));
        registry.record_calls(vec![forged]).await.expect("forged");
        registry.record_calls(vec![other_owner]).await.expect("other owner");
        assert_eq!(record(&registry, "alice", &call).await.outcome, CallOutcome::TimedOut);
        assert!(registry.call_record("mallory", &call).await.expect("read").is_none());

        // The device's late answer replaces the server's; a second copy changes nothing.
        registry.record_calls(vec![finish(&call, &device, "alice", CallOutcome::Error, Some(9))]).await.expect("late");
        registry.record_calls(vec![finish(&call, &device, "alice", CallOutcome::Ok, Some(1))]).await.expect("copy");
        registry.record_calls(vec![finish(&call, &device, "alice", CallOutcome::Offline, None)]).await.expect("503");
        let got = record(&registry, "alice", &call).await;
        assert_eq!(
            (got.outcome, got.error.as_deref(), got.result_bytes),
            (CallOutcome::Error, Some("no such file"), Some(9))
        );

        // Class and proposal: the first written stays.
        let mut proposed = CallPart::new(&call, &device, "alice");
        proposed.class = Some(ToolClass::Mutate);
        proposed.proposal_id = Some(id());
        registry.record_calls(vec![proposed.clone()]).await.expect("proposal");
        let mut again = proposed.clone();
        again.class = Some(ToolClass::Read);
        again.proposal_id = Some(id());
        registry.record_calls(vec![again]).await.expect("again");
        let got = record(&registry, "alice", &call).await;
        assert_eq!((got.class, got.proposal_id), (Some(ToolClass::Mutate), proposed.proposal_id));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_owner_scoped_filtered_and_paged_newest_first() {
    on_every_engine(|registry| async move {
        let (laptop, desktop) = (id(), id());
        let mut alice_calls = Vec::new();
        for i in 0..7 {
            let call = id();
            let (device, tool) = if i % 2 == 0 { (&laptop, "stat") } else { (&desktop, "read_file") };
            let outcome = if i % 3 == 0 { CallOutcome::Error } else { CallOutcome::Ok };
            registry
                .record_calls(vec![
                    dispatch(&call, device, "alice", tool, later(30)),
                    finish(&call, device, "alice", outcome, Some(1)),
                ])
                .await
                .expect("write");
            alice_calls.push(call);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let bob_call = id();
        registry.record_calls(vec![dispatch(&bob_call, &id(), "bob", "stat", later(30))]).await.expect("bob");
        // A part without its dispatch is never listed.
        let orphan = id();
        registry.record_calls(vec![finish(&orphan, &laptop, "alice", CallOutcome::Ok, Some(1))]).await.expect("orphan");
        assert!(registry.call_record("alice", &orphan).await.expect("read").is_none());

        // Every page of 3, newest first, each call once.
        let mut seen = Vec::new();
        let mut request = PageRequest { limit: 3, after: None };
        loop {
            let page = registry.calls_page("alice", &CallFilter::default(), &request).await.expect("page");
            assert!(page.items.len() <= 3);
            seen.extend(page.items.iter().map(|c| c.call_id.clone()));
            match page.next {
                Some(next) => request.after = Some(next),
                None => break,
            }
        }
        let mut newest_first = alice_calls.clone();
        newest_first.reverse();
        assert_eq!(seen, newest_first);
        assert!(registry.call_record("alice", &bob_call).await.expect("read").is_none());
        assert!(registry.call_record("bob", &bob_call).await.expect("read").is_some());

        let all = PageRequest { limit: 500, after: None };
        let only = |filter: CallFilter| {
            let registry = registry.clone();
            let all = all.clone();
            async move {
                let page = registry.calls_page("alice", &filter, &all).await.expect("filtered");
                page.items.into_iter().map(|c| c.call_id).collect::<Vec<_>>()
            }
        };
        let on_laptop = only(CallFilter { device_id: Some(laptop.clone()), ..CallFilter::default() }).await;
        assert_eq!(on_laptop.len(), 4);
        let reads = only(CallFilter { tool: Some("read_file".into()), ..CallFilter::default() }).await;
        assert_eq!(reads.len(), 3);
        let errors = only(CallFilter { outcome: Some(CallOutcome::Error), ..CallFilter::default() }).await;
        assert_eq!(errors, vec![alice_calls[6].clone(), alice_calls[3].clone(), alice_calls[0].clone()]);
        let none =
            only(CallFilter { device_id: Some(laptop.clone()), tool: Some("read_file".into()), outcome: None }).await;
        assert!(none.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_marks_calls_unanswered_past_their_deadline_unknown() {
    on_every_engine(|registry| async move {
        let device = id();
        let (stale, fresh, answered) = (id(), id(), id());
        registry
            .record_calls(vec![
                dispatch(&stale, &device, "alice", "stat", later(-60)),
                push(&stale, &device, "alice"),
                dispatch(&fresh, &device, "alice", "stat", later(60)),
                dispatch(&answered, &device, "alice", "stat", later(-60)),
                finish(&answered, &device, "alice", CallOutcome::TimedOut, None),
            ])
            .await
            .expect("write");
        assert_eq!(registry.mark_unknown_calls(later(-10)).await.expect("sweep"), 1);
        assert_eq!(registry.mark_unknown_calls(later(-10)).await.expect("again"), 0);
        assert_eq!(record(&registry, "alice", &stale).await.outcome, CallOutcome::Unknown);
        assert_eq!(record(&registry, "alice", &fresh).await.outcome, CallOutcome::Pending);
        assert_eq!(record(&registry, "alice", &answered).await.outcome, CallOutcome::TimedOut);
        // The device's result, arriving after all, still says what happened.
        registry.record_calls(vec![finish(&stale, &device, "alice", CallOutcome::Ok, Some(5))]).await.expect("late");
        let got = record(&registry, "alice", &stale).await;
        assert_eq!((got.outcome, got.result_bytes), (CallOutcome::Ok, Some(5)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_records_and_old_orphans_only() {
    on_every_engine(|registry| async move {
        let device = id();
        let (old, orphan) = (id(), id());
        registry.record_calls(vec![dispatch(&old, &device, "alice", "stat", later(30))]).await.expect("old");
        registry.record_calls(vec![finish(&orphan, &device, "alice", CallOutcome::Ok, None)]).await.expect("orphan");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let cutoff = Utc::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (new, new_orphan) = (id(), id());
        registry.record_calls(vec![dispatch(&new, &device, "alice", "stat", later(30))]).await.expect("new");
        registry
            .record_calls(vec![finish(&new_orphan, &device, "alice", CallOutcome::Ok, None)])
            .await
            .expect("new orphan");

        // Nothing is old enough yet: nothing goes.
        assert_eq!(registry.delete_old_calls(later(-3600), later(-3600)).await.expect("nothing"), 0);
        // Orphans first logged before the cutoff go; records are kept for longer.
        assert_eq!(registry.delete_old_calls(later(-3600), cutoff).await.expect("orphans"), 1);
        assert!(registry.call_record("alice", &old).await.expect("read").is_some());
        // A completed orphan is a record again once its dispatch part arrives.
        registry.record_calls(vec![dispatch(&new_orphan, &device, "alice", "stat", later(30))]).await.expect("late");
        assert_eq!(record(&registry, "alice", &new_orphan).await.outcome, CallOutcome::Ok);
        // Records logged before the cutoff go.
        assert_eq!(registry.delete_old_calls(cutoff, cutoff).await.expect("old"), 1);
        assert!(registry.call_record("alice", &old).await.expect("read").is_none());
        assert!(registry.call_record("alice", &new).await.expect("read").is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_stored_whole() {
    on_every_engine(|registry| async move {
        let device = id();
        let calls: Vec<String> = (0..1_000).map(|_| id()).collect();
        let mut parts = Vec::new();
        for call in &calls {
            parts.push(dispatch(call, &device, "alice", "stat", later(30)));
            parts.push(finish(call, &device, "alice", CallOutcome::Ok, Some(3)));
        }
        assert_eq!(registry.record_calls(parts).await.expect("batch"), 1_000);
        let mut count = 0;
        let mut request = PageRequest { limit: 500, after: None };
        loop {
            let page = registry.calls_page("alice", &CallFilter::default(), &request).await.expect("page");
            count += page.items.iter().filter(|c| c.outcome == CallOutcome::Ok).count();
            match page.next {
                Some(next) => request.after = Some(next),
                None => break,
            }
        }
        assert_eq!(count, 1_000);
    })
    .await;
}
