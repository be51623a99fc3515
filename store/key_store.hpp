#pragma once

// The key store: where wrapped private keys (or references to token-resident
// keys) live beside their public keys. Records are immutable once written.
//
// A key_store instance is not thread-safe: one owner (the CLI, or the storage
// actor) calls it. Back ends map their own failures to `store_errc`; nothing
// throws out of this interface.

#include "messages/audit.hpp"
#include "messages/errors.hpp"
#include "messages/key_record.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::store {

/// The master-key check (invariant 5): a P-256 key wrapped by the master key
/// at first start. A token that cannot unwrap it and sign with it holds
/// another master key.
struct canary_record {
  /// Canonical P-256 public key of the canary.
  std::vector<uint8_t> public_key;
  /// The canary's private key wrapped by the master key.
  std::vector<uint8_t> wrapped_key;
  /// Mechanism used for `wrapped_key`.
  std::string wrap_mechanism;
  /// Label of the master key that wrapped it (for the operator's message).
  std::string master_key_label;
  /// Creation time, milliseconds since the Unix epoch.
  int64_t created_at_ms = 0;
};

/// Where a master-key rotation stands.
enum class rotation_phase {
  /// Rows are being re-wrapped from `from_label` to `to_label`; drivers
  /// serve rows under either key and wrap new keys under `to_label`.
  running,
  /// Every row is under `to_label`; rows naming `from_label` are refused.
  complete,
};

/// The master-key rotation the store records (at most one: the latest).
struct rotation_record {
  /// The master key rows are moved off (its `CKA_LABEL`).
  std::string from_label;
  /// The master key rows are moved to.
  std::string to_label;
  rotation_phase phase = rotation_phase::running;
  /// When the rotation began, milliseconds since the Unix epoch.
  int64_t started_at_ms = 0;
  /// When it was declared complete; 0 while running.
  int64_t completed_at_ms = 0;

  bool operator==(const rotation_record&) const = default;
};

/// How many key rows share a master key id, a format and a storage kind:
/// one line of `master-key check`'s progress report.
struct row_count {
  std::string master_key_id;
  int format_version = 0;
  /// True for token-resident rows (`resident_mechanism`).
  bool resident = false;
  uint64_t rows = 0;

  bool operator==(const row_count&) const = default;
};

/// One schema migration; applied in version order, each at most once.
struct migration {
  /// 1, 2, ...: the schema version after this migration.
  int version;
  /// File name, for logs.
  const char* name;
  /// The statements.
  const char* sql;
};

/// The audit entries of a group of puts (`put_many_audited`).
struct put_audit {
  /// Whose chain the entries join.
  std::string driver_id;
  /// One per record, or empty: none.
  std::vector<std::optional<audit_entry>> entries;
};

/// What `put_many_audited` wrote.
struct audited_puts {
  /// The i-th answers the i-th record.
  std::vector<put_result> results;
  /// The audit rows appended, in chain order.
  std::vector<audit_row> rows;
};

/// Abstract key store. See the file comment for threading.
class key_store {
public:
  virtual ~key_store() = default;

  /// Inserts `rec` unless its key id is taken. Idempotent by key id: the same
  /// key id never holds two keys; a second put returns the stored record with
  /// `inserted == false`. Returns only after the write is durable. The same
  /// as `put_many` of `rec` alone.
  [[nodiscard]] caf::expected<put_result> put(const key_record& rec);

  /// Puts every record of `recs` as `put` does, in one transaction with one
  /// commit (one fsync) for all: on success every record is durable and the
  /// i-th result answers `recs[i]`; on error none of them is written. A key
  /// id that appears twice in `recs` is written once: the first record wins
  /// and the later ones get its record with `inserted == false`. An empty
  /// `recs` writes nothing and opens no transaction.
  [[nodiscard]] caf::expected<std::vector<put_result>>
  put_many(const std::vector<key_record>& recs);

  /// `put_many`, and in the same transaction the audit entries of the
  /// records it inserts: `audit.entries[i]`, if set, is appended to
  /// `audit.driver_id`'s chain (as `append_audit` would) if and only if
  /// `recs[i]` is inserted, and its result says `audited`. On error neither
  /// the records nor the entries are written. `audit.entries` is empty (no
  /// entry) or as long as `recs`.
  [[nodiscard]] virtual caf::expected<audited_puts>
  put_many_audited(const std::vector<key_record>& recs, const put_audit& audit)
    = 0;

  /// The record stored under `key_id`, or nullopt.
  [[nodiscard]] virtual caf::expected<std::optional<key_record>>
  get(std::string_view key_id) = 0;

  /// The canary, or nullopt before first start.
  [[nodiscard]] virtual caf::expected<std::optional<canary_record>>
  get_canary() = 0;

  /// Stores `c` unless a canary exists; returns the canary now stored (the
  /// first writer wins, so racing drivers agree on one).
  [[nodiscard]] virtual caf::expected<canary_record>
  put_canary(const canary_record& c) = 0;

  /// The schema version the database is at.
  [[nodiscard]] virtual caf::expected<int> schema_version() = 0;

  /// How many key rows are older than `current_row_format` (no row MAC):
  /// they are not served until sealed.
  [[nodiscard]] virtual caf::expected<uint64_t> unsealed_rows() {
    return uint64_t{0};
  }

  // -- master-key rotation ----------------------------------------------------
  // Rotation is the one change a key row sees after it is written: its blob
  // is re-wrapped under another master key (the key id, scheme, public key
  // and creation time never change), and its MAC and format follow.

  /// Every row grouped by (master_key_id, format_version, resident), sorted
  /// by those fields.
  [[nodiscard]] virtual caf::expected<std::vector<row_count>> count_rows() = 0;

  /// Up to `limit` rows that are not yet done for a rotation to
  /// `target_label`, in key id order, with key ids greater than
  /// `after_key_id` ("" = from the start). A row is done when its
  /// `format_version` is `current_row_format` and its `master_key_id` is
  /// `target_label` (token-resident rows included: their MAC is made by the
  /// row-MAC key of the master key they name).
  [[nodiscard]] virtual caf::expected<std::vector<key_record>>
  pending_rows(std::string_view target_label, std::string_view after_key_id,
               size_t limit)
    = 0;

  /// Replaces the stored row `old_row` by `new_row` in one durable write, if
  /// the stored row still is `old_row` (same key_blob, wrap_mechanism,
  /// master_key_id, format_version and row_mac); returns false, changing
  /// nothing, if it is not (another rotator, or the row is gone). Only
  /// key_blob, wrap_mechanism, master_key_id, format_version and row_mac may
  /// differ between the two; a `new_row` that changes the key id, scheme,
  /// public key or creation time is `store_errc::query_failed`.
  [[nodiscard]] virtual caf::expected<bool>
  replace_row(const key_record& old_row, const key_record& new_row) = 0;

  /// The recorded rotation, or nullopt if none was ever begun.
  [[nodiscard]] virtual caf::expected<std::optional<rotation_record>>
  get_rotation() = 0;

  /// Writes `next` if the stored rotation equals `expected` (nullopt: none
  /// is stored), durably; returns false, changing nothing, if it does not.
  [[nodiscard]] virtual caf::expected<bool>
  set_rotation(const std::optional<rotation_record>& expected,
               const rotation_record& next)
    = 0;

  /// Replaces the canary `old_canary` by `next` (the canary re-wrapped
  /// under a new master key) if the stored canary still equals
  /// `old_canary` (same wrapped_key and master_key_label); false otherwise.
  /// Public key and creation time must not change (else
  /// `store_errc::query_failed`).
  [[nodiscard]] virtual caf::expected<bool>
  replace_canary(const canary_record& old_canary, const canary_record& next)
    = 0;

  // -- the audit trail (store/audit.hpp) --------------------------------------

  /// Appends `entries` to `driver_id`'s chain, in order, in one durable
  /// transaction, each row linked to the one before (`chain_next`); returns
  /// the rows written. Writers of one chain (a driver's audit writer and its
  /// audited puts, two processes under one driver id) take turns: each
  /// reads the chain's head under a lock held to its commit. Empty
  /// `entries` writes nothing.
  [[nodiscard]] virtual caf::expected<std::vector<audit_row>>
  append_audit(std::string_view driver_id,
               const std::vector<audit_entry>& entries)
    = 0;

  /// Up to `limit` rows after (`after_driver`, `after_seq`), in (driver_id,
  /// seq) order; ("", 0) reads from the start.
  [[nodiscard]] virtual caf::expected<std::vector<audit_row>>
  read_audit(std::string_view after_driver, uint64_t after_seq, size_t limit)
    = 0;
};

/// Migrations for SQLite, from store/migrations/sqlite/ (generated).
std::vector<migration> sqlite_migrations();

/// Migrations for PostgreSQL, from store/migrations/postgres/ (generated).
std::vector<migration> postgres_migrations();

/// `store_errc::unavailable` with `msg`: the database cannot be reached.
caf::error make_unavailable(std::string msg);

/// `store_errc::query_failed` with `msg`.
caf::error make_query_failed(std::string msg);

/// `store_errc::corrupt_row` with `msg`.
caf::error make_corrupt_row(std::string msg);

/// `store_errc::schema_too_new`: the database at `where` (as errors name
/// it) is at schema version `current`, beyond this build's `newest`.
caf::error make_schema_too_new(const std::string& where, int current,
                               int newest);

/// Checks that versions are positive and distinct, and sorts `ms` by
/// version; a bad list is `store_errc::query_failed`.
[[nodiscard]] caf::error sort_migrations(std::vector<migration>& ms);

/// For each record of a group, the index of the first record in `recs` with
/// the same key id (its own index if it is the first). Back ends write only
/// the firsts and answer the others with their first's record.
[[nodiscard]] std::vector<size_t>
first_of_key_id(const std::vector<key_record>& recs);

/// Names a group in messages: "put key 'a'" for one record, "put 3 keys
/// ('a', 'b', 'c')" for more (at most three ids, then "...").
[[nodiscard]] std::string put_label(const std::vector<key_record>& recs);

} // namespace hsm::store
