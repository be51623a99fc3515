-- Row format 2: every row names its format, the master key its blob is
-- wrapped under, and carries a MAC made inside the HSM over the whole row.
-- Rows written before are format 1 (no MAC) and are not served until
-- sealed by 'hsm-driver master-key rotate' (see the README).
ALTER TABLE keys ADD COLUMN format_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE keys ADD COLUMN master_key_id TEXT NOT NULL DEFAULT '';
ALTER TABLE keys ADD COLUMN row_mac BYTEA NOT NULL DEFAULT ''::bytea;
