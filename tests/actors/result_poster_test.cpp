// The result poster on CAF's deterministic scheduler, with a proxy link that
// answers posts from a per-result script: the encoded body, 409 and other
// 4xx dropped after one attempt, transient failures retried on the test
// clock without holding up other results, giving up after `max_attempts`,
// and no retry once stopping. No network: pure actor logic.

#include "actors/result_poster.hpp"

#include "tests/support/actor_fixture.hpp"

#include "caf/all.hpp"
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace hsm {
namespace {

using std::chrono::milliseconds;

/// A proxy link that answers each result's posts from its own script
/// (keyed by the result id in the body) and 200 once that is used up.
class scripted_link : public net::proxy_link {
public:
  caf::expected<net::http_reply> poll(size_t, milliseconds) override {
    ADD_FAILURE() << "the result poster polled";
    return caf::make_error(net_errc::unreachable);
  }

  caf::expected<net::http_reply> post_result(const std::string& body) override {
    posts.push_back(body);
    auto doc = nlohmann::json::parse(body, nullptr, false);
    if (doc.is_object() && doc.contains("results"))
      return post_batch(doc);
    auto id = doc.is_object() ? doc.value("id", std::string{}) : std::string{};
    ++attempts[id];
    auto& script = replies[id];
    if (script.empty())
      return net::http_reply{200, "{}"};
    auto r = std::move(script.front());
    script.pop_front();
    return r;
  }

  const std::string& driver_id() const override {
    return id_;
  }

  /// Answers to the next posts of each result id.
  std::map<std::string, std::deque<caf::expected<net::http_reply>>> replies;
  /// Posts per result id.
  std::map<std::string, int> attempts;
  /// Every body, in order.
  std::vector<std::string> posts;
  /// The result ids of each batch post, in order.
  std::vector<std::vector<std::string>> batches;
  /// Ids the proxy answers `lease_not_current` for in a batch.
  std::set<std::string> stale;

private:
  /// Accepts every entry but the stale ones.
  caf::expected<net::http_reply> post_batch(const nlohmann::json& doc) {
    auto& ids = batches.emplace_back();
    auto statuses = nlohmann::json::array();
    for (const auto& entry : doc["results"]) {
      auto id = entry.value("id", std::string{});
      ids.push_back(id);
      ++attempts[id];
      EXPECT_EQ(doc.value("driver_id", std::string{}), id_);
      statuses.push_back(
        {{"id", id},
         {"status", stale.count(id) > 0 ? "lease_not_current" : "accepted"}});
    }
    return net::http_reply{200, nlohmann::json{{"results", statuses}}.dump()};
  }

  std::string id_ = "driver-7";
};

/// The poster's answer to one result, once it arrived.
struct reply_slot {
  std::optional<bool> posted;
  std::optional<caf::error> error;
};

/// Asks the poster to post `r` and keeps its answer in `slot`.
void requester(caf::event_based_actor* self, result_poster_actor poster,
               job_result r, std::shared_ptr<reply_slot> slot) {
  self->request(poster, caf::infinite, result_atom::value, std::move(r))
    .then([slot](bool ok) { slot->posted = ok; },
          [slot](caf::error& err) { slot->error = err; });
}

job_result key_answer(const std::string& id) {
  key_result k;
  k.key_id = "key-" + id;
  k.scheme = scheme::p256;
  k.public_key.assign(65, 4);
  k.storage = "CKM_AES_KEY_WRAP_PAD";
  k.created = true;
  return job_result{id, "lease-" + id, k, {}, {}};
}

net::http_reply status(long code) {
  return net::http_reply{code, "{\"error\":\"scripted\"}"};
}

caf::error unreachable() {
  return caf::make_error(net_errc::unreachable,
                         std::string{"connection refused"});
}

class ResultPosterTest : public testing::actor_fixture {
protected:
  void SetUp() override {
    result_poster_config c;
    c.max_attempts = 4;
    c.backoff_min = milliseconds{100};
    c.backoff_max = milliseconds{400};
    c.mode = spawn_mode::scheduled;
    poster = spawn_result_poster(sys, c, link, stopping);
  }

  void TearDown() override {
    for (auto& r : requesters)
      self->send_exit(r, caf::exit_reason::kill);
    self->send_exit(poster, caf::exit_reason::kill);
    sched.run();
  }

  /// Sends `r` to the poster and runs the scheduler.
  std::shared_ptr<reply_slot> post(job_result r) {
    auto slot = std::make_shared<reply_slot>();
    requesters.push_back(sys.spawn(requester, poster, std::move(r), slot));
    sched.run();
    return slot;
  }

  /// Advances the test clock and runs what became due.
  void wait(milliseconds d) {
    sched.advance_time(d);
    sched.run();
  }

  /// Fires every pending timer until `slot` has an answer (at most `max`
  /// rounds); returns the rounds needed.
  int fire_until_answered(const reply_slot& slot, int max = 20) {
    int rounds = 0;
    while (!slot.posted && !slot.error && rounds < max
           && sched.has_pending_timeout()) {
      sched.trigger_timeouts();
      sched.run();
      ++rounds;
    }
    return rounds;
  }

  std::shared_ptr<scripted_link> link = std::make_shared<scripted_link>();
  std::shared_ptr<std::atomic<bool>> stopping
    = std::make_shared<std::atomic<bool>>(false);
  result_poster_actor poster;
  std::vector<caf::actor> requesters;
};

TEST_F(ResultPosterTest, PostedResultRepliesTrueAndCarriesTheEncodedResult) {
  auto slot = post(key_answer("r1"));
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_TRUE(*slot->posted);
  ASSERT_EQ(link->posts.size(), 1u);
  auto doc = nlohmann::json::parse(link->posts[0]);
  EXPECT_EQ(doc.at("id"), "r1");
  EXPECT_EQ(doc.at("lease"), "lease-r1");
  EXPECT_EQ(doc.at("driver_id"), "driver-7");
  EXPECT_EQ(doc.at("ok"), true);
  EXPECT_EQ(doc.at("result").at("key_id"), "key-r1");
  EXPECT_EQ(doc.at("result").at("scheme"), "p256");
  EXPECT_FALSE(doc.contains("error"));
  EXPECT_FALSE(sched.has_pending_timeout());

  // An error answer is posted the same way, with `ok` false.
  job_result err{"r2",
                 "lease-r2",
                 error_result{"unknown_key", "no such key", false},
                 {},
                 {}};
  auto slot2 = post(err);
  ASSERT_TRUE(slot2->posted.has_value());
  EXPECT_TRUE(*slot2->posted);
  ASSERT_EQ(link->posts.size(), 2u);
  auto doc2 = nlohmann::json::parse(link->posts[1]);
  EXPECT_EQ(doc2.at("id"), "r2");
  EXPECT_EQ(doc2.at("lease"), "lease-r2");
  EXPECT_EQ(doc2.at("driver_id"), "driver-7");
  EXPECT_EQ(doc2.at("ok"), false);
  EXPECT_EQ(doc2.at("error").at("code"), "unknown_key");
  EXPECT_EQ(doc2.at("error").at("retryable"), false);
}

// The code settles a 409 (stale lease, answered already) and any other 4xx
// as "done": the reply is `true` (nothing to retry; the interface's `false`
// is for "gave up on a transient failure"). One attempt each, no timer.
TEST_F(ResultPosterTest, RefusedResultsAreDroppedAfterOneAttempt) {
  // 409: the lease is stale or the request answered already (settled, true);
  // any other 4xx: the proxy refused the result, which is left for
  // redelivery (given up, false).
  for (long code : {409L, 400L, 404L, 422L}) {
    SCOPED_TRACE("HTTP " + std::to_string(code));
    auto id = "r" + std::to_string(code);
    link->replies[id] = {status(code), status(code), status(code)};
    auto slot = post(key_answer(id));
    ASSERT_TRUE(slot->posted.has_value()) << "no reply after one attempt";
    EXPECT_EQ(*slot->posted, code == 409L);
    EXPECT_FALSE(sched.has_pending_timeout()) << "a retry was scheduled";
    sched.trigger_timeouts();
    sched.run();
    EXPECT_EQ(link->attempts[id], 1);
  }
}

TEST_F(ResultPosterTest, TransientFailuresAreRetriedOnATimer) {
  link->replies["r1"] = {unreachable(), status(503)};
  auto slot = post(key_answer("r1"));
  EXPECT_EQ(link->attempts["r1"], 1);
  EXPECT_FALSE(slot->posted.has_value()) << "answered before the retry";
  ASSERT_TRUE(sched.has_pending_timeout());
  // First wait: 100 ms jittered to 50..100 ms.
  wait(milliseconds{49});
  EXPECT_EQ(link->attempts["r1"], 1) << "retried before the backoff";
  wait(milliseconds{51});
  EXPECT_EQ(link->attempts["r1"], 2);
  EXPECT_FALSE(slot->posted.has_value());
  // Second wait doubles: 200 ms jittered to 100..200 ms.
  wait(milliseconds{99});
  EXPECT_EQ(link->attempts["r1"], 2) << "the backoff did not grow";
  wait(milliseconds{101});
  EXPECT_EQ(link->attempts["r1"], 3);
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_TRUE(*slot->posted);
  EXPECT_FALSE(sched.has_pending_timeout());
  // The retries posted the same body.
  ASSERT_EQ(link->posts.size(), 3u);
  EXPECT_EQ(link->posts[0], link->posts[2]);
}

TEST_F(ResultPosterTest, OtherResultsAreNotHeldUpBehindARetry) {
  link->replies["slow"] = {status(503), status(502)};
  auto slow = post(key_answer("slow"));
  EXPECT_FALSE(slow->posted.has_value());
  // Posted and answered while "slow" waits for its timer.
  auto fast = post(key_answer("fast"));
  ASSERT_TRUE(fast->posted.has_value());
  EXPECT_TRUE(*fast->posted);
  EXPECT_FALSE(slow->posted.has_value());
  EXPECT_EQ(link->attempts["fast"], 1);
  EXPECT_EQ(fire_until_answered(*slow), 2);
  ASSERT_TRUE(slow->posted.has_value());
  EXPECT_TRUE(*slow->posted);
  EXPECT_EQ(link->attempts["slow"], 3);
  EXPECT_EQ(link->attempts["fast"], 1);
}

TEST_F(ResultPosterTest, GivesUpAfterMaxAttempts) {
  for (int i = 0; i < 5; ++i) {
    link->replies["r1"].push_back(status(503));
    link->replies["r1"].push_back(unreachable());
  }
  auto slot = post(key_answer("r1"));
  fire_until_answered(*slot);
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_FALSE(*slot->posted);
  EXPECT_EQ(link->attempts["r1"], 4); // max_attempts, the first included
  EXPECT_FALSE(sched.has_pending_timeout());
  wait(std::chrono::hours{1});
  EXPECT_EQ(link->attempts["r1"], 4);
}

TEST_F(ResultPosterTest, NoRetryOnceStopping) {
  stopping->store(true);
  link->replies["down"] = {status(503)};
  auto slot = post(key_answer("down"));
  ASSERT_TRUE(slot->posted.has_value()) << "waiting on a retry at shutdown";
  EXPECT_FALSE(*slot->posted);
  EXPECT_EQ(link->attempts["down"], 1);
  EXPECT_FALSE(sched.has_pending_timeout());
  // Stopping does not prevent posting: a good post still succeeds.
  auto ok = post(key_answer("up"));
  ASSERT_TRUE(ok->posted.has_value());
  EXPECT_TRUE(*ok->posted);
}

TEST_F(ResultPosterTest, StoppingDuringARetryWaitEndsAtTheNextFailure) {
  link->replies["r1"] = {status(503), unreachable(), status(503)};
  auto slot = post(key_answer("r1"));
  ASSERT_TRUE(sched.has_pending_timeout());
  stopping->store(true);
  EXPECT_EQ(fire_until_answered(*slot), 1);
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_FALSE(*slot->posted);
  EXPECT_EQ(link->attempts["r1"], 2);
  EXPECT_FALSE(sched.has_pending_timeout());
}

TEST_F(ResultPosterTest, ResultsThatArriveTogetherGoInOneBatch) {
  link->stale.insert("b");
  std::vector<std::shared_ptr<reply_slot>> slots;
  for (auto id : {"a", "b", "c"}) {
    slots.push_back(std::make_shared<reply_slot>());
    requesters.push_back(
      sys.spawn(requester, poster, key_answer(id), slots.back()));
  }
  sched.run();
  // One post carries all three; each gets its own status: a stale lease
  // settles its result (true) without failing the others.
  ASSERT_EQ(link->posts.size(), 1u);
  ASSERT_EQ(link->batches.size(), 1u);
  EXPECT_EQ(link->batches[0], (std::vector<std::string>{"a", "b", "c"}));
  for (auto& slot : slots) {
    ASSERT_TRUE(slot->posted.has_value());
    EXPECT_TRUE(*slot->posted);
  }
  EXPECT_FALSE(sched.has_pending_timeout());
}

TEST_F(ResultPosterTest, RetryingStopsBeforeTheLeaseWouldExpire) {
  link->replies["r1"] = {unreachable(), unreachable(), unreachable()};
  auto r = key_answer("r1");
  // The lease ends 150 ms from now (on the test clock): the first retry
  // (due 50..100 ms from now) fits, the second (100..200 ms later) cannot.
  r.lease_deadline = sched.clock().now() + milliseconds{150};
  auto slot = post(r);
  EXPECT_EQ(link->attempts["r1"], 1);
  wait(milliseconds{100});
  EXPECT_EQ(link->attempts["r1"], 2);
  ASSERT_TRUE(slot->posted.has_value()) << "still retrying past the lease";
  EXPECT_FALSE(*slot->posted);
  EXPECT_FALSE(sched.has_pending_timeout());
}

// -- the audit trail
// ------------------------------------------------------------

/// What the scripted audit actor saw and does.
struct audit_script {
  /// Entries appended, in order.
  std::vector<audit_entry> entries;
  /// Posts the link had received when each append arrived.
  std::vector<size_t> posts_seen;
  /// Appends still to fail.
  int failures = 0;
  std::shared_ptr<scripted_link> link;
};

audit_actor::behavior_type scripted_audit(audit_actor::pointer,
                                          std::shared_ptr<audit_script> s) {
  return {
    [s](audit_atom, const audit_batch& b) -> caf::result<bool> {
      s->posts_seen.push_back(s->link->posts.size());
      if (s->failures > 0) {
        --s->failures;
        return caf::make_error(store_errc::unavailable,
                               std::string{"scripted audit failure"});
      }
      s->entries.insert(s->entries.end(), b.entries.begin(), b.entries.end());
      return true;
    },
  };
}

/// A signature answer to a job, with the facts the audit trail keeps.
job_result audited_sign(const std::string& id) {
  signature_result sig;
  sig.key_id = "key-" + id;
  sig.scheme = scheme::p256;
  sig.sig.raw.assign(64, 1);
  sig.sig.der = {0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01};
  sig.sig.recovery_id = 0;
  sig.sig.public_key_fingerprint = "sha256:abcd";
  job_result r{id, "lease-" + id, sig, {}, {}};
  r.audit = audit_facts{job_kind::sign, "key-" + id,
                        std::vector<uint8_t>(32, 0x5a)};
  return r;
}

class AuditedPosterTest : public ResultPosterTest {
protected:
  void SetUp() override {
    script->link = link;
    audit = sys.spawn(scripted_audit, script);
    result_poster_config c;
    c.max_attempts = 4;
    c.backoff_min = milliseconds{100};
    c.backoff_max = milliseconds{400};
    c.mode = spawn_mode::scheduled;
    poster = spawn_result_poster(sys, c, link, stopping, audit);
  }

  void TearDown() override {
    self->send_exit(audit, caf::exit_reason::kill);
    ResultPosterTest::TearDown();
  }

  std::shared_ptr<audit_script> script = std::make_shared<audit_script>();
  audit_actor audit;
};

TEST_F(AuditedPosterTest, AResultIsPostedOnlyOnceItsAuditEntryIsDurable) {
  auto slot = post(audited_sign("s1"));
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_TRUE(*slot->posted);
  ASSERT_EQ(script->entries.size(), 1u);
  ASSERT_EQ(script->posts_seen.size(), 1u);
  EXPECT_EQ(script->posts_seen[0], 0u) << "posted before it was audited";
  ASSERT_EQ(link->posts.size(), 1u);
  const auto& e = script->entries[0];
  EXPECT_EQ(e.request_id, "s1");
  EXPECT_EQ(e.kind, job_kind::sign);
  EXPECT_EQ(e.key_id, "key-s1");
  EXPECT_EQ(e.public_key_fingerprint, "sha256:abcd");
  EXPECT_EQ(e.payload_sha256, std::vector<uint8_t>(32, 0x5a));
  EXPECT_EQ(e.outcome, "ok");
  EXPECT_GT(e.at_ms, 0);
  // An error answer to a job is audited with its code.
  auto failed = audited_sign("s2");
  failed.outcome = error_result{"unknown_key", "no such key", false};
  auto slot2 = post(failed);
  ASSERT_TRUE(slot2->posted.has_value());
  ASSERT_EQ(script->entries.size(), 2u);
  EXPECT_EQ(script->entries[1].outcome, "unknown_key");
  EXPECT_TRUE(script->entries[1].public_key_fingerprint.empty());
}

TEST_F(AuditedPosterTest, AFailedAppendHoldsTheResultUntilARetryWritesIt) {
  script->failures = 2;
  auto slot = post(audited_sign("s1"));
  EXPECT_FALSE(slot->posted.has_value());
  EXPECT_TRUE(link->posts.empty()) << "posted without an audit entry";
  fire_until_answered(*slot);
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_TRUE(*slot->posted);
  EXPECT_EQ(script->posts_seen.size(), 3u);
  EXPECT_EQ(script->entries.size(), 1u);
  EXPECT_EQ(link->posts.size(), 1u);
}

TEST_F(AuditedPosterTest, AResultWhoseLeaseEndsUnauditedIsNeverPosted) {
  script->failures = 1000;
  auto r = audited_sign("s1");
  r.lease_deadline = sched.clock().now() + milliseconds{250};
  auto slot = post(r);
  fire_until_answered(*slot);
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_FALSE(*slot->posted) << "given up, for redelivery";
  EXPECT_TRUE(link->posts.empty());
  EXPECT_TRUE(script->entries.empty());
}

TEST_F(AuditedPosterTest, AResultAuditedWithItsPutIsNotAppendedAgain) {
  auto r = audited_sign("g1");
  r.audit_written = true;
  auto slot = post(r);
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_TRUE(*slot->posted);
  EXPECT_TRUE(script->entries.empty()) << "appended twice";
  EXPECT_EQ(link->posts.size(), 1u);
}

TEST_F(AuditedPosterTest, AnswersToMalformedRequestsAreNotAudited) {
  auto slot = post(key_answer("m1")); // no audit facts: never a job
  ASSERT_TRUE(slot->posted.has_value());
  EXPECT_TRUE(*slot->posted);
  EXPECT_TRUE(script->posts_seen.empty());
  EXPECT_EQ(link->posts.size(), 1u);
}

} // namespace
} // namespace hsm
