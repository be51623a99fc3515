#pragma once

// The session supervisor: spawns one hsm_session actor per slot, monitors
// them, and restarts a failed one with capped exponential backoff. Tells the
// dispatcher when a slot goes down or comes back. A fatal failure (wrong PIN,
// locked PIN, missing master key) stops that slot for good and is reported,
// never retried in a loop. On `(replace_atom, index)` (a call that exceeded
// the HSM timeout) the busy actor is abandoned, not closed from here: it
// exits, and closes its session in its own thread, when its call returns.
// Abandoned sessions stay monitored and counted (`stats_atom` answers their
// number), and a slot is not given a new session while more than one of its
// abandoned predecessors is still stuck. The backoff of a slot is reset only
// after a request succeeds on it (`slot_ok_atom` from the dispatcher).

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "actors/hsm_session.hpp"

namespace hsm {

/// Options of the supervisor.
struct supervisor_config {
  size_t sessions = 2;
  std::chrono::milliseconds backoff_min{100};
  std::chrono::milliseconds backoff_max{10000};
  spawn_mode mode = spawn_mode::detached;
  /// Consecutive `reinit_module` failures after which the module itself is
  /// considered lost: `on_fatal` is called (the daemon exits non-zero, so
  /// that the service manager restarts it with a fresh C_Initialize).
  uint32_t reinit_limit = 5;
  /// Called once when the driver cannot go on (see `reinit_limit`).
  std::function<void(const std::string&)> on_fatal;
};

/// Spawns the supervisor; it starts the sessions at once.
caf::actor spawn_slot_supervisor(caf::actor_system& sys,
                                 std::shared_ptr<const session_context> ctx,
                                 supervisor_config cfg,
                                 caf::actor dispatcher);

} // namespace hsm
