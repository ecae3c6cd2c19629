-- The call log: one row per dispatch, written off the hot path by each replica's batched
-- writer. Up to three replicas write parts of one row, in any order, through one upsert:
-- the dispatching replica (who, what, when, its deadline; and offline or timed out), the
-- replica that wrote the call to the device's stream (pushed_at, pushed_by), and the replica
-- that received the device's result (outcome, error, finished_at, result_bytes).
--
-- outcome_rank orders outcomes so that whichever part arrives last cannot undo a better one:
-- 0 pending, 1 unknown (the sweep), 2 offline or timed out (the server), 3 ok or error (the
-- device). A part replaces the outcome only with a higher rank; the device's word is final.
-- No input or result is stored. Times are BIGINT unix milliseconds, as everywhere.
CREATE TABLE call_log (
    call_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    tool TEXT,
    mode TEXT,
    class TEXT,
    proposal_id TEXT,
    dispatched_at BIGINT,
    dispatched_by TEXT,
    deadline BIGINT,
    pushed_at BIGINT,
    pushed_by TEXT,
    outcome TEXT NOT NULL,
    outcome_rank BIGINT NOT NULL,
    error TEXT,
    finished_at BIGINT,
    result_bytes BIGINT,
    logged_at BIGINT NOT NULL
);

-- Listing a user's calls newest first, filtered by device, tool or outcome.
CREATE INDEX call_log_owner ON call_log (owner, dispatched_at);
CREATE INDEX call_log_owner_device ON call_log (owner, device_id, dispatched_at);
-- The sweep of records still pending past their deadline.
CREATE INDEX call_log_pending ON call_log (outcome_rank, deadline);
-- Retention.
CREATE INDEX call_log_logged_at ON call_log (logged_at);
-- Rows made by a stream or a result whose dispatch part never arrived (its replica died
-- before writing it, or its writer dropped it): never listed, deleted after an hour.
CREATE INDEX call_log_orphans ON call_log (logged_at) WHERE dispatched_at IS NULL;
