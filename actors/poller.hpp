#pragma once

// The poller and the result poster: the two ends of the link to the proxy.
// Both run detached because their HTTPS calls block, and each owns its own
// connection, so that a result never waits behind a 20-second long-poll.
//
// The poller asks the dispatcher for credits and polls the proxy for at most
// that many requests; with no credit (no free healthy slot) it polls for
// nothing. Invalid requests are answered at once through the poster and never
// reach the HSM. Network errors back off with jitter.
//
// The poster posts results, retrying network errors with jittered backoff; a
// 409 (lease expired, or answered already) is logged and dropped. A result it
// cannot deliver is left for redelivery: the lease expires and the proxy
// hands the request out again; generate_key is idempotent by key id.

#include <atomic>
#include <chrono>
#include <memory>

#include "messages/interfaces.hpp"
#include "runtime/net/proxy_client.hpp"

namespace hsm {

/// Options of the poller.
struct poller_config {
  /// `wait_ms` of a long-poll.
  std::chrono::milliseconds poll_wait{20000};
  /// Pause before asking again when there is no credit.
  std::chrono::milliseconds idle_pause{20};
  /// Backoff bounds after a network error.
  std::chrono::milliseconds backoff_min{100};
  std::chrono::milliseconds backoff_max{5000};
};

/// Spawns the poster; it owns `client`. `(result_atom, job_result)` is
/// answered (with an empty reply) once the result is posted or given up on.
/// Once `stopping` is set, a result that fails to post is not retried
/// (shutdown must not wait on an unreachable proxy; the lease expires and
/// the request is redelivered).
caf::actor spawn_result_poster(caf::actor_system& sys,
                               std::shared_ptr<net::proxy_client> client,
                               std::shared_ptr<std::atomic<bool>> stopping);

/// Spawns the poller; it owns `client` and starts polling at once. Jobs and
/// the answers to invalid requests go to the dispatcher (which counts every
/// lease until its result is posted). Send it `stop_atom` to stop polling
/// (it replies when stopped).
caf::actor spawn_poller(caf::actor_system& sys, poller_config cfg,
                        std::shared_ptr<net::proxy_client> client,
                        caf::actor dispatcher);

} // namespace hsm
