#include "runtime/app/store_open.hpp"

#include "runtime/base/logging.hpp"
#include "store/pg_store.hpp"
#include "store/sqlite_store.hpp"

namespace hsm {

std::string store_name(const driver_config& cfg) {
  if (!cfg.postgres_url.empty())
    return "PostgreSQL " + redact_url(cfg.postgres_url);
  return "SQLite " + cfg.sqlite_path.string();
}

caf::expected<std::unique_ptr<store::key_store>>
open_store(const driver_config& cfg) {
  logger("store")->info("key store: {}", store_name(cfg));
  if (!cfg.postgres_url.empty()) {
    auto st = store::pg_store::open(cfg.postgres_url);
    if (!st)
      return st.error();
    return std::unique_ptr<store::key_store>{std::move(*st)};
  }
  auto st = store::sqlite_store::open(cfg.sqlite_path);
  if (!st)
    return st.error();
  return std::unique_ptr<store::key_store>{std::move(*st)};
}

caf::expected<std::unique_ptr<store::key_store>>
open_store_read_only(const driver_config& cfg) {
  logger("store")->info("key store (read-only): {}", store_name(cfg));
  if (!cfg.postgres_url.empty()) {
    store::pg_options opts;
    opts.read_only = true;
    auto st = store::pg_store::open(cfg.postgres_url, opts);
    if (!st)
      return st.error();
    return std::unique_ptr<store::key_store>{std::move(*st)};
  }
  auto st = store::sqlite_store::open_read_only(cfg.sqlite_path);
  if (!st)
    return st.error();
  return std::unique_ptr<store::key_store>{std::move(*st)};
}

} // namespace hsm
