#pragma once

// The capability probe: which schemes this token can serve, found by a full
// round trip per scheme at start-up. Runs on the caller's session; one
// thread at a time.

#include "messages/errors.hpp"
#include "messages/scheme.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/session.hpp"

#include <array>
#include <set>
#include <string>

namespace hsm::keys {

/// How the driver serves one scheme on this token.
struct capability {
  hsm::scheme scheme = hsm::scheme::secp256k1;
  /// True if requests for the scheme are served.
  bool served = false;
  /// True if keys of the scheme are token-resident (opt-in).
  bool resident = false;
  /// What the probe found, for the operator: `ok`, or the failing step.
  std::string detail;
  /// Ed25519: the form of `CKA_EC_PARAMS` the token took.
  pkcs11::ed25519_params params = pkcs11::ed25519_params::oid;
};

/// What the probe found for every scheme.
struct capabilities {
  std::array<capability, all_schemes.size()> schemes;

  /// The entry of `s`.
  const capability& of(scheme s) const;
};

/// Runs, per scheme, generate -> wrap -> unwrap -> sign -> verify -> destroy
/// on the token (or generate -> sign -> verify -> destroy as token-resident
/// keys for the schemes in `resident_opt_in`). A scheme whose round trip
/// fails is not served. For Ed25519 a generation the token refuses for its
/// curve parameters is tried again with the other form of `CKA_EC_PARAMS`
/// (`pkcs11::ed25519_params`), and the form that works is kept. Only a
/// session-level failure is an error.
[[nodiscard]] caf::expected<capabilities>
probe(pkcs11::session& sess, CK_OBJECT_HANDLE master,
      const std::set<scheme>& resident_opt_in);

} // namespace hsm::keys
