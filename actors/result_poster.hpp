#pragma once

// The result poster: posts results to the proxy on a connection of its own,
// so that a result never waits behind a 20-second long-poll. Runs detached
// in production (its HTTPS calls block).
//
// Results never wait behind each other: those that arrive while a post is
// on the wire go together in the next `POST /v1/results` (the batch form,
// with a status per result; one result alone goes in the single form). A
// result whose post failed (network error, 5xx) is retried on a timer with
// jittered exponential backoff while the others are posted meanwhile;
// retrying stops before its lease would expire (the proxy would refuse it
// anyway) and after `max_attempts`. A stale lease (409, or
// `lease_not_current` in a batch) settles a result; another 4xx gives it
// up. A result given up is left for redelivery: the lease expires and the
// proxy hands the request out again; generate_key is idempotent by key id.
// Once `stopping` is set, a failed post is not retried (shutdown must not
// wait on an unreachable proxy).
//
// With an audit actor, no answer to a job leaves before its audit entry is
// durable: results wait until the audit actor acknowledged them (entries of
// the results that came in meanwhile go together, one append at a time). A
// failed append is retried with the same backoff; a result whose lease ends
// (or, once stopping, whose append failed) before its entry is written is
// never posted: the request is redelivered and audited when it is answered
// again. Answers to malformed requests (no job, no HSM) are not audited.

#include "actors/spawn_mode.hpp"
#include "messages/interfaces.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/net/proxy_client.hpp"

#include <atomic>
#include <chrono>
#include <memory>

namespace hsm {

/// Options of the poster.
struct result_poster_config {
  /// Posts of one result, the first included.
  int max_attempts = 8;
  /// Backoff bounds between attempts (each jittered to 50-100 %).
  std::chrono::milliseconds backoff_min{100};
  std::chrono::milliseconds backoff_max{5000};
  /// Results in one post at most.
  size_t max_batch = 64;
  spawn_mode mode = spawn_mode::detached;
  /// Counts post errors and successes with the proxy; none: not counted.
  std::shared_ptr<driver_metrics> metrics;
};

/// Spawns the poster; it owns `link`. With `audit` (not null), results of
/// jobs are posted only once their audit entries are durable.
result_poster_actor
spawn_result_poster(caf::actor_system& sys, result_poster_config cfg,
                    std::shared_ptr<net::proxy_link> link,
                    std::shared_ptr<std::atomic<bool>> stopping,
                    audit_actor audit = {});

} // namespace hsm
