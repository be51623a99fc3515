#pragma once

// The dispatcher: runs each job as a small pipeline: look the key record up
// (storage) as soon as the job arrives, wait in a short queue for a free
// healthy session, the HSM operation (the session also finishes and
// verifies a signature), persist a new key (storage), report (the result
// poster). A public key is reported only after the store committed it; a
// signature only after it verified against the stored public key. Requests
// for schemes the token does not serve are answered before they take a
// session.
//
// A job whose lease is about to end (past its `start_by`) is not started:
// it is handed back with a retryable error while the proxy still takes it.
//
// Credits: the driver holds at most `healthy sessions x pipeline` leases
// (looked up, queued, in the HSM, or waiting for the poster), so that the
// next request of every session is fetched and looked up while the current
// one is in the HSM, and the proxy never sees more leases from a driver
// than it can serve soon. `credit_atom` answers at once when there is
// credit; otherwise the answer waits until credit appears (a lease is
// posted, a session comes up) or the dispatcher stops: the poller never
// asks on a timer. With no healthy session there is no credit.
//
// A job whose session died or timed out is retried on another session a
// bounded number of times, then answered with a retryable error. A session
// is held by one job at a time, identified by a token, so that late replies
// from a replaced session never free or fail its successor.
//
// The dispatcher spawns its session supervisor (through the factory in its
// configuration) and is linked to it.

#include "messages/interfaces.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/keys/capabilities.hpp"

#include <chrono>
#include <functional>
#include <memory>

namespace hsm {

/// Makes the session supervisor that reports to `dispatcher`.
using supervisor_factory
  = std::function<session_supervisor_actor(dispatcher_actor dispatcher)>;

/// Default `--pipeline`: leases per healthy session. With 2, the next
/// request of every session is fetched and looked up while the current one
/// is in the HSM; more only holds leases longer.
inline constexpr size_t default_pipeline = 2;

/// Options of the dispatcher.
struct dispatcher_config {
  size_t sessions = 2;
  /// Leases held per healthy session (1 = no request waits for a session).
  size_t pipeline = default_pipeline;
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
  /// Bound of the jobs waiting for a session or a lookup; beyond it a job
  /// is answered as retryable at once (credits keep the driver well below
  /// it unless sessions go down).
  size_t max_queue = 1024;
  /// Where requests, stage durations, sessions, credits and leases are
  /// counted; none: not counted.
  std::shared_ptr<driver_metrics> metrics;
  /// A generated key's audit entry goes into its put's commit (the store
  /// appends it if the key is inserted) rather than into a commit of its
  /// own after the put: set when the driver keeps an audit trail.
  bool audit_with_put = false;
};

/// Spawns the dispatcher; it spawns its supervisor with `make_supervisor`.
dispatcher_actor spawn_dispatcher(caf::actor_system& sys, dispatcher_config cfg,
                                  store_actor store, result_poster_actor poster,
                                  supervisor_factory make_supervisor);

} // namespace hsm
