-- The audit trail: one row per key generation and signature (and per such
-- request answered with an error), written before the answer leaves the
-- driver. Each driver's rows form a hash chain (store/audit.hpp): seq 1,
-- 2, ... without gaps, each row holding the previous row's hash and its
-- own. Rows are only ever appended; two processes under one driver id
-- collide on the primary key instead of forking the chain.
CREATE TABLE audit_log (
  driver_id              TEXT   NOT NULL,
  seq                    BIGINT NOT NULL CHECK (seq >= 1),
  at_ms                  BIGINT NOT NULL,
  request_id             TEXT   NOT NULL,
  kind                   TEXT   NOT NULL CHECK (kind IN ('generate_key', 'sign')),
  key_id                 TEXT   NOT NULL,
  public_key_fingerprint TEXT   NOT NULL,
  payload_sha256         BYTEA  NOT NULL,
  outcome                TEXT   NOT NULL,
  prev_hash              BYTEA  NOT NULL,
  entry_hash             BYTEA  NOT NULL,
  PRIMARY KEY (driver_id, seq)
);
CREATE INDEX audit_log_key ON audit_log (key_id);
