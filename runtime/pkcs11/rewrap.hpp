#pragma once

// Moving a wrapped private key from one master key to another inside the
// HSM, for master-key rotation: unwrap under the old key into a session
// object that only the new key's wrap may take out, wrap it under the new
// key, destroy it. The plaintext never leaves the token. Runs on the
// caller's session.

#include "messages/errors.hpp"
#include "messages/scheme.hpp"
#include "runtime/pkcs11/session.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace hsm::pkcs11 {

/// Re-wraps `blob` (a private key of scheme `s` wrapped by `from` with
/// CKM_AES_KEY_WRAP_PAD) under `to`. The intermediate key is a sensitive
/// session object that may sign and be wrapped, nothing else, and is
/// destroyed before this returns.
///
/// A master key whose unwrap template makes every key non-extractable (the
/// policy `master-key init` sets) cannot give its keys to another master
/// key: PKCS#11 has no operation for it, by design. That is
/// `hsm_errc::fatal` with a message saying so. A blob the token cannot
/// unwrap is `key_errc::key_corrupted`; session failures pass through.
[[nodiscard]] caf::expected<std::vector<uint8_t>>
rewrap(session& sess, CK_OBJECT_HANDLE from, CK_OBJECT_HANDLE to, scheme s,
       std::span<const uint8_t> blob);

} // namespace hsm::pkcs11
