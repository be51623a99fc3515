-- Master-key rotation: at most one row, the latest rotation, shared by
-- every driver. Rows are re-wrapped from from_label to to_label while phase
-- is 'running'; once every row is under to_label the phase is 'complete'.
CREATE TABLE master_key_rotation (
  id              INTEGER PRIMARY KEY CHECK (id = 1),
  from_label      TEXT    NOT NULL,
  to_label        TEXT    NOT NULL,
  phase           TEXT    NOT NULL CHECK (phase IN ('running', 'complete')),
  started_at_ms   BIGINT  NOT NULL,
  completed_at_ms BIGINT  NOT NULL DEFAULT 0
);
