#pragma once

// The session supervisor: spawns one hsm_session actor per session index,
// monitors them, and restarts a failed one with capped exponential backoff.
// Tells the dispatcher when a session goes down or comes back. A fatal
// failure (wrong PIN, locked PIN, missing master key, configuration) stops
// that index for good and is reported, never retried in a loop. On
// `(replace_atom, index, session)` (a call that exceeded the HSM timeout)
// the busy actor is abandoned, not closed from here: it exits, and closes
// its session in its own thread, when its call returns. Abandoned sessions
// stay monitored and counted (`stuck_atom`), and an index is not given a
// new session while more than one of its abandoned predecessors is still
// stuck. The backoff of an index is reset only after a request succeeds on
// it (`session_ok_atom` from the dispatcher).

#include "actors/hsm_session.hpp"
#include "runtime/base/metrics.hpp"

#include <chrono>
#include <functional>
#include <memory>
#include <string>

namespace hsm {

/// Makes the session actor for `index` (generation `generation`) that
/// reports to `supervisor`.
using session_factory = std::function<hsm_session_actor(
  caf::actor_system& sys, size_t index, uint64_t generation,
  session_supervisor_actor supervisor)>;

/// Options of the supervisor.
struct supervisor_config {
  size_t sessions = 2;
  std::chrono::milliseconds backoff_min{100};
  std::chrono::milliseconds backoff_max{10000};
  /// Consecutive `reinit_module` failures after which the module itself is
  /// considered lost: `on_fatal` is called (the daemon exits non-zero, so
  /// that the service manager restarts it with a fresh C_Initialize). With
  /// the default backoff, 10 failures in a row take about 40 s: an HSM
  /// outage shorter than that (a reboot, a failover) is ridden out.
  uint32_t reinit_limit = 10;
  /// Called once when the driver cannot go on (see `reinit_limit`).
  std::function<void(const std::string&)> on_fatal;
  /// Makes the session actors.
  session_factory spawn_session;
  /// Counts session restarts; none: not counted.
  std::shared_ptr<driver_metrics> metrics;
};

/// The factory of real sessions on the token of `ctx`.
session_factory hsm_sessions(std::shared_ptr<const session_context> ctx,
                             spawn_mode mode = spawn_mode::detached);

/// The backoff before the `failures + 1`-th restart of one index:
/// `backoff_min * 2^failures`, at most `backoff_max`.
std::chrono::milliseconds restart_backoff(const supervisor_config& cfg,
                                          uint32_t failures);

/// Spawns the supervisor; it starts the sessions at once.
session_supervisor_actor spawn_session_supervisor(caf::actor_system& sys,
                                                  supervisor_config cfg,
                                                  dispatcher_actor dispatcher);

} // namespace hsm
