#pragma once

// The key store: where wrapped private keys (or references to token-resident
// keys) live beside their public keys. Records are immutable once written.
//
// A key_store instance is not thread-safe: one owner (the CLI, or the storage
// actor) calls it. Back ends map their own failures to `store_errc`; nothing
// throws out of this interface.

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

/// One schema migration; applied in version order, each at most once.
struct migration {
  /// 1, 2, ...: the schema version after this migration.
  int version;
  /// File name, for logs.
  const char* name;
  /// The statements.
  const char* sql;
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
  [[nodiscard]] virtual caf::expected<std::vector<put_result>>
  put_many(const std::vector<key_record>& recs) = 0;

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
