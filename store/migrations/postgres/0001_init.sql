-- Keys: one row per key id, immutable once written.
CREATE TABLE keys (
  key_id         TEXT    PRIMARY KEY,
  scheme         TEXT    NOT NULL CHECK (scheme IN ('secp256k1', 'p256', 'ed25519')),
  public_key     BYTEA   NOT NULL,
  key_blob       BYTEA   NOT NULL,
  wrap_mechanism TEXT    NOT NULL,
  created_at_ms  BIGINT  NOT NULL
);

-- The master-key canary: at most one row, shared by every driver.
CREATE TABLE master_key_canary (
  id               INTEGER PRIMARY KEY CHECK (id = 1),
  public_key       BYTEA   NOT NULL,
  wrapped_key      BYTEA   NOT NULL,
  wrap_mechanism   TEXT    NOT NULL,
  master_key_label TEXT    NOT NULL,
  created_at_ms    BIGINT  NOT NULL
);
