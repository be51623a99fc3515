#pragma once

// One hsm_session actor per session index: opens its own PKCS#11 session on
// the token's slot, logs in (CKR_USER_ALREADY_LOGGED_IN is success), finds
// the master key, and then generates and signs. Only this actor touches its
// session, and it closes it in its own thread when it exits. A
// session-level failure (`is_session_failure`) is answered and then ends
// the actor with that error, so the supervisor replaces it.

#include "actors/spawn_mode.hpp"
#include "messages/interfaces.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/keys/capabilities.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"

#include <atomic>
#include <memory>
#include <string>

namespace hsm {

/// What every session actor needs; shared, read-only but for the latch.
struct session_context {
  const pkcs11::module* mod = nullptr;
  /// The PKCS#11 slot of the token.
  CK_SLOT_ID slot = 0;
  std::shared_ptr<const pkcs11::secret_pin> pin;
  /// The master keys to serve (found again by every new session).
  keys::master_key_plan master_keys;
  keys::capabilities caps;
  /// Set once the token rejected the PIN: no session tries again (each try
  /// brings the token closer to locking the PIN).
  std::shared_ptr<std::atomic<bool>> pin_rejected
    = std::make_shared<std::atomic<bool>>(false);
  /// Counts failed PKCS#11 calls by CKR name; none: not counted.
  std::shared_ptr<driver_metrics> metrics;
};

/// Spawns the session actor for session `index`; it sends
/// `(ready_atom, index, generation)` to `supervisor` once logged in, or
/// quits with the error.
hsm_session_actor spawn_hsm_session(caf::actor_system& sys,
                                    std::shared_ptr<const session_context> ctx,
                                    size_t index, uint64_t generation,
                                    session_supervisor_actor supervisor,
                                    spawn_mode mode = spawn_mode::detached);

} // namespace hsm
