#include "store/sqlite_store.hpp"

#include "runtime/base/clock.hpp"
#include "store/audit.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <initializer_list>
#include <limits>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

namespace hsm::store {

namespace {

// -- constants ----------------------------------------------------------------

/// How long a statement waits for another connection's lock before it fails
/// with SQLITE_BUSY.
constexpr int busy_timeout_ms = 5000;

/// Mode of a new database file: it holds wrapped keys. SQLite gives the -wal
/// and -shm files the mode of the database file.
constexpr mode_t db_file_mode = S_IRUSR | S_IWUSR;

/// SQLITE_STATIC without its C-style cast: SQLite does not copy bound data.
/// Safe because every statement is reset and its bindings cleared (see
/// `stmt_scope`) before the bound data goes away.
constexpr sqlite3_destructor_type no_copy = nullptr;

constexpr const char* create_migrations_table
  = "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version INTEGER PRIMARY KEY, "
    "name TEXT NOT NULL, "
    "applied_at_ms INTEGER NOT NULL)";

constexpr const char* select_version_sql
  = "SELECT COALESCE(MAX(version), 0) FROM schema_migrations";

constexpr const char* insert_migration_sql
  = "INSERT INTO schema_migrations (version, name, applied_at_ms) "
    "VALUES (?1, ?2, ?3)";

constexpr const char* insert_key_sql
  = "INSERT INTO keys (key_id, scheme, public_key, key_blob, wrap_mechanism, "
    "created_at_ms, format_version, master_key_id, row_mac) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) "
    "ON CONFLICT (key_id) DO NOTHING";

constexpr const char* select_key_sql
  = "SELECT key_id, scheme, public_key, key_blob, wrap_mechanism, "
    "created_at_ms, format_version, master_key_id, row_mac FROM keys "
    "WHERE key_id = ?1";

constexpr const char* insert_canary_sql
  = "INSERT INTO master_key_canary (id, public_key, wrapped_key, "
    "wrap_mechanism, master_key_label, created_at_ms) "
    "VALUES (1, ?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING";

constexpr const char* select_canary_sql
  = "SELECT public_key, wrapped_key, wrap_mechanism, master_key_label, "
    "created_at_ms FROM master_key_canary WHERE id = 1";

constexpr const char* count_rows_sql
  = "SELECT master_key_id, format_version, wrap_mechanism = ?1, COUNT(*) "
    "FROM keys GROUP BY 1, 2, 3 ORDER BY 1, 2, 3";

/// Rows not yet done for a rotation to ?3 (format ?2 under ?3 is done),
/// after key id ?1, in key id order (BINARY collation: byte order).
constexpr const char* pending_rows_sql
  = "SELECT key_id, scheme, public_key, key_blob, wrap_mechanism, "
    "created_at_ms, format_version, master_key_id, row_mac FROM keys "
    "WHERE key_id > ?1 AND NOT (format_version = ?2 AND master_key_id = ?3) "
    "ORDER BY key_id LIMIT ?4";

/// Compare-and-swap of a key row: ?1-?5 the new wrapping, ?6-?14 the whole
/// old row.
constexpr const char* replace_key_sql
  = "UPDATE keys SET key_blob = ?1, wrap_mechanism = ?2, master_key_id = ?3, "
    "format_version = ?4, row_mac = ?5 "
    "WHERE key_id = ?6 AND scheme = ?7 AND public_key = ?8 "
    "AND created_at_ms = ?9 AND key_blob = ?10 AND wrap_mechanism = ?11 "
    "AND master_key_id = ?12 AND format_version = ?13 AND row_mac = ?14";

constexpr const char* audit_head_sql
  = "SELECT seq, entry_hash FROM audit_log WHERE driver_id = ?1 "
    "ORDER BY seq DESC LIMIT 1";

constexpr const char* insert_audit_sql
  = "INSERT INTO audit_log (driver_id, seq, at_ms, request_id, kind, key_id, "
    "public_key_fingerprint, payload_sha256, outcome, prev_hash, entry_hash) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

constexpr const char* read_audit_sql
  = "SELECT driver_id, seq, at_ms, request_id, kind, key_id, "
    "public_key_fingerprint, payload_sha256, outcome, prev_hash, entry_hash "
    "FROM audit_log WHERE (driver_id, seq) > (?1, ?2) "
    "ORDER BY driver_id, seq LIMIT ?3";

constexpr const char* select_rotation_sql
  = "SELECT from_label, to_label, phase, started_at_ms, completed_at_ms "
    "FROM master_key_rotation WHERE id = 1";

constexpr const char* insert_rotation_sql
  = "INSERT INTO master_key_rotation (id, from_label, to_label, phase, "
    "started_at_ms, completed_at_ms) VALUES (1, ?1, ?2, ?3, ?4, ?5) "
    "ON CONFLICT (id) DO NOTHING";

/// Compare-and-swap of the rotation: ?1-?5 the next, ?6-?10 the expected.
constexpr const char* update_rotation_sql
  = "UPDATE master_key_rotation SET from_label = ?1, to_label = ?2, "
    "phase = ?3, started_at_ms = ?4, completed_at_ms = ?5 "
    "WHERE id = 1 AND from_label = ?6 AND to_label = ?7 AND phase = ?8 "
    "AND started_at_ms = ?9 AND completed_at_ms = ?10";

/// Compare-and-swap of the canary: ?1-?3 the new wrapping, ?4-?8 the whole
/// old canary.
constexpr const char* replace_canary_sql
  = "UPDATE master_key_canary SET wrapped_key = ?1, wrap_mechanism = ?2, "
    "master_key_label = ?3 WHERE id = 1 AND public_key = ?4 "
    "AND wrapped_key = ?5 AND wrap_mechanism = ?6 AND master_key_label = ?7 "
    "AND created_at_ms = ?8";

// -- RAII wrappers ------------------------------------------------------------

/// Closes a connection. close_v2 defers the close until every statement is
/// finalized, so member order cannot leak a half-closed handle.
struct db_closer {
  void operator()(sqlite3* db) const noexcept {
    sqlite3_close_v2(db);
  }
};

/// An owned connection.
using db_ptr = std::unique_ptr<sqlite3, db_closer>;

/// Finalizes a prepared statement.
struct stmt_finalizer {
  void operator()(sqlite3_stmt* stmt) const noexcept {
    sqlite3_finalize(stmt);
  }
};

/// An owned prepared statement.
using stmt_ptr = std::unique_ptr<sqlite3_stmt, stmt_finalizer>;

/// Resets a (cached) statement and clears its bindings on scope exit, so it
/// holds no read snapshot open and no pointer into the caller's data.
class stmt_scope {
public:
  explicit stmt_scope(sqlite3_stmt* stmt) noexcept : stmt_(stmt) {
    // nop
  }

  stmt_scope(const stmt_scope&) = delete;
  stmt_scope& operator=(const stmt_scope&) = delete;

  ~stmt_scope() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

private:
  sqlite3_stmt* stmt_;
};

// -- locks --------------------------------------------------------------------

/// The busy handler of every connection: pauses as `lock_wait_pause` says,
/// then has SQLite try again; gives up when it says no more.
int wait_for_lock(void*, int tries) {
  auto pause = lock_wait_pause(tries);
  if (!pause)
    return 0;
  std::this_thread::sleep_for(*pause);
  return 1;
}

/// Installs `wait_for_lock` on `db`.
void wait_for_locks(sqlite3* db) {
  sqlite3_busy_handler(db, wait_for_lock, nullptr);
}

// -- errors -------------------------------------------------------------------

/// True for the result codes that mean another connection holds the lock.
bool is_busy(int rc) {
  auto primary = rc & 0xff;
  return primary == SQLITE_BUSY || primary == SQLITE_LOCKED;
}

/// Maps the failed call with result `rc` on `db`: busy or locked (after the
/// busy timeout) is `unavailable`, anything else `query_failed`. `what` names
/// the operation. SQLite's messages name columns and constraints, never bound
/// values, so no key material reaches the error.
caf::error sqlite_error(sqlite3* db, int rc, std::string_view what) {
  std::string msg{what};
  msg += ": ";
  msg += db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  if (is_busy(rc)) {
    msg += " (after waiting ";
    msg += std::to_string(busy_timeout_ms);
    msg += " ms)";
    return make_unavailable(std::move(msg));
  }
  return make_query_failed(std::move(msg));
}

// -- binding and reading ------------------------------------------------------

/// Binds parameters, remembering the first failure. Binds without copying.
class binder {
public:
  explicit binder(sqlite3_stmt* stmt) noexcept : stmt_(stmt) {
    // nop
  }

  binder& text(int index, std::string_view x) {
    if (rc_ != SQLITE_OK)
      return *this;
    if (x.size() > static_cast<size_t>(INT_MAX)) {
      rc_ = SQLITE_TOOBIG;
      return *this;
    }
    // A null pointer would bind NULL; an empty view binds ''.
    auto data = x.data() != nullptr ? x.data() : "";
    rc_ = sqlite3_bind_text(stmt_, index, data, static_cast<int>(x.size()),
                            no_copy);
    return *this;
  }

  binder& blob(int index, const std::vector<uint8_t>& x) {
    if (rc_ != SQLITE_OK)
      return *this;
    if (x.size() > static_cast<size_t>(INT_MAX)) {
      rc_ = SQLITE_TOOBIG;
      return *this;
    }
    // A null pointer would bind NULL; an empty vector binds a 0-byte blob.
    if (x.empty())
      rc_ = sqlite3_bind_zeroblob(stmt_, index, 0);
    else
      rc_ = sqlite3_bind_blob(stmt_, index, x.data(),
                              static_cast<int>(x.size()), no_copy);
    return *this;
  }

  binder& int64(int index, int64_t x) {
    if (rc_ == SQLITE_OK)
      rc_ = sqlite3_bind_int64(stmt_, index, x);
    return *this;
  }

  /// SQLITE_OK, or the result of the first failed bind.
  int rc() const noexcept {
    return rc_;
  }

private:
  sqlite3_stmt* stmt_;
  int rc_ = SQLITE_OK;
};

/// An error for a failed bind (sqlite3_errmsg may be stale after a bind).
caf::error bind_error(int rc, std::string_view what) {
  std::string msg{what};
  msg += ": bind: ";
  msg += sqlite3_errstr(rc);
  return make_query_failed(std::move(msg));
}

/// Binds `stmt`'s parameters with `bind(binder&)` and runs it once (a
/// statement that returns no row). True if it changed a row.
template <class Bind>
caf::expected<bool> run_write(sqlite3* db, sqlite3_stmt* stmt,
                              std::string_view what, Bind bind) {
  stmt_scope scope{stmt};
  binder args{stmt};
  bind(args);
  if (args.rc() != SQLITE_OK)
    return bind_error(args.rc(), what);
  auto rc = sqlite3_step(stmt);
  if (rc != SQLITE_DONE)
    return sqlite_error(db, rc, what);
  return sqlite3_changes(db) != 0;
}

/// Checks the storage classes of the current row's columns (STRICT tables
/// make a mismatch impossible short of a damaged file).
bool has_types(sqlite3_stmt* stmt, std::initializer_list<int> types) {
  int index = 0;
  for (auto type : types)
    if (sqlite3_column_type(stmt, index++) != type)
      return false;
  return true;
}

std::string column_text(sqlite3_stmt* stmt, int index) {
  auto data = sqlite3_column_text(stmt, index);
  auto size = sqlite3_column_bytes(stmt, index);
  if (data == nullptr || size <= 0)
    return {};
  return std::string(reinterpret_cast<const char*>(data),
                     static_cast<size_t>(size));
}

std::vector<uint8_t> column_blob(sqlite3_stmt* stmt, int index) {
  auto data = static_cast<const uint8_t*>(sqlite3_column_blob(stmt, index));
  auto size = sqlite3_column_bytes(stmt, index);
  if (data == nullptr || size <= 0)
    return {};
  return std::vector<uint8_t>(data, data + size);
}

/// Reads a row of `select_key_sql`.
caf::expected<key_record> read_key_row(sqlite3_stmt* stmt,
                                       std::string_view key_id) {
  if (!has_types(stmt, {SQLITE_TEXT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_BLOB,
                        SQLITE_TEXT, SQLITE_INTEGER, SQLITE_INTEGER,
                        SQLITE_TEXT, SQLITE_BLOB}))
    return make_corrupt_row("key '" + std::string{key_id}
                            + "': a column has the wrong type");
  auto scheme_name = column_text(stmt, 1);
  auto parsed = parse_scheme(scheme_name);
  if (!parsed)
    return make_corrupt_row("key '" + std::string{key_id}
                            + "': unknown scheme '" + scheme_name + "'");
  key_record rec;
  rec.key_id = column_text(stmt, 0);
  rec.scheme = *parsed;
  rec.public_key = column_blob(stmt, 2);
  rec.key_blob = column_blob(stmt, 3);
  rec.wrap_mechanism = column_text(stmt, 4);
  rec.created_at_ms = sqlite3_column_int64(stmt, 5);
  rec.format_version = sqlite3_column_int(stmt, 6);
  rec.master_key_id = column_text(stmt, 7);
  rec.row_mac = column_blob(stmt, 8);
  return rec;
}

/// Reads a row of `select_canary_sql`.
caf::expected<canary_record> read_canary_row(sqlite3_stmt* stmt) {
  if (!has_types(stmt, {SQLITE_BLOB, SQLITE_BLOB, SQLITE_TEXT, SQLITE_TEXT,
                        SQLITE_INTEGER}))
    return make_corrupt_row("canary: a column has the wrong type");
  canary_record c;
  c.public_key = column_blob(stmt, 0);
  c.wrapped_key = column_blob(stmt, 1);
  c.wrap_mechanism = column_text(stmt, 2);
  c.master_key_label = column_text(stmt, 3);
  c.created_at_ms = sqlite3_column_int64(stmt, 4);
  return c;
}

/// The text of `p` in the `phase` column.
std::string_view phase_name(rotation_phase p) {
  return p == rotation_phase::complete ? "complete" : "running";
}

/// Reads a row of `select_rotation_sql`.
caf::expected<rotation_record> read_rotation_row(sqlite3_stmt* stmt) {
  if (!has_types(stmt, {SQLITE_TEXT, SQLITE_TEXT, SQLITE_TEXT, SQLITE_INTEGER,
                        SQLITE_INTEGER}))
    return make_corrupt_row("rotation: a column has the wrong type");
  rotation_record r;
  r.from_label = column_text(stmt, 0);
  r.to_label = column_text(stmt, 1);
  auto phase = column_text(stmt, 2);
  if (phase == "running")
    r.phase = rotation_phase::running;
  else if (phase == "complete")
    r.phase = rotation_phase::complete;
  else
    return make_corrupt_row("rotation: unknown phase '" + phase + "'");
  r.started_at_ms = sqlite3_column_int64(stmt, 3);
  r.completed_at_ms = sqlite3_column_int64(stmt, 4);
  return r;
}

/// `query_failed` if `next` is not `old` re-wrapped: only the blob, the
/// mechanism, the master key id, the format and the MAC may change.
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

/// `query_failed` if `next` is not `old` re-wrapped (public key and creation
/// time kept).
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

// -- statements ---------------------------------------------------------------

/// Prepares `sql` on `db`; `persistent` for statements kept for the life of
/// the store. `what` names the operation for errors.
caf::expected<stmt_ptr> prepare(sqlite3* db, const char* sql, bool persistent,
                                std::string_view what) {
  sqlite3_stmt* raw = nullptr;
  auto flags = persistent ? static_cast<unsigned>(SQLITE_PREPARE_PERSISTENT)
                          : 0u;
  auto rc = sqlite3_prepare_v3(db, sql, -1, flags, &raw, nullptr);
  stmt_ptr stmt{raw};
  if (rc != SQLITE_OK)
    return sqlite_error(db, rc, std::string{what} + ": prepare");
  return stmt;
}

/// Runs statements without parameters or results.
caf::error exec(sqlite3* db, const char* sql, std::string_view what) {
  char* msg = nullptr;
  auto rc = sqlite3_exec(db, sql, nullptr, nullptr, &msg);
  if (rc == SQLITE_OK)
    return {};
  std::string text{what};
  text += ": ";
  text += msg != nullptr ? msg : sqlite3_errstr(rc);
  sqlite3_free(msg);
  if (is_busy(rc))
    return make_unavailable(std::move(text));
  return make_query_failed(std::move(text));
}

/// Runs a statement that answers with one integer.
caf::expected<int> query_int(sqlite3* db, const char* sql,
                             std::string_view what) {
  auto stmt = prepare(db, sql, false, what);
  if (!stmt)
    return std::move(stmt.error());
  auto rc = sqlite3_step(stmt->get());
  if (rc != SQLITE_ROW)
    return sqlite_error(db, rc, what);
  return sqlite3_column_int(stmt->get(), 0);
}

/// Rolls back on scope exit unless committed. Runs the transaction
/// statements through `sqlite3_exec` or cached statements, as given.
class write_transaction {
public:
  write_transaction(sqlite3* db, sqlite3_stmt* begin, sqlite3_stmt* commit,
                    sqlite3_stmt* rollback) noexcept
    : db_(db), begin_(begin), commit_(commit), rollback_(rollback) {
    // nop
  }

  write_transaction(const write_transaction&) = delete;
  write_transaction& operator=(const write_transaction&) = delete;

  ~write_transaction() {
    // Some errors (SQLITE_FULL, SQLITE_IOERR, ...) roll back on their own;
    // then autocommit is on again and there is nothing to undo.
    if (!active_ || sqlite3_get_autocommit(db_) != 0)
      return;
    if (rollback_ != nullptr) {
      sqlite3_step(rollback_);
      sqlite3_reset(rollback_);
    } else {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    }
  }

  /// `BEGIN IMMEDIATE`: takes the write lock now, waiting up to the busy
  /// timeout, so that reads inside the transaction see the latest commit.
  caf::error begin(std::string_view what) {
    auto err = run(begin_, "BEGIN IMMEDIATE", what);
    if (!err)
      active_ = true;
    return err;
  }

  /// `COMMIT`; durable on return (synchronous=FULL).
  caf::error commit(std::string_view what) {
    auto err = run(commit_, "COMMIT", what);
    if (!err)
      active_ = false;
    return err;
  }

private:
  caf::error run(sqlite3_stmt* stmt, const char* sql, std::string_view what) {
    std::string ctx{what};
    ctx += ": ";
    ctx += sql;
    if (stmt == nullptr)
      return exec(db_, sql, ctx);
    auto rc = sqlite3_step(stmt);
    auto err = rc == SQLITE_DONE ? caf::error{} : sqlite_error(db_, rc, ctx);
    sqlite3_reset(stmt);
    return err;
  }

  sqlite3* db_;
  sqlite3_stmt* begin_;
  sqlite3_stmt* commit_;
  sqlite3_stmt* rollback_;
  bool active_ = false;
};

// -- opening ------------------------------------------------------------------

std::string errno_text(int code) {
  return std::generic_category().message(code);
}

/// Creates the database file with mode 0600 if it does not exist yet, so that
/// SQLite never creates it with the umask's mode. An existing file keeps its
/// mode.
caf::error create_private_file(const std::filesystem::path& file) {
  namespace fs = std::filesystem;
  auto dir = file.parent_path();
  if (dir.empty())
    dir = ".";
  std::error_code ec;
  auto st = fs::status(dir, ec);
  if (st.type() == fs::file_type::not_found)
    return make_unavailable("cannot open database " + file.string()
                            + ": directory " + dir.string()
                            + " does not exist");
  if (ec)
    return make_unavailable("cannot open database " + file.string()
                            + ": directory " + dir.string() + ": "
                            + ec.message());
  if (st.type() != fs::file_type::directory)
    return make_unavailable("cannot open database " + file.string() + ": "
                            + dir.string() + " is not a directory");
  auto fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC,
                   db_file_mode);
  if (fd < 0) {
    if (errno == EEXIST)
      return {};
    return make_unavailable("cannot create database " + file.string() + ": "
                            + errno_text(errno));
  }
  // The umask may have taken bits away; set the mode exactly.
  auto rc = ::fchmod(fd, db_file_mode);
  auto chmod_errno = errno;
  ::close(fd);
  if (rc != 0)
    return make_unavailable("cannot chmod database " + file.string() + ": "
                            + errno_text(chmod_errno));
  return {};
}

/// The same error as `store_errc::unavailable`: at open, any failure means
/// the file cannot be used (not a database, locked, unreadable).
caf::error as_unavailable(const caf::error& err) {
  const auto& ctx = err.context();
  if (ctx.size() == 1 && ctx.match_element<std::string>(0))
    return make_unavailable(ctx.get_as<std::string>(0));
  return make_unavailable(describe(err));
}

/// Switches to WAL and returns the journal mode now in effect. SQLite does
/// not call the busy handler when the switch meets another connection's lock
/// (two processes creating the database at once get SQLITE_BUSY at once), so
/// this retries until the busy timeout has passed.
caf::expected<std::string> set_wal_mode(sqlite3* db, const std::string& what) {
  using clock = std::chrono::steady_clock;
  constexpr auto pause_ms = 10;
  auto deadline = clock::now() + std::chrono::milliseconds{busy_timeout_ms};
  for (;;) {
    sqlite3_stmt* raw = nullptr;
    auto rc = sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &raw,
                                 nullptr);
    stmt_ptr stmt{raw};
    if (rc == SQLITE_OK) {
      rc = sqlite3_step(stmt.get());
      if (rc == SQLITE_ROW)
        return column_text(stmt.get(), 0);
    }
    if (!is_busy(rc) || clock::now() >= deadline)
      return sqlite_error(db, rc, what);
    stmt.reset();
    sqlite3_sleep(pause_ms);
  }
}

/// Sets the busy handler, WAL mode, full sync and foreign keys.
caf::error configure(sqlite3* db, const std::string& where) {
  wait_for_locks(db);
  auto mode = set_wal_mode(db, where + ": PRAGMA journal_mode=WAL");
  if (!mode)
    return as_unavailable(mode.error());
  std::transform(mode->begin(), mode->end(), mode->begin(), [](char c) {
    return static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  });
  if (*mode != "wal")
    return make_unavailable(where + ": journal_mode is '" + *mode
                            + "', not 'wal'");
  if (auto err = exec(db, "PRAGMA synchronous=FULL",
                      where + ": PRAGMA synchronous=FULL"))
    return as_unavailable(err);
  if (auto err = exec(db, "PRAGMA foreign_keys=ON",
                      where + ": PRAGMA foreign_keys=ON"))
    return as_unavailable(err);
  return {};
}

/// Applies the migrations above the database's version, all in one
/// transaction; the version is read after taking the write lock, so two
/// processes opening at once apply each migration once.
caf::error migrate(sqlite3* db, const std::string& where,
                   std::vector<migration> ms) {
  if (auto err = sort_migrations(ms))
    return err;
  auto newest = ms.empty() ? 0 : ms.back().version;
  write_transaction tx{db, nullptr, nullptr, nullptr};
  if (auto err = tx.begin(where + ": migrate"))
    return err;
  if (auto err = exec(db, create_migrations_table, where + ": migrate"))
    return err;
  auto current = query_int(db, select_version_sql,
                           where + ": read schema version");
  if (!current)
    return std::move(current.error());
  if (*current > newest)
    return make_schema_too_new(where, *current, newest);
  if (*current == newest)
    return tx.commit(where + ": migrate");
  auto insert = prepare(db, insert_migration_sql, false, where + ": migrate");
  if (!insert)
    return std::move(insert.error());
  for (const auto& m : ms) {
    if (m.version <= *current)
      continue;
    auto what = where + ": migration " + std::to_string(m.version) + " ("
                + m.name + ")";
    if (auto err = exec(db, m.sql, what))
      return err;
    auto recorded = run_write(
      db, insert->get(), what + ": record version", [&m](binder& args) {
        args.int64(1, m.version).text(2, m.name).int64(3, now_ms());
      });
    if (!recorded)
      return std::move(recorded.error());
  }
  return tx.commit(where + ": migrate");
}

} // namespace

std::optional<std::chrono::microseconds> lock_wait_pause(int tries) {
  constexpr std::chrono::microseconds first{50};
  constexpr std::chrono::microseconds longest{2000};
  std::chrono::microseconds waited{0};
  auto pause = first;
  for (int i = 0; i < tries; ++i) {
    waited += pause;
    if (waited >= std::chrono::milliseconds{busy_timeout_ms})
      return std::nullopt;
    pause = std::min(pause * 2, longest);
  }
  return pause;
}

// -- connection ---------------------------------------------------------------

struct sqlite_store::connection {
  /// The database file.
  std::filesystem::path path;
  /// Declared first, so destroyed after the statements.
  db_ptr db;
  /// Cached statements, prepared once in `open`.
  stmt_ptr begin;
  stmt_ptr commit;
  stmt_ptr rollback;
  stmt_ptr insert_key;
  stmt_ptr select_key;
  stmt_ptr insert_canary;
  stmt_ptr select_canary;
  stmt_ptr select_version;
  stmt_ptr count_rows;
  stmt_ptr pending_rows;
  stmt_ptr replace_key;
  stmt_ptr select_rotation;
  stmt_ptr insert_rotation;
  stmt_ptr update_rotation;
  stmt_ptr replace_canary;
  stmt_ptr audit_head;
  stmt_ptr insert_audit;
  stmt_ptr read_audit;

  /// A transaction on the cached statements.
  write_transaction transaction() {
    return write_transaction{db.get(), begin.get(), commit.get(),
                             rollback.get()};
  }
};

// -- construction -------------------------------------------------------------

caf::expected<std::unique_ptr<sqlite_store>>
sqlite_store::open(const std::filesystem::path& path,
                   std::vector<migration> migrations) {
  return open_as(path, std::move(migrations), false);
}

caf::expected<std::unique_ptr<sqlite_store>>
sqlite_store::open_read_only(const std::filesystem::path& path,
                             std::vector<migration> migrations) {
  return open_as(path, std::move(migrations), true);
}

namespace {

/// Opens `path` for reading only and checks that its schema is the newest
/// of `ms`; see `sqlite_store::open_read_only`.
caf::expected<db_ptr> open_for_reading(const std::filesystem::path& path,
                                       const std::string& where,
                                       std::vector<migration> ms) {
  if (auto err = sort_migrations(ms))
    return err;
  auto newest = ms.empty() ? 0 : ms.back().version;
  sqlite3* raw = nullptr;
  // No SQLITE_OPEN_CREATE: a missing file is an error, not a new database.
  auto rc = sqlite3_open_v2(path.c_str(), &raw,
                            SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX,
                            nullptr);
  db_ptr db{raw};
  if (rc != SQLITE_OK)
    return make_unavailable(
      "cannot open " + where + " read-only: "
      + (raw != nullptr ? sqlite3_errmsg(raw) : sqlite3_errstr(rc)));
  wait_for_locks(db.get());
  if (auto err = exec(db.get(), "PRAGMA query_only=1",
                      where + ": PRAGMA query_only=1"))
    return as_unavailable(err);
  auto current = query_int(db.get(), select_version_sql,
                           where + ": read schema version");
  if (!current)
    return make_unavailable(where + " is not a key store (no schema version: "
                            + describe(current.error()) + ")");
  if (*current > newest)
    return make_schema_too_new(where, *current, newest);
  if (*current < newest)
    return make_query_failed(
      where + ": database schema version " + std::to_string(*current)
      + " is older than this build's " + std::to_string(newest)
      + "; opened read-only, it is not migrated: migrate a copy first (any "
        "command that opens it read-write, e.g. 'hsm-driver master-key "
        "check', runs the migrations)");
  return db;
}

/// Opens (or creates) `path` for reading and writing and migrates it; see
/// `sqlite_store::open`.
caf::expected<db_ptr> open_for_writing(const std::filesystem::path& path,
                                       const std::string& where,
                                       std::vector<migration> ms) {
  if (auto err = create_private_file(path))
    return err;
  sqlite3* raw = nullptr;
  auto rc = sqlite3_open_v2(path.c_str(), &raw,
                            SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE
                              | SQLITE_OPEN_NOMUTEX,
                            nullptr);
  db_ptr db{raw};
  if (rc != SQLITE_OK) {
    auto msg = "cannot open " + where + ": "
               + (raw != nullptr ? sqlite3_errmsg(raw) : sqlite3_errstr(rc));
    return make_unavailable(std::move(msg));
  }
  if (auto err = configure(db.get(), where))
    return err;
  if (auto err = migrate(db.get(), where, std::move(ms)))
    return err;
  return db;
}

} // namespace

caf::expected<std::unique_ptr<sqlite_store>>
sqlite_store::open_as(const std::filesystem::path& path,
                      std::vector<migration> migrations, bool read_only) {
  auto where = "database " + path.string();
  auto opened = read_only
                  ? open_for_reading(path, where, std::move(migrations))
                  : open_for_writing(path, where, std::move(migrations));
  if (!opened)
    return std::move(opened.error());
  auto db = std::move(*opened);
  auto conn = std::make_unique<connection>();
  conn->path = path;
  struct cached {
    stmt_ptr connection::*member;
    const char* sql;
  };
  static constexpr cached statements[] = {
    {&connection::begin, "BEGIN IMMEDIATE"},
    {&connection::commit, "COMMIT"},
    {&connection::rollback, "ROLLBACK"},
    {&connection::insert_key, insert_key_sql},
    {&connection::select_key, select_key_sql},
    {&connection::insert_canary, insert_canary_sql},
    {&connection::select_canary, select_canary_sql},
    {&connection::select_version, select_version_sql},
    {&connection::count_rows, count_rows_sql},
    {&connection::pending_rows, pending_rows_sql},
    {&connection::replace_key, replace_key_sql},
    {&connection::select_rotation, select_rotation_sql},
    {&connection::insert_rotation, insert_rotation_sql},
    {&connection::update_rotation, update_rotation_sql},
    {&connection::replace_canary, replace_canary_sql},
    {&connection::audit_head, audit_head_sql},
    {&connection::insert_audit, insert_audit_sql},
    {&connection::read_audit, read_audit_sql},
  };
  for (const auto& s : statements) {
    auto stmt = prepare(db.get(), s.sql, true, where + ": " + s.sql);
    if (!stmt)
      return std::move(stmt.error());
    (*conn).*(s.member) = std::move(*stmt);
  }
  conn->db = std::move(db);
  return std::unique_ptr<sqlite_store>{new sqlite_store{std::move(conn)}};
}

sqlite_store::sqlite_store(std::unique_ptr<connection> conn)
  : conn_(std::move(conn)) {
  // nop
}

sqlite_store::~sqlite_store() = default;

// -- key_store ----------------------------------------------------------------

caf::expected<audited_puts>
sqlite_store::put_many_audited(const std::vector<key_record>& recs,
                               const put_audit& audit) {
  audited_puts out;
  auto& results = out.results;
  if (recs.empty())
    return out;
  if (!audit.entries.empty() && audit.entries.size() != recs.size())
    return make_query_failed(
      put_label(recs) + ": " + std::to_string(audit.entries.size())
      + " audit entries for " + std::to_string(recs.size()) + " records");
  auto label = put_label(recs);
  auto db = conn_->db.get();
  auto tx = conn_->transaction();
  if (auto err = tx.begin(label))
    return err;
  auto first = first_of_key_id(recs);
  results.reserve(recs.size());
  for (size_t i = 0; i < recs.size(); ++i) {
    const auto& rec = recs[i];
    if (first[i] != i) {
      // The key id came earlier in this group: that record is the stored
      // one now (inside this transaction).
      results.push_back(put_result{results[first[i]].record, false});
      continue;
    }
    auto what = "put key '" + rec.key_id + "'";
    auto written = run_write(db, conn_->insert_key.get(), what,
                             [&rec](binder& args) {
                               args.text(1, rec.key_id)
                                 .text(2, to_string(rec.scheme))
                                 .blob(3, rec.public_key)
                                 .blob(4, rec.key_blob)
                                 .text(5, rec.wrap_mechanism)
                                 .int64(6, rec.created_at_ms)
                                 .int64(7, rec.format_version)
                                 .text(8, rec.master_key_id)
                                 .blob(9, rec.row_mac);
                             });
    if (!written)
      return std::move(written.error());
    if (*written) {
      results.push_back(put_result{rec, true});
      continue;
    }
    // The key id is taken: answer with the stored record, read under the
    // same lock.
    auto stored = get(rec.key_id);
    if (!stored)
      return std::move(stored.error());
    if (!*stored)
      return make_query_failed(what + ": conflicting row not found");
    results.push_back(put_result{std::move(**stored), false});
  }
  // The entries of the records inserted, in the same transaction.
  std::vector<const audit_entry*> entries;
  for (size_t i = 0; i < audit.entries.size(); ++i)
    if (results[i].inserted && audit.entries[i]) {
      entries.push_back(&*audit.entries[i]);
      results[i].audited = true;
    }
  if (!entries.empty()) {
    auto rows = append_in_transaction(audit.driver_id, entries, label);
    if (!rows)
      return std::move(rows.error());
    out.rows = std::move(*rows);
  }
  if (auto err = tx.commit(label))
    return err;
  return out;
}

caf::expected<std::optional<key_record>>
sqlite_store::get(std::string_view key_id) {
  auto what = "get key '" + std::string{key_id} + "'";
  auto stmt = conn_->select_key.get();
  stmt_scope scope{stmt};
  binder args{stmt};
  args.text(1, key_id);
  if (args.rc() != SQLITE_OK)
    return bind_error(args.rc(), what);
  auto rc = sqlite3_step(stmt);
  if (rc == SQLITE_DONE)
    return std::optional<key_record>{};
  if (rc != SQLITE_ROW)
    return sqlite_error(conn_->db.get(), rc, what);
  auto rec = read_key_row(stmt, key_id);
  if (!rec)
    return std::move(rec.error());
  return std::optional<key_record>{std::move(*rec)};
}

caf::expected<std::optional<canary_record>> sqlite_store::get_canary() {
  auto stmt = conn_->select_canary.get();
  stmt_scope scope{stmt};
  auto rc = sqlite3_step(stmt);
  if (rc == SQLITE_DONE)
    return std::optional<canary_record>{};
  if (rc != SQLITE_ROW)
    return sqlite_error(conn_->db.get(), rc, "get canary");
  auto c = read_canary_row(stmt);
  if (!c)
    return std::move(c.error());
  return std::optional<canary_record>{std::move(*c)};
}

caf::expected<canary_record> sqlite_store::put_canary(const canary_record& c) {
  constexpr std::string_view what = "put canary";
  auto db = conn_->db.get();
  auto tx = conn_->transaction();
  if (auto err = tx.begin(what))
    return err;
  auto written = run_write(db, conn_->insert_canary.get(), what,
                           [&c](binder& args) {
                             args.blob(1, c.public_key)
                               .blob(2, c.wrapped_key)
                               .text(3, c.wrap_mechanism)
                               .text(4, c.master_key_label)
                               .int64(5, c.created_at_ms);
                           });
  if (!written)
    return std::move(written.error());
  bool inserted = *written;
  canary_record result;
  if (inserted) {
    result = c;
  } else {
    // First writer wins: answer with the stored canary.
    auto stored = get_canary();
    if (!stored)
      return std::move(stored.error());
    if (!*stored)
      return make_query_failed("put canary: conflicting row not found");
    result = std::move(**stored);
  }
  if (auto err = tx.commit(what))
    return err;
  return result;
}

caf::expected<int> sqlite_store::schema_version() {
  auto stmt = conn_->select_version.get();
  stmt_scope scope{stmt};
  auto rc = sqlite3_step(stmt);
  if (rc != SQLITE_ROW)
    return sqlite_error(conn_->db.get(), rc, "schema version");
  return sqlite3_column_int(stmt, 0);
}

caf::expected<uint64_t> sqlite_store::unsealed_rows() {
  auto sql = "SELECT COUNT(*) FROM keys WHERE format_version < "
             + std::to_string(current_row_format);
  sqlite3_stmt* raw = nullptr;
  auto rc = sqlite3_prepare_v2(conn_->db.get(), sql.c_str(), -1, &raw, nullptr);
  if (rc != SQLITE_OK)
    return sqlite_error(conn_->db.get(), rc, "count unsealed rows");
  rc = sqlite3_step(raw);
  auto n = rc == SQLITE_ROW ? sqlite3_column_int64(raw, 0) : 0;
  sqlite3_finalize(raw);
  if (rc != SQLITE_ROW)
    return sqlite_error(conn_->db.get(), rc, "count unsealed rows");
  return static_cast<uint64_t>(n);
}

// -- master-key rotation ------------------------------------------------------

caf::expected<std::vector<row_count>> sqlite_store::count_rows() {
  constexpr std::string_view what = "count rows";
  auto stmt = conn_->count_rows.get();
  stmt_scope scope{stmt};
  binder args{stmt};
  args.text(1, resident_mechanism);
  if (args.rc() != SQLITE_OK)
    return bind_error(args.rc(), what);
  std::vector<row_count> out;
  for (;;) {
    auto rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE)
      return out;
    if (rc != SQLITE_ROW)
      return sqlite_error(conn_->db.get(), rc, what);
    if (!has_types(stmt, {SQLITE_TEXT, SQLITE_INTEGER, SQLITE_INTEGER,
                          SQLITE_INTEGER}))
      return make_corrupt_row("count rows: a column has the wrong type");
    row_count c;
    c.master_key_id = column_text(stmt, 0);
    c.format_version = sqlite3_column_int(stmt, 1);
    c.resident = sqlite3_column_int(stmt, 2) != 0;
    c.rows = static_cast<uint64_t>(sqlite3_column_int64(stmt, 3));
    out.push_back(std::move(c));
  }
}

caf::expected<std::vector<key_record>>
sqlite_store::pending_rows(std::string_view target_label,
                           std::string_view after_key_id, size_t limit) {
  std::vector<key_record> out;
  if (limit == 0)
    return out;
  auto what = "pending rows for '" + std::string{target_label} + "'";
  auto stmt = conn_->pending_rows.get();
  stmt_scope scope{stmt};
  binder args{stmt};
  args.text(1, after_key_id)
    .int64(2, current_row_format)
    .text(3, target_label)
    .int64(4,
           static_cast<int64_t>(std::min<size_t>(
             limit, static_cast<size_t>(std::numeric_limits<int64_t>::max()))));
  if (args.rc() != SQLITE_OK)
    return bind_error(args.rc(), what);
  for (;;) {
    auto rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE)
      return out;
    if (rc != SQLITE_ROW)
      return sqlite_error(conn_->db.get(), rc, what);
    auto rec = read_key_row(stmt, column_text(stmt, 0));
    if (!rec)
      return std::move(rec.error());
    out.push_back(std::move(*rec));
  }
}

caf::expected<bool> sqlite_store::replace_row(const key_record& old_row,
                                              const key_record& new_row) {
  auto what = "replace key '" + old_row.key_id + "'";
  if (auto err = check_row_replacement(old_row, new_row, what))
    return err;
  auto tx = conn_->transaction();
  if (auto err = tx.begin(what))
    return err;
  auto scheme_name = to_string(old_row.scheme);
  auto replaced = run_write(conn_->db.get(), conn_->replace_key.get(), what,
                            [&](binder& args) {
                              args.blob(1, new_row.key_blob)
                                .text(2, new_row.wrap_mechanism)
                                .text(3, new_row.master_key_id)
                                .int64(4, new_row.format_version)
                                .blob(5, new_row.row_mac)
                                .text(6, old_row.key_id)
                                .text(7, scheme_name)
                                .blob(8, old_row.public_key)
                                .int64(9, old_row.created_at_ms)
                                .blob(10, old_row.key_blob)
                                .text(11, old_row.wrap_mechanism)
                                .text(12, old_row.master_key_id)
                                .int64(13, old_row.format_version)
                                .blob(14, old_row.row_mac);
                            });
  if (!replaced)
    return std::move(replaced.error());
  if (auto err = tx.commit(what))
    return err;
  return *replaced;
}

caf::expected<std::optional<rotation_record>> sqlite_store::get_rotation() {
  auto stmt = conn_->select_rotation.get();
  stmt_scope scope{stmt};
  auto rc = sqlite3_step(stmt);
  if (rc == SQLITE_DONE)
    return std::optional<rotation_record>{};
  if (rc != SQLITE_ROW)
    return sqlite_error(conn_->db.get(), rc, "get rotation");
  auto r = read_rotation_row(stmt);
  if (!r)
    return std::move(r.error());
  return std::optional<rotation_record>{std::move(*r)};
}

caf::expected<bool>
sqlite_store::set_rotation(const std::optional<rotation_record>& expected,
                           const rotation_record& next) {
  constexpr std::string_view what = "set rotation";
  auto tx = conn_->transaction();
  if (auto err = tx.begin(what))
    return err;
  auto bind_next = [&next](binder& args) -> binder& {
    return args.text(1, next.from_label)
      .text(2, next.to_label)
      .text(3, phase_name(next.phase))
      .int64(4, next.started_at_ms)
      .int64(5, next.completed_at_ms);
  };
  caf::expected<bool> written{false};
  if (!expected) {
    written = run_write(conn_->db.get(), conn_->insert_rotation.get(), what,
                        bind_next);
  } else {
    const auto& old = *expected;
    written = run_write(conn_->db.get(), conn_->update_rotation.get(), what,
                        [&](binder& args) {
                          bind_next(args)
                            .text(6, old.from_label)
                            .text(7, old.to_label)
                            .text(8, phase_name(old.phase))
                            .int64(9, old.started_at_ms)
                            .int64(10, old.completed_at_ms);
                        });
  }
  if (!written)
    return std::move(written.error());
  if (auto err = tx.commit(what))
    return err;
  return *written;
}

caf::expected<bool>
sqlite_store::replace_canary(const canary_record& old_canary,
                             const canary_record& next) {
  constexpr std::string_view what = "replace canary";
  if (auto err = check_canary_replacement(old_canary, next))
    return err;
  auto tx = conn_->transaction();
  if (auto err = tx.begin(what))
    return err;
  auto replaced = run_write(conn_->db.get(), conn_->replace_canary.get(), what,
                            [&](binder& args) {
                              args.blob(1, next.wrapped_key)
                                .text(2, next.wrap_mechanism)
                                .text(3, next.master_key_label)
                                .blob(4, old_canary.public_key)
                                .blob(5, old_canary.wrapped_key)
                                .text(6, old_canary.wrap_mechanism)
                                .text(7, old_canary.master_key_label)
                                .int64(8, old_canary.created_at_ms);
                            });
  if (!replaced)
    return std::move(replaced.error());
  if (auto err = tx.commit(what))
    return err;
  return *replaced;
}

// -- the audit trail ----------------------------------------------------------

caf::expected<std::vector<audit_row>>
sqlite_store::append_audit(std::string_view driver_id,
                           const std::vector<audit_entry>& entries) {
  if (entries.empty())
    return std::vector<audit_row>{};
  auto what = "append audit of '" + std::string{driver_id} + "'";
  auto tx = conn_->transaction();
  if (auto err = tx.begin(what))
    return err;
  std::vector<const audit_entry*> in_order;
  in_order.reserve(entries.size());
  for (const auto& e : entries)
    in_order.push_back(&e);
  auto rows = append_in_transaction(driver_id, in_order, what);
  if (!rows)
    return rows;
  if (auto err = tx.commit(what))
    return err;
  return rows;
}

caf::expected<std::vector<audit_row>> sqlite_store::append_in_transaction(
  std::string_view driver_id, const std::vector<const audit_entry*>& entries,
  const std::string& what) {
  auto db = conn_->db.get();
  // The chain's head, read under the write lock: every writer of the chain
  // (this driver's key and audit connections, another process under the
  // same driver id) takes its turn.
  std::optional<audit_row> prev;
  {
    auto stmt = conn_->audit_head.get();
    stmt_scope scope{stmt};
    binder args{stmt};
    args.text(1, driver_id);
    if (args.rc() != SQLITE_OK)
      return bind_error(args.rc(), what);
    auto rc = sqlite3_step(stmt);
    if (rc == SQLITE_ROW) {
      audit_row head;
      head.seq = static_cast<uint64_t>(sqlite3_column_int64(stmt, 0));
      head.entry_hash = column_blob(stmt, 1);
      prev = std::move(head);
    } else if (rc != SQLITE_DONE) {
      return sqlite_error(db, rc, what);
    }
  }
  std::vector<audit_row> rows;
  rows.reserve(entries.size());
  for (const auto* e : entries) {
    auto row = chain_next(driver_id, prev, *e);
    auto written = run_write(db, conn_->insert_audit.get(), what,
                             [&row](binder& args) {
                               args.text(1, row.driver_id)
                                 .int64(2, static_cast<int64_t>(row.seq))
                                 .int64(3, row.entry.at_ms)
                                 .text(4, row.entry.request_id)
                                 .text(5, audit_kind_name(row.entry.kind))
                                 .text(6, row.entry.key_id)
                                 .text(7, row.entry.public_key_fingerprint)
                                 .blob(8, row.entry.payload_sha256)
                                 .text(9, row.entry.outcome)
                                 .blob(10, row.prev_hash)
                                 .blob(11, row.entry_hash);
                             });
    if (!written)
      return std::move(written.error());
    prev = row;
    rows.push_back(std::move(row));
  }
  return rows;
}

caf::expected<std::vector<audit_row>>
sqlite_store::read_audit(std::string_view after_driver, uint64_t after_seq,
                         size_t limit) {
  constexpr std::string_view what = "read audit";
  std::vector<audit_row> rows;
  auto stmt = conn_->read_audit.get();
  stmt_scope scope{stmt};
  binder args{stmt};
  args.text(1, after_driver)
    .int64(2, static_cast<int64_t>(after_seq))
    .int64(3, static_cast<int64_t>(limit));
  if (args.rc() != SQLITE_OK)
    return bind_error(args.rc(), what);
  for (;;) {
    auto rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE)
      return rows;
    if (rc != SQLITE_ROW)
      return sqlite_error(conn_->db.get(), rc, what);
    audit_row row;
    row.driver_id = column_text(stmt, 0);
    row.seq = static_cast<uint64_t>(sqlite3_column_int64(stmt, 1));
    row.entry.at_ms = sqlite3_column_int64(stmt, 2);
    row.entry.request_id = column_text(stmt, 3);
    auto kind = parse_audit_kind(column_text(stmt, 4));
    if (!kind)
      return make_corrupt_row("audit row " + row.driver_id + " seq "
                              + std::to_string(row.seq) + ": unknown kind");
    row.entry.kind = *kind;
    row.entry.key_id = column_text(stmt, 5);
    row.entry.public_key_fingerprint = column_text(stmt, 6);
    row.entry.payload_sha256 = column_blob(stmt, 7);
    row.entry.outcome = column_text(stmt, 8);
    row.prev_hash = column_blob(stmt, 9);
    row.entry_hash = column_blob(stmt, 10);
    rows.push_back(std::move(row));
  }
}

// -- properties ---------------------------------------------------------------

const std::filesystem::path& sqlite_store::path() const noexcept {
  return conn_->path;
}

} // namespace hsm::store
