#include "runtime/net/lease_queue.hpp"

#include "runtime/base/clock.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <set>
#include <string>
#include <vector>

namespace hsm::net {
namespace {

using namespace std::chrono_literals;

constexpr auto lease_time = 10s;

request_outcome ok_outcome(std::string body = R"({"public_key":"02ab"})") {
  return request_outcome{true, false, std::move(body)};
}

request_outcome error_outcome(bool retryable) {
  return request_outcome{
    false, retryable,
    R"({"code":"hsm_unavailable","message":"no session","retryable":)"
      + std::string{retryable ? "true" : "false"} + "}"};
}

/// A queue on a manual clock; time moves only with `advance`.
class LeaseQueueTest : public ::testing::Test {
protected:
  void advance(std::chrono::milliseconds d) {
    clk.advance(d);
  }

  request_status status_of(const std::string& id) {
    auto info = queue.find(id);
    EXPECT_TRUE(info.has_value()) << id;
    return info ? info->status : request_status::done;
  }

  /// Enqueues `n` sign requests with ids `r0`, `r1`, ...
  std::vector<std::string> enqueue_n(int n) {
    std::vector<std::string> ids;
    for (int i = 0; i < n; ++i)
      ids.push_back(queue.enqueue("sign", "{}", "r" + std::to_string(i)));
    return ids;
  }

  manual_clock clk;
  lease_queue queue{clk, lease_time};
};

// -- enqueue and lease --------------------------------------------------------

TEST_F(LeaseQueueTest, LeaseHandsOutKindParamsAndALease) {
  auto id = queue.enqueue("generate_key", R"({"key_id":"k1"})");
  ASSERT_FALSE(id.empty());
  EXPECT_EQ(status_of(id), request_status::queued);
  auto got = queue.lease("driver-a", 10);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].id, id);
  EXPECT_EQ(got[0].kind, "generate_key");
  EXPECT_EQ(got[0].params, R"({"key_id":"k1"})");
  EXPECT_FALSE(got[0].lease.empty());
  auto info = queue.find(id);
  ASSERT_TRUE(info);
  EXPECT_EQ(info->status, request_status::leased);
  EXPECT_EQ(info->deliveries, 1u);
  EXPECT_EQ(info->driver, "driver-a");
  EXPECT_FALSE(info->outcome);
  EXPECT_FALSE(queue.has_work());
  EXPECT_TRUE(queue.lease("driver-a", 10).empty());
}

TEST_F(LeaseQueueTest, GeneratedIdsAreDistinct) {
  std::set<std::string> ids;
  for (int i = 0; i < 100; ++i)
    ids.insert(queue.enqueue("sign", "{}"));
  EXPECT_EQ(ids.size(), 100u);
  EXPECT_EQ(queue.stats().queued, 100u);
}

TEST_F(LeaseQueueTest, ExistingIdIsNotEnqueuedTwiceInAnyState) {
  EXPECT_EQ(queue.enqueue("sign", R"({"n":1})", "req-1"), "req-1");
  EXPECT_EQ(queue.enqueue("sign", R"({"n":2})", "req-1"), "req-1");
  EXPECT_EQ(queue.stats().queued, 1u);
  auto got = queue.lease("driver-a", 10);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].params, R"({"n":1})"); // the first one stays
  // Leased: still not enqueued again.
  EXPECT_EQ(queue.enqueue("sign", "{}", "req-1"), "req-1");
  EXPECT_FALSE(queue.has_work());
  // Done: neither.
  ASSERT_EQ(queue.complete("req-1", got[0].lease, ok_outcome()),
            completion::accepted);
  EXPECT_EQ(queue.enqueue("sign", "{}", "req-1"), "req-1");
  EXPECT_FALSE(queue.has_work());
  EXPECT_EQ(status_of("req-1"), request_status::done);
  EXPECT_EQ(queue.find("req-1")->deliveries, 1u);
}

TEST_F(LeaseQueueTest, LeaseHonoursMaxInFifoOrder) {
  auto ids = enqueue_n(5);
  auto first = queue.lease("driver-a", 2);
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(first[0].id, ids[0]);
  EXPECT_EQ(first[1].id, ids[1]);
  auto one = queue.lease("driver-b", 1);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].id, ids[2]);
  auto rest = queue.lease("driver-a", 10);
  ASSERT_EQ(rest.size(), 2u);
  EXPECT_EQ(rest[0].id, ids[3]);
  EXPECT_EQ(rest[1].id, ids[4]);
  EXPECT_NE(first[0].lease, first[1].lease);
  EXPECT_EQ(queue.stats().leased, 5u);
  EXPECT_EQ(queue.stats().queued, 0u);
}

TEST_F(LeaseQueueTest, MaxOfZeroLeasesNothing) {
  enqueue_n(1);
  EXPECT_TRUE(queue.lease("driver-a", 0).empty());
  EXPECT_TRUE(queue.has_work());
}

// -- answers ------------------------------------------------------------------

TEST_F(LeaseQueueTest, ResultIsAcceptedOnceThenRefused) {
  auto id = queue.enqueue("sign", "{}");
  auto got = queue.lease("driver-a", 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(queue.complete(id, got[0].lease, ok_outcome()),
            completion::accepted);
  EXPECT_EQ(queue.complete(id, got[0].lease, ok_outcome()),
            completion::already_answered);
  auto info = queue.find(id);
  ASSERT_TRUE(info);
  EXPECT_EQ(info->status, request_status::done);
  EXPECT_TRUE(info->driver.empty());
  ASSERT_TRUE(info->outcome);
  EXPECT_TRUE(info->outcome->ok);
  EXPECT_EQ(info->outcome->body, R"({"public_key":"02ab"})");
  auto s = queue.stats();
  EXPECT_EQ(s.done, 1u);
  EXPECT_EQ(s.rejected_results, 1u);
  EXPECT_EQ(s.leased, 0u);
  EXPECT_EQ(s.queued, 0u);
  EXPECT_EQ(s.in_flight["driver-a"], 0u);
  EXPECT_FALSE(queue.next_expiry());
}

TEST_F(LeaseQueueTest, RefusesUnknownIdAndWrongLease) {
  auto id = queue.enqueue("sign", "{}");
  auto got = queue.lease("driver-a", 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(queue.complete("no-such-request", got[0].lease, ok_outcome()),
            completion::unknown_request);
  EXPECT_EQ(queue.complete(id, "not-the-lease", ok_outcome()),
            completion::lease_not_current);
  EXPECT_EQ(status_of(id), request_status::leased);
  EXPECT_EQ(queue.stats().rejected_results, 2u);
  EXPECT_EQ(queue.complete(id, got[0].lease, ok_outcome()),
            completion::accepted);
}

TEST_F(LeaseQueueTest, ResultForQueuedRequestIsRefused) {
  auto id = queue.enqueue("sign", "{}");
  EXPECT_EQ(queue.complete(id, "", ok_outcome()),
            completion::lease_not_current);
  EXPECT_EQ(status_of(id), request_status::queued);
}

TEST_F(LeaseQueueTest, FailedResultIsStored) {
  auto id = queue.enqueue("sign", "{}");
  auto got = queue.lease("driver-a", 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(queue.complete(id, got[0].lease, error_outcome(false)),
            completion::accepted);
  auto info = queue.find(id);
  ASSERT_TRUE(info && info->outcome);
  EXPECT_EQ(info->status, request_status::done);
  EXPECT_FALSE(info->outcome->ok);
  EXPECT_EQ(info->outcome->body, error_outcome(false).body);
  EXPECT_EQ(queue.stats().done, 1u);
}

TEST_F(LeaseQueueTest, RetryableErrorRequeuesAtTheFront) {
  auto ids = enqueue_n(2);
  auto first = queue.lease("driver-a", 1);
  ASSERT_EQ(first.size(), 1u);
  ASSERT_EQ(first[0].id, ids[0]);
  EXPECT_EQ(queue.complete(ids[0], first[0].lease, error_outcome(true)),
            completion::accepted);
  EXPECT_EQ(status_of(ids[0]), request_status::queued);
  EXPECT_FALSE(queue.find(ids[0])->outcome);
  EXPECT_EQ(queue.stats().done, 0u);
  EXPECT_EQ(queue.stats().in_flight["driver-a"], 0u);
  auto second = queue.lease("driver-b", 1);
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(second[0].id, ids[0]); // before ids[1], which waited longer
  EXPECT_NE(second[0].lease, first[0].lease);
  EXPECT_EQ(queue.find(ids[0])->deliveries, 2u);
  EXPECT_EQ(queue.stats().redelivered, 1u);
  // The first lease ended with its answer.
  EXPECT_EQ(queue.complete(ids[0], first[0].lease, ok_outcome()),
            completion::lease_not_current);
}

// -- expiry and redelivery ----------------------------------------------------

TEST_F(LeaseQueueTest, LeaseLastsExactlyItsDuration) {
  auto id = queue.enqueue("sign", "{}");
  auto got = queue.lease("driver-a", 1);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(queue.next_expiry(), clk.steady_now() + lease_time);
  advance(lease_time - 1ms);
  EXPECT_EQ(status_of(id), request_status::leased);
  EXPECT_FALSE(queue.has_work());
  advance(1ms);
  EXPECT_TRUE(queue.has_work());
  auto info = queue.find(id);
  ASSERT_TRUE(info);
  EXPECT_EQ(info->status, request_status::queued);
  EXPECT_EQ(info->deliveries, 1u);
  EXPECT_TRUE(info->driver.empty());
  EXPECT_FALSE(queue.next_expiry());
}

TEST_F(LeaseQueueTest, ExpiredLeaseShowsInStatsAsQueued) {
  enqueue_n(1);
  ASSERT_EQ(queue.lease("driver-a", 1).size(), 1u);
  EXPECT_EQ(queue.stats().leased, 1u);
  advance(lease_time);
  auto s = queue.stats();
  EXPECT_EQ(s.queued, 1u);
  EXPECT_EQ(s.leased, 0u);
  EXPECT_EQ(s.in_flight["driver-a"], 0u);
  EXPECT_EQ(s.max_in_flight["driver-a"], 1u);
  EXPECT_EQ(s.redelivered, 0u); // counted when delivered again
}

TEST_F(LeaseQueueTest, ExpiredLeaseIsRedeliveredFirstWithNewLease) {
  auto ids = enqueue_n(2);
  auto first = queue.lease("driver-a", 1);
  ASSERT_EQ(first.size(), 1u);
  ASSERT_EQ(first[0].id, ids[0]);
  advance(lease_time);
  EXPECT_EQ(queue.expire(), 1u);
  EXPECT_EQ(queue.expire(), 0u);
  auto again = queue.lease("driver-b", 1);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].id, ids[0]); // before ids[1]
  EXPECT_NE(again[0].lease, first[0].lease);
  auto info = queue.find(ids[0]);
  ASSERT_TRUE(info);
  EXPECT_EQ(info->deliveries, 2u);
  EXPECT_EQ(info->driver, "driver-b");
  auto s = queue.stats();
  EXPECT_EQ(s.redelivered, 1u);
  EXPECT_EQ(s.in_flight["driver-a"], 0u);
  EXPECT_EQ(s.in_flight["driver-b"], 1u);
  EXPECT_EQ(s.queued, 1u);
}

TEST_F(LeaseQueueTest, StaleLeaseResultIsRefused) {
  auto id = queue.enqueue("sign", "{}");
  auto first = queue.lease("driver-a", 1);
  ASSERT_EQ(first.size(), 1u);
  advance(lease_time);
  // Expired and not yet leased again.
  EXPECT_EQ(queue.complete(id, first[0].lease, ok_outcome()),
            completion::lease_not_current);
  auto again = queue.lease("driver-b", 1);
  ASSERT_EQ(again.size(), 1u);
  // Expired and leased to someone else.
  EXPECT_EQ(queue.complete(id, first[0].lease, ok_outcome()),
            completion::lease_not_current);
  EXPECT_EQ(status_of(id), request_status::leased);
  EXPECT_EQ(queue.complete(id, again[0].lease, ok_outcome()),
            completion::accepted);
  auto s = queue.stats();
  EXPECT_EQ(s.rejected_results, 2u);
  EXPECT_EQ(s.done, 1u);
}

TEST_F(LeaseQueueTest, ResultAtTheExpiryInstantIsRefused) {
  auto id = queue.enqueue("sign", "{}");
  auto got = queue.lease("driver-a", 1);
  ASSERT_EQ(got.size(), 1u);
  advance(lease_time);
  EXPECT_EQ(queue.complete(id, got[0].lease, ok_outcome()),
            completion::lease_not_current);
}

TEST_F(LeaseQueueTest, ExpiredLeasesComeBackInExpiryOrder) {
  auto ids = enqueue_n(4);
  ASSERT_EQ(queue.lease("driver-a", 1).size(), 1u); // r0
  advance(1s);
  ASSERT_EQ(queue.lease("driver-a", 1).size(), 1u); // r1
  advance(1s);
  ASSERT_EQ(queue.lease("driver-a", 1).size(), 1u); // r2
  // r0 and r1 expire; r2 does not, r3 stays queued behind them.
  advance(lease_time - 1s);
  EXPECT_EQ(queue.next_expiry(), clk.steady_now() + 1s);
  auto got = queue.lease("driver-b", 10);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[0].id, ids[0]);
  EXPECT_EQ(got[1].id, ids[1]);
  EXPECT_EQ(got[2].id, ids[3]);
  EXPECT_EQ(status_of(ids[2]), request_status::leased);
}

TEST_F(LeaseQueueTest, NextExpiryIsTheEarliestLease) {
  EXPECT_FALSE(queue.next_expiry());
  enqueue_n(2);
  auto t0 = clk.steady_now();
  ASSERT_EQ(queue.lease("driver-a", 1).size(), 1u);
  advance(3s);
  ASSERT_EQ(queue.lease("driver-a", 1).size(), 1u);
  EXPECT_EQ(queue.next_expiry(), t0 + lease_time);
  advance(lease_time - 3s);
  EXPECT_EQ(queue.next_expiry(), t0 + 3s + lease_time);
}

// -- leases given back --------------------------------------------------------

TEST_F(LeaseQueueTest, GivenBackLeasesAreQueuedFirstInOrderAndNotCounted) {
  auto ids = enqueue_n(3);
  auto got = queue.lease("dead", 2);
  ASSERT_EQ(got.size(), 2u);
  // Last to first, as the proxy gives back the leases of one answer.
  EXPECT_TRUE(queue.give_back(got[1].id, got[1].lease));
  EXPECT_TRUE(queue.give_back(got[0].id, got[0].lease));
  auto s = queue.stats();
  EXPECT_EQ(s.queued, 3u);
  EXPECT_EQ(s.leased, 0u);
  EXPECT_EQ(s.in_flight["dead"], 0u);
  EXPECT_EQ(s.given_back, 2u);
  EXPECT_EQ(s.redelivered, 0u);
  EXPECT_EQ(queue.find(ids[0])->deliveries, 0u);
  EXPECT_EQ(status_of(ids[0]), request_status::queued);
  // The next poll gets them, in their first order, as first deliveries.
  auto again = queue.lease("live", 3);
  ASSERT_EQ(again.size(), 3u);
  EXPECT_EQ(again[0].id, ids[0]);
  EXPECT_EQ(again[1].id, ids[1]);
  EXPECT_EQ(again[2].id, ids[2]);
  EXPECT_EQ(queue.find(ids[0])->deliveries, 1u);
  EXPECT_EQ(queue.stats().redelivered, 0u);
  // The old lease is gone: its answer is refused.
  EXPECT_EQ(queue.complete(got[0].id, got[0].lease, ok_outcome()),
            completion::lease_not_current);
}

TEST_F(LeaseQueueTest, OnlyACurrentLeaseCanBeGivenBack) {
  auto ids = enqueue_n(2);
  auto got = queue.lease("a", 2);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_FALSE(queue.give_back(got[0].id, "not-the-lease"));
  EXPECT_FALSE(queue.give_back("no-such-id", got[0].lease));
  ASSERT_EQ(queue.complete(got[0].id, got[0].lease, ok_outcome()),
            completion::accepted);
  EXPECT_FALSE(queue.give_back(got[0].id, got[0].lease)); // answered
  advance(lease_time);
  EXPECT_FALSE(queue.give_back(got[1].id, got[1].lease)); // expired
  // A redelivery given back counts as neither delivery nor redelivery.
  auto again = queue.lease("b", 1);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(queue.stats().redelivered, 1u);
  EXPECT_TRUE(queue.give_back(again[0].id, again[0].lease));
  EXPECT_EQ(queue.stats().redelivered, 0u);
  EXPECT_EQ(queue.find(ids[1])->deliveries, 1u);
  EXPECT_EQ(queue.stats().given_back, 1u);
  EXPECT_EQ(status_of(ids[0]), request_status::done);
}

// -- stats --------------------------------------------------------------------

TEST_F(LeaseQueueTest, InFlightIsCountedPerDriver) {
  enqueue_n(4);
  auto a = queue.lease("driver-a", 2);
  auto b = queue.lease("driver-b", 1);
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 1u);
  auto s = queue.stats();
  EXPECT_EQ(s.in_flight["driver-a"], 2u);
  EXPECT_EQ(s.in_flight["driver-b"], 1u);
  EXPECT_EQ(s.queued, 1u);
  EXPECT_EQ(s.leased, 3u);
  ASSERT_EQ(queue.complete(a[0].id, a[0].lease, ok_outcome()),
            completion::accepted);
  s = queue.stats();
  EXPECT_EQ(s.in_flight["driver-a"], 1u);
  EXPECT_EQ(s.max_in_flight["driver-a"], 2u);
  EXPECT_EQ(s.max_in_flight["driver-b"], 1u);
  EXPECT_EQ(s.done, 1u);
  EXPECT_EQ(s.leased, 2u);
}

TEST_F(LeaseQueueTest, UnknownIdHasNoState) {
  EXPECT_FALSE(queue.find("no-such-id"));
}

// -- leases belong to their holder
// ---------------------------------------------

TEST_F(LeaseQueueTest, LeasesAre128RandomBitsAndNeverRepeat) {
  enqueue_n(200);
  std::set<std::string> seen;
  for (const auto& d : queue.lease("driver-a", 200)) {
    ASSERT_EQ(d.lease.size(), 6u + 32u) << d.lease;
    EXPECT_EQ(d.lease.rfind("lease-", 0), 0u) << d.lease;
    EXPECT_EQ(d.lease.find_first_not_of("0123456789abcdef", 6),
              std::string::npos)
      << d.lease;
    seen.insert(d.lease);
  }
  EXPECT_EQ(seen.size(), 200u);
}

TEST_F(LeaseQueueTest, OnlyTheHolderOfALeaseMayAnswerUnderIt) {
  auto id = queue.enqueue("sign", "{}");
  auto got = queue.lease("driver-a", 1, "cert-a");
  ASSERT_EQ(got.size(), 1u);
  // The right lease from another certificate: refused, the lease stays.
  EXPECT_EQ(queue.complete(id, got[0].lease, ok_outcome(), "cert-b"),
            completion::not_lease_holder);
  EXPECT_EQ(status_of(id), request_status::leased);
  EXPECT_EQ(queue.complete(id, got[0].lease, ok_outcome(), "cert-a"),
            completion::accepted);
  EXPECT_EQ(status_of(id), request_status::done);
  EXPECT_EQ(queue.stats().rejected_results, 1u);
}

// -- answered requests are forgotten after a while ----------------------------

TEST_F(LeaseQueueTest, AnsweredRequestsAreForgottenAfterTheirTime) {
  lease_queue q{clk, lease_time, retention{5min, 1000}};
  auto done = q.enqueue("sign", "{}", "done-1");
  auto open = q.enqueue("sign", "{}", "open-1");
  auto got = q.lease("driver-a", 1);
  ASSERT_EQ(got.size(), 1u);
  ASSERT_EQ(got[0].id, done);
  ASSERT_EQ(q.complete(done, got[0].lease, ok_outcome()), completion::accepted);
  clk.advance(5min - 1ms);
  EXPECT_TRUE(q.find(done));
  clk.advance(1ms);
  EXPECT_FALSE(q.find(done)) << "kept past its retention";
  // A request not answered is never dropped, however old.
  ASSERT_TRUE(q.find(open));
  EXPECT_EQ(q.find(open)->status, request_status::queued);
  EXPECT_EQ(q.stats().evicted, 1u);
  // Forgotten, the id may be enqueued again as a new request.
  EXPECT_EQ(q.enqueue("sign", "{}", done), done);
  EXPECT_EQ(q.find(done)->status, request_status::queued);
}

TEST_F(LeaseQueueTest, AtMostKeepMaxAnsweredRequestsAreKept) {
  lease_queue q{clk, lease_time, retention{1h, 3}};
  for (int i = 0; i < 5; ++i)
    q.enqueue("sign", "{}", "r" + std::to_string(i));
  for (const auto& d : q.lease("driver-a", 5))
    ASSERT_EQ(q.complete(d.id, d.lease, ok_outcome()), completion::accepted);
  // The two answered first are gone; the three newest stay.
  EXPECT_FALSE(q.find("r0"));
  EXPECT_FALSE(q.find("r1"));
  for (auto id : {"r2", "r3", "r4"})
    EXPECT_TRUE(q.find(id)) << id;
  EXPECT_EQ(q.stats().evicted, 2u);
  EXPECT_EQ(q.stats().done, 5u);
}

} // namespace
} // namespace hsm::net
