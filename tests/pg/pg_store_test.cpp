// The PostgreSQL key store against a real server: the same contract as the
// SQLite store (tests/integration/sqlite_store_test.cpp), plus what only a
// server brings: drivers racing on one database, lost connections, restarts,
// crashes, unreachable and read-only servers. Each test runs on a database
// of its own (tests/support/pg_cluster.hpp).

#include "store/pg_store.hpp"

#include "messages/errors.hpp"
#include "runtime/schemes.hpp"
#include "tests/support/pg_cluster.hpp"

#include <gtest/gtest.h>
#include <pqxx/pqxx>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <latch>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>


namespace {

using namespace std::chrono_literals;
using hsm::store::canary_record;
using hsm::store::key_record;
using hsm::store::migration;
using hsm::store::pg_options;
using hsm::store::pg_store;
using hsm::store::put_result;

// -- helpers ------------------------------------------------------------------

/// Runs `sql` on `url` in autocommit mode, behind the store's back, and
/// returns the first column of the first row as text ("<none>" without
/// rows, "<null>", or "<error: ...>"). Waits for a restarting server.
std::string scalar(const std::string& url, const std::string& sql) {
  auto deadline = std::chrono::steady_clock::now() + 15s;
  for (;;) {
    try {
      pqxx::connection conn{url};
      pqxx::nontransaction tx{conn};
      auto rows = tx.exec(sql);
      if (rows.empty() || rows.columns() == 0)
        return "<none>";
      if (rows[0][0].is_null())
        return "<null>";
      return rows[0][0].as<std::string>();
    } catch (const pqxx::broken_connection& e) {
      if (std::chrono::steady_clock::now() >= deadline)
        return std::string{"<error: "} + e.what() + ">";
    } catch (const pqxx::sql_error& e) {
      if (e.sqlstate() != "57P03"
          || std::chrono::steady_clock::now() >= deadline)
        return std::string{"<error: "} + e.what() + ">";
    }
    std::this_thread::sleep_for(100ms);
  }
}

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

/// True if `text` contains `part`.
::testing::AssertionResult contains(const std::string& text,
                                    const std::string& part) {
  if (text.find(part) != std::string::npos)
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << text << "' does not contain '" << part << "'";
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

/// A loopback TCP port that nothing listens on (bound, then released).
int unused_port() {
  auto fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    return 1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  auto* sa = reinterpret_cast<sockaddr*>(&addr);
  if (::bind(fd, sa, sizeof addr) != 0 || ::getsockname(fd, sa, &len) != 0) {
    ::close(fd);
    return 1;
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

/// Short retry timing, for tests that expect a call to give up.
pg_options short_budget(std::chrono::milliseconds budget) {
  pg_options opts;
  opts.retry_budget = budget;
  opts.retry_min = 20ms;
  opts.retry_max = 100ms;
  return opts;
}

/// Retry timing for tests that restart the server under the store.
pg_options restart_budget() {
  pg_options opts;
  opts.retry_budget = 30s;
  opts.retry_min = 20ms;
  opts.retry_max = 200ms;
  return opts;
}

// -- fixture ------------------------------------------------------------------

/// A fresh database per test, dropped afterwards.
class PgStoreTest : public ::testing::Test {
protected:
  void SetUp() override {
    url = hsm::test::fresh_database();
    ASSERT_FALSE(url.empty()) << "no PostgreSQL test database (see above)";
    db_name = scalar(url, "SELECT current_database()");
  }

  void TearDown() override {
    hsm::test::drop_database(url);
  }

  /// Opens `url` (or `other`), failing the test on error.
  std::unique_ptr<pg_store> open_store(pg_options opts = {}) {
    auto store = pg_store::open(url, opts);
    EXPECT_TRUE(store) << hsm::describe(store.error());
    if (!store)
      return nullptr;
    return std::move(*store);
  }

  /// Runs `sql` on this test's database.
  std::string sql(const std::string& statement) {
    return scalar(url, statement);
  }

  /// Runs `sql` on the cluster's `postgres` database (for statements that
  /// this test's database might refuse, e.g. when it is read-only).
  std::string admin_sql(const std::string& statement) {
    return scalar(hsm::test::postgres_url(), statement);
  }

  /// Terminates every other connection to this test's database and waits
  /// until they are gone.
  void terminate_other_backends() {
    EXPECT_EQ(sql("SELECT COUNT(pg_terminate_backend(pid)) "
                  "FROM pg_stat_activity WHERE datname = current_database() "
                  "AND pid <> pg_backend_pid()"),
              "1");
    auto deadline = std::chrono::steady_clock::now() + 5s;
    while (sql("SELECT COUNT(*) FROM pg_stat_activity "
               "WHERE datname = current_database() "
               "AND pid <> pg_backend_pid()")
             != "0"
           && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(10ms);
  }

  std::string url;
  std::string db_name;
};

// -- opening and migrations ---------------------------------------------------

TEST_F(PgStoreTest, OpenAppliesSchemaVersionOne) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto version = store->schema_version();
  ASSERT_TRUE(version) << hsm::describe(version.error());
  EXPECT_EQ(*version, 1);
  EXPECT_EQ(store->connects(), 1u);
  EXPECT_EQ(sql("SELECT COUNT(*) FROM schema_migrations"), "1");
  EXPECT_EQ(sql("SELECT name FROM schema_migrations"), "0001_init.sql");
  EXPECT_EQ(sql("SELECT COUNT(*) FROM information_schema.tables "
                "WHERE table_name IN ('keys', 'master_key_canary')"),
            "2");
}

TEST_F(PgStoreTest, ReopenKeepsVersionAndData) {
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
    ASSERT_TRUE(version) << hsm::describe(version.error());
    EXPECT_EQ(*version, 1);
    auto got = store->get("k1");
    ASSERT_TRUE(got) << hsm::describe(got.error());
    ASSERT_TRUE(got->has_value());
    expect_same_key(**got, rec);
  }
  EXPECT_EQ(sql("SELECT COUNT(*) FROM schema_migrations"), "1");
}

TEST_F(PgStoreTest, ConcurrentOpensOfAFreshDatabaseMigrateOnce) {
  constexpr size_t openers = 4;
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto db = round == 0 ? url : hsm::test::fresh_database();
    ASSERT_FALSE(db.empty());
    std::latch start{openers};
    std::vector<std::string> errors(openers);
    auto open_one = [&](size_t slot) {
      start.arrive_and_wait();
      auto store = pg_store::open(db);
      if (!store)
        errors[slot] = hsm::describe(store.error());
    };
    std::vector<std::thread> threads;
    for (size_t i = 0; i < openers; ++i)
      threads.emplace_back(open_one, i);
    for (auto& t : threads)
      t.join();
    for (const auto& e : errors)
      EXPECT_EQ(e, "");
    EXPECT_EQ(scalar(db, "SELECT COUNT(*) FROM schema_migrations"), "1");
    EXPECT_EQ(scalar(db, "SELECT MAX(version) FROM schema_migrations"), "1");
    if (round != 0)
      hsm::test::drop_database(db);
  }
}

TEST_F(PgStoreTest, AppliesNewMigrationsOnReopen) {
  ASSERT_NE(open_store(), nullptr);
  auto migrations = hsm::store::postgres_migrations();
  migrations.push_back(
    migration{2, "0002_extra.sql", "CREATE TABLE extra (x INTEGER);"});
  auto store = pg_store::open(url, {}, migrations);
  ASSERT_TRUE(store) << hsm::describe(store.error());
  auto version = (*store)->schema_version();
  ASSERT_TRUE(version) << hsm::describe(version.error());
  EXPECT_EQ(*version, 2);
  store->reset();
  // An older build now refuses the database.
  auto old = pg_store::open(url);
  ASSERT_FALSE(old);
  EXPECT_TRUE(is_store_error(old.error(), hsm::store_errc::schema_too_new));
}

TEST_F(PgStoreTest, FailedMigrationAppliesNothing) {
  ASSERT_NE(open_store(), nullptr);
  auto migrations = hsm::store::postgres_migrations();
  migrations.push_back(migration{2, "0002_broken.sql",
                                 "CREATE TABLE extra (x INTEGER);"
                                 "SELECT nonsense FROM nowhere;"});
  auto store = pg_store::open(url, {}, migrations);
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::query_failed));
  EXPECT_TRUE(contains(hsm::describe(store.error()), "0002_broken.sql"));
  EXPECT_EQ(sql("SELECT MAX(version) FROM schema_migrations"), "1");
  EXPECT_EQ(sql("SELECT COUNT(*) FROM information_schema.tables "
                "WHERE table_name = 'extra'"),
            "0");
}

TEST_F(PgStoreTest, NewerSchemaIsRefused) {
  ASSERT_EQ(sql("CREATE TABLE schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at_ms BIGINT NOT NULL)"),
            "<none>");
  ASSERT_EQ(sql("INSERT INTO schema_migrations VALUES "
                "(1, '0001_init.sql', 0), (99, '0099_future.sql', 0)"),
            "<none>");
  auto start = std::chrono::steady_clock::now();
  auto store = pg_store::open(url);
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::schema_too_new));
  auto text = hsm::describe(store.error());
  EXPECT_TRUE(contains(text, "99"));
  EXPECT_TRUE(contains(text, "migration 1"));
  // Not retried: the answer will not change.
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  // Nothing was written.
  EXPECT_EQ(sql("SELECT COUNT(*) FROM information_schema.tables "
                "WHERE table_name = 'keys'"),
            "0");
}

// -- keys ---------------------------------------------------------------------

TEST_F(PgStoreTest, PutThenGetRoundTripsEveryField) {
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
  // Bytes that text encodings mangle survive too.
  auto rec = sample_key("all-bytes", hsm::scheme::p256, 0);
  rec.key_blob.clear();
  for (int i = 0; i < 256; ++i)
    rec.key_blob.push_back(static_cast<uint8_t>(i));
  ASSERT_TRUE(store->put(rec));
  auto got = store->get("all-bytes");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_key(**got, rec);
  EXPECT_EQ(sql("SELECT length(key_blob) FROM keys "
                "WHERE key_id = 'all-bytes'"),
            "256");
}

TEST_F(PgStoreTest, ResidentKeyRoundTrips) {
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

TEST_F(PgStoreTest, EmptyBlobRoundTrips) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto rec = sample_key("empty-blob", hsm::scheme::ed25519, 5);
  rec.key_blob.clear();
  ASSERT_TRUE(store->put(rec));
  auto got = store->get("empty-blob");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_key(**got, rec);
  EXPECT_EQ(sql("SELECT key_blob IS NULL FROM keys"), "f");
}

TEST_F(PgStoreTest, SecondPutWithSameKeyIdReturnsFirstRecord) {
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
  EXPECT_EQ(sql("SELECT COUNT(*) FROM keys"), "1");
}

TEST_F(PgStoreTest, GetOfUnknownKeyIdIsNullopt) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto got = store->get("nobody");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  EXPECT_FALSE(got->has_value());
  auto empty = store->get("");
  ASSERT_TRUE(empty) << hsm::describe(empty.error());
  EXPECT_FALSE(empty->has_value());
}

TEST_F(PgStoreTest, CorruptSchemeIsCorruptRow) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("bad-scheme", hsm::scheme::p256, 3)));
  // The CHECK constraint guards the column; drop it to damage the row.
  ASSERT_EQ(sql("ALTER TABLE keys DROP CONSTRAINT keys_scheme_check"),
            "<none>");
  ASSERT_EQ(sql("UPDATE keys SET scheme = 'schnorr' "
                "WHERE key_id = 'bad-scheme'"),
            "<none>");
  auto got = store->get("bad-scheme");
  ASSERT_FALSE(got);
  EXPECT_TRUE(is_store_error(got.error(), hsm::store_errc::corrupt_row));
  EXPECT_TRUE(contains(hsm::describe(got.error()), "bad-scheme"));
  // A put that hits the damaged row reports it too.
  auto put = store->put(sample_key("bad-scheme", hsm::scheme::p256, 4));
  ASSERT_FALSE(put);
  EXPECT_TRUE(is_store_error(put.error(), hsm::store_errc::corrupt_row));
}

TEST_F(PgStoreTest, SqlErrorIsQueryFailedWithoutKeyMaterial) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  // A CHECK on the blob that every put violates: the server's DETAIL line
  // quotes the whole row, blob included; the error must not.
  ASSERT_EQ(sql("ALTER TABLE keys ADD CONSTRAINT no_blobs "
                "CHECK (length(key_blob) = 0)"),
            "<none>");
  auto rec = sample_key("checked", hsm::scheme::p256, 0x5a);
  auto put = store->put(rec);
  ASSERT_FALSE(put);
  EXPECT_TRUE(is_store_error(put.error(), hsm::store_errc::query_failed));
  auto text = hsm::describe(put.error());
  EXPECT_TRUE(contains(text, "no_blobs"));
  EXPECT_TRUE(contains(text, "checked"));
  // The blob's bytes 0x00 0x5a 0xb4 ... as PostgreSQL prints them.
  EXPECT_FALSE(contains(text, "\\x005ab4"));
  EXPECT_FALSE(contains(text, "Failing row"));
}

TEST_F(PgStoreTest, RacingStoresKeepOneRecordPerKeyId) {
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
  auto run = [&](pg_store& store, uint8_t tag, outcome& out) {
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
  EXPECT_EQ(sql("SELECT COUNT(*) FROM keys"), std::to_string(n));
  EXPECT_EQ(sql("SELECT COUNT(DISTINCT key_id) FROM keys"), std::to_string(n));
}

// -- canary -------------------------------------------------------------------

TEST_F(PgStoreTest, CanaryIsAbsentThenFirstPutWins) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto none = store->get_canary();
  ASSERT_TRUE(none) << hsm::describe(none.error());
  EXPECT_FALSE(none->has_value());
  auto first = sample_canary(1);
  auto put1 = store->put_canary(first);
  ASSERT_TRUE(put1) << hsm::describe(put1.error());
  expect_same_canary(*put1, first);
  // Another driver's store loses too.
  auto other = open_store();
  ASSERT_NE(other, nullptr);
  auto put2 = other->put_canary(sample_canary(2));
  ASSERT_TRUE(put2) << hsm::describe(put2.error());
  expect_same_canary(*put2, first);
  auto got = store->get_canary();
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_canary(**got, first);
  EXPECT_EQ(sql("SELECT COUNT(*) FROM master_key_canary"), "1");
}

// -- connections --------------------------------------------------------------

TEST_F(PgStoreTest, LostConnectionIsReopened) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("before", hsm::scheme::p256, 1)));
  EXPECT_EQ(store->connects(), 1u);
  terminate_other_backends();
  auto rec = sample_key("after", hsm::scheme::ed25519, 2);
  auto put = store->put(rec);
  ASSERT_TRUE(put) << hsm::describe(put.error());
  EXPECT_TRUE(put->inserted);
  EXPECT_EQ(store->connects(), 2u);
  terminate_other_backends();
  auto got = store->get("after");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_key(**got, rec);
  EXPECT_EQ(store->connects(), 3u);
}

TEST_F(PgStoreTest, PutsSucceedAcrossServerRestart) {
  constexpr int n = 50;
  auto store = open_store(restart_budget());
  ASSERT_NE(store, nullptr);
  std::atomic<bool> restarted{false};
  std::vector<std::string> errors;
  std::vector<bool> inserted;
  ASSERT_TRUE(store->put(sample_key("restart-0", hsm::scheme::p256, 0)));
  std::thread restarter{[&] {
    hsm::test::restart_postgres();
    restarted = true;
  }};
  for (int i = 1; i < n; ++i) {
    auto s = hsm::all_schemes[static_cast<size_t>(i) % 3];
    auto res = store->put(sample_key("restart-" + std::to_string(i), s,
                                     static_cast<uint8_t>(i)));
    if (res)
      inserted.push_back(res->inserted);
    else
      errors.push_back(hsm::describe(res.error()));
    // Spread the puts over the restart.
    if (!restarted)
      std::this_thread::sleep_for(20ms);
  }
  restarter.join();
  EXPECT_TRUE(errors.empty()) << errors.front();
  for (auto x : inserted)
    EXPECT_TRUE(x);
  for (int i = 0; i < n; ++i) {
    auto got = store->get("restart-" + std::to_string(i));
    ASSERT_TRUE(got) << hsm::describe(got.error());
    EXPECT_TRUE(got->has_value()) << "restart-" << i;
  }
  EXPECT_GT(store->connects(), 1u);
  EXPECT_EQ(sql("SELECT COUNT(*) FROM keys"), std::to_string(n));
}

TEST_F(PgStoreTest, PutWaitsForACrashedServerToComeBack) {
  auto store = open_store(restart_budget());
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("before-crash", hsm::scheme::p256, 1)));
  hsm::test::kill_postgres();
  std::thread starter{[] {
    std::this_thread::sleep_for(300ms);
    hsm::test::start_postgres_again();
  }};
  auto rec = sample_key("during-crash", hsm::scheme::secp256k1, 2);
  auto put = store->put(rec);
  starter.join();
  ASSERT_TRUE(put) << hsm::describe(put.error());
  EXPECT_TRUE(put->inserted);
  EXPECT_GE(store->connects(), 2u);
  auto got = store->get("during-crash");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_key(**got, rec);
  EXPECT_EQ(sql("SELECT COUNT(*) FROM keys"), "2");
}

TEST_F(PgStoreTest, UnreachableServerIsUnavailableWithoutPassword) {
  auto port = std::to_string(unused_port());
  auto bad = "postgresql://postgres:secretpw@127.0.0.1:" + port + "/x";
  auto start = std::chrono::steady_clock::now();
  auto store = pg_store::open(bad, short_budget(300ms));
  auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::unavailable));
  auto text = hsm::describe(store.error());
  EXPECT_TRUE(contains(text, "127.0.0.1:" + port));
  EXPECT_FALSE(contains(text, "secretpw"));
  EXPECT_GE(elapsed, 300ms);
  EXPECT_LT(elapsed, 1500ms);
  // The key=value form too.
  auto kv = pg_store::open("host=127.0.0.1 port=" + port
                             + " user=postgres password='secretpw' dbname=x",
                           short_budget(100ms));
  ASSERT_FALSE(kv);
  EXPECT_TRUE(is_store_error(kv.error(), hsm::store_errc::unavailable));
  EXPECT_TRUE(contains(hsm::describe(kv.error()), "127.0.0.1:" + port));
  EXPECT_FALSE(contains(hsm::describe(kv.error()), "secretpw"));
}

TEST_F(PgStoreTest, MultiHostUrlSkipsADeadHost) {
  // postgresql://user@host:port/db: put a dead host in front of the live one.
  auto at = url.find('@');
  auto slash = url.find('/', at);
  ASSERT_NE(at, std::string::npos) << url;
  ASSERT_NE(slash, std::string::npos) << url;
  auto multi = url.substr(0, at + 1) + "127.0.0.1:"
               + std::to_string(unused_port()) + ","
               + url.substr(at + 1);
  auto store = pg_store::open(multi, short_budget(5s));
  ASSERT_TRUE(store) << hsm::describe(store.error());
  ASSERT_TRUE((*store)->put(sample_key("multi", hsm::scheme::p256, 1)));
  EXPECT_EQ((*store)->connects(), 1u);
}

TEST_F(PgStoreTest, ReadOnlyServerIsRetriedThenUnavailable) {
  ASSERT_EQ(admin_sql("ALTER DATABASE " + db_name
                      + " SET default_transaction_read_only = on"),
            "<none>");
  auto start = std::chrono::steady_clock::now();
  auto store = pg_store::open(url, short_budget(400ms));
  auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::unavailable));
  EXPECT_TRUE(contains(hsm::describe(store.error()), "read-only"));
  EXPECT_GE(elapsed, 400ms);
  ASSERT_EQ(admin_sql("ALTER DATABASE " + db_name
                      + " RESET default_transaction_read_only"),
            "<none>");
  auto ok = pg_store::open(url, short_budget(2s));
  ASSERT_TRUE(ok) << hsm::describe(ok.error());
  EXPECT_EQ((*ok)->connects(), 1u);
}

TEST_F(PgStoreTest, StoreLeavesAServerThatTurnedReadOnly) {
  auto store = open_store(short_budget(400ms));
  ASSERT_NE(store, nullptr);
  ASSERT_EQ(admin_sql("ALTER DATABASE " + db_name
                      + " SET default_transaction_read_only = on"),
            "<none>");
  // Sessions pick the setting up when they start: end the store's.
  terminate_other_backends();
  auto put = store->put(sample_key("ro", hsm::scheme::p256, 1));
  ASSERT_FALSE(put);
  EXPECT_TRUE(is_store_error(put.error(), hsm::store_errc::unavailable));
  ASSERT_EQ(admin_sql("ALTER DATABASE " + db_name
                      + " RESET default_transaction_read_only"),
            "<none>");
  // The same store recovers once the server takes writes again.
  auto again = store->put(sample_key("ro", hsm::scheme::p256, 1));
  ASSERT_TRUE(again) << hsm::describe(again.error());
  EXPECT_TRUE(again->inserted);
}

} // namespace
