//! Proposals: a mutation's dry run stored as `pending` (within the size cap), listed page by
//! page and read by its owner, moved along its statuses by conditional UPDATEs (which is what
//! makes an apply happen at most once whatever the number of approvals, replicas or retries),
//! and deleted once decided long enough ago.
//!
//! The life of an apply: approval moves `pending -> applying` recording the apply's call id and
//! deadline ([`Registry::begin_apply`]); the approving replica records what its dispatch
//! answered ([`Registry::finish_apply`], deciding by [`ApplyOutcome::of`]); should it die
//! first, any replica's sweep fails the proposal with `device timed out` once the deadline has
//! long passed ([`Registry::fail_stale_applies`]), and the device's result, which no replica
//! waits for any more, still records the real outcome ([`Registry::complete_late_apply`]).
//! Every step is one conditional UPDATE, so replicas racing through them is harmless and
//! nothing is recorded twice.
//!
//! Not here: pushing the apply to the device, when to sweep (the janitor), and HTTP statuses.

use chrono::{DateTime, Utc};
use protocol::subject::is_uuid;
use protocol::{HostResult, Proposal, ProposalStatus};
use serde_json::Value;

use super::page::{choose_rows, Order, Page, PageRequest};
use super::{as_u64, from_json_text, json_text, optional_time_of, time_of};
use super::{Expiry, Limit, NewProposal, Registry, RegistryError, StoredProposal};

/// The columns [`proposal_of_row`] reads, in its order.
const PROPOSAL_COLUMNS: &str =
    "id, device_id, owner, tool, input, plan, preconditions, status, created_at, decided_at, result";

type ProposalRow = (String, String, String, String, String, String, String, String, i64, Option<i64>, Option<String>);

/// Stuck applies failed by one sweep at most; the next sweep takes the rest.
const SWEEP_BATCH: i64 = 100;
/// Rows deleted per statement by [`Registry::delete_expired`], so no statement holds its locks
/// for long.
const DELETE_BATCH: i64 = 500;
/// The statuses a proposal never leaves (except by a late result after a timeout).
const DECIDED: &str = "('applied', 'failed', 'rejected')";

fn proposal_of_row(row: ProposalRow) -> Result<StoredProposal, RegistryError> {
    let (id, device_id, owner, tool, input, plan, preconditions, status, created_at, decided_at, result) = row;
    let status = ProposalStatus::parse(&status)
        .ok_or_else(|| RegistryError::Corrupt(format!("unknown proposal status {status:?}")))?;
    Ok(StoredProposal {
        proposal: Proposal {
            input: from_json_text(&input, "proposal input")?,
            proposal: from_json_text(&plan, "proposal plan")?,
            status,
            created_at: time_of(created_at)?,
            decided_at: optional_time_of(decided_at)?,
            result: result.as_deref().map(|text| from_json_text::<HostResult>(text, "proposal result")).transpose()?,
            id,
            device_id,
            tool,
        },
        preconditions: from_json_text::<Value>(&preconditions, "proposal preconditions")?,
        owner,
    })
}

/// What the approving replica's dispatch of an apply means for its proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// `device offline`: nothing was pushed; the proposal is pending again, to approve later.
    NotPushed,
    /// `device timed out`: the device may or may not have applied it, so it is failed and never
    /// pushed again; the device's late result may still record the real outcome.
    TimedOut,
    /// The device's own answer: `applied` or `failed`, final.
    Answered(ProposalStatus),
}

impl ApplyOutcome {
    /// The outcome of the apply dispatch that answered `result`.
    pub fn of(result: &HostResult) -> Self {
        if result.is_offline() {
            Self::NotPushed
        } else if result.is_timed_out() {
            Self::TimedOut
        } else {
            Self::Answered(device_status(result))
        }
    }
}

/// The status a device's own answer to an apply gives its proposal (a result the device posted
/// is never a server-made failure, whatever its text).
pub fn device_status(result: &HostResult) -> ProposalStatus {
    if result.ok {
        ProposalStatus::Applied
    } else {
        ProposalStatus::Failed
    }
}

/// What a device's result for a call that no replica waits for did to a proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LateApply {
    /// It was a proposal's apply, still open (applying, or failed by a timeout): its real
    /// outcome is recorded.
    Recorded { proposal_id: String, status: ProposalStatus },
    /// The call was a proposal's apply sent to another device.
    OtherDevice,
    /// No open apply has that call id (unknown, or recorded already).
    Unknown,
}

impl Registry {
    /// Stores a pending proposal. [`RegistryError::NotFound`] unless `device_id` is a live device
    /// of `owner`'s; [`RegistryError::InvalidArgument`] unless `id` is a UUID;
    /// [`RegistryError::OverLimit`] (nothing stored) when the input and plan together are over
    /// [`super::Limits::max_proposal_bytes`].
    pub async fn create_proposal(&self, new: NewProposal) -> Result<Proposal, RegistryError> {
        if !is_uuid(&new.id) {
            return Err(RegistryError::InvalidArgument("proposal id is not a UUID"));
        }
        if !is_uuid(&new.device_id) {
            return Err(RegistryError::NotFound);
        }
        let (input, plan) = (json_text(&new.input)?, json_text(&new.plan)?);
        let bytes = input.len().saturating_add(plan.len());
        let max = self.limits.max_proposal_bytes;
        if bytes > max {
            return Err(RegistryError::OverLimit {
                limit: Limit::ProposalBytes,
                value: as_u64(bytes),
                max: as_u64(max),
            });
        }
        let now = self.now_ms();
        // Inserted through a SELECT of the device, so a proposal exists only for a live device
        // of its owner's, checked in the same statement.
        let done = sqlx::query(
            "INSERT INTO proposals \
             (id, device_id, owner, tool, input, plan, preconditions, status, created_at, stored_bytes) \
             SELECT $1, id, owner, $2, $3, $4, $5, $6, $7, $10 FROM devices \
             WHERE id = $8 AND owner = $9 AND revoked_at IS NULL",
        )
        .bind(&new.id)
        .bind(&new.tool)
        .bind(input)
        .bind(plan)
        .bind(json_text(&new.preconditions)?)
        .bind(ProposalStatus::Pending.as_str())
        .bind(now)
        .bind(&new.device_id)
        .bind(&new.owner)
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::NotFound);
        }
        Ok(Proposal {
            id: new.id,
            device_id: new.device_id,
            tool: new.tool,
            input: new.input,
            proposal: new.plan,
            status: ProposalStatus::Pending,
            created_at: time_of(now)?,
            decided_at: None,
            result: None,
        })
    }

    /// `owner`'s proposal `id`; `None` when it does not exist or is another user's.
    pub async fn proposal(&self, owner: &str, id: &str) -> Result<Option<StoredProposal>, RegistryError> {
        if !is_uuid(id) {
            return Ok(None);
        }
        let sql = format!("SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE id = $1 AND owner = $2");
        let row: Option<ProposalRow> = sqlx::query_as(&sql).bind(id).bind(owner).fetch_optional(&self.pool).await?;
        row.map(proposal_of_row).transpose()
    }

    /// All of `owner`'s proposals, newest first, only those in `status` when given. Unbounded:
    /// what clients see goes through [`Registry::proposals_page`].
    pub async fn proposals(&self, owner: &str, status: Option<ProposalStatus>) -> Result<Vec<Proposal>, RegistryError> {
        super::page::every_page(|request| async move { self.proposals_page(owner, status, &request).await }).await
    }

    /// One page of `owner`'s proposals, newest first (ties broken by id), only those in
    /// `status` when given: at most `request.limit` of them, cut short where their stored bytes
    /// would pass [`super::Limits::max_page_bytes`] (one always goes). `next` is set when there
    /// are more.
    pub async fn proposals_page(
        &self,
        owner: &str,
        status: Option<ProposalStatus>,
        request: &PageRequest,
    ) -> Result<Page<Proposal>, RegistryError> {
        let order = Order::NewestFirst;
        // $1 owner, $2 status (when filtered), then the cursor's two parameters.
        let mut filter = "owner = $1".to_owned();
        let mut next_param = 2;
        if status.is_some() {
            filter.push_str(" AND status = $2");
            next_param = 3;
        }
        if request.after.is_some() {
            filter.push_str(" AND ");
            filter.push_str(&order.after("created_at", "id", next_param));
            next_param += 2;
        }
        let order_by = order.order_by("created_at", "id");

        // First the candidates' keys and sizes, then only the rows that fit.
        let sizes_sql = format!(
            "SELECT id, created_at, COALESCE(stored_bytes, 0) + COALESCE(LENGTH(result), 0) \
             FROM proposals WHERE {filter} {order_by} LIMIT ${next_param}"
        );
        let mut query = sqlx::query_as::<_, (String, i64, i64)>(&sizes_sql).bind(owner);
        if let Some(status) = status {
            query = query.bind(status.as_str());
        }
        if let Some(after) = &request.after {
            query = query.bind(after.at_ms).bind(&after.id);
        }
        let limit = request.limit.max(1);
        let candidates = query.bind(i64::try_from(limit + 1).unwrap_or(i64::MAX)).fetch_all(&self.pool).await?;
        let (count, next) = choose_rows(&candidates, limit, as_u64(self.limits.max_page_bytes));
        let chosen = &candidates[..count];
        if chosen.is_empty() {
            return Ok(Page { items: Vec::new(), next });
        }
        let placeholders: Vec<String> = (0..chosen.len()).map(|i| format!("${}", i + 2)).collect();
        let rows_sql = format!(
            "SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE owner = $1 AND id IN ({}) {order_by}",
            placeholders.join(", ")
        );
        let mut query = sqlx::query_as::<_, ProposalRow>(&rows_sql).bind(owner);
        for (id, _, _) in chosen {
            query = query.bind(id);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let items =
            rows.into_iter().map(|row| proposal_of_row(row).map(|stored| stored.proposal)).collect::<Result<_, _>>()?;
        Ok(Page { items, next })
    }

    /// The conditional UPDATE that makes an apply happen at most once: moves `id` from `from` to
    /// `to` (setting decided_at, and result when given) only if its status is still `from`; true
    /// when this call made the move.
    pub async fn transition_proposal(
        &self,
        id: &str,
        from: ProposalStatus,
        to: ProposalStatus,
        result: Option<&HostResult>,
    ) -> Result<bool, RegistryError> {
        if !is_uuid(id) {
            return Ok(false);
        }
        let now = self.now_ms();
        let done = match result {
            Some(result) => {
                sqlx::query(
                    "UPDATE proposals SET status = $1, decided_at = $2, result = $3 WHERE id = $4 AND status = $5",
                )
                .bind(to.as_str())
                .bind(now)
                .bind(json_text(result)?)
                .bind(id)
                .bind(from.as_str())
                .execute(&self.pool)
                .await?
            }
            None => {
                sqlx::query("UPDATE proposals SET status = $1, decided_at = $2 WHERE id = $3 AND status = $4")
                    .bind(to.as_str())
                    .bind(now)
                    .bind(id)
                    .bind(from.as_str())
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected() == 1)
    }

    /// Approval: moves `id` from `pending` to `applying`, recording the call that will carry the
    /// apply and when its caller stops waiting. True when this call made the move (of any
    /// number of racing approvals, exactly one does).
    pub async fn begin_apply(&self, id: &str, call_id: &str, deadline: DateTime<Utc>) -> Result<bool, RegistryError> {
        if !is_uuid(id) || !is_uuid(call_id) {
            return Ok(false);
        }
        let done = sqlx::query(
            "UPDATE proposals SET status = $1, decided_at = $2, apply_call_id = $3, apply_deadline = $4, \
             apply_timed_out_at = NULL WHERE id = $5 AND status = $6",
        )
        .bind(ProposalStatus::Applying.as_str())
        .bind(self.now_ms())
        .bind(call_id)
        .bind(deadline.timestamp_millis())
        .bind(id)
        .bind(ProposalStatus::Pending.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records what the approving replica's dispatch of the apply `call_id` answered (see
    /// [`ApplyOutcome`]). Returns the status it recorded, or `None` when the proposal had moved
    /// on meanwhile (a late result or the sweep came first; theirs stands, except that a
    /// device's answer replaces a timeout).
    pub async fn finish_apply(
        &self,
        id: &str,
        call_id: &str,
        result: &HostResult,
    ) -> Result<Option<ProposalStatus>, RegistryError> {
        if !is_uuid(id) || !is_uuid(call_id) {
            return Ok(None);
        }
        let now = self.now_ms();
        let (status, done) = match ApplyOutcome::of(result) {
            ApplyOutcome::NotPushed => {
                let done = sqlx::query(
                    "UPDATE proposals SET status = $1, decided_at = NULL, apply_call_id = NULL, \
                     apply_deadline = NULL WHERE id = $2 AND apply_call_id = $3 AND status = $4",
                )
                .bind(ProposalStatus::Pending.as_str())
                .bind(id)
                .bind(call_id)
                .bind(ProposalStatus::Applying.as_str())
                .execute(&self.pool)
                .await?;
                (ProposalStatus::Pending, done)
            }
            ApplyOutcome::TimedOut => {
                let done = sqlx::query(
                    "UPDATE proposals SET status = $1, decided_at = $2, result = $3, apply_timed_out_at = $2 \
                     WHERE id = $4 AND apply_call_id = $5 AND status = $6",
                )
                .bind(ProposalStatus::Failed.as_str())
                .bind(now)
                .bind(json_text(result)?)
                .bind(id)
                .bind(call_id)
                .bind(ProposalStatus::Applying.as_str())
                .execute(&self.pool)
                .await?;
                (ProposalStatus::Failed, done)
            }
            ApplyOutcome::Answered(status) => {
                let done = self.record_answer(id, call_id, None, status, result, now).await?;
                (status, done)
            }
        };
        Ok((done.rows_affected() == 1).then_some(status))
    }

    /// The device's answer to an apply, recorded while the apply is open: `applying`, or
    /// `failed` by a timeout. Closes it (a second answer finds nothing open). With `device_id`,
    /// only when the proposal is that device's.
    async fn record_answer(
        &self,
        id: &str,
        call_id: &str,
        device_id: Option<&str>,
        status: ProposalStatus,
        result: &HostResult,
        now: i64,
    ) -> Result<sqlx::any::AnyQueryResult, RegistryError> {
        let device_filter = if device_id.is_some() { " AND device_id = $8" } else { "" };
        let sql = format!(
            "UPDATE proposals SET status = $1, decided_at = $2, result = $3, apply_timed_out_at = NULL \
             WHERE id = $4 AND apply_call_id = $5 \
             AND (status = $6 OR (status = $7 AND apply_timed_out_at IS NOT NULL)){device_filter}"
        );
        let mut query = sqlx::query(&sql)
            .bind(status.as_str())
            .bind(now)
            .bind(json_text(result)?)
            .bind(id)
            .bind(call_id)
            .bind(ProposalStatus::Applying.as_str())
            .bind(ProposalStatus::Failed.as_str());
        if let Some(device_id) = device_id {
            query = query.bind(device_id);
        }
        Ok(query.execute(&self.pool).await?)
    }

    /// A result `device_id` posted for a call that no replica waits for: if the call was a
    /// proposal's apply and that apply is still open (applying, its replica gone; or failed by
    /// a timeout), the device's real outcome is recorded, once.
    pub async fn complete_late_apply(&self, device_id: &str, result: &HostResult) -> Result<LateApply, RegistryError> {
        if !is_uuid(&result.call_id) {
            return Ok(LateApply::Unknown);
        }
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT id, device_id FROM proposals WHERE apply_call_id = $1")
                .bind(&result.call_id)
                .fetch_optional(&self.pool)
                .await?;
        let Some((proposal_id, owner_device)) = row else {
            return Ok(LateApply::Unknown);
        };
        if owner_device != device_id {
            return Ok(LateApply::OtherDevice);
        }
        let status = device_status(result);
        let done =
            self.record_answer(&proposal_id, &result.call_id, Some(device_id), status, result, self.now_ms()).await?;
        if done.rows_affected() == 0 {
            return Ok(LateApply::Unknown);
        }
        Ok(LateApply::Recorded { proposal_id, status })
    }

    /// The sweep: fails with `device timed out` every proposal still `applying` whose apply's
    /// deadline is before `deadline_before` (its approving replica is gone: a live one records
    /// the outcome by the deadline plus a second). Returns the ids it failed; a replica racing
    /// it fails each at most once between them. The apply is never pushed again; the device's
    /// late result may still complete it.
    pub async fn fail_stale_applies(&self, deadline_before: DateTime<Utc>) -> Result<Vec<String>, RegistryError> {
        let cutoff = deadline_before.timestamp_millis();
        let stale: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT id, apply_call_id FROM proposals WHERE status = $1 AND apply_deadline < $2 \
             ORDER BY apply_deadline LIMIT $3",
        )
        .bind(ProposalStatus::Applying.as_str())
        .bind(cutoff)
        .bind(SWEEP_BATCH)
        .fetch_all(&self.pool)
        .await?;
        let mut failed = Vec::new();
        for (id, call_id) in stale {
            let now = self.now_ms();
            let result = HostResult::timed_out(call_id.unwrap_or_default());
            let done = sqlx::query(
                "UPDATE proposals SET status = $1, decided_at = $2, result = $3, apply_timed_out_at = $2 \
                 WHERE id = $4 AND status = $5 AND apply_deadline < $6",
            )
            .bind(ProposalStatus::Failed.as_str())
            .bind(now)
            .bind(json_text(&result)?)
            .bind(&id)
            .bind(ProposalStatus::Applying.as_str())
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 1 {
                failed.push(id);
            }
        }
        Ok(failed)
    }

    /// Deletes proposals decided (applied, failed or rejected) before the expiry's time, in
    /// batches; returns how many. Pending and applying ones are never touched.
    pub(super) async fn delete_decided_proposals(&self, expiry: &Expiry) -> Result<u64, RegistryError> {
        let before = expiry.proposals_decided_before.timestamp_millis();
        let sql = format!(
            "DELETE FROM proposals WHERE id IN (SELECT id FROM proposals \
             WHERE status IN {DECIDED} AND decided_at < $1 LIMIT $2)"
        );
        let mut deleted = 0;
        loop {
            let done = sqlx::query(&sql).bind(before).bind(DELETE_BATCH).execute(&self.pool).await?;
            deleted += done.rows_affected();
            if done.rows_affected() < as_u64(DELETE_BATCH) {
                return Ok(deleted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_outcomes() {
        let ok = HostResult::success("c", json!({"written": 1}));
        let refused = HostResult::failure("c", "the target changed since the proposal");
        let (applied, failed) = (ProposalStatus::Applied, ProposalStatus::Failed);
        let table = [
            (HostResult::offline("c"), ApplyOutcome::NotPushed, failed),
            (HostResult::timed_out("c"), ApplyOutcome::TimedOut, failed),
            (ok, ApplyOutcome::Answered(applied), applied),
            (refused, ApplyOutcome::Answered(failed), failed),
        ];
        for (result, dispatched, posted) in table {
            assert_eq!(ApplyOutcome::of(&result), dispatched, "{result:?}");
            assert_eq!(device_status(&result), posted, "{result:?} posted by the device");
        }
    }
}
