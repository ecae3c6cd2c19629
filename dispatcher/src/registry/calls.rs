//! The call log as stored: one row per dispatch, assembled from the parts several replicas
//! write in any order ([`CallPart`]), read page by page and one by one by its owner, swept to
//! `unknown` when its result never came back, and deleted after its retention.
//!
//! A row's parts merge by fixed rules, the same in memory ([`CallPart::merge`], for a writer's
//! batch) and in the one upsert that stores them ([`Registry::record_calls`]):
//! - the dispatch's fields (tool, mode, when, by whom, its deadline), the push's (when, by
//!   whom), the class and the proposal id: the first value written stays;
//! - the outcome (with its error, finish time and result size) is replaced only by an outcome
//!   of a higher rank: pending < unknown < offline and timed out (said by the server) < ok and
//!   error (said by the device). So the device's word is final whichever part lands last, and a
//!   second copy of a result changes nothing;
//! - a part for another device or owner than the row's is ignored (a result is accepted only
//!   from the device its call was sent to).
//!
//! Rows without their dispatch part (the dispatching replica died before writing it) are
//! never listed, and are deleted after an hour. Not here: when parts are written (the
//! [`crate::calllog`] writer) and HTTP.

use chrono::{DateTime, Utc};
use protocol::subject::is_uuid;
use protocol::{CallMode, CallOutcome, CallRecord, ToolClass};

use super::page::{Cursor, Order, Page, PageRequest};
use super::{as_u64, optional_time_of, time_of, Engine, Registry, RegistryError};

/// Rows per upsert statement (18 parameters each, well within both engines' limits).
const UPSERT_BATCH: usize = 400;
/// Rows swept or deleted per statement, so no statement holds its locks for long.
const CALL_LOG_BATCH: i64 = 1000;

/// The columns [`record_of_row`] reads, in its order.
const CALL_COLUMNS: &str = "call_id, device_id, tool, mode, class, proposal_id, dispatched_at, dispatched_by, \
                            pushed_at, pushed_by, finished_at, outcome, error, result_bytes";

type CallRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    String,
    Option<String>,
    Option<i64>,
);

/// What the dispatching replica knows of a call when it sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub tool: String,
    pub mode: CallMode,
    pub at: DateTime<Utc>,
    /// The replica id.
    pub by: String,
    /// When the caller stops waiting.
    pub deadline: DateTime<Utc>,
}

/// The replica that wrote the call to the device's stream, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub at: DateTime<Utc>,
    pub by: String,
}

/// An outcome, with what came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub outcome: CallOutcome,
    pub error: Option<String>,
    pub at: Option<DateTime<Utc>>,
    /// Bytes of the device's result as it posted it.
    pub result_bytes: Option<u64>,
}

/// One replica's part of a call's record: what it knows, the rest `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPart {
    pub call_id: String,
    pub device_id: String,
    /// The device's owner: every writer knows it (the dispatch from its caller, the stream and
    /// the result from the device's credentials).
    pub owner: String,
    pub dispatched: Option<Dispatched>,
    pub pushed: Option<Pushed>,
    pub finished: Option<Finished>,
    pub class: Option<ToolClass>,
    pub proposal_id: Option<String>,
}

impl CallPart {
    /// A part with nothing but the call's identity.
    pub fn new(call_id: impl Into<String>, device_id: impl Into<String>, owner: impl Into<String>) -> Self {
        Self {
            call_id: call_id.into(),
            device_id: device_id.into(),
            owner: owner.into(),
            dispatched: None,
            pushed: None,
            finished: None,
            class: None,
            proposal_id: None,
        }
    }

    /// Folds a later part of the same call into this one, by the rules of the module: first
    /// values stay, a higher-ranked outcome replaces a lower one, another device's part is
    /// ignored.
    pub fn merge(&mut self, later: CallPart) {
        if later.call_id != self.call_id || later.device_id != self.device_id || later.owner != self.owner {
            return;
        }
        if self.dispatched.is_none() {
            self.dispatched = later.dispatched;
        }
        if self.pushed.is_none() {
            self.pushed = later.pushed;
        }
        if self.class.is_none() {
            self.class = later.class;
        }
        if self.proposal_id.is_none() {
            self.proposal_id = later.proposal_id;
        }
        if rank_of(later.finished.as_ref()) > rank_of(self.finished.as_ref()) {
            self.finished = later.finished;
        }
    }
}

/// The rank of an outcome: a part replaces the stored outcome only with a higher one.
pub fn outcome_rank(outcome: CallOutcome) -> i64 {
    match outcome {
        CallOutcome::Pending => 0,
        CallOutcome::Unknown => 1,
        CallOutcome::Offline | CallOutcome::TimedOut => 2,
        CallOutcome::Ok | CallOutcome::Error => 3,
    }
}

fn rank_of(finished: Option<&Finished>) -> i64 {
    finished.map_or(0, |finished| outcome_rank(finished.outcome))
}

/// Which calls a list shows: all of the owner's, or only those matching every filter given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallFilter {
    pub device_id: Option<String>,
    pub tool: Option<String>,
    pub outcome: Option<CallOutcome>,
}

fn mode_text(mode: CallMode) -> &'static str {
    match mode {
        CallMode::Auto => "auto",
        CallMode::Apply => "apply",
    }
}

fn class_text(class: ToolClass) -> &'static str {
    match class {
        ToolClass::Read => "read",
        ToolClass::Mutate => "mutate",
        ToolClass::Action => "action",
    }
}

fn record_of_row(row: CallRow) -> Result<CallRecord, RegistryError> {
    let (
        call_id,
        device_id,
        tool,
        mode,
        class,
        proposal_id,
        dispatched_at,
        dispatched_by,
        pushed_at,
        pushed_by,
        finished_at,
        outcome,
        error,
        result_bytes,
    ) = row;
    let corrupt = |what: &str| RegistryError::Corrupt(format!("call {call_id}: {what}"));
    let mode = match mode.as_deref() {
        Some("auto") => CallMode::Auto,
        Some("apply") => CallMode::Apply,
        other => return Err(corrupt(&format!("mode {other:?}"))),
    };
    let class = match class.as_deref() {
        None => None,
        Some("read") => Some(ToolClass::Read),
        Some("mutate") => Some(ToolClass::Mutate),
        Some("action") => Some(ToolClass::Action),
        Some(other) => return Err(corrupt(&format!("class {other:?}"))),
    };
    let outcome = CallOutcome::parse(&outcome).ok_or_else(|| corrupt(&format!("outcome {outcome:?}")))?;
    let dispatched_ms = dispatched_at.ok_or_else(|| corrupt("no dispatch time"))?;
    let duration_ms = finished_at.map(|finished| as_u64(finished.saturating_sub(dispatched_ms).max(0)));
    Ok(CallRecord {
        device_id,
        tool: tool.ok_or_else(|| corrupt("no tool"))?,
        mode,
        class,
        proposal_id,
        dispatched_at: time_of(dispatched_ms)?,
        dispatched_by: dispatched_by.ok_or_else(|| corrupt("no dispatching replica"))?,
        pushed_at: optional_time_of(pushed_at)?,
        pushed_by,
        finished_at: optional_time_of(finished_at)?,
        outcome,
        error,
        duration_ms,
        result_bytes: result_bytes.map(as_u64),
        call_id,
    })
}

impl Registry {
    /// Stores parts of call records: merged first where a batch holds several parts of one
    /// call, then one upsert per few hundred rows. Parts that are not about a call (ids that
    /// are not UUIDs) are skipped. Returns how many rows were written.
    pub async fn record_calls(&self, parts: Vec<CallPart>) -> Result<u64, RegistryError> {
        let mut merged: Vec<CallPart> = Vec::with_capacity(parts.len());
        let mut index = std::collections::HashMap::<String, usize>::with_capacity(parts.len());
        for part in parts {
            if !is_uuid(&part.call_id) || !is_uuid(&part.device_id) || part.owner.is_empty() {
                continue;
            }
            match index.get(&part.call_id) {
                Some(&at) => merged[at].merge(part),
                None => {
                    index.insert(part.call_id.clone(), merged.len());
                    merged.push(part);
                }
            }
        }
        let mut written = 0;
        for chunk in merged.chunks(UPSERT_BATCH) {
            written += self.upsert_calls(chunk).await?;
        }
        Ok(written)
    }

    async fn upsert_calls(&self, parts: &[CallPart]) -> Result<u64, RegistryError> {
        const COLUMNS: usize = 18;
        // SQLite gets anonymous `?` placeholders: to bind a numbered one (`$7`), SQLite looks
        // its name up in a list of every parameter of the statement, so binding the thousands
        // of a batch took time quadratic in their number (a third of the embedded
        // dispatcher's CPU at full load). Each parameter is used once, in order, so `?` binds
        // the same values. PostgreSQL only knows `$n`.
        let rows: Vec<String> = (0..parts.len())
            .map(|row| {
                let params: Vec<String> = (1..=COLUMNS)
                    .map(|col| match self.engine {
                        Engine::Sqlite => "?".to_owned(),
                        Engine::Postgres => format!("${}", row * COLUMNS + col),
                    })
                    .collect();
                format!("({})", params.join(", "))
            })
            .collect();
        let better = "excluded.outcome_rank > call_log.outcome_rank";
        let sql = format!(
            "INSERT INTO call_log (call_id, device_id, owner, tool, mode, class, proposal_id, dispatched_at, \
             dispatched_by, deadline, pushed_at, pushed_by, outcome, outcome_rank, error, finished_at, \
             result_bytes, logged_at) VALUES {} \
             ON CONFLICT (call_id) DO UPDATE SET \
             tool = COALESCE(call_log.tool, excluded.tool), \
             mode = COALESCE(call_log.mode, excluded.mode), \
             class = COALESCE(call_log.class, excluded.class), \
             proposal_id = COALESCE(call_log.proposal_id, excluded.proposal_id), \
             dispatched_at = COALESCE(call_log.dispatched_at, excluded.dispatched_at), \
             dispatched_by = COALESCE(call_log.dispatched_by, excluded.dispatched_by), \
             deadline = COALESCE(call_log.deadline, excluded.deadline), \
             pushed_at = COALESCE(call_log.pushed_at, excluded.pushed_at), \
             pushed_by = COALESCE(call_log.pushed_by, excluded.pushed_by), \
             outcome = CASE WHEN {better} THEN excluded.outcome ELSE call_log.outcome END, \
             error = CASE WHEN {better} THEN excluded.error ELSE call_log.error END, \
             finished_at = CASE WHEN {better} THEN excluded.finished_at ELSE call_log.finished_at END, \
             result_bytes = CASE WHEN {better} THEN excluded.result_bytes ELSE call_log.result_bytes END, \
             outcome_rank = CASE WHEN {better} THEN excluded.outcome_rank ELSE call_log.outcome_rank END \
             WHERE call_log.device_id = excluded.device_id AND call_log.owner = excluded.owner",
            rows.join(", ")
        );
        let now = self.now_ms();
        let mut query = sqlx::query(&sql);
        for part in parts {
            let dispatched = part.dispatched.as_ref();
            let pushed = part.pushed.as_ref();
            let finished = part.finished.as_ref();
            let outcome = finished.map_or(CallOutcome::Pending, |f| f.outcome);
            query = query
                .bind(part.call_id.clone())
                .bind(part.device_id.clone())
                .bind(part.owner.clone())
                .bind(dispatched.map(|d| d.tool.clone()))
                .bind(dispatched.map(|d| mode_text(d.mode).to_owned()))
                .bind(part.class.map(|c| class_text(c).to_owned()))
                .bind(part.proposal_id.clone())
                .bind(dispatched.map(|d| d.at.timestamp_millis()))
                .bind(dispatched.map(|d| d.by.clone()))
                .bind(dispatched.map(|d| d.deadline.timestamp_millis()))
                .bind(pushed.map(|p| p.at.timestamp_millis()))
                .bind(pushed.map(|p| p.by.clone()))
                .bind(outcome.as_str())
                .bind(outcome_rank(outcome))
                .bind(finished.and_then(|f| f.error.clone()))
                .bind(finished.and_then(|f| f.at).map(|at| at.timestamp_millis()))
                .bind(finished.and_then(|f| f.result_bytes).map(|b| i64::try_from(b).unwrap_or(i64::MAX)))
                .bind(now);
        }
        Ok(query.execute(&self.pool).await?.rows_affected())
    }

    /// `owner`'s call `call_id`; `None` when there is none (or it is another user's, or its
    /// dispatch part was never recorded).
    pub async fn call_record(&self, owner: &str, call_id: &str) -> Result<Option<CallRecord>, RegistryError> {
        if !is_uuid(call_id) {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {CALL_COLUMNS} FROM call_log WHERE call_id = $1 AND owner = $2 AND dispatched_at IS NOT NULL"
        );
        let row: Option<CallRow> = sqlx::query_as(&sql).bind(call_id).bind(owner).fetch_optional(&self.pool).await?;
        row.map(record_of_row).transpose()
    }

    /// One page of `owner`'s calls matching `filter`, newest first (ties broken by call id): at
    /// most `request.limit`, with `next` when there are more.
    pub async fn calls_page(
        &self,
        owner: &str,
        filter: &CallFilter,
        request: &PageRequest,
    ) -> Result<Page<CallRecord>, RegistryError> {
        let order = Order::NewestFirst;
        let mut conditions = vec!["owner = $1".to_owned(), "dispatched_at IS NOT NULL".to_owned()];
        let mut next_param = 2;
        let mut texts: Vec<&str> = Vec::new();
        if let Some(device_id) = &filter.device_id {
            conditions.push(format!("device_id = ${next_param}"));
            texts.push(device_id);
            next_param += 1;
        }
        if let Some(tool) = &filter.tool {
            conditions.push(format!("tool = ${next_param}"));
            texts.push(tool);
            next_param += 1;
        }
        if let Some(outcome) = filter.outcome {
            conditions.push(format!("outcome = ${next_param}"));
            texts.push(outcome.as_str());
            next_param += 1;
        }
        if request.after.is_some() {
            conditions.push(order.after("dispatched_at", "call_id", next_param));
            next_param += 2;
        }
        let sql = format!(
            "SELECT {CALL_COLUMNS} FROM call_log WHERE {} {} LIMIT ${next_param}",
            conditions.join(" AND "),
            order.order_by("dispatched_at", "call_id")
        );
        let mut query = sqlx::query_as::<_, CallRow>(&sql).bind(owner);
        for text in texts {
            query = query.bind(text);
        }
        if let Some(after) = &request.after {
            query = query.bind(after.at_ms).bind(&after.id);
        }
        let limit = request.limit.max(1);
        let rows = query.bind(i64::try_from(limit + 1).unwrap_or(i64::MAX)).fetch_all(&self.pool).await?;
        let more = rows.len() > limit;
        let items: Vec<CallRecord> = rows.into_iter().take(limit).map(record_of_row).collect::<Result<_, _>>()?;
        let next = if more {
            items.last().map(|last| Cursor { at_ms: last.dispatched_at.timestamp_millis(), id: last.call_id.clone() })
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// The sweep: calls still pending whose deadline is before `deadline_before` become
    /// `unknown` (their dispatching replica is gone, and no result came back anywhere; a live
    /// replica records `timed out` at the deadline). A device result arriving later still
    /// replaces it. Returns how many were marked.
    pub async fn mark_unknown_calls(&self, deadline_before: DateTime<Utc>) -> Result<u64, RegistryError> {
        let sql = "UPDATE call_log SET outcome = $1, outcome_rank = $2 WHERE call_id IN \
                   (SELECT call_id FROM call_log WHERE outcome_rank = 0 AND deadline < $3 LIMIT $4) \
                   AND outcome_rank = 0";
        let mut marked = 0;
        loop {
            let done = sqlx::query(sql)
                .bind(CallOutcome::Unknown.as_str())
                .bind(outcome_rank(CallOutcome::Unknown))
                .bind(deadline_before.timestamp_millis())
                .bind(CALL_LOG_BATCH)
                .execute(&self.pool)
                .await?;
            marked += done.rows_affected();
            if done.rows_affected() < as_u64(CALL_LOG_BATCH) {
                return Ok(marked);
            }
        }
    }

    /// Deletes call records first logged before `logged_before`, and records that never got
    /// their dispatch part first logged before `orphans_before`, in batches; returns how many.
    pub async fn delete_old_calls(
        &self,
        logged_before: DateTime<Utc>,
        orphans_before: DateTime<Utc>,
    ) -> Result<u64, RegistryError> {
        let old = "DELETE FROM call_log WHERE call_id IN \
                   (SELECT call_id FROM call_log WHERE logged_at < $1 LIMIT $2)";
        let orphans = "DELETE FROM call_log WHERE call_id IN \
                       (SELECT call_id FROM call_log WHERE dispatched_at IS NULL AND logged_at < $1 LIMIT $2)";
        let mut deleted = 0;
        for (sql, before) in [(old, logged_before), (orphans, orphans_before)] {
            loop {
                let done =
                    sqlx::query(sql).bind(before.timestamp_millis()).bind(CALL_LOG_BATCH).execute(&self.pool).await?;
                deleted += done.rows_affected();
                if done.rows_affected() < as_u64(CALL_LOG_BATCH) {
                    break;
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const CALL: &str = "0a000001-0000-4000-8000-000000000001";
    const DEVICE: &str = "7a04dbde-1c2f-4e4b-9a51-0d5b8f1e2a3c";

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_767_225_600 + secs, 0).unwrap()
    }

    fn dispatch() -> CallPart {
        let mut part = CallPart::new(CALL, DEVICE, "alice");
        part.dispatched =
            Some(Dispatched { tool: "stat".into(), mode: CallMode::Auto, at: at(0), by: "a".into(), deadline: at(30) });
        part
    }

    fn push() -> CallPart {
        let mut part = CallPart::new(CALL, DEVICE, "alice");
        part.pushed = Some(Pushed { at: at(1), by: "b".into() });
        part
    }

    fn finish(outcome: CallOutcome, secs: i64) -> CallPart {
        let mut part = CallPart::new(CALL, DEVICE, "alice");
        part.finished = Some(Finished { outcome, error: None, at: Some(at(secs)), result_bytes: Some(7) });
        part
    }

    fn merged(parts: Vec<CallPart>) -> CallPart {
        let mut parts = parts.into_iter();
        let mut first = parts.next().expect("a part");
        for part in parts {
            first.merge(part);
        }
        first
    }

    #[test]
    fn parts_merge_in_any_order_to_one_record() {
        let orders = [
            vec![dispatch(), push(), finish(CallOutcome::Ok, 2)],
            vec![finish(CallOutcome::Ok, 2), push(), dispatch()],
            vec![push(), finish(CallOutcome::Ok, 2), dispatch()],
        ];
        let want = merged(orders[0].clone());
        for parts in orders {
            assert_eq!(merged(parts.clone()), want, "{parts:?}");
        }
        assert_eq!(want.finished.as_ref().map(|f| f.outcome), Some(CallOutcome::Ok));
        assert!(want.dispatched.is_some() && want.pushed.is_some());
    }

    #[test]
    fn the_higher_outcome_wins_and_ties_keep_the_first() {
        use CallOutcome::*;
        // (stored, arriving, kept)
        let table = [
            (Pending, Ok, Ok),
            (Unknown, Ok, Ok),
            (TimedOut, Ok, Ok),
            (TimedOut, Error, Error),
            (Ok, TimedOut, Ok),
            (Ok, Unknown, Ok),
            (Ok, Error, Ok),
            (Error, Ok, Error),
            (Unknown, TimedOut, TimedOut),
            (TimedOut, Unknown, TimedOut),
            (Offline, Pending, Offline),
        ];
        for (stored, arriving, kept) in table {
            let part = merged(vec![finish(stored, 1), finish(arriving, 2)]);
            assert_eq!(part.finished.map(|f| f.outcome), Some(kept), "{stored:?} then {arriving:?}");
        }
    }

    #[test]
    fn another_devices_part_is_ignored() {
        let mut forged = finish(CallOutcome::Ok, 2);
        forged.device_id = "00000000-0000-4000-8000-000000000000".into();
        let part = merged(vec![dispatch(), forged]);
        assert_eq!(part.finished, None);
        let mut other_owner = finish(CallOutcome::Ok, 2);
        other_owner.owner = "mallory".into();
        assert_eq!(merged(vec![dispatch(), other_owner]).finished, None);
    }

    #[test]
    fn ranks_order_the_outcomes() {
        use CallOutcome::*;
        assert!(outcome_rank(Pending) < outcome_rank(Unknown));
        assert!(outcome_rank(Unknown) < outcome_rank(TimedOut));
        assert_eq!(outcome_rank(TimedOut), outcome_rank(Offline));
        assert!(outcome_rank(Offline) < outcome_rank(Ok));
        assert_eq!(outcome_rank(Ok), outcome_rank(Error));
    }
}
