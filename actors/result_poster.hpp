#pragma once

// The result poster: posts each result to the proxy on a connection of its
// own, so that a result never waits behind a 20-second long-poll. Runs
// detached in production (its HTTPS calls block).
//
// A network error or a 5xx is retried with jittered exponential backoff on
// a timer (other results are posted meanwhile); a 409 (lease expired, or
// answered already) is logged and dropped; another 4xx is logged and
// dropped. A result it cannot deliver is left for redelivery: the lease
// expires and the proxy hands the request out again; generate_key is
// idempotent by key id. Once `stopping` is set, a failed post is not retried
// (shutdown must not wait on an unreachable proxy).

#include "actors/spawn_mode.hpp"
#include "messages/interfaces.hpp"
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
  spawn_mode mode = spawn_mode::detached;
};

/// Spawns the poster; it owns `link`.
result_poster_actor
spawn_result_poster(caf::actor_system& sys, result_poster_config cfg,
                    std::shared_ptr<net::proxy_link> link,
                    std::shared_ptr<std::atomic<bool>> stopping);

} // namespace hsm
