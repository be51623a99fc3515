// The storage actor on CAF's deterministic scheduler: group commit (puts
// queued together are one put_many; replies only after it; a failed commit
// fails every put of its group; a long backlog in several groups, with gets
// served between them; pending puts committed on an orderly stop) and the
// bounded LRU cache. A scripted key store records what the actor asks of
// it; one test runs on a real SQLite store in a temporary directory.

#include "actors/store_actor.hpp"

#include "messages/errors.hpp"
#include "store/sqlite_store.hpp"
#include "tests/support/actor_fixture.hpp"

#include "caf/all.hpp"
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace hsm {
namespace {

/// What the scripted store was asked, and its rows.
struct store_log {
  /// "put_many a,b,c" and "get a", in call order.
  std::vector<std::string> calls;
  /// Runs inside each put_many, before it answers, as if it happened while
  /// the commit blocked.
  std::function<void()> on_put_many;
  /// Fail every put_many with `store_errc::unavailable`.
  bool fail = false;
  /// Fail `schema_version` (the health check) with `store_errc::unavailable`.
  bool fail_ping = false;
  std::map<std::string, key_record> rows;
  /// The audit rows appended with puts.
  std::vector<audit_row> audit_rows;
};

/// A key store that keeps its rows in memory and logs each call.
class scripted_store final : public store::key_store {
public:
  explicit scripted_store(std::shared_ptr<store_log> log)
    : log_(std::move(log)) {
    // nop
  }

  caf::expected<store::audited_puts>
  put_many_audited(const std::vector<key_record>& recs,
                   const store::put_audit& audit) override {
    std::string call = "put_many ";
    for (const auto& rec : recs)
      call += (&rec == &recs.front() ? "" : ",") + rec.key_id;
    log_->calls.push_back(call);
    if (log_->on_put_many)
      log_->on_put_many();
    if (log_->fail)
      return store::make_unavailable("scripted failure");
    store::audited_puts out;
    for (size_t k = 0; k < recs.size(); ++k) {
      const auto& rec = recs[k];
      auto [i, added] = log_->rows.try_emplace(rec.key_id, rec);
      put_result res{i->second, added};
      if (added && !audit.entries.empty() && audit.entries[k]) {
        res.audited = true;
        log_->audit_rows.push_back(audit_row{audit.driver_id,
                                             log_->audit_rows.size() + 1,
                                             *audit.entries[k],
                                             {},
                                             {}});
        out.rows.push_back(log_->audit_rows.back());
      }
      out.results.push_back(std::move(res));
    }
    return out;
  }

  caf::expected<std::optional<key_record>>
  get(std::string_view key_id) override {
    log_->calls.push_back("get " + std::string{key_id});
    auto i = log_->rows.find(std::string{key_id});
    if (i == log_->rows.end())
      return std::optional<key_record>{};
    return std::optional<key_record>{i->second};
  }

  caf::expected<std::optional<store::canary_record>> get_canary() override {
    return std::optional<store::canary_record>{};
  }

  caf::expected<store::canary_record>
  put_canary(const store::canary_record& c) override {
    return c;
  }

  caf::expected<int> schema_version() override {
    log_->calls.push_back("schema_version");
    if (log_->fail_ping)
      return store::make_unavailable("scripted failure");
    return 1;
  }

  // The storage actor never rotates: the rotation calls are not scripted.

  caf::expected<std::vector<store::row_count>> count_rows() override {
    return not_scripted("count_rows");
  }

  caf::expected<std::vector<key_record>>
  pending_rows(std::string_view, std::string_view, size_t) override {
    return not_scripted("pending_rows");
  }

  caf::expected<bool> replace_row(const key_record&,
                                  const key_record&) override {
    return not_scripted("replace_row");
  }

  caf::expected<std::optional<store::rotation_record>> get_rotation() override {
    return not_scripted("get_rotation");
  }

  caf::expected<bool> set_rotation(const std::optional<store::rotation_record>&,
                                   const store::rotation_record&) override {
    return not_scripted("set_rotation");
  }

  caf::expected<bool> replace_canary(const store::canary_record&,
                                     const store::canary_record&) override {
    return not_scripted("replace_canary");
  }

  caf::expected<std::vector<audit_row>>
  append_audit(std::string_view driver_id,
               const std::vector<audit_entry>& entries) override {
    log_->calls.push_back("append_audit");
    if (fail_audit)
      return store::make_unavailable("append_audit: scripted failure");
    std::vector<audit_row> out;
    for (const auto& e : entries)
      out.push_back(audit_row{std::string{driver_id}, ++audit_seq, e, {}, {}});
    audited.insert(audited.end(), entries.begin(), entries.end());
    return out;
  }

  caf::expected<std::vector<audit_row>> read_audit(std::string_view, uint64_t,
                                                   size_t) override {
    return not_scripted("read_audit");
  }

  /// Entries appended so far, and whether the next append fails.
  std::vector<audit_entry> audited;
  bool fail_audit = false;
  uint64_t audit_seq = 0;

private:
  caf::error not_scripted(const char* call) {
    log_->calls.push_back(call);
    return store::make_query_failed(std::string{call} + ": not scripted");
  }

  std::shared_ptr<store_log> log_;
};

key_record make_key(const std::string& id, uint8_t seed = 1) {
  key_record rec;
  rec.key_id = id;
  rec.scheme = scheme::p256;
  rec.public_key.assign(65, seed);
  rec.public_key[0] = 0x04;
  rec.key_blob.assign(40, seed);
  rec.wrap_mechanism = std::string{aes_key_wrap_pad};
  rec.created_at_ms = 1'700'000'000'000;
  return rec;
}

bool is_store_errc(const caf::error& err, store_errc code) {
  return err.category() == caf::atom("store")
         && err.code() == static_cast<uint8_t>(code);
}

/// One outstanding put and, once received, its answer.
using put_handle = decltype(std::declval<caf::scoped_actor&>()->request(
  std::declval<storage_actor>(), caf::infinite, caf::put_atom_v,
  std::declval<key_record>()));

class StoreActorTest : public testing::actor_fixture {
protected:
  void TearDown() override {
    if (testee)
      self->send_exit(testee, caf::exit_reason::kill);
    sched.run();
  }

  /// Spawns the actor (scheduled) on the scripted store.
  void start(size_t cache_capacity = default_store_cache_capacity,
             size_t max_group = default_store_max_group) {
    start_on(std::make_shared<scripted_store>(log), cache_capacity, max_group);
  }

  void start_on(std::shared_ptr<store::key_store> st, size_t cache_capacity,
                size_t max_group) {
    store_actor_config c;
    c.cache_capacity = cache_capacity;
    c.max_group = max_group;
    c.mode = spawn_mode::scheduled;
    testee = spawn_store_actor(sys, std::move(st), c);
  }

  /// Sends a put without running the scheduler.
  put_handle send_put(const key_record& rec) {
    return self->request(testee, caf::infinite, caf::put_atom_v, rec);
  }

  /// The answer to a put sent earlier (after the scheduler ran).
  static caf::expected<put_result> answer(put_handle& h) {
    caf::expected<put_result> out = caf::sec::unexpected_response;
    h.receive([&](put_result& r) { out = std::move(r); },
              [&](caf::error& err) { out = std::move(err); });
    return out;
  }

  std::optional<key_lookup> get(const std::string& id) {
    return ask<key_lookup>(testee, caf::get_atom_v, id);
  }

  store_stats stats() {
    auto s = ask<store_stats>(testee, stats_atom_v);
    EXPECT_TRUE(s);
    return s.value_or(store_stats{});
  }

  std::shared_ptr<store_log> log = std::make_shared<store_log>();
  storage_actor testee;
};

// -- group commit -------------------------------------------------------------

TEST_F(StoreActorTest, PutsQueuedTogetherCommitAsOneGroup) {
  start();
  std::vector<put_handle> hs;
  for (const char* id : {"a", "b", "c", "d", "e"})
    hs.push_back(send_put(make_key(id)));
  sched.run();
  for (auto& h : hs) {
    auto res = answer(h);
    ASSERT_TRUE(res) << describe(res.error());
    EXPECT_TRUE(res->inserted);
  }
  EXPECT_EQ(log->calls, std::vector<std::string>{"put_many a,b,c,d,e"});
  auto s = stats();
  EXPECT_EQ(s.commits, 1u);
  EXPECT_EQ(s.committed_puts, 5u);
  EXPECT_EQ(s.failed_groups, 0u);
  EXPECT_EQ(s.pending, 0u);
}

TEST_F(StoreActorTest, AnAuditedPutAppendsItsEntryInTheGroupsCommit) {
  store_actor_config c;
  c.driver_id = "d7";
  c.mode = spawn_mode::scheduled;
  testee = spawn_store_actor(sys, std::make_shared<scripted_store>(log), c);
  audit_entry e;
  e.request_id = "r-a";
  e.kind = job_kind::generate_key;
  e.key_id = "a";
  e.outcome = "ok";
  e.at_ms = 42;
  put_handle audited = self->request(testee, caf::infinite, caf::put_atom_v,
                                     make_key("a"), e);
  auto plain = send_put(make_key("b"));
  sched.run();
  auto a = answer(audited);
  ASSERT_TRUE(a) << describe(a.error());
  EXPECT_TRUE(a->inserted);
  EXPECT_TRUE(a->audited);
  auto b = answer(plain);
  ASSERT_TRUE(b) << describe(b.error());
  EXPECT_TRUE(b->inserted);
  EXPECT_FALSE(b->audited);
  // One group, one commit; the entry joined the chain of this driver.
  EXPECT_EQ(log->calls, std::vector<std::string>{"put_many a,b"});
  ASSERT_EQ(log->audit_rows.size(), 1u);
  EXPECT_EQ(log->audit_rows[0].driver_id, "d7");
  EXPECT_EQ(log->audit_rows[0].entry, e);
  auto s = stats();
  EXPECT_EQ(s.commits, 1u);
  EXPECT_EQ(s.audited, 1u);
}

TEST_F(StoreActorTest, RepliesArriveOnlyAfterTheGroupCommitted) {
  start();
  std::vector<size_t> replies_at_commit;
  log->on_put_many = [&] {
    replies_at_commit.push_back(self->mailbox().size());
  };
  std::vector<put_handle> hs;
  for (const char* id : {"a", "b", "c"})
    hs.push_back(send_put(make_key(id)));
  sched.run();
  // Nothing had reached the requester while the commit ran; all did after.
  EXPECT_EQ(replies_at_commit, std::vector<size_t>{0});
  EXPECT_EQ(self->mailbox().size(), 3u);
  for (auto& h : hs)
    EXPECT_TRUE(answer(h));
}

TEST_F(StoreActorTest, FailedCommitFailsEveryPutOfTheGroup) {
  start();
  log->fail = true;
  std::vector<put_handle> hs;
  for (const char* id : {"a", "b", "c"})
    hs.push_back(send_put(make_key(id)));
  sched.run();
  for (auto& h : hs) {
    auto res = answer(h);
    ASSERT_FALSE(res);
    EXPECT_TRUE(is_store_errc(res.error(), store_errc::unavailable))
      << describe(res.error());
  }
  auto s = stats();
  EXPECT_EQ(s.commits, 0u);
  EXPECT_EQ(s.failed_groups, 1u);
  // Nothing of the failed group was cached: a get asks the store.
  auto miss = get("a");
  ASSERT_TRUE(miss);
  EXPECT_FALSE(miss->found);
  // The actor goes on with the next group.
  log->fail = false;
  auto h = send_put(make_key("a"));
  sched.run();
  auto res = answer(h);
  ASSERT_TRUE(res) << describe(res.error());
  EXPECT_TRUE(res->inserted);
  EXPECT_EQ(stats().commits, 1u);
}

TEST_F(StoreActorTest, DuplicateKeyIdsInOneGroupGetTheFirstRecord) {
  start();
  auto first = make_key("dup", 1);
  auto second = make_key("dup", 2);
  auto h1 = send_put(first);
  auto h2 = send_put(second);
  sched.run();
  auto r1 = answer(h1);
  auto r2 = answer(h2);
  ASSERT_TRUE(r1);
  ASSERT_TRUE(r2);
  EXPECT_TRUE(r1->inserted);
  EXPECT_FALSE(r2->inserted);
  EXPECT_EQ(r2->record.public_key, first.public_key);
  EXPECT_EQ(log->calls, std::vector<std::string>{"put_many dup,dup"});
}

TEST_F(StoreActorTest, LongBacklogCommitsInGroupsWithGetsServedBetween) {
  log->rows.emplace("old", make_key("old"));
  start(default_store_cache_capacity, 2);
  // A get that arrives while the first group commits is answered before
  // the second group.
  std::optional<decltype(self->request(testee, caf::infinite, caf::get_atom_v,
                                       std::string{}))>
    get_during_commit;
  log->on_put_many = [&] {
    if (!get_during_commit)
      get_during_commit.emplace(self->request(
        testee, caf::infinite, caf::get_atom_v, std::string{"old"}));
  };
  std::vector<put_handle> hs;
  for (const char* id : {"a", "b", "c", "d", "e"})
    hs.push_back(send_put(make_key(id)));
  sched.run();
  for (auto& h : hs)
    EXPECT_TRUE(answer(h));
  ASSERT_TRUE(get_during_commit);
  get_during_commit->receive([](key_lookup& k) { EXPECT_TRUE(k.found); },
                             [](caf::error& err) {
                               ADD_FAILURE() << describe(err);
                             });
  EXPECT_EQ(log->calls,
            (std::vector<std::string>{"put_many a,b", "get old", "put_many c,d",
                                      "put_many e"}));
  auto s = stats();
  EXPECT_EQ(s.commits, 3u);
  EXPECT_EQ(s.committed_puts, 5u);
}

TEST_F(StoreActorTest, OrderlyStopCommitsPendingPutsFirst) {
  start();
  std::vector<put_handle> hs;
  for (const char* id : {"a", "b"})
    hs.push_back(send_put(make_key(id)));
  // Behind the puts, ahead of the flush the first put sends.
  self->send_exit(testee, caf::exit_reason::user_shutdown);
  sched.run();
  for (auto& h : hs)
    EXPECT_TRUE(answer(h));
  EXPECT_EQ(log->calls, std::vector<std::string>{"put_many a,b"});
  EXPECT_EQ(log->rows.size(), 2u);
}

// -- cache --------------------------------------------------------------------

TEST_F(StoreActorTest, CacheEvictsTheLeastRecentlyUsedRecord) {
  for (const char* id : {"k1", "k2", "k3"})
    log->rows.emplace(id, make_key(id));
  start(2);
  for (const char* id : {"k1", "k2", "k1", "k3", "k1", "k2"}) {
    auto k = get(id);
    ASSERT_TRUE(k);
    EXPECT_TRUE(k->found);
    EXPECT_EQ(k->record.key_id, id);
  }
  // k1 k2: misses; k1: hit; k3: miss, evicts k2 (k1 was used after it);
  // k1: hit; k2: miss again. First in, first out would have evicted k1.
  auto s = stats();
  EXPECT_EQ(s.cache_hits, 2u);
  EXPECT_EQ(s.cache_misses, 4u);
  EXPECT_EQ(s.cache_size, 2u);
  EXPECT_EQ(s.cache_capacity, 2u);
  EXPECT_EQ(log->calls,
            (std::vector<std::string>{"get k1", "get k2", "get k3", "get k2"}));
}

TEST_F(StoreActorTest, CommittedRecordsAreCachedMissingKeysAreNot) {
  start();
  auto h = send_put(make_key("fresh"));
  sched.run();
  ASSERT_TRUE(answer(h));
  auto hit = get("fresh");
  ASSERT_TRUE(hit);
  EXPECT_TRUE(hit->found);
  // Another driver may create a missing key: ask the store each time.
  for (int i = 0; i < 2; ++i) {
    auto none = get("nobody");
    ASSERT_TRUE(none);
    EXPECT_FALSE(none->found);
  }
  auto s = stats();
  EXPECT_EQ(s.cache_hits, 1u);
  EXPECT_EQ(s.cache_misses, 2u);
  EXPECT_EQ(log->calls, (std::vector<std::string>{"put_many fresh",
                                                  "get nobody", "get nobody"}));
}

// -- health -------------------------------------------------------------------

TEST_F(StoreActorTest, QuietStoreIsAskedSoThatReadinessSeesItGone) {
  using std::chrono::seconds;
  auto metrics = std::make_shared<driver_metrics>(1);
  store_actor_config c;
  c.mode = spawn_mode::scheduled;
  c.metrics = metrics;
  c.health_interval = seconds{5};
  testee = spawn_store_actor(sys, std::make_shared<scripted_store>(log), c);
  sched.run();
  auto up = [&] {
    return metrics->value("hsm_driver_store_up", {{"connection", "keys"}});
  };
  auto pings = [&] {
    return std::count(log->calls.begin(), log->calls.end(), "schema_version");
  };
  auto h = send_put(make_key("a"));
  sched.run();
  ASSERT_TRUE(answer(h));
  EXPECT_EQ(up(), 1);
  // Quiet for the interval: the store is asked, and found gone.
  log->fail_ping = true;
  sched.advance_time(seconds{5});
  sched.run();
  EXPECT_EQ(pings(), 1);
  EXPECT_EQ(up(), 0);
  EXPECT_EQ(metrics->value("hsm_driver_store_errors_total",
                           {{"operation", "ping"}}),
            1);
  // Back: the next check says so.
  log->fail_ping = false;
  sched.advance_time(seconds{5});
  sched.run();
  EXPECT_EQ(pings(), 2);
  EXPECT_EQ(up(), 1);
  // A store that answered within the interval is not asked.
  sched.advance_time(seconds{3});
  sched.run();
  EXPECT_TRUE(get("b"));
  sched.advance_time(seconds{2});
  sched.run();
  EXPECT_EQ(pings(), 2);
  // A failed operation counts as the store being gone too.
  log->fail = true;
  auto failed = send_put(make_key("c"));
  sched.run();
  EXPECT_FALSE(answer(failed));
  EXPECT_EQ(up(), 0);
  EXPECT_EQ(
    metrics->value("hsm_driver_store_errors_total", {{"operation", "put"}}), 1);
}

TEST_F(StoreActorTest, DefaultCacheCapacityIsTheNamedConstant) {
  start();
  EXPECT_EQ(stats().cache_capacity, default_store_cache_capacity);
}

// -- a real SQLite store
// --------------------------------------------------------

TEST_F(StoreActorTest, GroupLandsInSqlite) {
  namespace fs = std::filesystem;
  auto pattern
    = (fs::path{::testing::TempDir()} / "store_actor_test.XXXXXX").string();
  ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
  auto db = fs::path{pattern} / "keys.db";
  auto st = store::sqlite_store::open(db);
  ASSERT_TRUE(st) << describe(st.error());
  start_on(std::shared_ptr<store::key_store>{std::move(*st)},
           default_store_cache_capacity, default_store_max_group);
  std::vector<put_handle> hs;
  for (int i = 0; i < 10; ++i)
    hs.push_back(send_put(make_key("sq-" + std::to_string(i))));
  hs.push_back(send_put(make_key("sq-0", 9)));
  sched.run();
  for (auto& h : hs) {
    auto res = answer(h);
    ASSERT_TRUE(res) << describe(res.error());
    EXPECT_EQ(res->inserted, &h != &hs.back());
  }
  EXPECT_EQ(stats().commits, 1u);
  auto other = store::sqlite_store::open(db);
  ASSERT_TRUE(other) << describe(other.error());
  for (int i = 0; i < 10; ++i) {
    auto got = (*other)->get("sq-" + std::to_string(i));
    ASSERT_TRUE(got) << describe(got.error());
    EXPECT_TRUE(got->has_value());
  }
  other->reset();
  self->send_exit(testee, caf::exit_reason::kill);
  sched.run();
  testee = nullptr;
  std::error_code ec;
  fs::remove_all(pattern, ec);
}

} // namespace
} // namespace hsm
