#include "store/sqlite_store.hpp"

#include "messages/errors.hpp"
#include "runtime/schemes.hpp"

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <stdlib.h>
#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <latch>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;

using hsm::store::canary_record;
using hsm::store::key_record;
using hsm::store::migration;
using hsm::store::put_result;
using hsm::store::sqlite_store;

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
  std::string exec(const char* sql) {
    char* msg = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &msg) == SQLITE_OK)
      return {};
    std::string out = msg != nullptr ? msg : "unknown error";
    sqlite3_free(msg);
    return out;
  }

  /// The first column of the first row as text, or "<none>".
  std::string scalar(const char* sql) {
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db_, sql, -1, &stmt, nullptr) != SQLITE_OK)
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

/// Passes if `err` is the store error `code`.
::testing::AssertionResult is_store_error(const caf::error& err,
                                          hsm::store_errc code) {
  if (err.category() == caf::atom("store")
      && err.code() == static_cast<uint8_t>(code))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "expected store: " << hsm::to_string(code) << ", got "
         << hsm::describe(err);
}

/// A plausible wrapped key of `s` (the blob holds zero bytes on purpose).
key_record sample_key(std::string key_id, hsm::scheme s, uint8_t seed) {
  key_record rec;
  rec.key_id = std::move(key_id);
  rec.scheme = s;
  if (s == hsm::scheme::ed25519) {
    rec.public_key.assign(32, seed);
  } else {
    rec.public_key.assign(65, seed);
    rec.public_key[0] = 0x04;
  }
  for (uint8_t i = 0; i < 40; ++i)
    rec.key_blob.push_back(static_cast<uint8_t>(i * seed));
  rec.wrap_mechanism = std::string{hsm::store::aes_key_wrap_pad};
  rec.created_at_ms = 1'700'000'000'000 + seed;
  return rec;
}

/// A canary whose bytes depend on `seed`.
canary_record sample_canary(uint8_t seed) {
  canary_record c;
  c.public_key.assign(65, seed);
  c.public_key[0] = 0x04;
  c.wrapped_key.assign(40, static_cast<uint8_t>(seed + 1));
  c.wrap_mechanism = std::string{hsm::store::aes_key_wrap_pad};
  c.master_key_label = "master-" + std::to_string(seed);
  c.created_at_ms = 1'700'000'000'000 + seed;
  return c;
}

void expect_same_key(const key_record& x, const key_record& y) {
  EXPECT_EQ(x.key_id, y.key_id);
  EXPECT_EQ(hsm::to_string(x.scheme), hsm::to_string(y.scheme));
  EXPECT_EQ(x.public_key, y.public_key);
  EXPECT_EQ(x.key_blob, y.key_blob);
  EXPECT_EQ(x.wrap_mechanism, y.wrap_mechanism);
  EXPECT_EQ(x.created_at_ms, y.created_at_ms);
}

void expect_same_canary(const canary_record& x, const canary_record& y) {
  EXPECT_EQ(x.public_key, y.public_key);
  EXPECT_EQ(x.wrapped_key, y.wrapped_key);
  EXPECT_EQ(x.wrap_mechanism, y.wrap_mechanism);
  EXPECT_EQ(x.master_key_label, y.master_key_label);
  EXPECT_EQ(x.created_at_ms, y.created_at_ms);
}

/// The permission bits of `file`, or -1.
int file_mode(const fs::path& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0)
    return -1;
  return static_cast<int>(st.st_mode & 0777);
}

// -- fixture ------------------------------------------------------------------

/// A fresh directory per test, removed afterwards.
class SqliteStoreTest : public ::testing::Test {
protected:
  void SetUp() override {
    auto pattern
      = (fs::path{::testing::TempDir()} / "sqlite_store_test.XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr) << pattern;
    dir = pattern;
    db_path = dir / "keys.db";
  }

  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }

  /// Opens `db_path` (or `path`), failing the test on error.
  std::unique_ptr<sqlite_store>
  open_store(std::optional<fs::path> path = std::nullopt) {
    auto store = sqlite_store::open(path ? *path : db_path);
    EXPECT_TRUE(store) << hsm::describe(store.error());
    if (!store)
      return nullptr;
    return std::move(*store);
  }

  fs::path dir;
  fs::path db_path;
};

// -- opening and migrations ---------------------------------------------------

TEST_F(SqliteStoreTest, OpenCreatesPrivateWalDatabaseAtVersionOne) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto version = store->schema_version();
  ASSERT_TRUE(version) << hsm::describe(version.error());
  EXPECT_EQ(*version, 1);
  EXPECT_EQ(store->path(), db_path);
  raw_db raw{db_path};
  EXPECT_EQ(raw.scalar("PRAGMA journal_mode"), "wal");
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM schema_migrations"), "1");
  EXPECT_EQ(raw.scalar("SELECT name FROM schema_migrations"), "0001_init.sql");
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM sqlite_schema "
                       "WHERE name IN ('keys', 'master_key_canary')"),
            "2");
  EXPECT_EQ(file_mode(db_path), 0600);
  // SQLite gives the WAL files the database file's mode.
  ASSERT_TRUE(store->put(sample_key("k1", hsm::scheme::p256, 1)));
  EXPECT_EQ(file_mode(fs::path{db_path.string() + "-wal"}), 0600);
  EXPECT_EQ(file_mode(fs::path{db_path.string() + "-shm"}), 0600);
}

TEST_F(SqliteStoreTest, ReopenKeepsVersionAndData) {
  auto rec = sample_key("k1", hsm::scheme::secp256k1, 7);
  {
    auto store = open_store();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->put(rec));
  }
  for (int i = 0; i < 2; ++i) {
    auto store = open_store();
    ASSERT_NE(store, nullptr);
    auto version = store->schema_version();
    ASSERT_TRUE(version);
    EXPECT_EQ(*version, 1);
    auto got = store->get("k1");
    ASSERT_TRUE(got) << hsm::describe(got.error());
    ASSERT_TRUE(got->has_value());
    expect_same_key(**got, rec);
  }
  raw_db raw{db_path};
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM schema_migrations"), "1");
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
    EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM schema_migrations"), "1");
    EXPECT_EQ(raw.scalar("PRAGMA journal_mode"), "wal");
  }
}

TEST_F(SqliteStoreTest, AppliesNewMigrationsOnReopen) {
  ASSERT_NE(open_store(), nullptr);
  auto migrations = hsm::store::sqlite_migrations();
  migrations.push_back(
    migration{2, "0002_extra.sql", "CREATE TABLE extra (x INTEGER) STRICT;"});
  auto store = sqlite_store::open(db_path, migrations);
  ASSERT_TRUE(store) << hsm::describe(store.error());
  auto version = (*store)->schema_version();
  ASSERT_TRUE(version);
  EXPECT_EQ(*version, 2);
  store->reset();
  // An older build now refuses the database.
  auto old = sqlite_store::open(db_path);
  ASSERT_FALSE(old);
  EXPECT_TRUE(is_store_error(old.error(), hsm::store_errc::schema_too_new));
}

TEST_F(SqliteStoreTest, FailedMigrationAppliesNothing) {
  ASSERT_NE(open_store(), nullptr);
  auto migrations = hsm::store::sqlite_migrations();
  migrations.push_back(migration{2, "0002_broken.sql",
                                 "CREATE TABLE extra (x INTEGER);"
                                 "SELECT nonsense FROM nowhere;"});
  auto store = sqlite_store::open(db_path, migrations);
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::query_failed));
  EXPECT_NE(hsm::describe(store.error()).find("0002_broken.sql"),
            std::string::npos)
    << hsm::describe(store.error());
  raw_db raw{db_path};
  EXPECT_EQ(raw.scalar("SELECT MAX(version) FROM schema_migrations"), "1");
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM sqlite_schema "
                       "WHERE name = 'extra'"),
            "0");
}

TEST_F(SqliteStoreTest, NewerSchemaIsRefused) {
  {
    raw_db raw{db_path};
    ASSERT_EQ(raw.exec("CREATE TABLE schema_migrations ("
                       "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                       "applied_at_ms INTEGER NOT NULL);"
                       "INSERT INTO schema_migrations VALUES "
                       "(1, '0001_init.sql', 0), (99, '0099_future.sql', 0);"),
              "");
  }
  auto store = sqlite_store::open(db_path);
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::schema_too_new));
  auto text = hsm::describe(store.error());
  EXPECT_NE(text.find("99"), std::string::npos) << text;
  EXPECT_NE(text.find("migration 1"), std::string::npos) << text;
  // Nothing was written.
  raw_db raw{db_path};
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM sqlite_schema "
                       "WHERE name = 'keys'"),
            "0");
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

// -- keys ---------------------------------------------------------------------

TEST_F(SqliteStoreTest, PutThenGetRoundTripsEveryField) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  uint8_t seed = 1;
  for (auto s : hsm::all_schemes) {
    SCOPED_TRACE(std::string{hsm::to_string(s)});
    auto rec = sample_key("key-" + std::string{hsm::to_string(s)}, s, seed++);
    auto put = store->put(rec);
    ASSERT_TRUE(put) << hsm::describe(put.error());
    EXPECT_TRUE(put->inserted);
    expect_same_key(put->record, rec);
    auto got = store->get(rec.key_id);
    ASSERT_TRUE(got) << hsm::describe(got.error());
    ASSERT_TRUE(got->has_value());
    expect_same_key(**got, rec);
    EXPECT_FALSE((*got)->resident());
  }
}

TEST_F(SqliteStoreTest, ResidentKeyRoundTrips) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto rec = sample_key("resident-1", hsm::scheme::p256, 9);
  rec.key_blob = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08};
  rec.wrap_mechanism = std::string{hsm::store::resident_mechanism};
  auto put = store->put(rec);
  ASSERT_TRUE(put) << hsm::describe(put.error());
  EXPECT_TRUE(put->inserted);
  auto got = store->get("resident-1");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_key(**got, rec);
  EXPECT_TRUE((*got)->resident());
  EXPECT_EQ((*got)->wrap_mechanism, "token-resident");
}

TEST_F(SqliteStoreTest, SecondPutWithSameKeyIdReturnsFirstRecord) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto first = sample_key("dup", hsm::scheme::secp256k1, 1);
  auto second = sample_key("dup", hsm::scheme::secp256k1, 2);
  ASSERT_NE(first.public_key, second.public_key);
  auto put1 = store->put(first);
  ASSERT_TRUE(put1) << hsm::describe(put1.error());
  EXPECT_TRUE(put1->inserted);
  auto put2 = store->put(second);
  ASSERT_TRUE(put2) << hsm::describe(put2.error());
  EXPECT_FALSE(put2->inserted);
  expect_same_key(put2->record, first);
  auto got = store->get("dup");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_key(**got, first);
}

TEST_F(SqliteStoreTest, GetOfUnknownKeyIdIsNullopt) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto got = store->get("nobody");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  EXPECT_FALSE(got->has_value());
  auto empty = store->get("");
  ASSERT_TRUE(empty) << hsm::describe(empty.error());
  EXPECT_FALSE(empty->has_value());
}

TEST_F(SqliteStoreTest, CorruptSchemeIsCorruptRow) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("bad-scheme", hsm::scheme::p256, 3)));
  {
    raw_db raw{db_path};
    // The CHECK constraint guards the column; switch it off to damage it.
    ASSERT_EQ(raw.exec("PRAGMA ignore_check_constraints=ON;"
                       "UPDATE keys SET scheme = 'schnorr' "
                       "WHERE key_id = 'bad-scheme';"),
              "");
  }
  auto got = store->get("bad-scheme");
  ASSERT_FALSE(got);
  EXPECT_TRUE(is_store_error(got.error(), hsm::store_errc::corrupt_row));
  auto text = hsm::describe(got.error());
  EXPECT_NE(text.find("bad-scheme"), std::string::npos) << text;
  // A put that hits the damaged row reports it too.
  auto put = store->put(sample_key("bad-scheme", hsm::scheme::p256, 4));
  ASSERT_FALSE(put);
  EXPECT_TRUE(is_store_error(put.error(), hsm::store_errc::corrupt_row));
}

TEST_F(SqliteStoreTest, RacingStoresKeepOneRecordPerKeyId) {
  constexpr int n = 200;
  auto store_a = open_store();
  auto store_b = open_store();
  ASSERT_NE(store_a, nullptr);
  ASSERT_NE(store_b, nullptr);
  struct outcome {
    std::vector<put_result> results;
    std::vector<std::string> errors;
  };
  outcome out_a;
  outcome out_b;
  std::latch start{2};
  auto run = [&](sqlite_store& store, uint8_t tag, outcome& out) {
    start.arrive_and_wait();
    for (int i = 0; i < n; ++i) {
      auto s = hsm::all_schemes[static_cast<size_t>(i) % 3];
      auto rec = sample_key("race-" + std::to_string(i), s, tag);
      rec.public_key[1] = static_cast<uint8_t>(i);
      auto res = store.put(rec);
      if (res)
        out.results.push_back(std::move(*res));
      else
        out.errors.push_back(hsm::describe(res.error()));
    }
  };
  std::thread a{run, std::ref(*store_a), uint8_t{0xA1}, std::ref(out_a)};
  std::thread b{run, std::ref(*store_b), uint8_t{0xB2}, std::ref(out_b)};
  a.join();
  b.join();
  ASSERT_TRUE(out_a.errors.empty()) << out_a.errors.front();
  ASSERT_TRUE(out_b.errors.empty()) << out_b.errors.front();
  ASSERT_EQ(out_a.results.size(), size_t{n});
  ASSERT_EQ(out_b.results.size(), size_t{n});
  for (size_t i = 0; i < size_t{n}; ++i) {
    const auto& ra = out_a.results[i];
    const auto& rb = out_b.results[i];
    SCOPED_TRACE(ra.record.key_id);
    EXPECT_EQ(ra.record.public_key, rb.record.public_key);
    EXPECT_NE(ra.inserted, rb.inserted);
    auto got = store_a->get(ra.record.key_id);
    ASSERT_TRUE(got) << hsm::describe(got.error());
    ASSERT_TRUE(got->has_value());
    EXPECT_EQ((*got)->public_key, ra.record.public_key);
  }
  raw_db raw{db_path};
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM keys"), std::to_string(n));
  EXPECT_EQ(raw.scalar("SELECT COUNT(DISTINCT key_id) FROM keys"),
            std::to_string(n));
}

// -- canary -------------------------------------------------------------------

TEST_F(SqliteStoreTest, CanaryIsAbsentThenFirstPutWins) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto none = store->get_canary();
  ASSERT_TRUE(none) << hsm::describe(none.error());
  EXPECT_FALSE(none->has_value());
  auto first = sample_canary(1);
  auto put1 = store->put_canary(first);
  ASSERT_TRUE(put1) << hsm::describe(put1.error());
  expect_same_canary(*put1, first);
  auto put2 = store->put_canary(sample_canary(2));
  ASSERT_TRUE(put2) << hsm::describe(put2.error());
  expect_same_canary(*put2, first);
  auto got = store->get_canary();
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_canary(**got, first);
  raw_db raw{db_path};
  EXPECT_EQ(raw.scalar("SELECT COUNT(*) FROM master_key_canary"), "1");
}

} // namespace
