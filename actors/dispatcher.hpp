#pragma once

// The dispatcher: holds the free session slots and a short bounded queue,
// and runs each job as a small state machine: fetch the key record (storage)
// -> HSM operation (a session) -> persist (storage) -> report (the result
// poster). A public key is reported only after the store committed it; a
// signature only after it verified against the stored public key. Requests
// for schemes the token does not serve are answered before they take a slot.
//
// Credits (`credit_atom`) are the healthy slots minus every lease the driver
// holds (queued, running, or waiting for the poster): the poller never asks
// the proxy for more. A job whose session died or timed out is retried on
// another slot a bounded number of times, then answered with a retryable
// error. A slot is held by one job at a time, identified by a token, so
// that late replies from a replaced session never free or fail the slot of
// its successor.

#include <chrono>

#include "messages/interfaces.hpp"
#include "runtime/key_service.hpp"

namespace hsm {

/// Options of the dispatcher.
struct dispatcher_config {
  size_t sessions = 2;
  /// What the capability probe found.
  capabilities caps;
  /// Deadline of one HSM call.
  std::chrono::milliseconds hsm_timeout{10000};
  /// Deadline of one storage call.
  std::chrono::milliseconds store_timeout{30000};
  /// Slot failures one job may see before it is answered as retryable.
  uint32_t max_attempts = 3;
  /// Queue bound; jobs beyond it are answered as retryable at once.
  size_t max_queue = 64;
};

/// Spawns the dispatcher. `poster` receives `(result_atom, job_result)` and
/// answers once the result is posted.
caf::actor spawn_dispatcher(caf::actor_system& sys, dispatcher_config cfg,
                            store_actor store, caf::actor poster);

/// Tells the dispatcher whom to ask for slot replacements.
void set_supervisor(caf::actor dispatcher, caf::actor supervisor);

} // namespace hsm
