// The poller on CAF's deterministic scheduler, with a scripted proxy link and
// a dispatcher that answers `credit_atom` from a script: no credit means no
// poll, the poll asks for at most the credit, valid requests become jobs and
// invalid ones error results, errors back off on the test clock, and a stop
// ends polling. No network: pure actor logic.
//
// The poller sends itself `poll_atom` after every successful poll, so while
// the dispatcher grants credit and the link answers, the scheduler never runs
// dry: these tests run it in bounded steps (`settle`), and let the credit
// script end with 0 so that the poller parks on its idle timer.

#include "actors/poller.hpp"

#include "tests/support/actor_fixture.hpp"

#include "caf/all.hpp"
#include <gtest/gtest.h>

#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace hsm {
namespace {

using std::chrono::milliseconds;

/// A proxy link that answers polls from a script and records them.
class scripted_link : public net::proxy_link {
public:
  struct poll_call {
    size_t max = 0;
    milliseconds wait{0};
  };

  caf::expected<net::http_reply> poll(size_t max, milliseconds wait) override {
    polls.push_back(poll_call{max, wait});
    if (on_poll)
      on_poll();
    if (replies.empty())
      return net::http_reply{200, R"({"requests":[]})"};
    auto r = std::move(replies.front());
    replies.pop_front();
    return r;
  }

  caf::expected<net::http_reply> post_result(const std::string&) override {
    ADD_FAILURE() << "the poller posted a result itself";
    return caf::make_error(net_errc::unreachable);
  }

  const std::string& driver_id() const override {
    return id;
  }

  /// Answers to the next polls; then empty 200 answers.
  std::deque<caf::expected<net::http_reply>> replies;
  std::vector<poll_call> polls;
  /// Runs inside each poll, as if it happened while the poll blocked.
  std::function<void()> on_poll;
  std::string id = "driver-test";
};

/// What the fake dispatcher answered and received.
struct poller_world {
  /// Credits for the next questions; then `steady_credit`; with neither,
  /// the question waits in `parked` (as the real dispatcher's does until
  /// credit appears).
  std::deque<int64_t> credits;
  int64_t steady_credit = 0;
  int credit_asks = 0;
  std::vector<caf::typed_response_promise<int64_t>> parked;
  /// What the waiting questions get when a session comes up.
  int64_t grant = 0;
  std::vector<job> jobs;
  std::vector<job_result> results;
};

dispatcher_actor::behavior_type
credit_dispatcher(dispatcher_actor::pointer self,
                  std::shared_ptr<poller_world> w) {
  return {
    [=](job_atom, const job& j) { w->jobs.push_back(j); },
    [=](result_atom, const job_result& r) { w->results.push_back(r); },
    [=](credit_atom) -> caf::result<int64_t> {
      ++w->credit_asks;
      if (!w->credits.empty()) {
        auto c = w->credits.front();
        w->credits.pop_front();
        return c;
      }
      if (w->steady_credit > 0)
        return w->steady_credit;
      auto rp = self->make_response_promise<int64_t>();
      w->parked.push_back(rp);
      return rp;
    },
    // As in the real dispatcher, a session coming up brings credit: the
    // waiting questions get `grant`.
    [=](session_up_atom, size_t, const hsm_session_actor&) {
      for (auto& rp : w->parked)
        rp.deliver(w->grant);
      w->parked.clear();
    },
    [](session_down_atom, size_t) {},
    [](deadline_atom, uint64_t) {},
    [](drain_atom) { return true; },
    [](stop_atom) {},
    [](close_atom) { return size_t{0}; },
    [](stuck_atom) { return size_t{0}; },
    [](stats_atom) { return dispatcher_stats{}; },
  };
}

net::http_reply ok_body(std::string body) {
  return net::http_reply{200, std::move(body)};
}

const error_result& error_of(const job_result& r) {
  return std::get<error_result>(r.outcome);
}

const std::string hash_hex(64, 'a');

/// Two valid requests, three invalid ones, one without an id.
const std::string mixed_body = R"({"requests":[
  {"id":"g1","lease":"L-g1","kind":"generate_key",
   "params":{"key_id":"k1","scheme":"secp256k1"}},
  {"id":"bad-scheme","lease":"L-b1","kind":"generate_key",
   "params":{"key_id":"k2","scheme":"schnorr"}},
  {"id":"s1","lease":"L-s1","kind":"sign",
   "params":{"key_id":"k1","payload":")"
                               + hash_hex + R"("}},
  {"id":"bad-kind","lease":"L-b2","kind":"decrypt","params":{"key_id":"k3"}},
  {"id":"bad-key","lease":"L-b3","kind":"sign",
   "params":{"key_id":"not a key id","payload":"00"}},
  {"lease":"L-anon","kind":"sign","params":{"key_id":"k1","payload":"00"}}
]})";

const std::string two_jobs_body = R"({"requests":[
  {"id":"late1","lease":"L-1","kind":"generate_key",
   "params":{"key_id":"k1","scheme":"p256"}},
  {"id":"late2","lease":"L-2","kind":"sign",
   "params":{"key_id":"k1","payload":")"
                                  + hash_hex + R"("}}
]})";

class PollerTest : public testing::actor_fixture {
protected:
  void SetUp() override {
    dispatcher = sys.spawn(credit_dispatcher, world);
  }

  void TearDown() override {
    link->on_poll = nullptr;
    if (poller)
      self->send_exit(poller, caf::exit_reason::kill);
    self->send_exit(dispatcher, caf::exit_reason::kill);
    sched.run(1000);
  }

  poller_config config() {
    poller_config c;
    c.poll_wait = milliseconds{20000};
    c.backoff_min = milliseconds{100};
    c.backoff_max = milliseconds{5000};
    c.mode = spawn_mode::scheduled;
    c.stopping = cfg_stopping;
    return c;
  }

  std::shared_ptr<std::atomic<bool>> cfg_stopping
    = std::make_shared<std::atomic<bool>>(false);

  void start() {
    poller = spawn_poller(sys, config(), link, dispatcher);
  }

  /// Runs the scheduler in bounded steps and checks that the poller went
  /// idle (waiting for credit, on a timer, or stopped) rather than looping.
  void settle() {
    constexpr size_t bound = 500;
    EXPECT_LT(sched.run(bound), bound) << "the poller never went idle";
  }

  /// Advances the test clock and runs what became due.
  void wait(milliseconds d) {
    sched.advance_time(d);
    settle();
  }

  std::shared_ptr<scripted_link> link = std::make_shared<scripted_link>();
  std::shared_ptr<poller_world> world = std::make_shared<poller_world>();
  dispatcher_actor dispatcher;
  poller_actor poller;
};

TEST_F(PollerTest, NoCreditMeansNoPollUntilCreditAppears) {
  start();
  settle();
  EXPECT_EQ(world->credit_asks, 1);
  // The question waits; nothing polls and nothing asks again on a timer.
  EXPECT_FALSE(sched.has_pending_timeout());
  wait(std::chrono::hours{1});
  EXPECT_EQ(world->credit_asks, 1);
  EXPECT_TRUE(link->polls.empty());
  // The moment credit appears, the poll goes out for that much.
  ASSERT_EQ(world->parked.size(), 1u);
  world->grant = 2;
  self->send(dispatcher, session_up_atom::value, size_t{0},
             hsm_session_actor{});
  settle();
  ASSERT_EQ(link->polls.size(), 1u);
  EXPECT_EQ(link->polls[0].max, 2u);
  EXPECT_EQ(world->credit_asks, 2);
  EXPECT_TRUE(world->jobs.empty());
  EXPECT_TRUE(world->results.empty());
}

TEST_F(PollerTest, PollAsksForAtMostTheCredit) {
  world->credits = {3, 1};
  start();
  settle();
  ASSERT_EQ(link->polls.size(), 2u);
  EXPECT_EQ(link->polls[0].max, 3u);
  EXPECT_EQ(link->polls[1].max, 1u);
  // The first poll returns at once (the driver is ready after one round
  // trip); the next ones wait on the proxy.
  EXPECT_EQ(link->polls[0].wait, milliseconds{0});
  EXPECT_EQ(link->polls[1].wait, milliseconds{20000});
  // The third question waits for credit: no third poll, no timer.
  EXPECT_EQ(world->credit_asks, 3);
  wait(std::chrono::hours{1});
  EXPECT_EQ(world->credit_asks, 3);
  EXPECT_EQ(link->polls.size(), 2u);
}

TEST_F(PollerTest, PollsAgainAtOnceWhileThereIsCredit) {
  world->steady_credit = 2;
  start();
  // No timer fires in between: each poll follows the previous at once.
  sched.run(60);
  EXPECT_GE(link->polls.size(), 5u);
  for (auto& p : link->polls)
    EXPECT_EQ(p.max, 2u);
  EXPECT_TRUE(sched.has_job()) << "the poller should still be polling";
}

TEST_F(PollerTest, ValidRequestsBecomeJobsInvalidOnesErrorResults) {
  world->credits = {8};
  link->replies.push_back(ok_body(mixed_body));
  start();
  settle();
  ASSERT_EQ(link->polls.size(), 1u);
  ASSERT_EQ(world->jobs.size(), 2u);
  EXPECT_EQ(world->jobs[0].id, "g1");
  EXPECT_EQ(world->jobs[0].lease, "L-g1");
  EXPECT_EQ(world->jobs[0].kind, job_kind::generate_key);
  EXPECT_EQ(world->jobs[0].key_id, "k1");
  EXPECT_EQ(world->jobs[0].scheme, scheme::secp256k1);
  EXPECT_EQ(world->jobs[1].id, "s1");
  EXPECT_EQ(world->jobs[1].kind, job_kind::sign);
  EXPECT_EQ(world->jobs[1].payload, std::vector<uint8_t>(32, 0xaa));
  // Each invalid request is answered (through the dispatcher, which counts
  // the lease), never run; the one without an id cannot be answered.
  ASSERT_EQ(world->results.size(), 3u);
  const std::pair<const char*, const char*> expected[] = {
    {"bad-scheme", "scheme_unsupported"},
    {"bad-kind", "invalid_request"},
    {"bad-key", "invalid_request"},
  };
  for (size_t i = 0; i < 3; ++i) {
    auto& r = world->results[i];
    EXPECT_EQ(r.id, expected[i].first);
    ASSERT_FALSE(r.ok()) << r.id;
    EXPECT_EQ(error_of(r).code, expected[i].second) << r.id;
    EXPECT_FALSE(error_of(r).retryable) << r.id;
  }
  EXPECT_EQ(world->results[0].lease, "L-b1");
  for (auto& j : world->jobs)
    EXPECT_TRUE(j.id != "bad-scheme" && j.id != "bad-kind" && j.id != "bad-key")
      << j.id;
}

TEST_F(PollerTest, TransportErrorsAndServerErrorsBackOff) {
  // The third poll asks for two requests (and gets them).
  world->credits = {1, 1, 2, 1};
  link->replies.push_back(
    caf::make_error(net_errc::unreachable, std::string{"refused"}));
  link->replies.push_back(net::http_reply{500, "oops"});
  link->replies.push_back(ok_body(two_jobs_body));
  link->replies.push_back(
    caf::make_error(net_errc::unreachable, std::string{"reset"}));
  start();
  settle();
  ASSERT_EQ(link->polls.size(), 1u);
  // First backoff: 100 ms, jittered to 50..100 ms.
  wait(milliseconds{49});
  EXPECT_EQ(link->polls.size(), 1u) << "polled again without backing off";
  wait(milliseconds{51});
  ASSERT_EQ(link->polls.size(), 2u);
  // HTTP 500: doubled, 200 ms jittered to 100..200 ms.
  wait(milliseconds{99});
  EXPECT_EQ(link->polls.size(), 2u) << "the backoff did not grow";
  wait(milliseconds{101});
  // The third poll succeeds; the fourth follows at once and fails.
  ASSERT_EQ(link->polls.size(), 4u);
  EXPECT_EQ(world->jobs.size(), 2u);
  // Until a poll reached the proxy, none waits on it; after one did, the
  // next waits the full poll wait.
  EXPECT_EQ(link->polls[0].wait, milliseconds{0});
  EXPECT_EQ(link->polls[1].wait, milliseconds{0});
  EXPECT_EQ(link->polls[2].wait, milliseconds{0});
  EXPECT_EQ(link->polls[3].wait, milliseconds{20000});
  EXPECT_EQ(world->credit_asks, 4);
  // A success reset the backoff: the minimum again (50..100 ms).
  wait(milliseconds{49});
  EXPECT_EQ(world->credit_asks, 4);
  wait(milliseconds{51});
  EXPECT_EQ(world->credit_asks, 5);
  EXPECT_EQ(link->polls.size(), 4u); // that question waits for credit
}

TEST_F(PollerTest, MalformedPollResponsesBackOffLikeFailures) {
  world->credits = {1, 1, 1, 1};
  link->replies.push_back(ok_body("<html>not json</html>"));
  link->replies.push_back(ok_body("\x01\x02 garbage"));
  link->replies.push_back(ok_body(R"({"requests":[]})"));
  start();
  settle();
  ASSERT_EQ(link->polls.size(), 1u);
  // First: 100 ms, jittered to 50..100 ms.
  wait(milliseconds{49});
  EXPECT_EQ(link->polls.size(), 1u) << "polled again without backing off";
  wait(milliseconds{51});
  ASSERT_EQ(link->polls.size(), 2u);
  // Garbage again: doubled, 200 ms jittered to 100..200 ms.
  wait(milliseconds{99});
  EXPECT_EQ(link->polls.size(), 2u) << "the backoff did not grow";
  wait(milliseconds{101});
  ASSERT_GE(link->polls.size(), 3u);
  EXPECT_TRUE(world->jobs.empty());
  EXPECT_TRUE(world->results.empty());
}

TEST_F(PollerTest, NoPollAfterStop) {
  world->steady_credit = 1;
  start();
  sched.run(30);
  ASSERT_FALSE(link->polls.empty());
  auto h = self->request(poller, caf::infinite, stop_atom::value);
  settle();
  ASSERT_FALSE(self->mailbox().empty()) << "no answer to stop";
  bool stopped = false;
  h.receive([&](bool b) { stopped = b; },
            [&](caf::error& err) { ADD_FAILURE() << describe(err); });
  EXPECT_TRUE(stopped);
  auto polls = link->polls.size();
  auto asks = world->credit_asks;
  // Neither a late poll_atom nor any timer starts polling again.
  self->send(poller, poll_atom::value);
  wait(std::chrono::hours{1});
  sched.trigger_timeouts();
  settle();
  EXPECT_EQ(link->polls.size(), polls);
  EXPECT_EQ(world->credit_asks, asks);
}

// Requests leased by the poll during which the stop arrived are answered at
// once as retryable ("driver shutting down"), not run. The stop_atom cannot
// be handled while the poll blocks; the shared flag, set first (as the
// daemon does), is seen when the poll returns.
TEST_F(PollerTest, RequestsLeasedAfterTheStopAreHandedBack) {
  world->credits = {2};
  link->replies.push_back(ok_body(two_jobs_body));
  link->on_poll = [this] {
    link->on_poll = nullptr;
    cfg_stopping->store(true);
    self->send(poller, stop_atom::value); // arrives while the poll blocks
  };
  start();
  settle();
  ASSERT_EQ(link->polls.size(), 1u);
  EXPECT_TRUE(world->jobs.empty()) << world->jobs.size() << " job(s) started "
                                   << "after the stop";
  ASSERT_EQ(world->results.size(), 2u);
  for (auto& r : world->results) {
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(error_of(r).retryable) << r.id;
    EXPECT_NE(error_of(r).message.find("shutting down"), std::string::npos)
      << error_of(r).message;
  }
}

TEST_F(PollerTest, StopDuringAPollRepliesAfterThePollAndEndsPolling) {
  world->steady_credit = 2;
  link->replies.push_back(ok_body(two_jobs_body));
  link->on_poll = [this] {
    link->on_poll = nullptr;
    self->send(poller, stop_atom::value); // arrives while the poll blocks
  };
  start();
  settle();
  // The poll in progress ends; then the stop is answered and no further
  // poll is made although credit is still granted.
  EXPECT_EQ(link->polls.size(), 1u);
  ASSERT_FALSE(self->mailbox().empty()) << "no answer to stop";
  self->receive([](bool b) { EXPECT_TRUE(b); });
  EXPECT_EQ(world->jobs.size() + world->results.size(), 2u)
    << "every request of the last poll is either run or handed back";
  wait(std::chrono::hours{1});
  EXPECT_EQ(link->polls.size(), 1u);
}

} // namespace
} // namespace hsm
