//! Proposals: a mutation's dry run stored as `pending`, listed and read by its owner, and moved
//! along its statuses by conditional UPDATEs, which is what makes an apply happen at most once
//! whatever the number of approvals, replicas or retries.
//!
//! Not here: which transitions are allowed when (the approve and reject handlers decide), and
//! pushing the apply to the device.

use protocol::subject::is_uuid;
use protocol::{HostResult, Proposal, ProposalStatus};
use serde_json::Value;

use super::{from_json_text, json_text, optional_time_of, time_of};
use super::{NewProposal, Registry, RegistryError, StoredProposal};

/// The columns [`proposal_of_row`] reads, in its order.
const PROPOSAL_COLUMNS: &str =
    "id, device_id, owner, tool, input, plan, preconditions, status, created_at, decided_at, result";

type ProposalRow = (String, String, String, String, String, String, String, String, i64, Option<i64>, Option<String>);

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

impl Registry {
    /// Stores a pending proposal. [`RegistryError::NotFound`] unless `device_id` is a live device
    /// of `owner`'s; [`RegistryError::InvalidArgument`] unless `id` is a UUID.
    pub async fn create_proposal(&self, new: NewProposal) -> Result<Proposal, RegistryError> {
        if !is_uuid(&new.id) {
            return Err(RegistryError::InvalidArgument("proposal id is not a UUID"));
        }
        if !is_uuid(&new.device_id) {
            return Err(RegistryError::NotFound);
        }
        let now = self.now_ms();
        // Inserted through a SELECT of the device, so a proposal exists only for a live device
        // of its owner's, checked in the same statement.
        let done = sqlx::query(
            "INSERT INTO proposals \
             (id, device_id, owner, tool, input, plan, preconditions, status, created_at) \
             SELECT $1, id, owner, $2, $3, $4, $5, $6, $7 FROM devices \
             WHERE id = $8 AND owner = $9 AND revoked_at IS NULL",
        )
        .bind(&new.id)
        .bind(&new.tool)
        .bind(json_text(&new.input)?)
        .bind(json_text(&new.plan)?)
        .bind(json_text(&new.preconditions)?)
        .bind(ProposalStatus::Pending.as_str())
        .bind(now)
        .bind(&new.device_id)
        .bind(&new.owner)
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

    /// `owner`'s proposals, newest first, only those in `status` when given.
    pub async fn proposals(&self, owner: &str, status: Option<ProposalStatus>) -> Result<Vec<Proposal>, RegistryError> {
        let rows: Vec<ProposalRow> = match status {
            Some(status) => {
                let sql = format!(
                    "SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE owner = $1 AND status = $2 \
                     ORDER BY created_at DESC, id DESC"
                );
                sqlx::query_as(&sql).bind(owner).bind(status.as_str()).fetch_all(&self.pool).await?
            }
            None => {
                let sql = format!(
                    "SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE owner = $1 ORDER BY created_at DESC, id DESC"
                );
                sqlx::query_as(&sql).bind(owner).fetch_all(&self.pool).await?
            }
        };
        rows.into_iter().map(|row| proposal_of_row(row).map(|stored| stored.proposal)).collect()
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
}
