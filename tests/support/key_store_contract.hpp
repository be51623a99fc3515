#pragma once

// Test support: the key-store contract (store/key_store.hpp) as one typed
// GoogleTest suite that every back end runs. A back end's test file defines
// a traits struct and instantiates the suite with it:
//
//   INSTANTIATE_TYPED_TEST_SUITE_P(Sqlite, KeyStoreContractTest,
//                                  sqlite_traits);
//
// The traits struct has these static members (see sqlite_store_test.cpp and
// pg_store_test.cpp):
//
//   using location = ...;  // where one test's database lives; empty = none
//   location fresh_location();  // a new, empty database, or empty after
//                               // adding a test failure
//   void remove_location(const location&);
//   std::vector<migration> migrations();  // the back end's own list
//   caf::expected<std::unique_ptr<key_store>>
//   open(const location&, std::vector<migration>);
//   std::string exec(const location&, const std::string& sql);  // "" or
//                                                               // error
//   std::string scalar(const location&, const std::string& sql);  // first
//                    // column of the first row as text, "<none>" if none
//   std::string table_count(const location&, const std::string& table);
//   std::string corrupt_scheme(const location&, const std::string& key_id);
//                    // sets the key's scheme to 'schnorr'; "" or error
//   int64_t commits(const location&);  // seen from outside the store: a
//                    // count that grows by one with each committed
//                    // transaction that wrote rows of `keys` (-1: error)
//
// SQL given to `exec` and `scalar` is the dialect both back ends accept.

#include "messages/errors.hpp"
#include "messages/scheme.hpp"
#include "store/audit.hpp"
#include "store/key_store.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <latch>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace hsm::test {

// -- helpers ------------------------------------------------------------------

/// Passes if `err` is the store error `code`.
inline ::testing::AssertionResult is_store_error(const caf::error& err,
                                                 hsm::store_errc code) {
  if (err.category() == caf::atom("store")
      && err.code() == static_cast<uint8_t>(code))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "expected store: " << hsm::to_string(code) << ", got "
         << hsm::describe(err);
}

/// Passes if `text` contains `part`.
inline ::testing::AssertionResult contains(const std::string& text,
                                           const std::string& part) {
  if (text.find(part) != std::string::npos)
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << text << "' does not contain '" << part << "'";
}

/// The highest migration version `Traits` ships.
template <class Traits>
int latest_version() {
  int v = 0;
  for (const auto& m : Traits::migrations())
    v = std::max(v, static_cast<int>(m.version));
  return v;
}

/// A plausible wrapped key of `s` (the blob holds zero bytes on purpose).
inline hsm::key_record sample_key(std::string key_id, hsm::scheme s,
                                  uint8_t seed) {
  hsm::key_record rec;
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
  rec.wrap_mechanism = std::string{hsm::aes_key_wrap_pad};
  rec.created_at_ms = 1'700'000'000'000 + seed;
  rec.master_key_id = "master-" + std::to_string(seed);
  rec.row_mac.assign(32, static_cast<uint8_t>(seed + 7));
  return rec;
}

/// A canary whose bytes depend on `seed`.
inline hsm::store::canary_record sample_canary(uint8_t seed) {
  hsm::store::canary_record c;
  c.public_key.assign(65, seed);
  c.public_key[0] = 0x04;
  c.wrapped_key.assign(40, static_cast<uint8_t>(seed + 1));
  c.wrap_mechanism = std::string{hsm::aes_key_wrap_pad};
  c.master_key_label = "master-" + std::to_string(seed);
  c.created_at_ms = 1'700'000'000'000 + seed;
  return c;
}

/// Expects every field of `x` and `y` to be equal.
inline void expect_same_key(const hsm::key_record& x,
                            const hsm::key_record& y) {
  EXPECT_EQ(x.key_id, y.key_id);
  EXPECT_EQ(hsm::to_string(x.scheme), hsm::to_string(y.scheme));
  EXPECT_EQ(x.public_key, y.public_key);
  EXPECT_EQ(x.key_blob, y.key_blob);
  EXPECT_EQ(x.wrap_mechanism, y.wrap_mechanism);
  EXPECT_EQ(x.created_at_ms, y.created_at_ms);
  EXPECT_EQ(x.format_version, y.format_version);
  EXPECT_EQ(x.master_key_id, y.master_key_id);
  EXPECT_EQ(x.row_mac, y.row_mac);
}

/// Expects every field of `x` and `y` to be equal.
inline void expect_same_canary(const hsm::store::canary_record& x,
                               const hsm::store::canary_record& y) {
  EXPECT_EQ(x.public_key, y.public_key);
  EXPECT_EQ(x.wrapped_key, y.wrapped_key);
  EXPECT_EQ(x.wrap_mechanism, y.wrap_mechanism);
  EXPECT_EQ(x.master_key_label, y.master_key_label);
  EXPECT_EQ(x.created_at_ms, y.created_at_ms);
}

// -- fixture ------------------------------------------------------------------

/// A fresh database per test (from `Traits`), removed afterwards.
template <class Traits>
class KeyStoreContractTest : public ::testing::Test {
protected:
  void SetUp() override {
    where = Traits::fresh_location();
    ASSERT_FALSE(where.empty()) << "no database for the test (see above)";
  }

  void TearDown() override {
    if (!where.empty())
      Traits::remove_location(where);
  }

  /// Opens this test's database with `ms`.
  caf::expected<std::unique_ptr<hsm::store::key_store>>
  open(std::vector<hsm::store::migration> ms = Traits::migrations()) {
    return Traits::open(where, std::move(ms));
  }

  /// Opens this test's database, failing the test on error.
  std::unique_ptr<hsm::store::key_store> open_store() {
    auto store = open();
    EXPECT_TRUE(store) << hsm::describe(store.error());
    if (!store)
      return nullptr;
    return std::move(*store);
  }

  /// Runs statements on this test's database; "" or the error.
  std::string exec(const std::string& statements) {
    return Traits::exec(where, statements);
  }

  /// The first column of the first row of `query` on this test's database.
  std::string sql(const std::string& query) {
    return Traits::scalar(where, query);
  }

  /// How many tables named `table` this test's database has, as text.
  std::string table_count(const std::string& table) {
    return Traits::table_count(where, table);
  }

  typename Traits::location where;
};

TYPED_TEST_SUITE_P(KeyStoreContractTest);

// -- opening and migrations ---------------------------------------------------

TYPED_TEST_P(KeyStoreContractTest, ReopenKeepsVersionAndData) {
  auto rec = sample_key("k1", hsm::scheme::secp256k1, 7);
  {
    auto store = this->open_store();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->put(rec));
  }
  for (int i = 0; i < 2; ++i) {
    auto store = this->open_store();
    ASSERT_NE(store, nullptr);
    auto version = store->schema_version();
    ASSERT_TRUE(version) << hsm::describe(version.error());
    EXPECT_EQ(*version, latest_version<TypeParam>());
    auto got = store->get("k1");
    ASSERT_TRUE(got) << hsm::describe(got.error());
    ASSERT_TRUE(got->has_value());
    expect_same_key(**got, rec);
  }
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM schema_migrations"),
            std::to_string(latest_version<TypeParam>()));
}

TYPED_TEST_P(KeyStoreContractTest, AppliesNewMigrationsOnReopen) {
  ASSERT_NE(this->open_store(), nullptr);
  auto migrations = TypeParam::migrations();
  auto next = latest_version<TypeParam>() + 1;
  migrations.push_back(hsm::store::migration{
    next, "0099_extra.sql", "CREATE TABLE extra (x INTEGER);"});
  auto store = this->open(migrations);
  ASSERT_TRUE(store) << hsm::describe(store.error());
  auto version = (*store)->schema_version();
  ASSERT_TRUE(version) << hsm::describe(version.error());
  EXPECT_EQ(*version, next);
  EXPECT_EQ(this->table_count("extra"), "1");
  store->reset();
  // An older build now refuses the database.
  auto old = this->open();
  ASSERT_FALSE(old);
  EXPECT_TRUE(is_store_error(old.error(), hsm::store_errc::schema_too_new));
}

TYPED_TEST_P(KeyStoreContractTest, FailedMigrationAppliesNothing) {
  ASSERT_NE(this->open_store(), nullptr);
  auto migrations = TypeParam::migrations();
  migrations.push_back(hsm::store::migration{latest_version<TypeParam>() + 1,
                                             "0002_broken.sql",
                                             "CREATE TABLE extra (x INTEGER);"
                                             "SELECT nonsense FROM nowhere;"});
  auto store = this->open(migrations);
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::query_failed));
  EXPECT_TRUE(contains(hsm::describe(store.error()), "0002_broken.sql"));
  EXPECT_EQ(this->sql("SELECT MAX(version) FROM schema_migrations"),
            std::to_string(latest_version<TypeParam>()));
  EXPECT_EQ(this->table_count("extra"), "0");
}

TYPED_TEST_P(KeyStoreContractTest, NewerSchemaIsRefused) {
  ASSERT_EQ(this->exec("CREATE TABLE schema_migrations ("
                       "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                       "applied_at_ms BIGINT NOT NULL)"),
            "");
  ASSERT_EQ(this->exec("INSERT INTO schema_migrations VALUES "
                       "(1, '0001_init.sql', 0), (99, '0099_future.sql', 0)"),
            "");
  auto start = std::chrono::steady_clock::now();
  auto store = this->open();
  ASSERT_FALSE(store);
  EXPECT_TRUE(is_store_error(store.error(), hsm::store_errc::schema_too_new));
  auto text = hsm::describe(store.error());
  EXPECT_TRUE(contains(text, "99"));
  EXPECT_TRUE(
    contains(text, "migration " + std::to_string(latest_version<TypeParam>())));
  // Not retried: the answer will not change.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds{5});
  // Nothing was written.
  EXPECT_EQ(this->table_count("keys"), "0");
}

// -- keys ---------------------------------------------------------------------

TYPED_TEST_P(KeyStoreContractTest, PutThenGetRoundTripsEveryField) {
  auto store = this->open_store();
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
  EXPECT_EQ(this->sql("SELECT length(key_blob) FROM keys "
                      "WHERE key_id = 'all-bytes'"),
            "256");
}

TYPED_TEST_P(KeyStoreContractTest, ResidentKeyRoundTrips) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto rec = sample_key("resident-1", hsm::scheme::p256, 9);
  rec.key_blob = {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08};
  rec.wrap_mechanism = std::string{hsm::resident_mechanism};
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

TYPED_TEST_P(KeyStoreContractTest, EmptyBlobRoundTrips) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto rec = sample_key("empty-blob", hsm::scheme::ed25519, 5);
  rec.key_blob.clear();
  ASSERT_TRUE(store->put(rec));
  auto got = store->get("empty-blob");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_key(**got, rec);
  // Stored as an empty blob, not as NULL.
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "1");
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys WHERE key_blob IS NULL"), "0");
}

TYPED_TEST_P(KeyStoreContractTest, SecondPutWithSameKeyIdReturnsFirstRecord) {
  auto store = this->open_store();
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
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "1");
}

TYPED_TEST_P(KeyStoreContractTest, GetOfUnknownKeyIdIsNullopt) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto got = store->get("nobody");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  EXPECT_FALSE(got->has_value());
  auto empty = store->get("");
  ASSERT_TRUE(empty) << hsm::describe(empty.error());
  EXPECT_FALSE(empty->has_value());
}

TYPED_TEST_P(KeyStoreContractTest, CorruptSchemeIsCorruptRow) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("bad-scheme", hsm::scheme::p256, 3)));
  ASSERT_EQ(TypeParam::corrupt_scheme(this->where, "bad-scheme"), "");
  auto got = store->get("bad-scheme");
  ASSERT_FALSE(got);
  EXPECT_TRUE(is_store_error(got.error(), hsm::store_errc::corrupt_row));
  EXPECT_TRUE(contains(hsm::describe(got.error()), "bad-scheme"));
  // A put that hits the damaged row reports it too.
  auto put = store->put(sample_key("bad-scheme", hsm::scheme::p256, 4));
  ASSERT_FALSE(put);
  EXPECT_TRUE(is_store_error(put.error(), hsm::store_errc::corrupt_row));
}

TYPED_TEST_P(KeyStoreContractTest, RacingStoresKeepOneRecordPerKeyId) {
  constexpr int n = 200;
  auto store_a = this->open_store();
  auto store_b = this->open_store();
  ASSERT_NE(store_a, nullptr);
  ASSERT_NE(store_b, nullptr);
  struct outcome {
    std::vector<hsm::put_result> results;
    std::vector<std::string> errors;
  };
  outcome out_a;
  outcome out_b;
  std::latch start{2};
  auto run = [&](hsm::store::key_store& store, uint8_t tag, outcome& out) {
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
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), std::to_string(n));
  EXPECT_EQ(this->sql("SELECT COUNT(DISTINCT key_id) FROM keys"),
            std::to_string(n));
}

// -- groups of puts -----------------------------------------------------------

/// `n` records with distinct key ids `prefix0`, `prefix1`, ..., all schemes.
inline std::vector<hsm::key_record> sample_group(const std::string& prefix,
                                                 size_t n, uint8_t seed) {
  std::vector<hsm::key_record> out;
  for (size_t i = 0; i < n; ++i) {
    auto rec = sample_key(prefix + std::to_string(i), hsm::all_schemes[i % 3],
                          seed);
    rec.public_key[1] = static_cast<uint8_t>(i);
    out.push_back(std::move(rec));
  }
  return out;
}

TYPED_TEST_P(KeyStoreContractTest, PutManyCommitsTheWholeGroup) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto group = sample_group("g-", 20, 3);
  auto put = store->put_many(group);
  ASSERT_TRUE(put) << hsm::describe(put.error());
  ASSERT_EQ(put->size(), group.size());
  for (size_t i = 0; i < group.size(); ++i) {
    SCOPED_TRACE(group[i].key_id);
    EXPECT_TRUE((*put)[i].inserted);
    expect_same_key((*put)[i].record, group[i]);
  }
  // Visible to everyone once put_many returns: another connection sees all.
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "20");
  auto other = this->open_store();
  ASSERT_NE(other, nullptr);
  for (const auto& rec : group) {
    auto got = other->get(rec.key_id);
    ASSERT_TRUE(got) << hsm::describe(got.error());
    ASSERT_TRUE(got->has_value()) << rec.key_id;
    expect_same_key(**got, rec);
  }
}

TYPED_TEST_P(KeyStoreContractTest, PutManyIsOneTransaction) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto before = TypeParam::commits(this->where);
  ASSERT_GE(before, 0);
  ASSERT_TRUE(store->put_many(sample_group("one-", 50, 1)));
  EXPECT_EQ(TypeParam::commits(this->where), before + 1);
  // The count is no constant: single puts commit one by one.
  for (const auto& rec : sample_group("single-", 5, 2))
    ASSERT_TRUE(store->put(rec));
  EXPECT_EQ(TypeParam::commits(this->where), before + 6);
  // Nothing to write, nothing committed.
  auto none = store->put_many({});
  ASSERT_TRUE(none) << hsm::describe(none.error());
  EXPECT_TRUE(none->empty());
  EXPECT_EQ(TypeParam::commits(this->where), before + 6);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "55");
}

TYPED_TEST_P(KeyStoreContractTest, PutManyFirstOfAKeyIdInTheGroupWins) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto a1 = sample_key("a", hsm::scheme::secp256k1, 1);
  auto b = sample_key("b", hsm::scheme::p256, 2);
  auto a2 = sample_key("a", hsm::scheme::ed25519, 3);
  auto put = store->put_many({a1, b, a2, a1});
  ASSERT_TRUE(put) << hsm::describe(put.error());
  ASSERT_EQ(put->size(), 4u);
  EXPECT_TRUE((*put)[0].inserted);
  expect_same_key((*put)[0].record, a1);
  EXPECT_TRUE((*put)[1].inserted);
  expect_same_key((*put)[1].record, b);
  EXPECT_FALSE((*put)[2].inserted);
  expect_same_key((*put)[2].record, a1);
  EXPECT_FALSE((*put)[3].inserted);
  expect_same_key((*put)[3].record, a1);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "2");
  auto got = store->get("a");
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_key(**got, a1);
}

TYPED_TEST_P(KeyStoreContractTest, PutManyAnswersStoredKeyIdsWithStoredRecord) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto x1 = sample_key("x", hsm::scheme::p256, 1);
  ASSERT_TRUE(store->put(x1));
  auto x2 = sample_key("x", hsm::scheme::p256, 2);
  auto y = sample_key("y", hsm::scheme::ed25519, 3);
  auto put = store->put_many({x2, y, x2});
  ASSERT_TRUE(put) << hsm::describe(put.error());
  ASSERT_EQ(put->size(), 3u);
  EXPECT_FALSE((*put)[0].inserted);
  expect_same_key((*put)[0].record, x1);
  EXPECT_TRUE((*put)[1].inserted);
  expect_same_key((*put)[1].record, y);
  EXPECT_FALSE((*put)[2].inserted);
  expect_same_key((*put)[2].record, x1);
  // The same group again: nothing new.
  auto again = store->put_many({x2, y});
  ASSERT_TRUE(again) << hsm::describe(again.error());
  ASSERT_EQ(again->size(), 2u);
  EXPECT_FALSE((*again)[0].inserted);
  expect_same_key((*again)[0].record, x1);
  EXPECT_FALSE((*again)[1].inserted);
  expect_same_key((*again)[1].record, y);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "2");
}

TYPED_TEST_P(KeyStoreContractTest, FailedPutManyWritesNothing) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("damaged", hsm::scheme::p256, 1)));
  ASSERT_EQ(TypeParam::corrupt_scheme(this->where, "damaged"), "");
  // The damaged row is met after other records of the group were inserted
  // (in group order, or in key id order: "a-..." sorts first).
  auto group = sample_group("a-", 4, 5);
  group.insert(group.begin() + 2, sample_key("damaged", hsm::scheme::p256, 2));
  auto put = store->put_many(group);
  ASSERT_FALSE(put);
  EXPECT_TRUE(is_store_error(put.error(), hsm::store_errc::corrupt_row));
  EXPECT_TRUE(contains(hsm::describe(put.error()), "damaged"));
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "1");
  for (size_t i = 0; i < 4; ++i) {
    auto got = store->get("a-" + std::to_string(i));
    ASSERT_TRUE(got) << hsm::describe(got.error());
    EXPECT_FALSE(got->has_value()) << "a-" << i;
  }
  // The store goes on: the group without the damaged key lands.
  group.erase(group.begin() + 2);
  auto retry = store->put_many(group);
  ASSERT_TRUE(retry) << hsm::describe(retry.error());
  for (const auto& res : *retry)
    EXPECT_TRUE(res.inserted);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "5");
}

TYPED_TEST_P(KeyStoreContractTest, RacingGroupsKeepOneRecordPerKeyId) {
  // Two stores put the same key ids in groups, in opposite orders.
  constexpr size_t n = 200;
  constexpr size_t group_size = 20;
  auto store_a = this->open_store();
  auto store_b = this->open_store();
  ASSERT_NE(store_a, nullptr);
  ASSERT_NE(store_b, nullptr);
  auto recs_a = sample_group("race-", n, 0xA1);
  auto recs_b = sample_group("race-", n, 0xB2);
  std::reverse(recs_b.begin(), recs_b.end());
  struct outcome {
    std::vector<hsm::put_result> results;
    std::vector<std::string> errors;
  };
  outcome out_a;
  outcome out_b;
  std::latch start{2};
  auto run = [&](hsm::store::key_store& store,
                 const std::vector<hsm::key_record>& recs, outcome& out) {
    start.arrive_and_wait();
    for (size_t i = 0; i < recs.size(); i += group_size) {
      std::vector<hsm::key_record> group(recs.begin() + i,
                                         recs.begin() + i + group_size);
      auto res = store.put_many(group);
      if (!res) {
        out.errors.push_back(hsm::describe(res.error()));
        continue;
      }
      for (auto& r : *res)
        out.results.push_back(std::move(r));
    }
  };
  std::thread a{run, std::ref(*store_a), std::cref(recs_a), std::ref(out_a)};
  std::thread b{run, std::ref(*store_b), std::cref(recs_b), std::ref(out_b)};
  a.join();
  b.join();
  ASSERT_TRUE(out_a.errors.empty()) << out_a.errors.front();
  ASSERT_TRUE(out_b.errors.empty()) << out_b.errors.front();
  ASSERT_EQ(out_a.results.size(), n);
  ASSERT_EQ(out_b.results.size(), n);
  for (size_t i = 0; i < n; ++i) {
    const auto& ra = out_a.results[i];
    const auto& rb = out_b.results[n - 1 - i];
    SCOPED_TRACE(ra.record.key_id);
    ASSERT_EQ(ra.record.key_id, rb.record.key_id);
    EXPECT_EQ(ra.record.public_key, rb.record.public_key);
    EXPECT_NE(ra.inserted, rb.inserted);
  }
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), std::to_string(n));
}

// -- canary -------------------------------------------------------------------

TYPED_TEST_P(KeyStoreContractTest, CanaryIsAbsentThenFirstPutWins) {
  auto store = this->open_store();
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
  // Another driver's store loses too.
  auto other = this->open_store();
  ASSERT_NE(other, nullptr);
  auto put3 = other->put_canary(sample_canary(3));
  ASSERT_TRUE(put3) << hsm::describe(put3.error());
  expect_same_canary(*put3, first);
  auto got = store->get_canary();
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_canary(**got, first);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM master_key_canary"), "1");
}

TYPED_TEST_P(KeyStoreContractTest, CountsRowsOfTheFormatBeforeTheMac) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("sealed", hsm::scheme::p256, 1)));
  auto none = store->unsealed_rows();
  ASSERT_TRUE(none) << hsm::describe(none.error());
  EXPECT_EQ(*none, 0u);
  auto old = sample_key("old", hsm::scheme::p256, 2);
  old.format_version = 1;
  old.master_key_id.clear();
  old.row_mac.clear();
  ASSERT_TRUE(store->put(old));
  auto one = store->unsealed_rows();
  ASSERT_TRUE(one) << hsm::describe(one.error());
  EXPECT_EQ(*one, 1u);
}

// -- master-key rotation ------------------------------------------------------

/// `sample_key(key_id, p256, seed)` under `master` in `format` (a format-1
/// row has no MAC), token-resident if `resident`.
inline hsm::key_record rotation_key(std::string key_id, uint8_t seed,
                                    std::string master, int format,
                                    bool resident = false) {
  auto rec = sample_key(std::move(key_id), hsm::scheme::p256, seed);
  rec.master_key_id = std::move(master);
  rec.format_version = format;
  if (format < hsm::current_row_format)
    rec.row_mac.clear();
  if (resident) {
    rec.wrap_mechanism = std::string{hsm::resident_mechanism};
    rec.key_blob = {'g', 'e', 'n', '-', seed};
  }
  return rec;
}

/// `rec` re-wrapped under `master`: another blob and MAC, the current
/// format, the same key.
inline hsm::key_record rewrapped(hsm::key_record rec, std::string master) {
  rec.master_key_id = std::move(master);
  rec.format_version = hsm::current_row_format;
  for (auto& b : rec.key_blob)
    b = static_cast<uint8_t>(b ^ 0x5a);
  rec.key_blob.push_back(0x01);
  rec.row_mac.assign(32, static_cast<uint8_t>(rec.master_key_id.size()));
  return rec;
}

/// The key ids of `recs`, in order.
inline std::vector<std::string>
ids_of(const std::vector<hsm::key_record>& recs) {
  std::vector<std::string> out;
  for (const auto& rec : recs)
    out.push_back(rec.key_id);
  return out;
}

/// The stored record under `key_id`, or a record with an empty key id.
inline hsm::key_record stored_key(hsm::store::key_store& store,
                                  const std::string& key_id) {
  auto got = store.get(key_id);
  EXPECT_TRUE(got) << hsm::describe(got.error());
  if (!got || !*got) {
    ADD_FAILURE() << "no row under '" << key_id << "'";
    return {};
  }
  return **got;
}

TYPED_TEST_P(KeyStoreContractTest, CountRowsGroupsAndSorts) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto none = store->count_rows();
  ASSERT_TRUE(none) << hsm::describe(none.error());
  EXPECT_TRUE(none->empty());
  // Put in an order that sorts differently; "Z-upper" sorts before "m-a" in
  // byte order (and after it in most locales' collations).
  ASSERT_TRUE(store->put_many({
    rotation_key("a", 1, "m-b", 2),
    rotation_key("b", 2, "m-a", 2),
    rotation_key("c", 3, "m-a", 2, true),
    rotation_key("d", 4, "m-a", 2),
    rotation_key("e", 5, "", 1),
    rotation_key("f", 6, "m-a", 1),
    rotation_key("g", 7, "Z-upper", 2),
    rotation_key("h", 8, "m-a", 2),
  }));
  auto counts = store->count_rows();
  ASSERT_TRUE(counts) << hsm::describe(counts.error());
  using hsm::store::row_count;
  std::vector<row_count> expected{
    row_count{"", 1, false, 1},    row_count{"Z-upper", 2, false, 1},
    row_count{"m-a", 1, false, 1}, row_count{"m-a", 2, false, 3},
    row_count{"m-a", 2, true, 1},  row_count{"m-b", 2, false, 1},
  };
  ASSERT_EQ(counts->size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    SCOPED_TRACE("line " + std::to_string(i));
    EXPECT_EQ((*counts)[i].master_key_id, expected[i].master_key_id);
    EXPECT_EQ((*counts)[i].format_version, expected[i].format_version);
    EXPECT_EQ((*counts)[i].resident, expected[i].resident);
    EXPECT_EQ((*counts)[i].rows, expected[i].rows);
  }
}

TYPED_TEST_P(KeyStoreContractTest, PendingRowsAreTheRowsNotDoneForTheTarget) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  std::vector<hsm::key_record> rows{
    rotation_key("k1", 1, "new-mk", 2),       // done
    rotation_key("k2", 2, "new-mk", 1),       // format 1
    rotation_key("k3", 3, "old-mk", 2),       // another master key
    rotation_key("k4", 4, "old-mk", 2, true), // resident, names another
    rotation_key("k5", 5, "new-mk", 2, true), // resident, done
    rotation_key("k6", 6, "", 1),             // format 1, no master key
    rotation_key("k7", 7, "new-mk-2", 2),     // a label with the target's
                                              // prefix is another key
  };
  ASSERT_TRUE(store->put_many(rows));
  auto pending = store->pending_rows("new-mk", "", 100);
  ASSERT_TRUE(pending) << hsm::describe(pending.error());
  EXPECT_EQ(ids_of(*pending),
            (std::vector<std::string>{"k2", "k3", "k4", "k6", "k7"}));
  // Whole records, read back field by field.
  for (const auto& rec : *pending) {
    SCOPED_TRACE(rec.key_id);
    auto i = static_cast<size_t>(rec.key_id[1] - '1');
    expect_same_key(rec, rows[i]);
  }
  // Towards the other key, the other rows are pending.
  auto back = store->pending_rows("old-mk", "", 100);
  ASSERT_TRUE(back) << hsm::describe(back.error());
  EXPECT_EQ(ids_of(*back),
            (std::vector<std::string>{"k1", "k2", "k5", "k6", "k7"}));
  // Nothing is pending once every row is done.
  ASSERT_TRUE(this
                ->exec("UPDATE keys SET format_version = 2, "
                       "master_key_id = 'new-mk'")
                .empty());
  auto done = store->pending_rows("new-mk", "", 100);
  ASSERT_TRUE(done) << hsm::describe(done.error());
  EXPECT_TRUE(done->empty()) << done->size() << " rows";
}

TYPED_TEST_P(KeyStoreContractTest, PendingRowsPageInKeyIdOrder) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  // Pending rows p0..p6 put out of order, with done rows between them.
  std::vector<hsm::key_record> rows;
  for (int i : {4, 0, 6, 2, 5, 1, 3})
    rows.push_back(rotation_key("p" + std::to_string(i),
                                static_cast<uint8_t>(i + 1), "old-mk", 2));
  for (auto id : {"p0x", "p3x", "p9"})
    rows.push_back(rotation_key(id, 20, "new-mk", 2));
  ASSERT_TRUE(store->put_many(rows));
  auto page = [&](const std::string& after, size_t limit) {
    auto got = store->pending_rows("new-mk", after, limit);
    EXPECT_TRUE(got) << hsm::describe(got.error());
    return got ? ids_of(*got) : std::vector<std::string>{"<error>"};
  };
  using ids = std::vector<std::string>;
  EXPECT_EQ(page("", 3), (ids{"p0", "p1", "p2"}));
  EXPECT_EQ(page("p2", 3), (ids{"p3", "p4", "p5"}));
  EXPECT_EQ(page("p5", 3), (ids{"p6"}));
  EXPECT_EQ(page("p6", 3), ids{});
  // The bound is exclusive and need not be a stored key id.
  EXPECT_EQ(page("p3", 1), (ids{"p4"}));
  EXPECT_EQ(page("p35", 10), (ids{"p4", "p5", "p6"}));
  EXPECT_EQ(page("", 1), (ids{"p0"}));
  EXPECT_EQ(page("", 0), ids{});
  EXPECT_EQ(page("", 100).size(), 7u);
}

TYPED_TEST_P(KeyStoreContractTest, ReplaceRowSwapsOnce) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto old_row = rotation_key("r1", 1, "old-mk", 2);
  auto other = rotation_key("r2", 2, "old-mk", 2);
  ASSERT_TRUE(store->put_many({old_row, other}));
  auto new_row = rewrapped(old_row, "new-mk");
  auto first = store->replace_row(old_row, new_row);
  ASSERT_TRUE(first) << hsm::describe(first.error());
  EXPECT_TRUE(*first);
  expect_same_key(stored_key(*store, "r1"), new_row);
  // Seen by another connection: committed.
  auto reader = this->open_store();
  ASSERT_NE(reader, nullptr);
  expect_same_key(stored_key(*reader, "r1"), new_row);
  // The same swap again finds the row changed: nothing happens.
  auto second = store->replace_row(old_row, new_row);
  ASSERT_TRUE(second) << hsm::describe(second.error());
  EXPECT_FALSE(*second);
  expect_same_key(stored_key(*store, "r1"), new_row);
  // The other row is untouched, and no row was added.
  expect_same_key(stored_key(*store, "r2"), other);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "2");
  // A row that is not stored is not replaced (nor created).
  auto ghost = rotation_key("ghost", 3, "old-mk", 2);
  auto missing = store->replace_row(ghost, rewrapped(ghost, "new-mk"));
  ASSERT_TRUE(missing) << hsm::describe(missing.error());
  EXPECT_FALSE(*missing);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "2");
}

TYPED_TEST_P(KeyStoreContractTest, ReplaceRowSealsAFormatOneRow) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  // No MAC and no master key id: empty values must compare equal.
  auto legacy = rotation_key("legacy", 1, "", 1);
  ASSERT_TRUE(legacy.row_mac.empty());
  ASSERT_TRUE(store->put(legacy));
  auto read = store->pending_rows("mk", "", 10);
  ASSERT_TRUE(read) << hsm::describe(read.error());
  ASSERT_EQ(read->size(), 1u);
  auto sealed = rewrapped(read->front(), "mk");
  auto swapped = store->replace_row(read->front(), sealed);
  ASSERT_TRUE(swapped) << hsm::describe(swapped.error());
  EXPECT_TRUE(*swapped);
  expect_same_key(stored_key(*store, "legacy"), sealed);
  auto left = store->pending_rows("mk", "", 10);
  ASSERT_TRUE(left) << hsm::describe(left.error());
  EXPECT_TRUE(left->empty());
}

TYPED_TEST_P(KeyStoreContractTest, ReplaceRowLosesToAConcurrentChange) {
  auto store_a = this->open_store();
  auto store_b = this->open_store();
  ASSERT_NE(store_a, nullptr);
  ASSERT_NE(store_b, nullptr);
  auto old_row = rotation_key("race", 1, "old-mk", 2);
  ASSERT_TRUE(store_a->put(old_row));
  // Both rotators read the row; B swaps first.
  auto b_row = rewrapped(old_row, "mk-b");
  auto a_row = rewrapped(old_row, "mk-a");
  auto b = store_b->replace_row(old_row, b_row);
  ASSERT_TRUE(b) << hsm::describe(b.error());
  EXPECT_TRUE(*b);
  auto a = store_a->replace_row(old_row, a_row);
  ASSERT_TRUE(a) << hsm::describe(a.error());
  EXPECT_FALSE(*a);
  expect_same_key(stored_key(*store_a, "race"), b_row);
  // Each column of the old row is compared: a stale old row that differs
  // in only one of them loses too.
  auto stale_mac = b_row;
  stale_mac.row_mac[0] ^= 1;
  auto stale_blob = b_row;
  stale_blob.key_blob[0] ^= 1;
  auto stale_format = b_row;
  stale_format.format_version = 1;
  auto stale_master = b_row;
  stale_master.master_key_id = "mk-c";
  auto stale_mech = b_row;
  stale_mech.wrap_mechanism = "CKM_AES_KEY_WRAP";
  for (const auto& stale :
       {stale_mac, stale_blob, stale_format, stale_master, stale_mech}) {
    auto next = rewrapped(stale, "mk-d");
    auto res = store_a->replace_row(stale, next);
    ASSERT_TRUE(res) << hsm::describe(res.error());
    EXPECT_FALSE(*res);
  }
  expect_same_key(stored_key(*store_a, "race"), b_row);
}

TYPED_TEST_P(KeyStoreContractTest, ReplaceRowRefusesToChangeTheKey) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto old_row = rotation_key("fixed", 1, "old-mk", 2);
  ASSERT_TRUE(store->put(old_row));
  auto new_key_id = rewrapped(old_row, "new-mk");
  new_key_id.key_id = "fixed-2";
  auto new_public_key = rewrapped(old_row, "new-mk");
  new_public_key.public_key[5] ^= 1;
  auto new_scheme = rewrapped(old_row, "new-mk");
  new_scheme.scheme = hsm::scheme::secp256k1;
  auto new_created = rewrapped(old_row, "new-mk");
  new_created.created_at_ms += 1;
  for (const auto& bad :
       {new_key_id, new_public_key, new_scheme, new_created}) {
    auto res = store->replace_row(old_row, bad);
    ASSERT_FALSE(res) << "replaced with " << bad.key_id;
    EXPECT_TRUE(is_store_error(res.error(), hsm::store_errc::query_failed));
  }
  expect_same_key(stored_key(*store, "fixed"), old_row);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "1");
  // The same replacement with the key kept goes through.
  auto ok = store->replace_row(old_row, rewrapped(old_row, "new-mk"));
  ASSERT_TRUE(ok) << hsm::describe(ok.error());
  EXPECT_TRUE(*ok);
}

TYPED_TEST_P(KeyStoreContractTest, RotationIsCompareAndSwap) {
  using hsm::store::rotation_phase;
  using hsm::store::rotation_record;
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto none = store->get_rotation();
  ASSERT_TRUE(none) << hsm::describe(none.error());
  EXPECT_FALSE(none->has_value());
  rotation_record begun{"mk-1", "mk-2", rotation_phase::running,
                        1'700'000'000'123, 0};
  // Expecting a rotation where none is stored fails and writes nothing.
  auto early = store->set_rotation(begun, begun);
  ASSERT_TRUE(early) << hsm::describe(early.error());
  EXPECT_FALSE(*early);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM master_key_rotation"), "0");
  auto first = store->set_rotation(std::nullopt, begun);
  ASSERT_TRUE(first) << hsm::describe(first.error());
  EXPECT_TRUE(*first);
  auto got = store->get_rotation();
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ(**got, begun);
  // A second "begin" loses.
  rotation_record other{"mk-1", "mk-3", rotation_phase::running,
                        1'700'000'000'999, 0};
  auto again = store->set_rotation(std::nullopt, other);
  ASSERT_TRUE(again) << hsm::describe(again.error());
  EXPECT_FALSE(*again);
  rotation_record done{"mk-1", "mk-2", rotation_phase::complete,
                       1'700'000'000'123, 1'700'000'555'000};
  // An expectation that differs in any one field loses.
  auto from = begun;
  from.from_label = "mk-0";
  auto to = begun;
  to.to_label = "mk-3";
  auto phase = begun;
  phase.phase = rotation_phase::complete;
  auto started = begun;
  started.started_at_ms += 1;
  auto completed = begun;
  completed.completed_at_ms = 1;
  for (const auto& wrong : {from, to, phase, started, completed}) {
    auto res = store->set_rotation(wrong, done);
    ASSERT_TRUE(res) << hsm::describe(res.error());
    EXPECT_FALSE(*res);
  }
  got = store->get_rotation();
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ(**got, begun);
  // The right expectation wins, and every field of `next` round-trips,
  // seen from another connection too.
  auto completed_ok = store->set_rotation(begun, done);
  ASSERT_TRUE(completed_ok) << hsm::describe(completed_ok.error());
  EXPECT_TRUE(*completed_ok);
  auto reader = this->open_store();
  ASSERT_NE(reader, nullptr);
  auto final_state = reader->get_rotation();
  ASSERT_TRUE(final_state) << hsm::describe(final_state.error());
  ASSERT_TRUE(final_state->has_value());
  EXPECT_EQ((*final_state)->from_label, "mk-1");
  EXPECT_EQ((*final_state)->to_label, "mk-2");
  EXPECT_EQ((*final_state)->phase, rotation_phase::complete);
  EXPECT_EQ((*final_state)->started_at_ms, 1'700'000'000'123);
  EXPECT_EQ((*final_state)->completed_at_ms, 1'700'000'555'000);
  EXPECT_EQ(this->sql("SELECT phase FROM master_key_rotation"), "complete");
  // Swapping from a stale value fails now.
  auto stale = store->set_rotation(begun, other);
  ASSERT_TRUE(stale) << hsm::describe(stale.error());
  EXPECT_FALSE(*stale);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM master_key_rotation"), "1");
}

TYPED_TEST_P(KeyStoreContractTest, ReplaceCanaryIsCompareAndSwap) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto old_canary = sample_canary(1);
  auto next = old_canary;
  next.wrapped_key.assign(48, 0x33);
  next.master_key_label = "master-new";
  // No canary stored: nothing to replace, nothing created.
  auto empty = store->replace_canary(old_canary, next);
  ASSERT_TRUE(empty) << hsm::describe(empty.error());
  EXPECT_FALSE(*empty);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM master_key_canary"), "0");
  ASSERT_TRUE(store->put_canary(old_canary));
  // Changing the canary's key or creation time is refused.
  auto other_key = next;
  other_key.public_key[3] ^= 1;
  auto other_time = next;
  other_time.created_at_ms += 1;
  for (const auto& bad : {other_key, other_time}) {
    auto res = store->replace_canary(old_canary, bad);
    ASSERT_FALSE(res);
    EXPECT_TRUE(is_store_error(res.error(), hsm::store_errc::query_failed));
  }
  // A stale expectation loses.
  auto stale_label = old_canary;
  stale_label.master_key_label = "master-9";
  auto stale_blob = old_canary;
  stale_blob.wrapped_key[0] ^= 1;
  for (const auto& stale : {stale_label, stale_blob}) {
    auto res = store->replace_canary(stale, next);
    ASSERT_TRUE(res) << hsm::describe(res.error());
    EXPECT_FALSE(*res);
  }
  auto unchanged = store->get_canary();
  ASSERT_TRUE(unchanged && *unchanged);
  expect_same_canary(**unchanged, old_canary);
  // The right one wins once.
  auto swapped = store->replace_canary(old_canary, next);
  ASSERT_TRUE(swapped) << hsm::describe(swapped.error());
  EXPECT_TRUE(*swapped);
  auto twice = store->replace_canary(old_canary, next);
  ASSERT_TRUE(twice) << hsm::describe(twice.error());
  EXPECT_FALSE(*twice);
  auto reader = this->open_store();
  ASSERT_NE(reader, nullptr);
  auto got = reader->get_canary();
  ASSERT_TRUE(got) << hsm::describe(got.error());
  ASSERT_TRUE(got->has_value());
  expect_same_canary(**got, next);
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM master_key_canary"), "1");
}

// -- the audit trail
// -----------------------------------------------------------

inline hsm::audit_entry audit_of(const std::string& request_id,
                                 const std::string& outcome = "ok") {
  hsm::audit_entry e;
  e.request_id = request_id;
  e.kind = hsm::job_kind::sign;
  e.key_id = "k-" + request_id;
  e.public_key_fingerprint = "sha256:00ff";
  e.payload_sha256.assign(32, 0xab);
  e.outcome = outcome;
  e.at_ms = 1700000000000;
  return e;
}

TYPED_TEST_P(KeyStoreContractTest, AuditAppendsChainPerDriverAndReadsInOrder) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto empty = store->append_audit("d1", {});
  ASSERT_TRUE(empty) << hsm::describe(empty.error());
  EXPECT_TRUE(empty->empty());
  auto first = store->append_audit("d1", {audit_of("r1"), audit_of("r2")});
  ASSERT_TRUE(first) << hsm::describe(first.error());
  ASSERT_EQ(first->size(), 2u);
  EXPECT_EQ((*first)[0].seq, 1u);
  EXPECT_EQ((*first)[0].prev_hash, hsm::store::audit_genesis());
  EXPECT_EQ((*first)[1].prev_hash, (*first)[0].entry_hash);
  // Another driver's chain starts on its own; the first one goes on.
  auto other = store->append_audit("d0", {audit_of("x1", "unknown_key")});
  ASSERT_TRUE(other) << hsm::describe(other.error());
  EXPECT_EQ((*other)[0].seq, 1u);
  auto more = store->append_audit("d1", {audit_of("r3")});
  ASSERT_TRUE(more) << hsm::describe(more.error());
  EXPECT_EQ((*more)[0].seq, 3u);
  EXPECT_EQ((*more)[0].prev_hash, (*first)[1].entry_hash);
  // Read back in (driver, seq) order, a page at a time, every field whole.
  auto page = store->read_audit("", 0, 2);
  ASSERT_TRUE(page) << hsm::describe(page.error());
  ASSERT_EQ(page->size(), 2u);
  EXPECT_EQ((*page)[0], (*other)[0]);
  EXPECT_EQ((*page)[1], (*first)[0]);
  auto rest = store->read_audit((*page)[1].driver_id, (*page)[1].seq, 10);
  ASSERT_TRUE(rest) << hsm::describe(rest.error());
  ASSERT_EQ(rest->size(), 2u);
  EXPECT_EQ((*rest)[0], (*first)[1]);
  EXPECT_EQ((*rest)[1], (*more)[0]);
  hsm::store::audit_checker checker;
  for (const auto& r : *page)
    checker.add(r);
  for (const auto& r : *rest)
    checker.add(r);
  auto report = checker.finish();
  EXPECT_TRUE(report.ok()) << ::testing::PrintToString(report.breaks);
  ASSERT_EQ(report.chains.size(), 2u);
  EXPECT_EQ(report.chains[1].head_seq, 3u);
}

TYPED_TEST_P(KeyStoreContractTest, AuditChainsOfTwoWritersNeverFork) {
  auto store_a = this->open_store();
  auto store_b = this->open_store();
  ASSERT_NE(store_a, nullptr);
  ASSERT_NE(store_b, nullptr);
  // Two processes under one driver id, appending in turns: each append
  // reads the head inside its own transaction, so the chain stays one.
  for (int i = 0; i < 5; ++i) {
    auto a = store_a->append_audit("shared",
                                   {audit_of("a" + std::to_string(i))});
    ASSERT_TRUE(a) << hsm::describe(a.error());
    auto b = store_b->append_audit("shared",
                                   {audit_of("b" + std::to_string(i))});
    ASSERT_TRUE(b) << hsm::describe(b.error());
  }
  auto rows = store_a->read_audit("", 0, 100);
  ASSERT_TRUE(rows) << hsm::describe(rows.error());
  ASSERT_EQ(rows->size(), 10u);
  hsm::store::audit_checker checker;
  for (const auto& r : *rows)
    checker.add(r);
  auto report = checker.finish();
  EXPECT_TRUE(report.ok()) << ::testing::PrintToString(report.breaks);
}

/// The audit entry of a generated key, as the dispatcher makes it.
inline hsm::audit_entry generated(const hsm::key_record& rec) {
  auto e = audit_of("req-" + rec.key_id);
  e.kind = hsm::job_kind::generate_key;
  e.key_id = rec.key_id;
  e.payload_sha256.clear();
  return e;
}

/// Every audit row, in (driver, seq) order, checked as `audit verify` does.
inline std::vector<hsm::audit_row> whole_trail(hsm::store::key_store& store) {
  auto rows = store.read_audit("", 0, 100000);
  EXPECT_TRUE(rows) << hsm::describe(rows.error());
  if (!rows)
    return {};
  hsm::store::audit_checker checker;
  for (const auto& r : *rows)
    checker.add(r);
  auto report = checker.finish();
  EXPECT_TRUE(report.ok()) << ::testing::PrintToString(report.breaks);
  return std::move(*rows);
}

TYPED_TEST_P(KeyStoreContractTest, AuditedPutAppendsTheInsertedInItsCommit) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  auto old = sample_key("old", hsm::scheme::p256, 1);
  ASSERT_TRUE(store->put(old));
  auto head = store->append_audit("d1", {audit_of("s1")});
  ASSERT_TRUE(head) << hsm::describe(head.error());
  auto group = sample_group("new-", 3, 2);
  group.insert(group.begin() + 1, old);
  group.push_back(group.front());
  // new-0 (entry), old (entry, stored already), new-1 (no entry), new-2
  // (entry), new-0 again (entry).
  hsm::store::put_audit audit{"d1", {}};
  for (const auto& rec : group)
    audit.entries.emplace_back(generated(rec));
  audit.entries[2].reset();
  auto before = TypeParam::commits(this->where);
  ASSERT_GE(before, 0);
  auto put = store->put_many_audited(group, audit);
  ASSERT_TRUE(put) << hsm::describe(put.error());
  EXPECT_EQ(TypeParam::commits(this->where), before + 1);
  ASSERT_EQ(put->results.size(), group.size());
  std::vector<bool> inserted;
  std::vector<bool> audited;
  for (const auto& r : put->results) {
    inserted.push_back(r.inserted);
    audited.push_back(r.audited);
  }
  EXPECT_EQ(inserted, (std::vector<bool>{true, false, true, true, false}));
  EXPECT_EQ(audited, (std::vector<bool>{true, false, false, true, false}));
  // Two rows, in group order, chained after the row already there.
  ASSERT_EQ(put->rows.size(), 2u);
  EXPECT_EQ(put->rows[0].entry, *audit.entries[0]);
  EXPECT_EQ(put->rows[1].entry, *audit.entries[3]);
  EXPECT_EQ(put->rows[0].seq, 2u);
  EXPECT_EQ(put->rows[0].prev_hash, (*head)[0].entry_hash);
  EXPECT_EQ(put->rows[1].prev_hash, put->rows[0].entry_hash);
  auto rows = whole_trail(*store);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[1], put->rows[0]);
  EXPECT_EQ(rows[2], put->rows[1]);
  // Entries that do not match the records: refused, nothing written.
  audit.entries.pop_back();
  auto uneven = store->put_many_audited(sample_group("odd-", 5, 3), audit);
  ASSERT_FALSE(uneven);
  EXPECT_TRUE(is_store_error(uneven.error(), hsm::store_errc::query_failed));
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys WHERE key_id LIKE 'odd-%'"),
            "0");
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM audit_log"), "3");
}

TYPED_TEST_P(KeyStoreContractTest, FailedAuditedPutWritesNoKeyAndNoEntry) {
  auto store = this->open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->put(sample_key("damaged", hsm::scheme::p256, 1)));
  ASSERT_EQ(TypeParam::corrupt_scheme(this->where, "damaged"), "");
  auto group = sample_group("a-", 3, 5);
  group.push_back(sample_key("damaged", hsm::scheme::p256, 2));
  hsm::store::put_audit audit{"d1", {}};
  for (const auto& rec : group)
    audit.entries.emplace_back(generated(rec));
  auto put = store->put_many_audited(group, audit);
  ASSERT_FALSE(put);
  EXPECT_TRUE(is_store_error(put.error(), hsm::store_errc::corrupt_row));
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM keys"), "1");
  EXPECT_EQ(this->sql("SELECT COUNT(*) FROM audit_log"), "0");
}

TYPED_TEST_P(KeyStoreContractTest, AuditedPutsAndAppendsOfOneChainTakeTurns) {
  // A driver's key writer and audit writer: two connections appending to
  // one chain at the same time. Each reads the head under the chain's
  // lock, so none fails and the chain does not fork.
  auto keys = this->open_store();
  auto audit = this->open_store();
  ASSERT_NE(keys, nullptr);
  ASSERT_NE(audit, nullptr);
  constexpr int rounds = 25;
  std::latch start{2};
  std::string put_error;
  std::string append_error;
  std::thread putter{[&] {
    start.arrive_and_wait();
    for (int i = 0; i < rounds && put_error.empty(); ++i) {
      auto rec = sample_key("gen-" + std::to_string(i), hsm::scheme::p256, 7);
      auto put = keys->put_many_audited({rec}, {"shared", {generated(rec)}});
      if (!put)
        put_error = hsm::describe(put.error());
      else if (put->rows.size() != 1)
        put_error = "no row for " + rec.key_id;
    }
  }};
  std::thread appender{[&] {
    start.arrive_and_wait();
    for (int i = 0; i < rounds && append_error.empty(); ++i) {
      auto rows = audit->append_audit("shared",
                                      {audit_of("sig-" + std::to_string(i))});
      if (!rows)
        append_error = hsm::describe(rows.error());
    }
  }};
  putter.join();
  appender.join();
  EXPECT_EQ(put_error, "");
  EXPECT_EQ(append_error, "");
  auto rows = whole_trail(*keys);
  EXPECT_EQ(rows.size(), 2u * rounds);
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(rows.back().seq, 2u * rounds);
}

REGISTER_TYPED_TEST_SUITE_P(
  KeyStoreContractTest, CountsRowsOfTheFormatBeforeTheMac,
  ReopenKeepsVersionAndData, AppliesNewMigrationsOnReopen,
  FailedMigrationAppliesNothing, NewerSchemaIsRefused,
  PutThenGetRoundTripsEveryField, ResidentKeyRoundTrips, EmptyBlobRoundTrips,
  SecondPutWithSameKeyIdReturnsFirstRecord, GetOfUnknownKeyIdIsNullopt,
  CorruptSchemeIsCorruptRow, RacingStoresKeepOneRecordPerKeyId,
  PutManyCommitsTheWholeGroup, PutManyIsOneTransaction,
  PutManyFirstOfAKeyIdInTheGroupWins,
  PutManyAnswersStoredKeyIdsWithStoredRecord, FailedPutManyWritesNothing,
  RacingGroupsKeepOneRecordPerKeyId, CanaryIsAbsentThenFirstPutWins,
  CountRowsGroupsAndSorts, PendingRowsAreTheRowsNotDoneForTheTarget,
  PendingRowsPageInKeyIdOrder, ReplaceRowSwapsOnce,
  ReplaceRowSealsAFormatOneRow, ReplaceRowLosesToAConcurrentChange,
  ReplaceRowRefusesToChangeTheKey, RotationIsCompareAndSwap,
  ReplaceCanaryIsCompareAndSwap, AuditAppendsChainPerDriverAndReadsInOrder,
  AuditChainsOfTwoWritersNeverFork, AuditedPutAppendsTheInsertedInItsCommit,
  FailedAuditedPutWritesNoKeyAndNoEntry,
  AuditedPutsAndAppendsOfOneChainTakeTurns);

} // namespace hsm::test
