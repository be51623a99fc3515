#pragma once

// The dispatcher: holds the free sessions and a short bounded queue, and
// runs each job as a small state machine: fetch the key record (storage)
// -> HSM operation (a session) -> persist (storage) -> report (the result
// poster). A public key is reported only after the store committed it; a
// signature only after it verified against the stored public key. Requests
// for schemes the token does not serve are answered before they take a
// session.
//
// Credits (`credit_atom`) are the healthy sessions minus every lease the
// driver holds (queued, running, or waiting for the poster): the poller
// never asks the proxy for more. A job whose session died or timed out is
// retried on another session a bounded number of times, then answered with
// a retryable error. A session is held by one job at a time, identified by
// a token, so that late replies from a replaced session never free or fail
// its successor.
//
// The dispatcher spawns its session supervisor (through the factory in its
// configuration) and is linked to it.

#include "messages/interfaces.hpp"
#include "runtime/keys/capabilities.hpp"

#include <chrono>
#include <functional>

namespace hsm {

/// Makes the session supervisor that reports to `dispatcher`.
using supervisor_factory
  = std::function<session_supervisor_actor(dispatcher_actor dispatcher)>;

/// Options of the dispatcher.
struct dispatcher_config {
  size_t sessions = 2;
  /// What the capability probe found.
  keys::capabilities caps;
  /// Deadline of one HSM call.
  std::chrono::milliseconds hsm_timeout{10000};
  /// Deadline of one storage call.
  std::chrono::milliseconds store_timeout{30000};
  /// Deadline of one result post (the poster retries within it).
  std::chrono::milliseconds post_timeout{std::chrono::minutes{5}};
  /// Session failures one job may see before it is answered as retryable.
  uint32_t max_attempts = 3;
  /// Queue bound; jobs beyond it are answered as retryable at once.
  size_t max_queue = 64;
};

/// Spawns the dispatcher; it spawns its supervisor with `make_supervisor`.
dispatcher_actor spawn_dispatcher(caf::actor_system& sys, dispatcher_config cfg,
                                  store_actor store, result_poster_actor poster,
                                  supervisor_factory make_supervisor);

} // namespace hsm
