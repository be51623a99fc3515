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
// documents. libpqxx exceptions are caught here and mapped to `store_errc`.
// One owner thread at a time, like every key_store.

#include "store/key_store.hpp"

#include <chrono>
#include <memory>
#include <string>
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
};

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
  /// commit was this call's.
  [[nodiscard]] caf::expected<std::vector<put_result>>
  put_many(const std::vector<key_record>& recs) override;

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

  /// Number of times a connection was (re-)opened; for tests and logs.
  [[nodiscard]] uint64_t connects() const noexcept;

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
