#pragma once

// A SoftHSMv2 token of the driver's own under a folder, for `dev` and
// `bench`: its configuration (SOFTHSM2_CONF of this process and its
// children), random PINs in 0600 files, the token, and its master key.
// Test and dev tokens only; one thread.

#include "messages/errors.hpp"
#include "runtime/app/config.hpp"
#include "runtime/app/token_setup.hpp"
#include "runtime/pkcs11/secret_pin.hpp"

#include <filesystem>

namespace hsm {

/// The token of `prepare_local_token`, logged in, with its master key.
struct local_token {
  token_session tok;
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  /// The user PIN (from `dir/user.pin`).
  pkcs11::secret_pin pin;
  /// True if this call created the master key.
  bool master_created = false;
};

/// Makes `dir` hold a SoftHSMv2 token store: `dir/softhsm2.conf` (kept if
/// it exists) naming `dir/tokens`, set as SOFTHSM2_CONF, and random PINs in
/// `dir/so.pin` and `dir/user.pin` unless they exist. Then loads `module`,
/// initialises the token `cfg.token_label` if it is missing, logs in and
/// creates the master key `cfg.master_key_label` if it is missing.
[[nodiscard]] caf::expected<local_token>
prepare_local_token(const driver_config& cfg,
                    const std::filesystem::path& module,
                    const std::filesystem::path& dir);

} // namespace hsm
