#include "store/pg_store.hpp"

#include "runtime/base/clock.hpp"
#include "runtime/base/logging.hpp"
#include "store/audit.hpp"
#include "store/pg_conninfo.hpp"

#include <poll.h>
#include <pqxx/pqxx>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

namespace hsm::store {

namespace {

using clock_type = std::chrono::steady_clock;
using std::chrono::milliseconds;

// -- constants ----------------------------------------------------------------

/// Key of the transaction-scoped advisory lock that serializes migrations
/// across every driver sharing the database ("hsm-migr" in ASCII).
constexpr int64_t migration_lock_key = 0x68736d2d6d696772;

/// Bounds of the `connect_timeout` (seconds) added to a connection string
/// that has none: without it, a host that drops packets holds one connection
/// attempt for minutes (the kernel's SYN retries), far past the retry budget.
/// libpq treats values below 2 as 2.
constexpr int64_t min_connect_timeout_s = 2;
constexpr int64_t max_connect_timeout_s = 10;

constexpr const char* create_migrations_table
  = "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, "
    "name TEXT NOT NULL, "
    "applied_at_ms BIGINT NOT NULL)";

constexpr const char* select_version_sql
  = "SELECT COALESCE(MAX(version), 0) FROM schema_migrations";

constexpr const char* insert_migration_sql
  = "INSERT INTO schema_migrations (version, name, applied_at_ms) "
    "VALUES ($1, $2, $3)";

constexpr const char* insert_key_sql
  = "INSERT INTO keys (key_id, scheme, public_key, key_blob, wrap_mechanism, "
    "created_at_ms, format_version, master_key_id, row_mac) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
    "ON CONFLICT (key_id) DO NOTHING";

constexpr const char* select_key_sql
  = "SELECT key_id, scheme, public_key, key_blob, wrap_mechanism, "
    "created_at_ms, format_version, master_key_id, row_mac FROM keys "
    "WHERE key_id = $1";

constexpr const char* insert_canary_sql
  = "INSERT INTO master_key_canary (id, public_key, wrapped_key, "
    "wrap_mechanism, master_key_label, created_at_ms) "
    "VALUES (1, $1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING";

constexpr const char* select_canary_sql
  = "SELECT public_key, wrapped_key, wrap_mechanism, master_key_label, "
    "created_at_ms FROM master_key_canary WHERE id = 1";

constexpr const char* count_rows_sql
  = "SELECT master_key_id, format_version, wrap_mechanism = $1, COUNT(*) "
    "FROM keys GROUP BY 1, 2, 3 "
    "ORDER BY master_key_id COLLATE \"C\", 2, 3";

/// Rows not yet done for a rotation to $3 (format $2 under $3 is done),
/// after key id $1, in key id order. The database's collation, not "C":
/// the primary key's index then serves the order and the bound.
constexpr const char* pending_rows_sql
  = "SELECT key_id, scheme, public_key, key_blob, wrap_mechanism, "
    "created_at_ms, format_version, master_key_id, row_mac FROM keys "
    "WHERE key_id > $1 AND NOT (format_version = $2 AND master_key_id = $3) "
    "ORDER BY key_id LIMIT $4";

/// Compare-and-swap of a key row: $1-$5 the new wrapping, $6-$14 the whole
/// old row.
constexpr const char* replace_key_sql
  = "UPDATE keys SET key_blob = $1, wrap_mechanism = $2, master_key_id = $3, "
    "format_version = $4, row_mac = $5 "
    "WHERE key_id = $6 AND scheme = $7 AND public_key = $8 "
    "AND created_at_ms = $9 AND key_blob = $10 AND wrap_mechanism = $11 "
    "AND master_key_id = $12 AND format_version = $13 AND row_mac = $14";

constexpr const char* select_rotation_sql
  = "SELECT from_label, to_label, phase, started_at_ms, completed_at_ms "
    "FROM master_key_rotation WHERE id = 1";

constexpr const char* insert_rotation_sql
  = "INSERT INTO master_key_rotation (id, from_label, to_label, phase, "
    "started_at_ms, completed_at_ms) VALUES (1, $1, $2, $3, $4, $5) "
    "ON CONFLICT (id) DO NOTHING";

/// Compare-and-swap of the rotation: $1-$5 the next, $6-$10 the expected.
constexpr const char* update_rotation_sql
  = "UPDATE master_key_rotation SET from_label = $1, to_label = $2, "
    "phase = $3, started_at_ms = $4, completed_at_ms = $5 "
    "WHERE id = 1 AND from_label = $6 AND to_label = $7 AND phase = $8 "
    "AND started_at_ms = $9 AND completed_at_ms = $10";

/// Compare-and-swap of the canary: $1-$3 the new wrapping, $4-$8 the whole
/// old canary.
constexpr const char* replace_canary_sql
  = "UPDATE master_key_canary SET wrapped_key = $1, wrap_mechanism = $2, "
    "master_key_label = $3 WHERE id = 1 AND public_key = $4 "
    "AND wrapped_key = $5 AND wrap_mechanism = $6 AND master_key_label = $7 "
    "AND created_at_ms = $8";

constexpr const char* audit_head_sql
  = "SELECT seq, entry_hash FROM audit_log WHERE driver_id = $1 "
    "ORDER BY seq DESC LIMIT 1";

/// The lock of one driver's chain, held to the end of the transaction:
/// every writer of the chain (the driver's key and audit connections, a
/// second process under the same driver id) reads its head in turn.
constexpr const char* lock_audit_chain_sql
  = "SELECT pg_advisory_xact_lock(hashtextextended("
    "'hsm-driver audit chain ' || $1, 0))";

constexpr const char* audit_hash_at_sql
  = "SELECT entry_hash FROM audit_log WHERE driver_id = $1 AND seq = $2";

constexpr const char* insert_audit_sql
  = "INSERT INTO audit_log (driver_id, seq, at_ms, request_id, kind, key_id, "
    "public_key_fingerprint, payload_sha256, outcome, prev_hash, entry_hash) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

constexpr const char* read_audit_sql
  = "SELECT driver_id, seq, at_ms, request_id, kind, key_id, "
    "public_key_fingerprint, payload_sha256, outcome, prev_hash, entry_hash "
    "FROM audit_log WHERE (driver_id, seq) > ($1, $2) "
    "ORDER BY driver_id, seq LIMIT $3";

/// Raises the commit level of the transaction it runs in; see
/// `key_write_commit_level`.
constexpr const char* force_sync_commit_sql
  = "SET LOCAL synchronous_commit TO on";

/// A statement prepared on every new connection (libpqxx sends the PREPARE
/// on first use, so preparing before the migrations ran is fine).
struct statement {
  const char* name;
  const char* sql;
};

constexpr statement insert_key{"hsm_insert_key", insert_key_sql};
constexpr statement select_key{"hsm_select_key", select_key_sql};
constexpr statement insert_canary{"hsm_insert_canary", insert_canary_sql};
constexpr statement select_canary{"hsm_select_canary", select_canary_sql};
constexpr statement select_version{"hsm_select_version", select_version_sql};

constexpr statement count_key_rows{"hsm_count_rows", count_rows_sql};
constexpr statement select_pending{"hsm_pending_rows", pending_rows_sql};
constexpr statement replace_key{"hsm_replace_key", replace_key_sql};
constexpr statement select_rotation{"hsm_select_rotation", select_rotation_sql};
constexpr statement insert_rotation{"hsm_insert_rotation", insert_rotation_sql};
constexpr statement update_rotation{"hsm_update_rotation", update_rotation_sql};
constexpr statement update_canary{"hsm_replace_canary", replace_canary_sql};
constexpr statement audit_head{"hsm_audit_head", audit_head_sql};
constexpr statement insert_audit{"hsm_insert_audit", insert_audit_sql};
constexpr statement lock_audit_chain{"hsm_lock_audit_chain",
                                     lock_audit_chain_sql};
constexpr statement audit_hash_at{"hsm_audit_hash_at", audit_hash_at_sql};
constexpr statement read_audit_rows{"hsm_read_audit", read_audit_sql};

constexpr statement prepared_statements[] = {
  insert_key,      select_key,      insert_canary,   select_canary,
  select_version,  count_key_rows,  select_pending,  replace_key,
  select_rotation, insert_rotation, update_rotation, update_canary,
  audit_head,      insert_audit,    read_audit_rows, lock_audit_chain,
  audit_hash_at,
};

// -- errors -------------------------------------------------------------------

bool is_unavailable(const caf::error& err) {
  return err.category() == caf::atom("store")
         && err.code() == static_cast<uint8_t>(store_errc::unavailable);
}

/// The context message of `err` (as made by the helpers above).
std::string message_of(const caf::error& err) {
  const auto& ctx = err.context();
  if (ctx.size() == 1 && ctx.match_element<std::string>(0))
    return ctx.get_as<std::string>(0);
  return describe(err);
}

/// True for the SQLSTATEs after which a new connection may succeed: class 08
/// (connection exception), 57P01 admin_shutdown, 57P02 crash_shutdown,
/// 57P03 cannot_connect_now, and 25006 read_only_sql_transaction (the server
/// is, or has become, a standby).
bool is_retryable_state(std::string_view state) {
  return state.substr(0, 2) == "08" || state == "57P01" || state == "57P02"
         || state == "57P03" || state == "25006";
}

/// The first line of a libpq or server message. The lines after it (DETAIL,
/// CONTEXT) may quote row values, e.g. "Failing row contains (...)" with the
/// key blob, so they never reach an error.
std::string first_line(std::string_view msg) {
  auto end = msg.find('\n');
  auto line = msg.substr(0, end);
  while (!line.empty()
         && std::isspace(static_cast<unsigned char>(line.back())) != 0)
    line.remove_suffix(1);
  return std::string{line};
}

// -- connection strings -------------------------------------------------------

/// Where the store connects, from the connection string (parsed by
/// pg_conninfo.hpp, not by libpq: libpqxx does not expose PQconninfoParse).
struct conn_target {
  /// The string handed to libpq (the caller's, maybe with connect_timeout
  /// and target_session_attrs added).
  std::string conninfo;
  /// `host:port[, host:port...]`, for messages.
  std::string where;
  /// The passwords given in the string (`password`, `sslpassword`), which
  /// no message may contain.
  std::vector<std::string> secrets;
  /// How many servers the string names (`host`, else `hostaddr`, else
  /// PGHOST / PGHOSTADDR): more than one means a failover may move the
  /// store to another server.
  size_t host_count = 1;
};

std::string env_or(const char* name, std::string fallback) {
  if (const char* x = std::getenv(name); x != nullptr && *x != '\0')
    return x;
  return fallback;
}

/// The value of `keyword` in `info`, or empty.
std::string value_of(const pg_conninfo& info, std::string_view keyword) {
  const auto* x = info.find(keyword);
  return x != nullptr ? *x : std::string{};
}

/// `host:port, ...` for messages, with libpq's defaults filled in.
std::string describe_hosts(const pg_conninfo& info) {
  auto host_list = value_of(info, "host");
  if (host_list.empty())
    host_list = value_of(info, "hostaddr");
  if (host_list.empty())
    host_list = env_or("PGHOST", env_or("PGHOSTADDR", "local socket"));
  auto port_list = value_of(info, "port");
  if (port_list.empty())
    port_list = env_or("PGPORT", "5432");
  std::string out;
  for (const auto& [host_name, port_name] : pair_hosts(host_list, port_list)) {
    auto port = port_name.empty() ? env_or("PGPORT", "5432") : port_name;
    auto host = host_name.empty() ? std::string{"local socket"} : host_name;
    if (!out.empty())
      out += ", ";
    if (host.find(':') != std::string::npos)
      out += "[" + host + "]:" + port;
    else
      out += host + ":" + port;
  }
  return out;
}

/// Fails with `config_errc::invalid_option` if `url` does not parse
/// (`parse_conninfo`): libpq would refuse or misread it, and its messages
/// quote the string, password and all.
caf::expected<conn_target> make_target(const std::string& url,
                                       milliseconds budget) {
  auto info = parse_conninfo(url);
  if (!info)
    return std::move(info.error());
  conn_target out;
  out.where = describe_hosts(*info);
  for (auto keyword : {"password", "sslpassword"})
    if (auto pw = value_of(*info, keyword); !pw.empty())
      out.secrets.push_back(std::move(pw));
  out.conninfo = url;
  auto add = [&](const std::string& option) {
    if (info->uri) {
      if (out.conninfo.find('?') == std::string::npos)
        out.conninfo += '?';
      else if (!out.conninfo.ends_with('?') && !out.conninfo.ends_with('&'))
        out.conninfo += '&';
      out.conninfo += option;
    } else {
      // In front: appended, it would join a value that ends in a lone
      // backslash. libpq takes the last of a keyword given twice, but these
      // are added only when absent.
      out.conninfo = option + " " + out.conninfo;
    }
  };
  if (info->find("connect_timeout") == nullptr
      && std::getenv("PGCONNECT_TIMEOUT") == nullptr) {
    auto seconds = std::clamp<int64_t>((budget.count() + 999) / 1000,
                                       min_connect_timeout_s,
                                       max_connect_timeout_s);
    add("connect_timeout=" + std::to_string(seconds));
  }
  // A server that stops answering must not hold the store actor for the
  // kernel's TCP timeout (minutes): keepalives find a dead peer, and
  // tcp_user_timeout bounds a write nobody acknowledges. Each only if the
  // URL does not say otherwise.
  for (auto [keyword, value] : pg_socket_defaults)
    if (info->find(keyword) == nullptr)
      add(std::string{keyword} + "=" + std::string{value});
  // With several hosts, let libpq skip read-only ones (standbys, an old
  // primary after failover) itself; reconnecting alone would land on the
  // same first reachable host again. One host needs no choice: the check
  // after connecting drops a read-only server.
  auto hosts = value_of(*info, "host");
  if (hosts.empty())
    hosts = value_of(*info, "hostaddr");
  auto listed = hosts.empty() ? env_or("PGHOST", env_or("PGHOSTADDR", ""))
                              : hosts;
  out.host_count = listed.empty() ? 1 : pair_hosts(listed, "").size();
  if (info->find("target_session_attrs") == nullptr
      && std::getenv("PGTARGETSESSIONATTRS") == nullptr
      && hosts.find(',') != std::string::npos)
    add("target_session_attrs=read-write");
  return out;
}

// -- reading rows -------------------------------------------------------------

/// A binary parameter for a BYTEA column (sent in binary format).
pqxx::binarystring bytea(const std::vector<uint8_t>& x) {
  // binarystring copies with memcpy, which wants a valid pointer even for
  // zero bytes.
  static constexpr uint8_t none = 0;
  return pqxx::binarystring{x.empty() ? &none : x.data(), x.size()};
}

std::vector<uint8_t> column_bytes(const pqxx::field& f) {
  pqxx::binarystring bs{f};
  return std::vector<uint8_t>(bs.data(), bs.data() + bs.size());
}

/// The name of the first NULL column of `row`, or nullopt.
std::optional<std::string> null_column(const pqxx::row& row) {
  for (const auto& f : row)
    if (f.is_null())
      return std::string{f.name()};
  return std::nullopt;
}

/// Takes the lock of `driver`'s audit chain for the rest of `tx`, then
/// reads the chain's head (none before its first row).
caf::expected<std::optional<audit_row>>
lock_audit_head(pqxx::transaction_base& tx, const std::string& driver,
                const std::string& what) {
  tx.exec_prepared(lock_audit_chain.name, driver);
  auto head = tx.exec_prepared(audit_head.name, driver);
  if (head.empty())
    return std::optional<audit_row>{};
  if (auto col = null_column(head[0]))
    return make_corrupt_row(what + ": column " + *col + " is NULL");
  audit_row h;
  h.seq = head[0][0].as<uint64_t>();
  h.entry_hash = column_bytes(head[0][1]);
  return std::optional<audit_row>{std::move(h)};
}

/// True if `row` is stored (its driver, seq and hash).
bool audit_row_stored(pqxx::transaction_base& tx, const audit_row& row) {
  auto found = tx.exec_prepared(audit_hash_at.name, row.driver_id,
                                static_cast<int64_t>(row.seq));
  return !found.empty() && !found[0][0].is_null()
         && column_bytes(found[0][0]) == row.entry_hash;
}

/// Appends `entries` after `prev` (the head `lock_audit_head` read) in `tx`.
std::vector<audit_row>
insert_audit_rows(pqxx::transaction_base& tx, const std::string& driver,
                  std::optional<audit_row> prev,
                  const std::vector<const audit_entry*>& entries) {
  std::vector<audit_row> rows;
  rows.reserve(entries.size());
  for (const auto* e : entries) {
    auto row = chain_next(driver, prev, *e);
    tx.exec_prepared0(insert_audit.name, row.driver_id,
                      static_cast<int64_t>(row.seq), row.entry.at_ms,
                      row.entry.request_id,
                      std::string{audit_kind_name(row.entry.kind)},
                      row.entry.key_id, row.entry.public_key_fingerprint,
                      bytea(row.entry.payload_sha256), row.entry.outcome,
                      bytea(row.prev_hash), bytea(row.entry_hash));
    prev = row;
    rows.push_back(std::move(row));
  }
  return rows;
}

/// Reads a row of `select_key_sql`.
caf::expected<key_record> read_key_row(const pqxx::row& row,
                                       std::string_view key_id) {
  if (auto col = null_column(row))
    return make_corrupt_row("key '" + std::string{key_id} + "': column " + *col
                            + " is NULL");
  auto scheme_name = row[1].as<std::string>();
  auto parsed = parse_scheme(scheme_name);
  if (!parsed)
    return make_corrupt_row("key '" + std::string{key_id}
                            + "': unknown scheme '" + scheme_name + "'");
  key_record rec;
  rec.key_id = row[0].as<std::string>();
  rec.scheme = *parsed;
  rec.public_key = column_bytes(row[2]);
  rec.key_blob = column_bytes(row[3]);
  rec.wrap_mechanism = row[4].as<std::string>();
  rec.created_at_ms = row[5].as<int64_t>();
  rec.format_version = row[6].as<int>();
  rec.master_key_id = row[7].as<std::string>();
  rec.row_mac = column_bytes(row[8]);
  return rec;
}

/// Reads a row of `select_canary_sql`.
caf::expected<canary_record> read_canary_row(const pqxx::row& row) {
  if (auto col = null_column(row))
    return make_corrupt_row("canary: column " + *col + " is NULL");
  canary_record c;
  c.public_key = column_bytes(row[0]);
  c.wrapped_key = column_bytes(row[1]);
  c.wrap_mechanism = row[2].as<std::string>();
  c.master_key_label = row[3].as<std::string>();
  c.created_at_ms = row[4].as<int64_t>();
  return c;
}

/// The text of `p` in the `phase` column.
std::string phase_name(rotation_phase p) {
  return p == rotation_phase::complete ? "complete" : "running";
}

/// Reads a row of `select_rotation_sql`.
caf::expected<rotation_record> read_rotation_row(const pqxx::row& row) {
  if (auto col = null_column(row))
    return make_corrupt_row("rotation: column " + *col + " is NULL");
  rotation_record r;
  r.from_label = row[0].as<std::string>();
  r.to_label = row[1].as<std::string>();
  auto phase = row[2].as<std::string>();
  if (phase == "running")
    r.phase = rotation_phase::running;
  else if (phase == "complete")
    r.phase = rotation_phase::complete;
  else
    return make_corrupt_row("rotation: unknown phase '" + phase + "'");
  r.started_at_ms = row[3].as<int64_t>();
  r.completed_at_ms = row[4].as<int64_t>();
  return r;
}

/// `query_failed` if `new_row` is not `old_row` re-wrapped: only the blob,
/// the mechanism, the master key id, the format and the MAC may change.
caf::error check_row_replacement(const key_record& old_row,
                                 const key_record& new_row,
                                 const std::string& what) {
  const char* field = nullptr;
  if (new_row.key_id != old_row.key_id)
    field = "key id";
  else if (new_row.scheme != old_row.scheme)
    field = "scheme";
  else if (new_row.public_key != old_row.public_key)
    field = "public key";
  else if (new_row.created_at_ms != old_row.created_at_ms)
    field = "creation time";
  if (field == nullptr)
    return {};
  return make_query_failed(what + ": the new row changes the " + field
                           + ", which a replacement must keep");
}

/// `query_failed` if `next` is not `old_canary` re-wrapped (public key and
/// creation time kept).
caf::error check_canary_replacement(const canary_record& old_canary,
                                    const canary_record& next) {
  const char* field = nullptr;
  if (next.public_key != old_canary.public_key)
    field = "public key";
  else if (next.created_at_ms != old_canary.created_at_ms)
    field = "creation time";
  if (field == nullptr)
    return {};
  return make_query_failed(std::string{"replace canary: the new canary "
                                       "changes the "}
                           + field + ", which a replacement must keep");
}

bool same_canary(const canary_record& x, const canary_record& y) {
  return x.public_key == y.public_key && x.wrapped_key == y.wrapped_key
         && x.wrap_mechanism == y.wrap_mechanism
         && x.master_key_label == y.master_key_label
         && x.created_at_ms == y.created_at_ms;
}

/// True if the server has sent something on the idle connection `c`, or
/// closed it. An idle backend sends nothing until it is terminated (the
/// FATAL message, then EOF): a restart, pg_terminate_backend, a failover.
/// Checking first spares a failed attempt, and libpqxx 6.4 leaks the
/// PGresult of a statement that meets a closed connection (it asks for the
/// client encoding before wrapping the result, which throws).
bool ended_by_server(const pqxx::connection& c) {
  auto fd = c.sock();
  if (fd < 0)
    return true;
  pollfd p{};
  p.fd = fd;
  p.events = POLLIN;
  return ::poll(&p, 1, 0) != 0;
}

bool same_key(const key_record& x, const key_record& y) {
  return x.key_id == y.key_id && x.scheme == y.scheme
         && x.public_key == y.public_key && x.key_blob == y.key_blob
         && x.wrap_mechanism == y.wrap_mechanism
         && x.created_at_ms == y.created_at_ms
         && x.format_version == y.format_version
         && x.master_key_id == y.master_key_id && x.row_mac == y.row_mac;
}

// -- migrations ---------------------------------------------------------------

} // namespace

// -- impl ---------------------------------------------------------------------

struct pg_store::impl {
  /// Where the store connects; see `conn_target`.
  conn_target target;
  /// Retry timing.
  pg_options opts;
  /// Sorted by version.
  std::vector<migration> migrations;
  /// The open connection, or null between a failure and the next attempt.
  std::unique_ptr<pqxx::connection> conn;
  /// Successful (re-)connections.
  uint64_t connects = 0;
  /// How key writes commit on the open connection (from its
  /// `synchronous_commit`, read once after connecting).
  key_write_commit commit_level;
  /// The level last logged, so that it is logged once (again only if a
  /// new connection lands on a server or role with another setting).
  std::optional<key_write_commit> logged_level;
  /// The replication warning of the server connected last, or "".
  std::string replication_warning;
  /// The server that warning was logged for.
  std::string warned_server;

  /// `msg` without the passwords (libpq's messages never carry them, but a
  /// host name or an option echoed back might).
  std::string scrub(std::string msg) const {
    for (const auto& pw : target.secrets) {
      if (pw.size() < 3)
        continue;
      for (auto pos = msg.find(pw); pos != std::string::npos;
           pos = msg.find(pw, pos))
        msg.replace(pos, pw.size(), "***");
    }
    return msg;
  }

  /// Drops the connection and answers with a retryable error; `connected`
  /// says whether the failure came after a connection was up.
  caf::error lost(std::string_view reason, bool connected) {
    conn.reset();
    // libpqxx 6.4 words some losses obscurely ("Could not obtain client
    // encoding"); say what happened first.
    return make_unavailable(
      (connected ? "connection lost: " : "cannot connect: ")
      + scrub(first_line(reason)));
  }

  /// Opens a connection unless one is open. Throws what libpqxx throws.
  caf::error ensure_connected() {
    // A connection that libpq knows is broken would be re-activated
    // silently by libpqxx on the next transaction, skipping the checks
    // below: replace it instead. So is one the server ended while idle.
    if (conn != nullptr && (!conn->is_open() || ended_by_server(*conn)))
      conn.reset();
    if (conn != nullptr)
      return {};
    auto c = std::make_unique<pqxx::connection>(target.conninfo);
    std::string server = target.where;
    if (auto host = c->hostname(), port = c->port();
        host != nullptr && port != nullptr)
      server = std::string{host} + ":" + port;
    {
      // A server in recovery, or a database set read-only, cannot take the
      // writes: drop it like a lost connection, so a multi-host URL can land
      // on the primary next time.
      pqxx::nontransaction q{*c};
      if (opts.read_only)
        q.exec0("SET default_transaction_read_only = on");
      auto ro = q.exec1("SHOW transaction_read_only")[0].as<std::string>();
      if (ro == "on" && !opts.read_only)
        return make_unavailable("server " + server
                                + " is read-only (SQLSTATE 25006, "
                                  "transaction_read_only = on)");
      // Statement, lock and idle-transaction deadlines, unless the server,
      // the role or the URL's `options` set one (0 is "none").
      for (auto [setting, value] : pg_session_deadlines) {
        auto now = q.exec1("SHOW " + std::string{setting})[0].as<std::string>();
        if (now == "0")
          q.exec0("SET " + std::string{setting} + " = '" + std::string{value}
                  + "'");
      }
      // The session's level, from the server, the role, the database or
      // the URL's `options`: read once, raised per key write if weaker.
      auto level = q.exec1("SHOW synchronous_commit")[0].as<std::string>();
      commit_level = key_write_commit_level(level);
      // On every connection, not only the first: after a failover the new
      // primary may have no synchronous standby yet, and the next failover
      // would then lose keys already reported.
      if (target.host_count > 1) {
        auto names
          = q.exec1("SHOW synchronous_standby_names")[0].as<std::string>();
        auto warning = failover_warning(target.host_count, names);
        if (!warning.empty()
            && (warning != replication_warning || server != warned_server))
          logger("store")->warn("PostgreSQL at {}: {}", server, warning);
        replication_warning = std::move(warning);
        warned_server = server;
      }
      // A read-only store writes nothing: how writes commit is not news.
      if (!opts.read_only && logged_level != commit_level) {
        logged_level = commit_level;
        if (commit_level.forced)
          logger("store")->info("PostgreSQL at {}: key writes commit with "
                                "synchronous_commit = on (the session's "
                                "'{}' is raised for each key write)",
                                server, level);
        else
          logger("store")->info("PostgreSQL at {}: key writes commit with "
                                "the session's synchronous_commit = {}",
                                server, commit_level.level);
      }
    }
    for (const auto& s : prepared_statements)
      c->prepare(s.name, s.sql);
    conn = std::move(c);
    ++connects;
    return {};
  }

  /// Starts a key write in `tx`: raises `synchronous_commit` to `on` for
  /// this transaction if the session's level is weaker, so that the
  /// commit returns only once the row is flushed on the primary and on the
  /// synchronous standbys, if any (invariant 1 across a failover).
  void begin_key_write(pqxx::transaction_base& tx) const {
    if (commit_level.forced)
      tx.exec0(force_sync_commit_sql);
  }

  /// One attempt of `body`: connects if needed, runs it, and maps libpqxx's
  /// exceptions. A retryable failure comes back as `unavailable` with the
  /// connection dropped; anything else as `query_failed`.
  template <class T, class F>
  caf::expected<T> attempt(const std::string& what, F& body) {
    bool connected = false;
    try {
      if (auto err = ensure_connected())
        return err;
      connected = true;
      auto res = body(*conn);
      // The body reports a retryable failure it caught itself (after its
      // transaction is gone) as `unavailable`: drop the connection too.
      if (!res && is_unavailable(res.error()))
        conn.reset();
      return res;
    } catch (const pqxx::broken_connection& e) {
      return lost(e.what(), connected);
    } catch (const pqxx::in_doubt_error& e) {
      return lost(e.what(), connected);
    } catch (const pqxx::sql_error& e) {
      if (is_retryable_state(e.sqlstate()) || conn == nullptr
          || !conn->is_open())
        return lost(e.what(), connected);
      return make_query_failed(what + ": " + scrub(first_line(e.what())));
    } catch (const std::exception& e) {
      if (conn == nullptr || !conn->is_open())
        return lost(e.what(), connected);
      return make_query_failed(what + ": " + scrub(first_line(e.what())));
    }
  }

  /// Runs `body` (a callable `caf::expected<T>(pqxx::connection&)`) until it
  /// succeeds, fails for a reason other than the connection, or the retry
  /// budget runs out. The whole call is retried, so `body` must be a
  /// complete transaction.
  template <class T, class F>
  caf::expected<T> run(const std::string& what, F body) {
    auto start = clock_type::now();
    auto deadline = start + opts.retry_budget;
    auto pause = std::max(opts.retry_min, milliseconds{1});
    auto max_pause = std::max(opts.retry_max, pause);
    int attempts = 0;
    for (;;) {
      ++attempts;
      auto res = attempt<T>(what, body);
      if (res || !is_unavailable(res.error())) {
        if (attempts > 1)
          logger("store")->info("{}: PostgreSQL at {} reachable again after "
                                "{} attempts",
                                what, target.where, attempts);
        return res;
      }
      auto reason = message_of(res.error());
      auto now = clock_type::now();
      if (now >= deadline) {
        auto elapsed = std::chrono::duration_cast<milliseconds>(now - start);
        return make_unavailable(
          what + ": PostgreSQL at " + target.where + " unavailable for "
          + std::to_string(elapsed.count()) + " ms (" + std::to_string(attempts)
          + " attempts); last error: " + reason);
      }
      if (attempts == 1)
        logger("store")->warn("{}: PostgreSQL at {}: {}; retrying for up to "
                              "{} ms",
                              what, target.where, reason,
                              opts.retry_budget.count());
      auto left = std::chrono::duration_cast<milliseconds>(deadline - now);
      std::this_thread::sleep_for(std::min(pause, left + milliseconds{1}));
      pause = std::min(pause * 2, max_pause);
    }
  }

  /// The schema version, which must be the newest of `migrations`: a
  /// read-only store migrates nothing.
  caf::expected<int> check_version(pqxx::connection& c) {
    auto newest = migrations.empty() ? 0 : migrations.back().version;
    pqxx::read_transaction tx{c};
    auto exists = tx.exec1("SELECT to_regclass('schema_migrations') IS NOT "
                           "NULL")[0]
                    .as<bool>();
    if (!exists)
      return make_query_failed("PostgreSQL at " + target.where
                               + ": not a key store (no schema_migrations "
                                 "table)");
    auto current = tx.exec1(select_version_sql)[0].as<int>();
    if (current > newest)
      return make_schema_too_new("PostgreSQL at " + target.where, current,
                                 newest);
    if (current < newest)
      return make_query_failed(
        "PostgreSQL at " + target.where + ": database schema version "
        + std::to_string(current) + " is older than this build's "
        + std::to_string(newest)
        + "; opened read-only, it is not migrated: migrate it first (any "
          "command that opens it read-write, e.g. 'hsm-driver master-key "
          "check', runs the migrations)");
    return current;
  }

  /// Applies pending migrations in one transaction under the advisory lock.
  caf::expected<int> migrate(pqxx::connection& c) {
    auto newest = migrations.empty() ? 0 : migrations.back().version;
    pqxx::work tx{c};
    tx.exec_params("SELECT pg_advisory_xact_lock($1)", migration_lock_key);
    tx.exec0(create_migrations_table);
    auto current = tx.exec1(select_version_sql)[0].as<int>();
    if (current > newest)
      return make_schema_too_new("PostgreSQL at " + target.where, current,
                                 newest);
    for (const auto& m : migrations) {
      if (m.version <= current)
        continue;
      auto what = "migration " + std::to_string(m.version) + " (" + m.name
                  + ")";
      // A failing statement aborts the whole transaction, so either every
      // pending migration lands or none. Caught here to name the migration;
      // connection failures still go to `attempt`, as `unavailable`.
      try {
        tx.exec(m.sql);
        tx.exec_params0(insert_migration_sql, m.version, std::string{m.name},
                        now_ms());
      } catch (const pqxx::sql_error& e) {
        if (is_retryable_state(e.sqlstate()) || !c.is_open())
          return make_unavailable(scrub(first_line(e.what())));
        return make_query_failed("open: " + what + ": "
                                 + scrub(first_line(e.what())));
      }
    }
    tx.commit();
    return newest > current ? newest : current;
  }
};

// -- construction -------------------------------------------------------------

caf::expected<std::unique_ptr<pg_store>>
pg_store::open(const std::string& url, pg_options opts,
               std::vector<migration> migrations) {
  if (auto err = sort_migrations(migrations))
    return err;
  std::unique_ptr<pg_store> store{new pg_store};
  store->impl_ = std::make_unique<impl>();
  auto& st = *store->impl_;
  auto target = make_target(url, opts.retry_budget);
  if (!target)
    return std::move(target.error());
  st.target = std::move(*target);
  st.opts = opts;
  st.migrations = std::move(migrations);
  auto version = st.run<int>("open", [&st](pqxx::connection& c) {
    return st.opts.read_only ? st.check_version(c) : st.migrate(c);
  });
  if (!version)
    return std::move(version.error());
  return store;
}

pg_store::~pg_store() = default;

// -- key_store ----------------------------------------------------------------

caf::expected<audited_puts>
pg_store::put_many_audited(const std::vector<key_record>& recs,
                           const put_audit& audit) {
  if (recs.empty())
    return audited_puts{};
  if (!audit.entries.empty() && audit.entries.size() != recs.size())
    return make_query_failed(
      put_label(recs) + ": " + std::to_string(audit.entries.size())
      + " audit entries for " + std::to_string(recs.size()) + " records");
  auto label = put_label(recs);
  auto first = first_of_key_id(recs);
  // Inserted in key id order: two drivers writing overlapping groups then
  // wait for each other's row locks in the same order and cannot deadlock.
  std::vector<size_t> order;
  for (size_t i = 0; i < recs.size(); ++i)
    if (first[i] == i)
      order.push_back(i);
  std::sort(order.begin(), order.end(), [&recs](size_t x, size_t y) {
    return recs[x].key_id < recs[y].key_id;
  });
  // Set once a COMMIT went out whose outcome is unknown (the connection
  // broke during it), with what it carried. If the retry then finds exactly
  // a record of this group, it was this call's commit that landed; if it
  // carried audit rows, finding them says so for the whole group.
  std::optional<audited_puts> in_doubt;
  return impl_->run<audited_puts>(
    label, [&](pqxx::connection& c) -> caf::expected<audited_puts> {
      pqxx::work tx{c};
      impl_->begin_key_write(tx);
      if (in_doubt && !in_doubt->rows.empty()
          && audit_row_stored(tx, in_doubt->rows.back()))
        return std::move(*in_doubt);
      std::vector<put_result> out(recs.size());
      for (auto i : order) {
        const auto& rec = recs[i];
        auto scheme_name = std::string{to_string(rec.scheme)};
        auto res = tx.exec_prepared(insert_key.name, rec.key_id, scheme_name,
                                    bytea(rec.public_key), bytea(rec.key_blob),
                                    rec.wrap_mechanism, rec.created_at_ms,
                                    rec.format_version, rec.master_key_id,
                                    bytea(rec.row_mac));
        if (res.affected_rows() != 0) {
          out[i] = put_result{rec, true};
          continue;
        }
        // The key id is taken by a committed row (ON CONFLICT waits for a
        // concurrent inserter to finish), which the next statement sees:
        // READ COMMITTED takes a new snapshot per statement.
        auto rows = tx.exec_prepared(select_key.name, rec.key_id);
        if (rows.empty())
          return make_query_failed("put key '" + rec.key_id
                                   + "': conflicting row not found");
        auto stored = read_key_row(rows[0], rec.key_id);
        if (!stored)
          return std::move(stored.error());
        auto inserted = in_doubt && same_key(*stored, rec);
        out[i] = put_result{std::move(*stored), inserted};
      }
      // A key id seen earlier in the group: its first record is the stored
      // one now (inside this transaction).
      for (size_t i = 0; i < recs.size(); ++i)
        if (first[i] != i)
          out[i] = put_result{out[first[i]].record, false};
      // The entries of the records this transaction inserts. (A lost
      // commit that carried none inserted no record that has one.)
      std::vector<const audit_entry*> entries;
      for (size_t i = 0; i < audit.entries.size(); ++i)
        if (out[i].inserted && audit.entries[i]) {
          entries.push_back(&*audit.entries[i]);
          out[i].audited = true;
        }
      audited_puts done{std::move(out), {}};
      if (!entries.empty()) {
        auto prev = lock_audit_head(tx, audit.driver_id, label);
        if (!prev)
          return std::move(prev.error());
        done.rows = insert_audit_rows(tx, audit.driver_id, *prev, entries);
      }
      in_doubt = done;
      tx.commit();
      in_doubt.reset();
      return done;
    });
}

caf::expected<std::optional<key_record>>
pg_store::get(std::string_view key_id) {
  auto what = "get key '" + std::string{key_id} + "'";
  auto id = std::string{key_id};
  return impl_->run<std::optional<key_record>>(
    what, [&](pqxx::connection& c) -> caf::expected<std::optional<key_record>> {
      pqxx::nontransaction q{c};
      auto rows = q.exec_prepared(select_key.name, id);
      if (rows.empty())
        return std::optional<key_record>{};
      auto rec = read_key_row(rows[0], key_id);
      if (!rec)
        return std::move(rec.error());
      return std::optional<key_record>{std::move(*rec)};
    });
}

caf::expected<std::optional<canary_record>> pg_store::get_canary() {
  return impl_->run<std::optional<canary_record>>(
    "get canary",
    [](pqxx::connection& c) -> caf::expected<std::optional<canary_record>> {
      pqxx::nontransaction q{c};
      auto rows = q.exec_prepared(select_canary.name);
      if (rows.empty())
        return std::optional<canary_record>{};
      auto stored = read_canary_row(rows[0]);
      if (!stored)
        return std::move(stored.error());
      return std::optional<canary_record>{std::move(*stored)};
    });
}

caf::expected<canary_record> pg_store::put_canary(const canary_record& c) {
  return impl_->run<canary_record>(
    "put canary",
    [this, &c](pqxx::connection& conn) -> caf::expected<canary_record> {
      pqxx::work tx{conn};
      impl_->begin_key_write(tx);
      auto res = tx.exec_prepared(insert_canary.name, bytea(c.public_key),
                                  bytea(c.wrapped_key), c.wrap_mechanism,
                                  c.master_key_label, c.created_at_ms);
      canary_record out;
      if (res.affected_rows() != 0) {
        out = c;
      } else {
        // First writer wins: answer with the stored canary.
        auto rows = tx.exec_prepared(select_canary.name);
        if (rows.empty())
          return make_query_failed("put canary: conflicting row not found");
        auto stored = read_canary_row(rows[0]);
        if (!stored)
          return std::move(stored.error());
        out = std::move(*stored);
      }
      tx.commit();
      return out;
    });
}

caf::expected<int> pg_store::schema_version() {
  return impl_->run<int>(
    "schema version", [](pqxx::connection& c) -> caf::expected<int> {
      pqxx::nontransaction q{c};
      return q.exec_prepared1(select_version.name)[0].as<int>();
    });
}

caf::expected<uint64_t> pg_store::unsealed_rows() {
  return impl_->run<uint64_t>(
    "count unsealed rows", [](pqxx::connection& c) -> caf::expected<uint64_t> {
      pqxx::nontransaction q{c};
      auto sql = "SELECT COUNT(*) FROM keys WHERE format_version < "
                 + std::to_string(current_row_format);
      return q.exec1(sql)[0].as<uint64_t>();
    });
}

// -- the audit trail ----------------------------------------------------------

caf::expected<std::vector<audit_row>>
pg_store::append_audit(std::string_view driver_id,
                       const std::vector<audit_entry>& entries) {
  if (entries.empty())
    return std::vector<audit_row>{};
  auto what = "append audit of '" + std::string{driver_id} + "'";
  auto driver = std::string{driver_id};
  std::vector<const audit_entry*> in_order;
  in_order.reserve(entries.size());
  for (const auto& e : entries)
    in_order.push_back(&e);
  // Set once a COMMIT went out whose outcome is unknown, with the rows it
  // carried. If the retry finds them stored, that commit landed: appending
  // again would record everything twice.
  std::optional<std::vector<audit_row>> in_doubt;
  return impl_->run<std::vector<audit_row>>(
    what, [&](pqxx::connection& c) -> caf::expected<std::vector<audit_row>> {
      pqxx::work tx{c};
      impl_->begin_key_write(tx);
      auto prev = lock_audit_head(tx, driver, what);
      if (!prev)
        return std::move(prev.error());
      if (in_doubt && audit_row_stored(tx, in_doubt->back()))
        return std::move(*in_doubt);
      auto rows = insert_audit_rows(tx, driver, *prev, in_order);
      in_doubt = rows;
      tx.commit();
      in_doubt.reset();
      return rows;
    });
}

caf::expected<std::vector<audit_row>>
pg_store::read_audit(std::string_view after_driver, uint64_t after_seq,
                     size_t limit) {
  auto after = std::string{after_driver};
  auto n = static_cast<int64_t>(std::min<size_t>(
    limit, static_cast<size_t>(std::numeric_limits<int64_t>::max())));
  return impl_->run<std::vector<audit_row>>(
    "read audit",
    [&](pqxx::connection& c) -> caf::expected<std::vector<audit_row>> {
      pqxx::nontransaction q{c};
      auto rows = q.exec_prepared(read_audit_rows.name, after,
                                  static_cast<int64_t>(after_seq), n);
      std::vector<audit_row> out;
      out.reserve(rows.size());
      for (const auto& r : rows) {
        if (auto col = null_column(r))
          return make_corrupt_row("read audit: column " + *col + " is NULL");
        audit_row row;
        row.driver_id = r[0].as<std::string>();
        row.seq = r[1].as<uint64_t>();
        row.entry.at_ms = r[2].as<int64_t>();
        row.entry.request_id = r[3].as<std::string>();
        auto kind = parse_audit_kind(r[4].as<std::string>());
        if (!kind)
          return make_corrupt_row("audit row " + row.driver_id + " seq "
                                  + std::to_string(row.seq) + ": unknown kind");
        row.entry.kind = *kind;
        row.entry.key_id = r[5].as<std::string>();
        row.entry.public_key_fingerprint = r[6].as<std::string>();
        row.entry.payload_sha256 = column_bytes(r[7]);
        row.entry.outcome = r[8].as<std::string>();
        row.prev_hash = column_bytes(r[9]);
        row.entry_hash = column_bytes(r[10]);
        out.push_back(std::move(row));
      }
      return out;
    });
}

// -- master-key rotation ------------------------------------------------------

caf::expected<std::vector<row_count>> pg_store::count_rows() {
  return impl_->run<std::vector<row_count>>(
    "count rows",
    [](pqxx::connection& c) -> caf::expected<std::vector<row_count>> {
      pqxx::nontransaction q{c};
      auto rows = q.exec_prepared(count_key_rows.name,
                                  std::string{resident_mechanism});
      std::vector<row_count> out;
      out.reserve(rows.size());
      for (const auto& row : rows) {
        if (auto col = null_column(row))
          return make_corrupt_row("count rows: column " + *col + " is NULL");
        row_count n;
        n.master_key_id = row[0].as<std::string>();
        n.format_version = row[1].as<int>();
        n.resident = row[2].as<bool>();
        n.rows = row[3].as<uint64_t>();
        out.push_back(std::move(n));
      }
      return out;
    });
}

caf::expected<std::vector<key_record>>
pg_store::pending_rows(std::string_view target_label,
                       std::string_view after_key_id, size_t limit) {
  if (limit == 0)
    return std::vector<key_record>{};
  auto what = "pending rows for '" + std::string{target_label} + "'";
  auto target = std::string{target_label};
  auto after = std::string{after_key_id};
  auto n = static_cast<int64_t>(std::min<size_t>(
    limit, static_cast<size_t>(std::numeric_limits<int64_t>::max())));
  return impl_->run<std::vector<key_record>>(
    what, [&](pqxx::connection& c) -> caf::expected<std::vector<key_record>> {
      pqxx::nontransaction q{c};
      auto rows = q.exec_prepared(select_pending.name, after,
                                  current_row_format, target, n);
      std::vector<key_record> out;
      out.reserve(rows.size());
      for (const auto& row : rows) {
        auto id = row[0].is_null() ? std::string{"<null>"}
                                   : row[0].as<std::string>();
        auto rec = read_key_row(row, id);
        if (!rec)
          return std::move(rec.error());
        out.push_back(std::move(*rec));
      }
      return out;
    });
}

caf::expected<bool> pg_store::replace_row(const key_record& old_row,
                                          const key_record& new_row) {
  auto what = "replace key '" + old_row.key_id + "'";
  if (auto err = check_row_replacement(old_row, new_row, what))
    return err;
  auto scheme_name = std::string{to_string(old_row.scheme)};
  // As in put_many: set once a COMMIT went out whose outcome is unknown. If
  // the retry then finds exactly `new_row` stored, that commit landed.
  bool in_doubt = false;
  return impl_->run<bool>(
    what, [&](pqxx::connection& c) -> caf::expected<bool> {
      pqxx::work tx{c};
      impl_->begin_key_write(tx);
      auto res = tx.exec_prepared(
        replace_key.name, bytea(new_row.key_blob), new_row.wrap_mechanism,
        new_row.master_key_id, new_row.format_version, bytea(new_row.row_mac),
        old_row.key_id, scheme_name, bytea(old_row.public_key),
        old_row.created_at_ms, bytea(old_row.key_blob), old_row.wrap_mechanism,
        old_row.master_key_id, old_row.format_version, bytea(old_row.row_mac));
      auto replaced = res.affected_rows() != 0;
      if (!replaced && in_doubt) {
        auto rows = tx.exec_prepared(select_key.name, old_row.key_id);
        if (!rows.empty()) {
          auto stored = read_key_row(rows[0], old_row.key_id);
          replaced = stored && same_key(*stored, new_row);
        }
      }
      in_doubt = true;
      tx.commit();
      in_doubt = false;
      return replaced;
    });
}

caf::expected<std::optional<rotation_record>> pg_store::get_rotation() {
  return impl_->run<std::optional<rotation_record>>(
    "get rotation",
    [](pqxx::connection& c) -> caf::expected<std::optional<rotation_record>> {
      pqxx::nontransaction q{c};
      auto rows = q.exec_prepared(select_rotation.name);
      if (rows.empty())
        return std::optional<rotation_record>{};
      auto r = read_rotation_row(rows[0]);
      if (!r)
        return std::move(r.error());
      return std::optional<rotation_record>{std::move(*r)};
    });
}

caf::expected<bool>
pg_store::set_rotation(const std::optional<rotation_record>& expected,
                       const rotation_record& next) {
  bool in_doubt = false;
  return impl_->run<bool>(
    "set rotation", [&](pqxx::connection& c) -> caf::expected<bool> {
      pqxx::work tx{c};
      impl_->begin_key_write(tx);
      auto phase = phase_name(next.phase);
      pqxx::result res;
      if (!expected)
        res = tx.exec_prepared(insert_rotation.name, next.from_label,
                               next.to_label, phase, next.started_at_ms,
                               next.completed_at_ms);
      else
        res = tx.exec_prepared(update_rotation.name, next.from_label,
                               next.to_label, phase, next.started_at_ms,
                               next.completed_at_ms, expected->from_label,
                               expected->to_label, phase_name(expected->phase),
                               expected->started_at_ms,
                               expected->completed_at_ms);
      auto written = res.affected_rows() != 0;
      if (!written && in_doubt) {
        auto rows = tx.exec_prepared(select_rotation.name);
        if (!rows.empty()) {
          auto stored = read_rotation_row(rows[0]);
          written = stored && *stored == next;
        }
      }
      in_doubt = true;
      tx.commit();
      in_doubt = false;
      return written;
    });
}

caf::expected<bool> pg_store::replace_canary(const canary_record& old_canary,
                                             const canary_record& next) {
  if (auto err = check_canary_replacement(old_canary, next))
    return err;
  bool in_doubt = false;
  return impl_->run<bool>(
    "replace canary", [&](pqxx::connection& c) -> caf::expected<bool> {
      pqxx::work tx{c};
      impl_->begin_key_write(tx);
      auto res = tx.exec_prepared(
        update_canary.name, bytea(next.wrapped_key), next.wrap_mechanism,
        next.master_key_label, bytea(old_canary.public_key),
        bytea(old_canary.wrapped_key), old_canary.wrap_mechanism,
        old_canary.master_key_label, old_canary.created_at_ms);
      auto replaced = res.affected_rows() != 0;
      if (!replaced && in_doubt) {
        auto rows = tx.exec_prepared(select_canary.name);
        if (!rows.empty()) {
          auto stored = read_canary_row(rows[0]);
          replaced = stored && same_canary(*stored, next);
        }
      }
      in_doubt = true;
      tx.commit();
      in_doubt = false;
      return replaced;
    });
}

// -- durability ---------------------------------------------------------------

key_write_commit key_write_commit_level(std::string_view session_level) {
  std::string level;
  for (auto ch : session_level)
    if (std::isspace(static_cast<unsigned char>(ch)) == 0)
      level += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  // `on` and its boolean spellings, and `remote_apply` (stronger: waits
  // until the standbys have applied the commit) are kept. Anything else
  // (`off`, `local`, `remote_write`, or a value this build does not know)
  // commits key writes with `on`.
  if (level == "on" || level == "true" || level == "yes" || level == "1")
    return {"on", false};
  if (level == "remote_apply")
    return {"remote_apply", false};
  return {"on", true};
}

std::string failover_warning(size_t host_count,
                             std::string_view synchronous_standby_names) {
  if (host_count < 2)
    return {};
  auto names = synchronous_standby_names;
  while (!names.empty()
         && std::isspace(static_cast<unsigned char>(names.front())) != 0)
    names.remove_prefix(1);
  while (!names.empty()
         && std::isspace(static_cast<unsigned char>(names.back())) != 0)
    names.remove_suffix(1);
  if (!names.empty())
    return {};
  return "the connection string names " + std::to_string(host_count)
         + " hosts, but the primary has no synchronous standby "
           "(synchronous_standby_names is empty): replication is "
           "asynchronous, so after a failover a key already reported may be "
           "missing on the new primary, and a redelivered generate_key would "
           "make a second key under its key id. Configure a synchronous "
           "standby on the primary (e.g. synchronous_standby_names = "
           "'ANY 1 (standby1, standby2)') with synchronous_commit = on, or "
           "remote_apply if reads go to standbys";
}

// -- properties ---------------------------------------------------------------

uint64_t pg_store::connects() const noexcept {
  return impl_->connects;
}

const std::string& pg_store::replication_warning() const noexcept {
  return impl_->replication_warning;
}

} // namespace hsm::store
