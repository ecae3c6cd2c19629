-- Applies that outlive their replica, and storage that stays bounded.
--
-- An apply's call: approving moves a proposal pending -> applying and records the call that
-- carries the apply and when its caller stops waiting. Every replica's sweep fails a proposal
-- still applying well past that deadline (its replica died), and a result that no replica
-- waits for finds its proposal by the call id. apply_timed_out_at is set when an apply was
-- failed for want of an answer (504 or the sweep): the device's late result may then still
-- record the real outcome, once, which clears it.
ALTER TABLE proposals ADD COLUMN apply_call_id TEXT;
ALTER TABLE proposals ADD COLUMN apply_deadline BIGINT;
ALTER TABLE proposals ADD COLUMN apply_timed_out_at BIGINT;
CREATE INDEX proposals_apply_call ON proposals (apply_call_id);
CREATE INDEX proposals_applying ON proposals (status, apply_deadline);
-- Proposals left applying by an older version: swept like any other, 30 s after approval.
UPDATE proposals SET apply_deadline = decided_at + 30000 WHERE status = 'applying';

-- Bytes of a proposal's input and plan as stored, so a page can be cut to a byte budget
-- without reading the rows (approximate for rows stored before this migration).
ALTER TABLE proposals ADD COLUMN stored_bytes BIGINT;
UPDATE proposals SET stored_bytes = LENGTH(input) + LENGTH(plan);
-- Listing by status, newest first; expiry of decided proposals by decision time.
CREATE INDEX proposals_owner_status ON proposals (owner, status, created_at);
CREATE INDEX proposals_decided ON proposals (status, decided_at);

-- What a device list shows without the manifest: its roots and how many tools it has, kept
-- beside the manifest when one is stored. NULL for manifests stored before this migration
-- (read from the manifest then).
ALTER TABLE devices ADD COLUMN roots TEXT;
ALTER TABLE devices ADD COLUMN tool_count BIGINT;
ALTER TABLE devices ADD COLUMN manifest_bytes BIGINT;
UPDATE devices SET manifest_bytes = LENGTH(manifest) WHERE manifest IS NOT NULL;

-- Live pairing codes per user (the quota); expiry of used codes.
CREATE INDEX pairing_codes_user ON pairing_codes (user_id, expires_at);
CREATE INDEX pairing_codes_used_at ON pairing_codes (used_at);
