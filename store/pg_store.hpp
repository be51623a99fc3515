#pragma once

// The PostgreSQL back end of the key store (libpqxx 6.4): the same schema
// and contract as the SQLite one, for several drivers sharing one database.
// Migrations run at open under an advisory lock, so drivers starting at once
// apply each migration exactly once. Idempotent put by key id holds across
// drivers (INSERT ... ON CONFLICT DO NOTHING, then read the winner); a
// group of puts is one transaction. A lost
// connection is re-opened and the call retried with backoff, without losing
// the call in hand, until `retry_budget` runs out; a connection that lands on
// a read-only server (SQLSTATE 25006, e.g. an old primary after failover) is
// dropped and re-opened, which with a multi-host URL and
// `target_session_attrs=read-write` finds the new primary, as libpq
// documents. Key writes commit with `synchronous_commit` at least `on`
// (`key_write_commit_level`); with a multi-host URL, `open` warns if the
// primary has no synchronous standby (`failover_warning`). libpqxx
// exceptions are caught here and mapped to `store_errc`. One owner thread
// at a time, like every key_store.

#include "store/key_store.hpp"

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hsm::store {

/// Options of the PostgreSQL store.
struct pg_options {
  /// How long one call keeps retrying a lost connection before it fails
  /// with `store_errc::unavailable`.
  std::chrono::milliseconds retry_budget{30000};
  /// First pause between retries; doubles up to `retry_max`.
  std::chrono::milliseconds retry_min{50};
  /// Longest pause between retries.
  std::chrono::milliseconds retry_max{2000};
  /// Read only (`hsm-driver db verify`, `db export`): no migration runs
  /// (`open` fails unless the schema is this build's newest), every session
  /// sets `default_transaction_read_only = on`, so that any write fails in
  /// the server, and a read-only server (a standby, a restored copy) is
  /// accepted instead of dropped.
  bool read_only = false;
};

/// Socket settings added to a connection string that does not name them:
/// TCP keepalives (idle 10 s, then every 5 s, 3 probes) and a TCP user
/// timeout of 15 s, so that a server that stops answering is found dead in
/// seconds, not after the kernel's TCP timeout.
inline constexpr std::pair<std::string_view, std::string_view>
  pg_socket_defaults[] = {
    {"keepalives", "1"},           {"keepalives_idle", "10"},
    {"keepalives_interval", "5"},  {"keepalives_count", "3"},
    {"tcp_user_timeout", "15000"},
};

/// Deadlines set on every session whose server, role or URL `options`
/// leave them at 0 (none): a statement 10 s, a lock wait 5 s, a transaction
/// left idle 60 s (the server ends it, and with it any lock it held). Set
/// them in the URL (`options=-c statement_timeout=30s`) to change them.
inline constexpr std::pair<std::string_view, std::string_view>
  pg_session_deadlines[] = {
    {"statement_timeout", "10s"},
    {"lock_timeout", "5s"},
    {"idle_in_transaction_session_timeout", "60s"},
};

/// How key writes (puts, row and canary replacements, the rotation record)
/// commit on a connection.
struct key_write_commit {
  /// The `synchronous_commit` they commit with: `on` or `remote_apply`.
  std::string level = "on";
  /// True if the session's own level is weaker (`off`, `local`,
  /// `remote_write`, or unknown) and each key-write transaction raises it
  /// with `SET LOCAL synchronous_commit TO on`.
  bool forced = false;

  bool operator==(const key_write_commit&) const = default;
};

/// How key writes commit on a session whose `SHOW synchronous_commit` is
/// `session_level`: with the session's level if it is `on` (or a boolean
/// spelling of it) or `remote_apply`, else with `on`, forced. Without it, a
/// commit acknowledged before the WAL is flushed (`off`), or flushed only
/// locally (`local`) or only received by the standby (`remote_write`), can
/// be lost by a crash or a failover after the key was reported.
[[nodiscard]] key_write_commit
key_write_commit_level(std::string_view session_level);

/// The warning `pg_store::open` logs for a connection string naming
/// `host_count` hosts on a primary whose `SHOW synchronous_standby_names`
/// is `synchronous_standby_names`: "" with one host (no failover through
/// the URL) or with a synchronous standby named; else why a failover can
/// lose reported keys and what to configure.
[[nodiscard]] std::string
failover_warning(size_t host_count, std::string_view synchronous_standby_names);

/// A key store in a PostgreSQL database.
class pg_store final : public key_store {
public:
  /// Connects to `url` (a libpq connection string or URI, multi-host
  /// allowed) and applies pending migrations. Fails with
  /// `store_errc::unavailable` naming the host (never the password) if the
  /// server cannot be reached within the retry budget,
  /// `store_errc::schema_too_new` if the database is newer than this build,
  /// `config_errc::invalid_option` at once if `url` does not parse
  /// (`parse_conninfo`).
  [[nodiscard]] static caf::expected<std::unique_ptr<pg_store>>
  open(const std::string& url, pg_options opts = {},
       std::vector<migration> migrations = postgres_migrations());

  /// Closes the connection.
  ~pg_store() override;

  /// Not copyable: owns a connection.
  pg_store(const pg_store&) = delete;

  /// Not copyable: owns a connection.
  pg_store& operator=(const pg_store&) = delete;

  /// Inserts each record unless its key id is taken (then answers with the
  /// stored record), all in one transaction; committed before returning. A
  /// lost connection retries the whole group (see the file comment). If the
  /// connection broke while committing and the retry finds exactly a
  /// group's record stored, that record's `inserted` is true: the lost
  /// commit was this call's. The audit entries of the records inserted are
  /// appended in the same transaction, after taking the chain's lock; a
  /// lost commit that carried some is recognised by its last row.
  [[nodiscard]] caf::expected<audited_puts>
  put_many_audited(const std::vector<key_record>& recs,
                   const put_audit& audit) override;

  /// The record stored under `key_id`, or nullopt; `store_errc::corrupt_row`
  /// if the stored row does not parse.
  [[nodiscard]] caf::expected<std::optional<key_record>>
  get(std::string_view key_id) override;

  /// The canary, or nullopt before first start.
  [[nodiscard]] caf::expected<std::optional<canary_record>>
  get_canary() override;

  /// Stores `c` unless a canary exists; returns the canary now stored.
  [[nodiscard]] caf::expected<canary_record>
  put_canary(const canary_record& c) override;

  /// The highest version in `schema_migrations`.
  [[nodiscard]] caf::expected<int> schema_version() override;
  [[nodiscard]] caf::expected<uint64_t> unsealed_rows() override;

  // -- master-key rotation ----------------------------------------------------

  /// Every row grouped by (master_key_id, format_version, resident), sorted
  /// by those fields (text in byte order, `COLLATE "C"`).
  [[nodiscard]] caf::expected<std::vector<row_count>> count_rows() override;

  /// Up to `limit` rows not yet done for `target_label`, in key id order
  /// after `after_key_id`. The order is the database's collation (the one
  /// the primary key's index has, so a batch reads only its rows); paging
  /// with the last key id of a batch visits every row once either way.
  [[nodiscard]] caf::expected<std::vector<key_record>>
  pending_rows(std::string_view target_label, std::string_view after_key_id,
               size_t limit) override;

  /// One compare-and-swap `UPDATE` (the stored row must equal `old_row` in
  /// every column), committed as key writes are (`key_write_commit`). A
  /// lost connection retries it; if the connection broke while committing
  /// and the retry finds exactly `new_row` stored, the answer is true.
  [[nodiscard]] caf::expected<bool>
  replace_row(const key_record& old_row, const key_record& new_row) override;

  /// The recorded rotation, or nullopt.
  [[nodiscard]] caf::expected<std::optional<rotation_record>>
  get_rotation() override;

  /// Compare-and-swap of the rotation row, committed as key writes are;
  /// retried like `replace_row`.
  [[nodiscard]] caf::expected<bool>
  set_rotation(const std::optional<rotation_record>& expected,
               const rotation_record& next) override;

  /// Compare-and-swap of the canary (the stored canary must equal
  /// `old_canary` in every field), committed as key writes are; retried
  /// like `replace_row`.
  [[nodiscard]] caf::expected<bool>
  replace_canary(const canary_record& old_canary,
                 const canary_record& next) override;

  /// Appends to `driver_id`'s chain in one transaction, committed as key
  /// writes are (synchronous_commit on at least); retried like `put_many`
  /// after a lost connection (the chain's head is read again inside the
  /// retry's transaction).
  [[nodiscard]] caf::expected<std::vector<audit_row>>
  append_audit(std::string_view driver_id,
               const std::vector<audit_entry>& entries) override;

  [[nodiscard]] caf::expected<std::vector<audit_row>>
  read_audit(std::string_view after_driver, uint64_t after_seq,
             size_t limit) override;

  // -- properties -------------------------------------------------------------

  /// Number of times a connection was (re-)opened; for tests and logs.
  [[nodiscard]] uint64_t connects() const noexcept;

  /// The warning logged because the connection string names several hosts
  /// but the primary connected last has no synchronous standby
  /// (`failover_warning`), or "". Checked on every new connection, so that
  /// a failover onto a primary without a synchronous standby is warned
  /// about when it happens, not at the next start.
  [[nodiscard]] const std::string& replication_warning() const noexcept;

private:
  /// Used by `open` only.
  pg_store() = default;

  /// The connection, options and retry loop (defined in the .cpp, so that
  /// this header does not need libpqxx).
  struct impl;

  /// Never null after `open`.
  std::unique_ptr<impl> impl_;
};

} // namespace hsm::store
