// The SQLite key store: the key-store contract
// (tests/support/key_store_contract.hpp), plus what only a database file
// brings: WAL mode, file permissions, file-level errors.

#include "store/sqlite_store.hpp"

#include "messages/errors.hpp"
#include "messages/scheme.hpp"
#include "tests/support/key_store_contract.hpp"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <latch>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;

using hsm::store::key_store;
using hsm::store::migration;
using hsm::store::sqlite_store;
using hsm::test::is_store_error;
using hsm::test::sample_key;

// -- helpers ------------------------------------------------------------------

/// A second, raw connection, for looking behind the store's back.
class raw_db {
public:
  explicit raw_db(const fs::path& path) {
    auto rc = sqlite3_open_v2(path.c_str(), &db_,
                              SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                              nullptr);
    EXPECT_EQ(rc, SQLITE_OK) << sqlite3_errstr(rc);
    sqlite3_busy_timeout(db_, 5000);
  }

  raw_db(const raw_db&) = delete;
  raw_db& operator=(const raw_db&) = delete;

  ~raw_db() {
    sqlite3_close_v2(db_);
  }

  /// Runs statements; returns "" or SQLite's message.
  std::string exec(const std::string& sql) {
    char* msg = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &msg) == SQLITE_OK)
      return {};
    std::string out = msg != nullptr ? msg : "unknown error";
    sqlite3_free(msg);
    return out;
  }

  /// The first column of the first row as text, or "<none>".
  std::string scalar(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK)
      return std::string{"<error: "} + sqlite3_errmsg(db_) + ">";
    std::string out = "<none>";
    if (sqlite3_step(stmt) == SQLITE_ROW) {
      auto text = sqlite3_column_text(stmt, 0);
      out = text != nullptr ? reinterpret_cast<const char*>(text) : "<null>";
    }
    sqlite3_finalize(stmt);
    return out;
  }

private:
  sqlite3* db_ = nullptr;
};

/// The permission bits of `file`, or -1.
int file_mode(const fs::path& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0)
    return -1;
  return static_cast<int>(st.st_mode & 0777);
}

// -- the contract -------------------------------------------------------------

/// The SQLite back end of the key-store contract: a database file in a
/// directory of its own.
struct sqlite_traits {
  /// The database file.
  using location = fs::path;

  /// `keys.db` in a new temporary directory, or empty after a failure.
  static location fresh_location() {
    auto pattern
      = (fs::path{::testing::TempDir()} / "sqlite_store_test.XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) {
      ADD_FAILURE() << "mkdtemp failed: " << pattern;
      return {};
    }
    return fs::path{pattern} / "keys.db";
  }

  /// Removes the directory of `db`.
  static void remove_location(const location& db) {
    std::error_code ec;
    fs::remove_all(db.parent_path(), ec);
  }

  static std::vector<migration> migrations() {
    return hsm::store::sqlite_migrations();
  }

  static caf::expected<std::unique_ptr<key_store>>
  open(const location& db, std::vector<migration> ms) {
    auto store = sqlite_store::open(db, std::move(ms));
    if (!store)
      return std::move(store.error());
    return std::unique_ptr<key_store>{std::move(*store)};
  }

  static std::string exec(const location& db, const std::string& sql) {
    return raw_db{db}.exec(sql);
  }

  static std::string scalar(const location& db, const std::string& sql) {
    return raw_db{db}.scalar(sql);
  }

  static std::string table_count(const location& db, const std::string& table) {
    return scalar(db, "SELECT COUNT(*) FROM sqlite_schema WHERE name = '"
                        + table + "'");
  }

  /// Commit frames in the WAL file (synchronous=FULL: one fsync each). The
  /// store keeps the database open, so the WAL is not checkpointed away
  /// under the test: the auto-checkpoint waits for 1000 pages. Frames of an
  /// earlier WAL generation (other salts) end the count; checksums are not
  /// checked (no crash tears a frame in these tests).
  static int64_t commits(const location& db) {
    std::ifstream in{db.string() + "-wal", std::ios::binary};
    if (!in)
      return 0;
    std::vector<unsigned char> wal{std::istreambuf_iterator<char>{in},
                                   std::istreambuf_iterator<char>{}};
    constexpr size_t header_size = 32;
    constexpr size_t frame_header_size = 24;
    auto be32 = [&wal](size_t at) {
      return uint32_t{wal[at]} << 24 | uint32_t{wal[at + 1]} << 16
             | uint32_t{wal[at + 2]} << 8 | uint32_t{wal[at + 3]};
    };
    if (wal.size() < header_size)
      return 0;
    size_t page_size = be32(8);
    // 1 stands for 65536, which does not fit the field.
    if (page_size == 1)
      page_size = 65536;
    if (page_size < 512)
      return -1;
    int64_t count = 0;
    for (size_t at = header_size;
         at + frame_header_size + page_size <= wal.size();
         at += frame_header_size + page_size) {
      if (be32(at + 8) != be32(16) || be32(at + 12) != be32(20))
        break;
      // Non-zero "database size after commit": the last frame of a commit.
      if (be32(at + 4) != 0)
        ++count;
    }
    return count;
  }

  /// The CHECK constraint guards the column; switch it off to damage it.
  static std::string corrupt_scheme(const location& db,
                                    const std::string& key_id) {
    return exec(db, "PRAGMA ignore_check_constraints=ON;"
                    "UPDATE keys SET scheme = 'schnorr' WHERE key_id = '"
                      + key_id + "';");
  }
};

// -- fixture ------------------------------------------------------------------

/// A fresh directory per test, removed afterwards.
class SqliteStoreTest : public ::testing::Test {
protected:
  void SetUp() override {
    db_path = sqlite_traits::fresh_location();
    ASSERT_FALSE(db_path.empty());
    dir = db_path.parent_path();
  }

  void TearDown() override {
    if (!db_path.empty())
      sqlite_traits::remove_location(db_path);
  }

  /// Opens `db_path`, failing the test on error.
  std::unique_ptr<sqlite_store> open_store() {
    auto store = sqlite_store::open(db_path);
    EXPECT_TRUE(store) << hsm::describe(store.error());
    if (!store)
      return nullptr;
    return std::move(*store);
  }

  fs::path dir;
  fs::path db_path;
};

// -- opening ------------------------------------------------------------------

TEST_F(SqliteStoreTest, OpenCreatesPrivateWalDatabaseAtTheLatestVersion) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto version = store->schema_version();
  ASSERT_TRUE(version) << hsm::describe(version.error());
  EXPECT_EQ(*version, static_cast<int>(hsm::store::sqlite_migrations().size()));
  EXPECT_EQ(*version, 4);
  EXPECT_EQ(store->path(), db_path);
  raw_db raw{db_path};
  EXPECT_EQ(raw.scalar("PRAGMA journal_mode"), "wal");
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM schema_migrations"), "4");
  EXPECT_EQ(raw.scalar("SELECT group_concat(name, ' ') FROM (SELECT name "
                       "FROM schema_migrations ORDER BY version)"),
            "0001_init.sql 0002_row_mac.sql 0003_rotation.sql "
            "0004_audit.sql");
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM sqlite_schema "
                       "WHERE name IN ('keys', 'master_key_canary', "
                       "'audit_log')"),
            "3");
  EXPECT_EQ(file_mode(db_path), 0600);
  // SQLite gives the WAL files the database file's mode.
  ASSERT_TRUE(store->put(sample_key("k1", hsm::scheme::p256, 1)));
  EXPECT_EQ(file_mode(fs::path{db_path.string() + "-wal"}), 0600);
  EXPECT_EQ(file_mode(fs::path{db_path.string() + "-shm"}), 0600);
}

TEST_F(SqliteStoreTest, ConcurrentOpensOfANewFileMigrateOnce) {
  for (int round = 0; round < 10; ++round) {
    auto path = dir / ("race-" + std::to_string(round) + ".db");
    std::latch start{2};
    std::vector<std::string> errors(2);
    auto open_one = [&](size_t slot) {
      start.arrive_and_wait();
      auto store = sqlite_store::open(path);
      if (!store)
        errors[slot] = hsm::describe(store.error());
    };
    std::thread a{open_one, size_t{0}};
    std::thread b{open_one, size_t{1}};
    a.join();
    b.join();
    EXPECT_EQ(errors[0], "");
    EXPECT_EQ(errors[1], "");
    raw_db raw{path};
    EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM schema_migrations"), "4");
    EXPECT_EQ(raw.scalar("PRAGMA journal_mode"), "wal");
  }
}

TEST_F(SqliteStoreTest, MissingParentDirectoryIsUnavailable) {
  auto path = dir / "no-such-dir" / "keys.db";
  auto store = sqlite_store::open(path);
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::unavailable));
  auto text = hsm::describe(store.error());
  EXPECT_NE(text.find(path.string()), std::string::npos) << text;
  EXPECT_FALSE(fs::exists(path.parent_path()));
}

TEST_F(SqliteStoreTest, FileThatIsNotADatabaseIsUnavailable) {
  {
    auto fd = ::fopen(db_path.c_str(), "w");
    ASSERT_NE(fd, nullptr);
    std::string junk(4096, 'x');
    ASSERT_EQ(::fwrite(junk.data(), 1, junk.size(), fd), junk.size());
    ::fclose(fd);
  }
  auto store = sqlite_store::open(db_path);
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::unavailable));
  auto text = hsm::describe(store.error());
  EXPECT_NE(text.find(db_path.string()), std::string::npos) << text;
}

TEST_F(SqliteStoreTest, ReadOnlyOpenReadsWritesNothingAndCreatesNothing) {
  {
    auto store = open_store();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->put(sample_key("r1", hsm::scheme::p256, 1)));
  }
  auto read_file = [](const fs::path& p) {
    std::ifstream in{p, std::ios::binary};
    return std::string{std::istreambuf_iterator<char>{in},
                       std::istreambuf_iterator<char>{}};
  };
  auto before = read_file(db_path);
  ASSERT_FALSE(before.empty());
  {
    auto ro = sqlite_store::open_read_only(db_path);
    ASSERT_TRUE(ro) << hsm::describe(ro.error());
    auto got = (*ro)->get("r1");
    ASSERT_TRUE(got) << hsm::describe(got.error());
    EXPECT_TRUE(got->has_value());
    auto rows = (*ro)->pending_rows("\n", "", 10);
    ASSERT_TRUE(rows) << hsm::describe(rows.error());
    EXPECT_EQ(rows->size(), 1u);
    // Every write fails.
    EXPECT_FALSE((*ro)->put(sample_key("r2", hsm::scheme::p256, 2)));
    hsm::store::canary_record c;
    c.public_key = {4, 1};
    c.wrapped_key = {1};
    c.wrap_mechanism = "CKM_AES_KEY_WRAP_PAD";
    c.master_key_label = "m";
    EXPECT_FALSE((*ro)->put_canary(c));
  }
  EXPECT_EQ(read_file(db_path), before) << "a read-only open changed the file";
  EXPECT_EQ(raw_db{db_path}.scalar("SELECT COUNT(*) FROM keys"), "1");
  // A missing file is not created.
  auto missing = sqlite_store::open_read_only(dir / "missing.db");
  ASSERT_FALSE(missing);
  EXPECT_TRUE(is_store_error(missing.error(), hsm::store_errc::unavailable));
  EXPECT_FALSE(fs::exists(dir / "missing.db"));
  // An older schema is refused, not migrated (the record of the last
  // migration removed stands for a database of the release before).
  auto old_path = dir / "old.db";
  ASSERT_TRUE(sqlite_store::open(old_path));
  ASSERT_EQ(raw_db{old_path}.exec("DELETE FROM schema_migrations WHERE "
                                  "version = 4"),
            "");
  auto old = sqlite_store::open_read_only(old_path);
  ASSERT_FALSE(old);
  EXPECT_NE(hsm::describe(old.error()).find("older"), std::string::npos)
    << hsm::describe(old.error());
  EXPECT_EQ(raw_db{old_path}.scalar("SELECT MAX(version) FROM "
                                    "schema_migrations"),
            "3");
}

// -- another connection's lock -----------------------------------------------

TEST(SqliteLockWait, PausesStartShortDoubleAndGiveUpAfterFiveSeconds) {
  using hsm::store::lock_wait_pause;
  using std::chrono::microseconds;
  EXPECT_EQ(lock_wait_pause(0), microseconds{50});
  EXPECT_EQ(lock_wait_pause(1), microseconds{100});
  EXPECT_EQ(lock_wait_pause(5), microseconds{1600});
  EXPECT_EQ(lock_wait_pause(6), microseconds{2000});
  EXPECT_EQ(lock_wait_pause(100), microseconds{2000});
  // Every pause until it says no more: five seconds in all, not much more.
  microseconds total{0};
  int tries = 0;
  while (auto pause = lock_wait_pause(tries)) {
    total += *pause;
    ++tries;
    ASSERT_LT(tries, 10000);
  }
  EXPECT_GE(total, std::chrono::seconds{5});
  EXPECT_LT(total, std::chrono::seconds{5} + microseconds{2000});
  EXPECT_FALSE(lock_wait_pause(tries + 1));
}

TEST_F(SqliteStoreTest, AWriteWaitsForAnotherConnectionsLockAndThenCommits) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  raw_db holder{db_path};
  ASSERT_EQ(holder.exec("BEGIN IMMEDIATE"), "");
  auto held_for = std::chrono::milliseconds{300};
  std::thread release{[&] {
    std::this_thread::sleep_for(held_for);
    EXPECT_EQ(holder.exec("COMMIT"), "");
  }};
  auto t0 = std::chrono::steady_clock::now();
  auto put = store->put(sample_key("waited", hsm::scheme::p256, 1));
  auto waited = std::chrono::steady_clock::now() - t0;
  release.join();
  ASSERT_TRUE(put) << hsm::describe(put.error());
  EXPECT_TRUE(put->inserted);
  // It waited for the lock rather than failing at once.
  EXPECT_GE(waited, held_for - std::chrono::milliseconds{50});
  EXPECT_EQ(raw_db{db_path}.scalar(
              "SELECT COUNT(*) FROM keys WHERE key_id = 'waited'"),
            "1");
}

TEST_F(SqliteStoreTest, AWriteGivesUpAfterFiveSecondsOfAnotherConnectionsLock) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  raw_db holder{db_path};
  ASSERT_EQ(holder.exec("BEGIN IMMEDIATE"), "");
  auto t0 = std::chrono::steady_clock::now();
  auto put = store->put(sample_key("refused", hsm::scheme::p256, 1));
  auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(holder.exec("ROLLBACK"), "");
  ASSERT_FALSE(put);
  EXPECT_TRUE(is_store_error(put.error(), hsm::store_errc::unavailable));
  auto text = hsm::describe(put.error());
  EXPECT_NE(text.find("after waiting 5000 ms"), std::string::npos) << text;
  EXPECT_GE(waited, std::chrono::milliseconds{4900});
  EXPECT_LT(waited, std::chrono::seconds{30});
  EXPECT_EQ(raw_db{db_path}.scalar(
              "SELECT COUNT(*) FROM keys WHERE key_id = 'refused'"),
            "0");
}

} // namespace

// The contract, on this back end (in the suite's namespace, where the
// instantiation macro looks for it).
namespace hsm::test {

INSTANTIATE_TYPED_TEST_SUITE_P(Sqlite, KeyStoreContractTest, sqlite_traits);

} // namespace hsm::test
