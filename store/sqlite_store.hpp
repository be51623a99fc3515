#pragma once

// The SQLite back end of the key store: one database file in WAL mode, its
// schema brought up to date by the migrations in store/migrations/sqlite/
// when it opens. The caller of `open` owns the store (the CLI, or the storage
// actor). One thread at a time calls it (the connection is opened NOMUTEX);
// it may move between threads, as an actor does between workers. Several
// stores, in one process or many, may share a file: writes run in
// `BEGIN IMMEDIATE` transactions and wait up to five seconds for the lock
// (see `lock_wait_pause`).

#include "store/key_store.hpp"

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

namespace hsm::store {

/// How long a connection pauses before it tries again for a lock another
/// connection holds, after `tries` failed tries; none once the pauses add up
/// to five seconds (then the statement fails, `store_errc::unavailable`).
/// 50 µs, doubling up to 2 ms. SQLite's own busy handler pauses 1, 2, 5,
/// 10 ... ms, while a commit here holds the lock for a fraction of a
/// millisecond: the driver's two writers (keys, audit trail) would wait
/// several times longer than the lock is held.
[[nodiscard]] std::optional<std::chrono::microseconds>
lock_wait_pause(int tries);

/// A key store in one SQLite database file. See the file comment for
/// threading.
class sqlite_store final : public key_store {
public:
  // -- construction -----------------------------------------------------------

  /// Opens (or creates, with mode 0600) the database at `path` and applies
  /// every migration above its schema version, in one `BEGIN IMMEDIATE`
  /// transaction. Fails with `store_errc::unavailable` if the file cannot be
  /// opened or locked (e.g. a missing parent directory), with
  /// `store_errc::schema_too_new` if the database is at a version newer than
  /// the newest of `migrations`, and with `store_errc::query_failed` if a
  /// migration fails (then none of them is applied). Migration SQL must not
  /// open or end transactions itself.
  [[nodiscard]] static caf::expected<std::unique_ptr<sqlite_store>>
  open(const std::filesystem::path& path,
       std::vector<migration> migrations = sqlite_migrations());

  /// Opens the existing database at `path` for reading only
  /// (`SQLITE_OPEN_READONLY` and `PRAGMA query_only`): nothing is created,
  /// migrated or written, not even the journal mode, so a backup copy stays
  /// byte for byte as it was (SQLite may add its -wal and -shm files beside
  /// a WAL database). Every write fails. Fails with `store_errc::unavailable`
  /// if the file is missing or not a key store, `store_errc::schema_too_new`
  /// if its schema is newer than the newest of `migrations`, and
  /// `store_errc::query_failed` if it is older (read-only, it cannot be
  /// migrated). For `hsm-driver db verify` and `db export`.
  [[nodiscard]] static caf::expected<std::unique_ptr<sqlite_store>>
  open_read_only(const std::filesystem::path& path,
                 std::vector<migration> migrations = sqlite_migrations());

  /// Closes the connection.
  ~sqlite_store() override;

  /// Not copyable: owns a connection.
  sqlite_store(const sqlite_store&) = delete;

  /// Not copyable: owns a connection.
  sqlite_store& operator=(const sqlite_store&) = delete;

  // -- key_store --------------------------------------------------------------

  /// Inserts each record unless its key id is taken (then answers with the
  /// stored record), and appends the audit entries of those inserted, all
  /// in one `BEGIN IMMEDIATE` transaction; commits (one WAL fsync,
  /// synchronous=FULL) before returning.
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
  /// by those fields (text in byte order).
  [[nodiscard]] caf::expected<std::vector<row_count>> count_rows() override;

  /// Up to `limit` rows not yet done for `target_label`, in key id order
  /// (byte order), after `after_key_id`; `store_errc::corrupt_row` if one
  /// of them does not parse.
  [[nodiscard]] caf::expected<std::vector<key_record>>
  pending_rows(std::string_view target_label, std::string_view after_key_id,
               size_t limit) override;

  /// One compare-and-swap `UPDATE` in a `BEGIN IMMEDIATE` transaction,
  /// committed (synchronous=FULL) before returning. The stored row must
  /// equal `old_row` in every column.
  [[nodiscard]] caf::expected<bool>
  replace_row(const key_record& old_row, const key_record& new_row) override;

  /// The recorded rotation, or nullopt.
  [[nodiscard]] caf::expected<std::optional<rotation_record>>
  get_rotation() override;

  /// Compare-and-swap of the rotation row, committed before returning.
  [[nodiscard]] caf::expected<bool>
  set_rotation(const std::optional<rotation_record>& expected,
               const rotation_record& next) override;

  /// Compare-and-swap of the canary (the stored canary must equal
  /// `old_canary` in every field), committed before returning.
  [[nodiscard]] caf::expected<bool>
  replace_canary(const canary_record& old_canary,
                 const canary_record& next) override;

  [[nodiscard]] caf::expected<std::vector<audit_row>>
  append_audit(std::string_view driver_id,
               const std::vector<audit_entry>& entries) override;

  [[nodiscard]] caf::expected<std::vector<audit_row>>
  read_audit(std::string_view after_driver, uint64_t after_seq,
             size_t limit) override;

  // -- properties -------------------------------------------------------------

  /// The database file, as given to `open` (for log messages).
  [[nodiscard]] const std::filesystem::path& path() const noexcept;

private:
  /// The connection and its prepared statements (defined in the .cpp, so
  /// that this header does not need sqlite3.h).
  struct connection;

  /// Takes over an open, migrated connection.
  explicit sqlite_store(std::unique_ptr<connection> conn);

  /// `open`, or with `read_only` `open_read_only`.
  [[nodiscard]] static caf::expected<std::unique_ptr<sqlite_store>>
  open_as(const std::filesystem::path& path, std::vector<migration> migrations,
          bool read_only);

  /// Appends `entries` to `driver_id`'s chain inside the write transaction
  /// the caller has begun; `what` names the operation in errors.
  [[nodiscard]] caf::expected<std::vector<audit_row>>
  append_in_transaction(std::string_view driver_id,
                        const std::vector<const audit_entry*>& entries,
                        const std::string& what);

  /// Never null.
  std::unique_ptr<connection> conn_;
};

} // namespace hsm::store
