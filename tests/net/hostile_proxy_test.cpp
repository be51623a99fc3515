// The driver's side of the protocol against a proxy that misbehaves on
// purpose: the reference proxy's fault switches (reset mid-poll, 5xx, slow,
// garbage, duplicate, over-delivered and oversized answers) and request ids
// no driver should use. The proxy client and the poll decoder are driven as
// the poller drives them: poll for at most `max`, read the answer with that
// `max`, answer every usable request on a connection of its own, and after
// a failed poll wait before the next, doubling the wait (the poller's
// backoff, with its actor plumbing left out). What the tests check is what
// the poller's backoff rests on, that each fault comes back from the client
// as an error or an HTTP error status (never a crash, never a body past the
// cap, never a call sent twice), and that nothing is lost: every request
// ends answered, the leases of broken answers coming back when they expire.

#include "runtime/net/proxy_client.hpp"
#include "runtime/net/reference_proxy.hpp"
#include "runtime/net/wire_codec.hpp"
#include "tests/net/pki_suite.hpp"
#include "tests/support/wait.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace hsm::net {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

/// What the driver's side saw over a run.
struct seen {
  /// Polls that failed, by what came back: `net_errc` names, or `HTTP n`.
  std::map<std::string, size_t> failures;
  /// Polls answered with a readable body.
  size_t answers = 0;
  /// The decoder's counts, summed.
  size_t excess = 0;
  size_t duplicates = 0;
  size_t unanswerable = 0;
  /// Results posted, and how the proxy took them.
  size_t accepted = 0;
  size_t refused = 0;
  /// Most requests taken from one answer.
  size_t most_per_poll = 0;
};

/// The driver's side of one connection pair: polls on one client, posts on
/// the other.
class driver_side {
public:
  driver_side(std::unique_ptr<proxy_client> polls,
              std::unique_ptr<proxy_client> posts, size_t max)
    : polls_(std::move(polls)), posts_(std::move(posts)), max_(max) {
    // nop
  }

  /// One poll and its answers; after a failure, the backoff wait.
  void round(std::chrono::milliseconds wait) {
    auto reply = polls_->poll(max_, wait);
    if (!reply || reply->status != 200) {
      fail(reply ? "HTTP " + std::to_string(reply->status)
                 : to_string(static_cast<net_errc>(reply.error().code())));
      return;
    }
    auto decoded = decode_poll(reply->body, max_);
    if (!decoded) {
      fail(to_string(static_cast<net_errc>(decoded.error().code())));
      return;
    }
    backoff_ = 0ms;
    ++seen_.answers;
    seen_.excess += decoded->excess;
    seen_.duplicates += decoded->duplicates;
    seen_.unanswerable += decoded->unanswerable;
    seen_.most_per_poll = std::max(seen_.most_per_poll,
                                   decoded->requests.size());
    for (const auto& r : decoded->requests) {
      auto body = json{{"id", r.id},
                       {"lease", r.lease},
                       {"driver_id", posts_->driver_id()},
                       {"ok", true},
                       {"result", {{"key_id", r.key_id}}}}
                    .dump();
      auto posted = posts_->post_result(body);
      if (posted && posted->status == 200)
        ++seen_.accepted;
      else
        ++seen_.refused;
    }
  }

  const seen& what() const {
    return seen_;
  }

  uint64_t reconnects() const {
    return polls_->reconnects() + posts_->reconnects();
  }

private:
  void fail(const std::string& what) {
    ++seen_.failures[what];
    backoff_ = std::clamp<std::chrono::milliseconds>(backoff_ * 2, 20ms, 320ms);
    std::this_thread::sleep_for(backoff_);
  }

  std::unique_ptr<proxy_client> polls_;
  std::unique_ptr<proxy_client> posts_;
  size_t max_;
  std::chrono::milliseconds backoff_{0};
  seen seen_;
};

class HostileProxyTest : public pki_suite<HostileProxyTest> {
public:
  static constexpr const char* suite_dir = "hsm_net_hostile_proxy";

protected:
  void TearDown() override {
    driver_.reset();
    proxy_.reset();
  }

  /// A proxy with short leases (broken answers come back quickly).
  void start(std::chrono::milliseconds lease) {
    reference_proxy_config cfg;
    cfg.server_cert = pki_->server_chain;
    cfg.server_key = pki_->server_key;
    cfg.client_ca = pki_->root_cert;
    cfg.lease_duration = lease;
    cfg.max_wait = 5s;
    cfg.slow_body_pieces = 4;
    cfg.slow_body_delay = 50ms;
    cfg.over_delivery_extra = 2;
    auto proxy = reference_proxy::start(cfg);
    ASSERT_TRUE(proxy) << describe(proxy.error());
    proxy_ = std::move(*proxy);
  }

  std::unique_ptr<proxy_client> client() {
    proxy_client_config cfg;
    cfg.proxy_addr = "127.0.0.1:" + std::to_string(proxy_->port());
    cfg.tls = {pki_->root_cert, pki_->driver_chain, pki_->driver_key};
    cfg.driver_id = "driver-a";
    cfg.connect_timeout = 2s;
    cfg.poll_grace = 2s;
    cfg.post_timeout = 2s;
    auto c = proxy_client::create(cfg);
    EXPECT_TRUE(c) << describe(c.error());
    return c ? std::move(*c) : nullptr;
  }

  void start_driver(size_t max) {
    auto polls = client();
    auto posts = client();
    ASSERT_TRUE(polls && posts);
    driver_ = std::make_unique<driver_side>(std::move(polls), std::move(posts),
                                            max);
  }

  /// Runs the driver until `ids` are all done (or the limit passes).
  ::testing::AssertionResult
  serve_until_done(const std::vector<std::string>& ids,
                   std::chrono::milliseconds limit = 30s) {
    return test::wait_until(
      [&] {
        driver_->round(100ms);
        return std::all_of(ids.begin(), ids.end(), [&](const auto& id) {
          auto st = proxy_->request_state(id);
          return st && (*st)["state"] == "done";
        });
      },
      limit, "every request to be answered", 0ms);
  }

  std::unique_ptr<reference_proxy> proxy_;
  std::unique_ptr<driver_side> driver_;
};

TEST_F(HostileProxyTest, EveryFaultIsSurvivedAndNothingIsLost) {
  start(1500ms);
  start_driver(2);
  std::vector<std::string> ids;
  for (int i = 0; i < 8; ++i)
    ids.push_back(proxy_->enqueue(
      "generate_key", {{"key_id", "k" + std::to_string(i)}, {"scheme", "p256"}},
      "r" + std::to_string(i)));
  // One answer each, in this order.
  for (auto f : {poll_fault::duplicate_delivery, poll_fault::over_delivery,
                 poll_fault::server_error, poll_fault::reset,
                 poll_fault::garbage_body, poll_fault::oversized_body,
                 poll_fault::slow_body, poll_fault::server_error})
    proxy_->inject(f);
  ASSERT_TRUE(serve_until_done(ids));
  EXPECT_TRUE(proxy_->pending_faults().empty());
  const auto& w = driver_->what();
  // Each breaking fault came back as a failure the poller backs off on:
  // 503 twice (an HTTP error status), the reset as a transport error, the
  // garbage as an unreadable body, the oversized body as a bad response
  // (the transfer aborted at the cap).
  EXPECT_EQ(w.failures.at("HTTP 503"), 2u);
  EXPECT_EQ(w.failures.at("unreachable"), 1u);
  EXPECT_EQ(w.failures.at("bad_response"), 2u);
  EXPECT_EQ(w.failures.size(), 3u);
  // The call whose answer was cut short went out once.
  EXPECT_EQ(driver_->reconnects(), 0u);
  // Of [r0, r0, r1, r1] with max 2: r0 taken, its copy dropped, r1 taken,
  // its copy past the second place (excess); of the over-delivered four,
  // two taken and two not.
  EXPECT_EQ(w.duplicates, 1u);
  EXPECT_EQ(w.excess, 3u);
  EXPECT_LE(w.most_per_poll, 2u);
  // Nothing lost, nothing answered twice: every request done with the one
  // result the driver posted for it; those of the broken answers (2 over-
  // delivered, 2 under the reset, any under the garbage and the oversized
  // answer) came back when their leases expired.
  EXPECT_EQ(w.accepted, ids.size());
  EXPECT_EQ(w.refused, 0u);
  auto s = proxy_->stats();
  EXPECT_EQ(s.done, ids.size());
  EXPECT_EQ(s.leased, 0u);
  EXPECT_EQ(s.queued, 0u);
  EXPECT_GE(s.redelivered, 4u);
  EXPECT_EQ(s.faulted_polls, 8u);
  for (const auto& id : ids) {
    auto st = proxy_->request_state(id);
    ASSERT_TRUE(st) << id;
    EXPECT_EQ((*st)["ok"], true) << id;
  }
}

TEST_F(HostileProxyTest, RequestsWithUnusableIdsAreNeverServedNorAnswered) {
  // The proxy hands out ids no driver should echo (a line break that would
  // forge a log line, a terminal escape, 200 characters, a space): they are
  // left alone, lease after lease, while the good one is served.
  start(300ms);
  start_driver(4);
  std::vector<std::string> bad{"evil\nINFO forged", "\x1b[2Jclear",
                               std::string(200, 'a'), "with space"};
  for (const auto& id : bad)
    proxy_->enqueue("generate_key", {{"key_id", "k1"}, {"scheme", "p256"}}, id);
  auto good = proxy_->enqueue("generate_key",
                              {{"key_id", "k2"}, {"scheme", "p256"}}, "good-1");
  ASSERT_TRUE(serve_until_done({good}));
  // Past one lease of the bad ones, so that they came back at least once.
  ASSERT_TRUE(test::wait_until(
    [&] {
      driver_->round(100ms);
      return driver_->what().unanswerable >= 2 * bad.size();
    },
    10s, "the bad requests to be delivered twice"));
  const auto& w = driver_->what();
  EXPECT_EQ(w.accepted, 1u);
  EXPECT_EQ(w.refused, 0u);
  for (const auto& id : bad) {
    auto st = proxy_->request_state(id);
    ASSERT_TRUE(st);
    EXPECT_NE((*st)["state"], "done") << printable(id);
    EXPECT_GE((*st)["deliveries"].get<int>(), 1) << printable(id);
  }
}

TEST_F(HostileProxyTest, OversizedAnswerIsCutAtTheCapEveryTime) {
  // A proxy that answers every poll with more than the cap: each poll fails
  // as a bad response, the client stays usable, and the requests under
  // those answers are served once the proxy behaves.
  start(1000ms);
  start_driver(1);
  auto id = proxy_->enqueue("generate_key",
                            {{"key_id", "k1"}, {"scheme", "p256"}}, "r1");
  proxy_->inject(poll_fault::oversized_body, 3);
  ASSERT_TRUE(serve_until_done({id}));
  const auto& w = driver_->what();
  EXPECT_EQ(w.failures.at("bad_response"), 3u);
  EXPECT_EQ(w.accepted, 1u);
  EXPECT_EQ(proxy_->stats().done, 1u);
}

} // namespace
} // namespace hsm::net
