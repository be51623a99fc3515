#pragma once

// The poller: owns the long-poll connection to the proxy. Asks the
// dispatcher for credit, which answers as soon as there is some, and polls
// the proxy for at most that many requests; with no credit (no healthy
// session, or every lease taken) it waits for the answer and polls for
// nothing (invariant 6). Each request is checked on its own (runtime/keys/
// requests.hpp): valid ones go to the dispatcher as jobs, invalid ones are
// answered at once through the dispatcher (which counts every lease until
// its result is posted) and never reach the HSM. Network errors back off
// with jitter. Runs detached in production (its HTTPS calls block).
// Stopping: set `poller_config::stopping`, then send `stop_atom` (the flag
// reaches a poll that is blocking; the message answers once it is over).

#include "actors/spawn_mode.hpp"
#include "messages/interfaces.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/net/proxy_client.hpp"

#include <atomic>
#include <chrono>
#include <memory>

namespace hsm {

/// Options of the poller.
struct poller_config {
  /// `wait_ms` of a long-poll.
  std::chrono::milliseconds poll_wait{20000};
  /// Backoff bounds after a network error.
  std::chrono::milliseconds backoff_min{100};
  std::chrono::milliseconds backoff_max{5000};
  /// Set by whoever stops the poller, before it sends `stop_atom`: a poll
  /// in progress cannot see the message until it returns, but it sees this
  /// flag and hands back what it leased (answered as retryable).
  std::shared_ptr<std::atomic<bool>> stopping
    = std::make_shared<std::atomic<bool>>(false);
  spawn_mode mode = spawn_mode::detached;
  /// Counts poll errors and successes with the proxy; none: not counted.
  std::shared_ptr<driver_metrics> metrics;
};

/// Spawns the poller; it owns `link` and starts polling at once.
poller_actor spawn_poller(caf::actor_system& sys, poller_config cfg,
                          std::shared_ptr<net::proxy_link> link,
                          dispatcher_actor dispatcher);

} // namespace hsm
