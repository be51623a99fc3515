#pragma once

// Opens the configured key store: PostgreSQL when `--postgres-url` is set,
// else SQLite at `--sqlite-path`.

#include "runtime/app/config.hpp"
#include "store/key_store.hpp"

#include <memory>

namespace hsm {

/// The configured key store, opened and migrated.
[[nodiscard]] caf::expected<std::unique_ptr<store::key_store>>
open_store(const driver_config& cfg);

/// The configured key store opened read-only (`db verify`, `db export`):
/// SQLite with `sqlite_store::open_read_only`, PostgreSQL with
/// `pg_options::read_only`. Nothing is created or migrated.
[[nodiscard]] caf::expected<std::unique_ptr<store::key_store>>
open_store_read_only(const driver_config& cfg);

/// The store for messages: the SQLite path or the redacted URL.
std::string store_name(const driver_config& cfg);

} // namespace hsm
