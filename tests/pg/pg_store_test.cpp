// The PostgreSQL key store against a real server: the key-store contract
// (tests/support/key_store_contract.hpp), plus what only a server brings:
// drivers racing on one database, lost connections, restarts, crashes,
// unreachable and read-only servers, server-side SQL errors. Each test runs
// on a database of its own (tests/support/pg_cluster.hpp).

#include "store/pg_store.hpp"

#include "messages/errors.hpp"
#include "messages/scheme.hpp"
#include "store/pg_conninfo.hpp"
#include "tests/support/key_store_contract.hpp"
#include "tests/support/pg_cluster.hpp"
#include "tests/support/wait.hpp"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <pqxx/pqxx>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <functional>
#include <latch>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

namespace hsm::store {

/// Prints a commit level in test failures.
void PrintTo(const key_write_commit& x, std::ostream* os) {
  *os << "{" << x.level << (x.forced ? ", forced}" : "}");
}

} // namespace hsm::store

namespace {

using namespace std::chrono_literals;
using hsm::store::key_store;
using hsm::store::migration;
using hsm::store::pg_options;
using hsm::store::pg_store;
using hsm::test::contains;
using hsm::test::expect_same_key;
using hsm::test::is_store_error;
using hsm::test::sample_key;

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

/// `url` with the libpq setting `keyword` = `value` added (`value` holds no
/// quote, backslash, `&` or `%`).
std::string with_option(const std::string& url, const std::string& keyword,
                        const std::string& value) {
  if (!hsm::store::is_conninfo_uri(url))
    return url + " " + keyword + "='" + value + "'";
  std::string encoded;
  for (auto ch : value) {
    if (ch == ' ')
      encoded += "%20";
    else if (ch == '=')
      encoded += "%3D";
    else
      encoded += ch;
  }
  auto sep = url.find('?') == std::string::npos ? "?" : "&";
  return url + sep + keyword + "=" + encoded;
}

/// `url` with a second host in front of its host list that nothing listens
/// on (`postgresql://user@host:port/db` form), or "" for another form.
std::string with_dead_host_first(const std::string& url) {
  auto at = url.find('@');
  if (!hsm::store::is_conninfo_uri(url) || at == std::string::npos
      || url.find('/', at) == std::string::npos)
    return {};
  return url.substr(0, at + 1) + "127.0.0.1:" + std::to_string(unused_port())
         + "," + url.substr(at + 1);
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

// -- the contract -------------------------------------------------------------

/// The PostgreSQL back end of the key-store contract: a database of its own
/// on the test cluster.
struct pg_traits {
  /// The database's URL.
  using location = std::string;

  /// A new database, or "" after a test failure.
  static location fresh_location() {
    return hsm::test::fresh_database();
  }

  /// Drops the database.
  static void remove_location(const location& url) {
    hsm::test::drop_database(url);
  }

  static std::vector<migration> migrations() {
    return hsm::store::postgres_migrations();
  }

  static caf::expected<std::unique_ptr<key_store>>
  open(const location& url, std::vector<migration> ms) {
    auto store = pg_store::open(url, {}, std::move(ms));
    if (!store)
      return std::move(store.error());
    return std::unique_ptr<key_store>{std::move(*store)};
  }

  static std::string exec(const location& url, const std::string& sql) {
    auto out = ::scalar(url, sql);
    return out.starts_with("<error") ? out : std::string{};
  }

  static std::string scalar(const location& url, const std::string& sql) {
    return ::scalar(url, sql);
  }

  static std::string table_count(const location& url,
                                 const std::string& table) {
    return ::scalar(url, "SELECT COUNT(*) FROM information_schema.tables "
                         "WHERE table_name = '"
                           + table + "'");
  }

  /// Transactions that wrote the rows of `keys`: each row's xmin is the id
  /// of the transaction that inserted it.
  static int64_t commits(const location& url) {
    auto n = ::scalar(url, "SELECT COUNT(DISTINCT xmin::text) FROM keys");
    int64_t out = -1;
    auto [end, ec] = std::from_chars(n.data(), n.data() + n.size(), out);
    if (ec != std::errc{} || end != n.data() + n.size()) {
      ADD_FAILURE() << "counting transactions: " << n;
      return -1;
    }
    return out;
  }

  /// The CHECK constraint guards the column; drop it to damage the row.
  static std::string corrupt_scheme(const location& url,
                                    const std::string& key_id) {
    auto out = exec(url, "ALTER TABLE keys DROP CONSTRAINT keys_scheme_check");
    if (!out.empty())
      return out;
    return exec(url, "UPDATE keys SET scheme = 'schnorr' WHERE key_id = '"
                       + key_id + "'");
  }
};

// -- fixture ------------------------------------------------------------------

/// A fresh database per test, dropped afterwards.
class PgStoreTest : public ::testing::Test {
protected:
  void SetUp() override {
    url = pg_traits::fresh_location();
    ASSERT_FALSE(url.empty()) << "no PostgreSQL test database (see above)";
    db_name = scalar(url, "SELECT current_database()");
  }

  void TearDown() override {
    pg_traits::remove_location(url);
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

TEST_F(PgStoreTest, OpenAppliesTheLatestSchemaVersion) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  auto version = store->schema_version();
  ASSERT_TRUE(version) << hsm::describe(version.error());
  EXPECT_EQ(*version, 4);
  EXPECT_EQ(store->connects(), 1u);
  EXPECT_EQ(sql("SELECT COUNT(*) FROM schema_migrations"), "4");
  EXPECT_EQ(sql("SELECT string_agg(name, ' ' ORDER BY version) FROM "
                "schema_migrations"),
            "0001_init.sql 0002_row_mac.sql 0003_rotation.sql "
            "0004_audit.sql");
  EXPECT_EQ(sql("SELECT COUNT(*) FROM information_schema.tables "
                "WHERE table_name IN ('keys', 'master_key_canary', "
                "'master_key_rotation', 'audit_log')"),
            "4");
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
    EXPECT_EQ(scalar(db, "SELECT COUNT(*) FROM schema_migrations"), "4");
    EXPECT_EQ(scalar(db, "SELECT MAX(version) FROM schema_migrations"), "4");
    if (round != 0)
      hsm::test::drop_database(db);
  }
}

// -- server-side errors -------------------------------------------------------

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

TEST_F(PgStoreTest, GroupIsRetriedWholeOnANewConnection) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("before", hsm::scheme::p256, 1)));
  terminate_other_backends();
  auto group = hsm::test::sample_group("g-", 10, 2);
  group.push_back(sample_key("before", hsm::scheme::p256, 3));
  auto put = store->put_many(group);
  ASSERT_TRUE(put) << hsm::describe(put.error());
  ASSERT_EQ(put->size(), group.size());
  for (size_t i = 0; i < 10; ++i)
    EXPECT_TRUE((*put)[i].inserted) << group[i].key_id;
  EXPECT_FALSE(put->back().inserted);
  EXPECT_EQ(store->connects(), 2u);
  EXPECT_EQ(sql("SELECT COUNT(*) FROM keys"), "11");
  EXPECT_EQ(sql("SELECT COUNT(DISTINCT xmin::text) FROM keys"), "2");
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
    auto res = store->put(
      sample_key("restart-" + std::to_string(i), s, static_cast<uint8_t>(i)));
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
               + std::to_string(unused_port()) + "," + url.substr(at + 1);
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

TEST_F(PgStoreTest, ReadOnlyStoreReadsMigratesNothingAndCannotWrite) {
  {
    auto store = open_store();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->put(sample_key("ro1", hsm::scheme::p256, 1)));
  }
  auto ro_opts = short_budget(400ms);
  ro_opts.read_only = true;
  {
    auto ro = pg_store::open(url, ro_opts);
    ASSERT_TRUE(ro) << hsm::describe(ro.error());
    auto rows = (*ro)->pending_rows("\n", "", 10);
    ASSERT_TRUE(rows) << hsm::describe(rows.error());
    EXPECT_EQ(rows->size(), 1u);
    // The server refuses the write (SQLSTATE 25006, which the store takes
    // for a read-only server and gives up on after its budget).
    EXPECT_FALSE((*ro)->put(sample_key("ro2", hsm::scheme::p256, 2)));
    EXPECT_EQ(sql("SELECT COUNT(*) FROM keys"), "1");
  }
  // A read-only server (a standby, a copy set read-only) is fine for it.
  ASSERT_EQ(admin_sql("ALTER DATABASE " + db_name
                      + " SET default_transaction_read_only = on"),
            "<none>");
  auto on_ro_server = pg_store::open(url, ro_opts);
  EXPECT_TRUE(on_ro_server) << hsm::describe(on_ro_server.error());
  ASSERT_EQ(admin_sql("ALTER DATABASE " + db_name
                      + " RESET default_transaction_read_only"),
            "<none>");
  // An older schema is refused, not migrated.
  ASSERT_EQ(sql("DELETE FROM schema_migrations WHERE version = 4"), "<none>");
  auto old = pg_store::open(url, ro_opts);
  ASSERT_FALSE(old);
  EXPECT_TRUE(contains(hsm::describe(old.error()), "older"))
    << hsm::describe(old.error());
  EXPECT_EQ(sql("SELECT MAX(version) FROM schema_migrations"), "3");
}

// -- durability ---------------------------------------------------------------

TEST(PgDurabilityTest, KeyWritesCommitWithAtLeastOn) {
  using hsm::store::key_write_commit;
  using hsm::store::key_write_commit_level;
  // Weaker levels are raised to `on` for key writes.
  for (auto weak : {"off", "local", "remote_write", "OFF", "false", "0", "",
                    "something_new"}) {
    SCOPED_TRACE(weak);
    EXPECT_EQ(key_write_commit_level(weak), (key_write_commit{"on", true}));
  }
  // `on` (in any spelling) and the stronger `remote_apply` are kept.
  for (auto on : {"on", "ON", " on ", "true", "yes", "1"}) {
    SCOPED_TRACE(on);
    EXPECT_EQ(key_write_commit_level(on), (key_write_commit{"on", false}));
  }
  EXPECT_EQ(key_write_commit_level("remote_apply"),
            (key_write_commit{"remote_apply", false}));
}

TEST(PgDurabilityTest, FailoverWarningNeedsSeveralHostsAndNoSyncStandby) {
  using hsm::store::failover_warning;
  // One host: a failover does not move the store; nothing to say.
  EXPECT_EQ(failover_warning(1, ""), "");
  EXPECT_EQ(failover_warning(0, ""), "");
  // Several hosts and a synchronous standby: fine.
  EXPECT_EQ(failover_warning(2, "ANY 1 (standby1, standby2)"), "");
  EXPECT_EQ(failover_warning(3, "*"), "");
  // Several hosts, asynchronous replication: say what is lost and what to
  // configure.
  for (auto names : {"", "  "}) {
    auto text = failover_warning(2, names);
    EXPECT_TRUE(contains(text, "synchronous_standby_names")) << text;
    EXPECT_TRUE(contains(text, "ANY 1")) << text;
    EXPECT_TRUE(contains(text, "synchronous_commit = on")) << text;
    EXPECT_TRUE(contains(text, "remote_apply")) << text;
    EXPECT_TRUE(contains(text, "second key")) << text;
  }
}

/// Records, for every row written to the store's tables, the table and the
/// `synchronous_commit` in force in the writing transaction (a trigger runs
/// inside it).
class PgCommitLevelTest : public PgStoreTest {
protected:
  /// Opens the store on `store_url` (its migrations make the tables), then
  /// installs the triggers.
  std::unique_ptr<pg_store> open_watched(const std::string& store_url) {
    auto store = pg_store::open(store_url);
    EXPECT_TRUE(store) << hsm::describe(store.error());
    if (!store)
      return nullptr;
    auto out = sql(
      "CREATE TABLE commit_levels (n SERIAL PRIMARY KEY, tbl TEXT, "
      "level TEXT);"
      "CREATE FUNCTION record_level() RETURNS trigger LANGUAGE plpgsql AS $$ "
      "BEGIN INSERT INTO commit_levels (tbl, level) VALUES (TG_TABLE_NAME, "
      "current_setting('synchronous_commit')); RETURN NEW; END $$;"
      "CREATE TRIGGER w BEFORE INSERT OR UPDATE ON keys FOR EACH ROW "
      "EXECUTE FUNCTION record_level();"
      "CREATE TRIGGER w BEFORE INSERT OR UPDATE ON master_key_canary "
      "FOR EACH ROW EXECUTE FUNCTION record_level();"
      "CREATE TRIGGER w BEFORE INSERT OR UPDATE ON master_key_rotation "
      "FOR EACH ROW EXECUTE FUNCTION record_level();");
    EXPECT_FALSE(out.starts_with("<error")) << out;
    return std::move(*store);
  }

  /// "table:level" of each recorded write, in order, then forgets them.
  std::string take_levels() {
    auto out = sql("SELECT COALESCE(string_agg(tbl || ':' || level, ' ' "
                   "ORDER BY n), '') FROM commit_levels");
    sql("DELETE FROM commit_levels");
    return out;
  }

  /// Every kind of key write, once each.
  void write_everything(pg_store& store) {
    auto rec = sample_key("k1", hsm::scheme::p256, 1);
    ASSERT_TRUE(store.put(rec));
    ASSERT_TRUE(store.put_many({sample_key("k2", hsm::scheme::p256, 2)}));
    auto next = rec;
    next.key_blob.push_back(0x01);
    next.master_key_id = "master-new";
    auto swapped = store.replace_row(rec, next);
    ASSERT_TRUE(swapped && *swapped);
    auto canary = hsm::test::sample_canary(1);
    ASSERT_TRUE(store.put_canary(canary));
    auto moved = canary;
    moved.master_key_label = "master-new";
    auto replaced = store.replace_canary(canary, moved);
    ASSERT_TRUE(replaced && *replaced);
    hsm::store::rotation_record r{"master-1", "master-new",
                                  hsm::store::rotation_phase::running, 1, 0};
    auto set = store.set_rotation(std::nullopt, r);
    ASSERT_TRUE(set && *set);
  }

  static constexpr const char* every_write
    = "keys:{0} keys:{0} keys:{0} master_key_canary:{0} "
      "master_key_canary:{0} master_key_rotation:{0}";

  /// `every_write` with each level `level`.
  static std::string every_write_at(const std::string& level) {
    std::string out = every_write;
    for (auto pos = out.find("{0}"); pos != std::string::npos;
         pos = out.find("{0}", pos))
      out.replace(pos, 3, level);
    return out;
  }
};

TEST_F(PgCommitLevelTest, KeyWritesCommitWithOnWhenTheUrlTurnsItOff) {
  auto off_url = with_option(url, "options", "-c synchronous_commit=off");
  auto store = open_watched(off_url);
  ASSERT_NE(store, nullptr);
  // The URL's setting reaches the session, and the trigger sees it: a
  // plain insert on such a connection records `off`.
  {
    pqxx::connection raw{off_url};
    pqxx::nontransaction tx{raw};
    EXPECT_EQ(tx.exec1("SHOW synchronous_commit")[0].as<std::string>(), "off");
    tx.exec0("INSERT INTO keys (key_id, scheme, public_key, key_blob, "
             "wrap_mechanism, created_at_ms) VALUES ('raw', 'p256', '', '', "
             "'x', 0)");
  }
  EXPECT_EQ(take_levels(), "keys:off");
  write_everything(*store);
  EXPECT_EQ(take_levels(), every_write_at("on"));
  // A new connection (after a lost one) reads the session's level again.
  terminate_other_backends();
  ASSERT_TRUE(store->put(sample_key("k3", hsm::scheme::p256, 3)));
  EXPECT_GE(store->connects(), 2u);
  EXPECT_EQ(take_levels(), "keys:on");
}

TEST_F(PgCommitLevelTest, KeyWritesKeepAStrongerLevelFromTheUrl) {
  // remote_apply waits for nothing on a server without synchronous
  // standbys, like this one; it must not be lowered to `on`.
  auto strong_url = with_option(url, "options",
                                "-c synchronous_commit=remote_apply");
  auto store = open_watched(strong_url);
  ASSERT_NE(store, nullptr);
  write_everything(*store);
  EXPECT_EQ(take_levels(), every_write_at("remote_apply"));
}

TEST_F(PgCommitLevelTest, KeyWritesCommitWithTheServersOnByDefault) {
  ASSERT_EQ(sql("SHOW synchronous_commit"), "on");
  auto store = open_watched(url);
  ASSERT_NE(store, nullptr);
  write_everything(*store);
  EXPECT_EQ(take_levels(), every_write_at("on"));
}

TEST_F(PgStoreTest, MultiHostUrlWithoutSynchronousStandbyIsWarnedAtOpen) {
  // The test server replicates to nobody.
  ASSERT_EQ(sql("SHOW synchronous_standby_names"), "");
  auto one = open_store();
  ASSERT_NE(one, nullptr);
  EXPECT_EQ(one->replication_warning(), "");
  auto multi = with_dead_host_first(url);
  ASSERT_FALSE(multi.empty()) << url;
  auto store = pg_store::open(multi, short_budget(5s));
  ASSERT_TRUE(store) << hsm::describe(store.error());
  auto warning = (*store)->replication_warning();
  EXPECT_TRUE(contains(warning, "synchronous_standby_names")) << warning;
  EXPECT_TRUE(contains(warning, "2 hosts")) << warning;
  // The store works all the same.
  ASSERT_TRUE((*store)->put(sample_key("multi", hsm::scheme::p256, 1)));
}

TEST_F(PgStoreTest, APrimaryWithoutSynchronousStandbyIsWarnedAtEachConnect) {
  // The primary names a synchronous standby at open (none is connected:
  // nothing is written meanwhile, which would wait for it), then loses it;
  // the store's next connection, as after a failover, warns.
  ASSERT_NE(open_store(), nullptr); // the schema is in place
  struct on_exit {
    std::function<void()> f;
    ~on_exit() {
      f();
    }
  } restore{[this] {
    sql("ALTER SYSTEM RESET synchronous_standby_names");
    sql("SELECT pg_reload_conf()");
  }};
  sql("ALTER SYSTEM SET synchronous_standby_names = 'standby_x'");
  sql("SELECT pg_reload_conf()");
  ASSERT_TRUE(hsm::test::wait_until(
    [&] { return sql("SHOW synchronous_standby_names") == "standby_x"; }, 10s,
    "the server to take the setting"));
  auto multi = with_dead_host_first(url);
  ASSERT_FALSE(multi.empty()) << url;
  auto store = pg_store::open(multi, short_budget(5s));
  ASSERT_TRUE(store) << hsm::describe(store.error());
  EXPECT_EQ((*store)->replication_warning(), "");
  sql("ALTER SYSTEM RESET synchronous_standby_names");
  sql("SELECT pg_reload_conf()");
  ASSERT_TRUE(hsm::test::wait_until(
    [&] { return sql("SHOW synchronous_standby_names").empty(); }, 10s,
    "the server to drop the setting"));
  terminate_other_backends();
  auto before = (*store)->connects();
  ASSERT_TRUE((*store)->get("anything"));
  EXPECT_GT((*store)->connects(), before);
  auto warning = (*store)->replication_warning();
  EXPECT_TRUE(contains(warning, "synchronous_standby_names")) << warning;
}

} // namespace

// The contract, on this back end (in the suite's namespace, where the
// instantiation macro looks for it).
namespace hsm::test {

INSTANTIATE_TYPED_TEST_SUITE_P(Postgres, KeyStoreContractTest, pg_traits);

} // namespace hsm::test

// -- deadlines ----------------------------------------------------------------

namespace {

class PgDeadlineTest : public PgStoreTest {
protected:
  /// Records the deadlines of the session that writes a key row.
  void watch_deadlines() {
    auto out = sql(
      "CREATE TABLE seen (n SERIAL PRIMARY KEY, d TEXT);"
      "CREATE FUNCTION record_deadlines() RETURNS trigger LANGUAGE plpgsql "
      "AS $$ BEGIN INSERT INTO seen (d) VALUES ("
      "current_setting('statement_timeout') || ' ' || "
      "current_setting('lock_timeout') || ' ' || "
      "current_setting('idle_in_transaction_session_timeout')); RETURN NEW; "
      "END $$;"
      "CREATE TRIGGER d BEFORE INSERT ON keys FOR EACH ROW EXECUTE FUNCTION "
      "record_deadlines();");
    ASSERT_FALSE(out.starts_with("<error")) << out;
  }
};

TEST_F(PgDeadlineTest, EverySessionHasStatementLockAndIdleDeadlines) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  watch_deadlines();
  ASSERT_TRUE(store->put(sample_key("d1", hsm::scheme::p256, 1)));
  EXPECT_EQ(sql("SELECT d FROM seen"), "10s 5s 1min");
}

TEST_F(PgDeadlineTest, TheUrlOverridesADeadline) {
  auto opened = pg_store::open(
    with_option(url, "options", "-c lock_timeout=250ms"), pg_options{});
  ASSERT_TRUE(opened) << hsm::describe(opened.error());
  auto& store = *opened;
  watch_deadlines();
  ASSERT_TRUE(store->put(sample_key("d1", hsm::scheme::p256, 1)));
  EXPECT_EQ(sql("SELECT d FROM seen"), "10s 250ms 1min");
}

TEST_F(PgDeadlineTest, ALockHeldForeverFailsAPutInsteadOfBlockingIt) {
  pg_options opts;
  opts.retry_budget = std::chrono::milliseconds{1500};
  auto opened = pg_store::open(
    with_option(url, "options", "-c lock_timeout=200ms"), opts);
  ASSERT_TRUE(opened) << hsm::describe(opened.error());
  auto& store = *opened;
  // Another session holds the table and never lets go.
  pqxx::connection holder{url};
  pqxx::work tx{holder};
  tx.exec0("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE");
  auto start = std::chrono::steady_clock::now();
  auto put = store->put(sample_key("blocked", hsm::scheme::p256, 1));
  auto took = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(put);
  EXPECT_EQ(put.error().category(), caf::atom("store"))
    << hsm::describe(put.error());
  EXPECT_LT(took, std::chrono::seconds{10});
  tx.abort();
  // Once the lock is gone the same store writes again.
  EXPECT_TRUE(store->put(sample_key("after", hsm::scheme::p256, 2)));
}

} // namespace
