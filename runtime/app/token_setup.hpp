#pragma once

// The one token set-up of the program, shared by the key commands
// (`keys`, `probe`, `master-key`) and `daemon::start`: load the module, find
// the token by label, log in; then find the master key, open the store,
// run the master-key guard and the capability probe, and log what is
// served. The caller owns what it gets back; main thread, at start-up.

#include "messages/errors.hpp"
#include "runtime/app/config.hpp"
#include "runtime/keys/capabilities.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/session.hpp"
#include "store/key_store.hpp"

#include <memory>

namespace hsm {

/// The loaded module and one logged-in session on the configured token.
/// Member order matters: the session closes before the module finalises.
/// Move it only before anything keeps a pointer to `mod`.
struct token_session {
  /// The loaded module (C_Finalize when it dies).
  pkcs11::module mod;
  /// A session on the token, logged in as the user.
  pkcs11::session sess;
  /// The token's slot (found by label; slot numbers change).
  CK_SLOT_ID slot = 0;
  /// What the token reports about itself.
  pkcs11::token_description info;
};

/// Loads the module (wrapped by `decorate`, for fault-injection tests),
/// then opens a session on the token and logs in with `pin`.
[[nodiscard]] caf::expected<token_session>
open_token(const driver_config& cfg, const pkcs11::secret_pin& pin,
           const pkcs11::table_decorator& decorate = {});

/// The same on a module the caller loaded already (the dev mode creates its
/// token first).
[[nodiscard]] caf::expected<token_session>
open_token(pkcs11::module mod, const driver_config& cfg,
           const pkcs11::secret_pin& pin);

/// The same with the user PIN from `USER_PIN` or `USER_PIN_FILE`.
[[nodiscard]] caf::expected<token_session> open_token(const driver_config& cfg);

/// Which steps `set_up_keys` runs after finding the master key. The key
/// commands and the daemon run all of them.
struct key_steps {
  /// Open the store and run the master-key guard.
  bool guard = true;
  /// With `guard`: record the canary if the store has none (first use).
  bool may_create_canary = true;
  /// Run the capability probe and log which schemes are served.
  bool probe = true;
};

/// What serving keys needs beyond the session.
struct key_setup {
  /// The master key on the token.
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  /// The master keys served and their row-MAC keys.
  keys::key_handles keys;
  /// Which master keys those are (for the session actors to find).
  keys::master_key_plan plan;
  /// The key store, opened and migrated, its canary checked; null without
  /// `key_steps::guard`.
  std::unique_ptr<store::key_store> store;
  /// What the probe found; nothing is served without `key_steps::probe`.
  keys::capabilities caps;
};

/// Reads the master key's attributes (`pkcs11::inspect_master_key`): a key
/// that lets a blob leave the HSM is `key_errc::master_key_weak`, naming
/// each weak attribute, unless `cfg.allow_weak_master_key`, which logs the
/// same as an error and goes on.
[[nodiscard]] caf::error
check_master_key_policy(pkcs11::session& sess, const keys::master_key_set& set,
                        const driver_config& cfg);

/// Which master keys to serve: the configured one, or, with a rotation
/// recorded, its target (running: and its source too; complete: never its
/// source). A configured label that fits neither is
/// `config_errc::invalid_option` saying what to set.
[[nodiscard]] caf::expected<keys::master_key_plan>
plan_master_keys(const driver_config& cfg,
                 const std::optional<store::rotation_record>& rotation);

/// Finds the master key, checks its policy, opens the store, runs the
/// master-key guard (which records the canary on first use) and the capability
/// probe on `sess`, and logs which schemes are served; `steps` leaves some out.
/// A token whose master key does not match the store is refused here, before
/// anything is served.
[[nodiscard]] caf::expected<key_setup> set_up_keys(pkcs11::session& sess,
                                                   const driver_config& cfg,
                                                   key_steps steps = {});

/// Logs one line per scheme: served (and how), or not served and why.
void log_capabilities(const keys::capabilities& caps);

} // namespace hsm
