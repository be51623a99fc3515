#pragma once

// The master-key guard (invariant 5): the store records a canary wrapped by
// the master key on first start; a token whose master key cannot unwrap it
// and sign with it is refused before any key is served. Runs on the
// caller's session and store; one thread at a time.

#include "messages/errors.hpp"
#include "runtime/pkcs11/session.hpp"
#include "store/key_store.hpp"

#include <string_view>

namespace hsm::keys {

/// What the guard found.
enum class canary_state {
  /// This call wrote the canary (first start against this database).
  created,
  /// The canary unwrapped and signed: the token holds the right master key.
  matches,
};

/// Checks that `master` (labelled `master_label`, for messages) unwraps the
/// canary `c` and signs with it, the signature verifying against the
/// canary's public key; `key_errc::master_key_mismatch` naming the problem
/// if not; a session failure as it is. Writes nothing.
[[nodiscard]] caf::error
check_canary(pkcs11::session& sess, CK_OBJECT_HANDLE master,
             std::string_view master_label, const store::canary_record& c);

/// Checks the master key against the store's canary; on first use (no
/// canary, `may_create`) writes one. A token whose master key cannot unwrap
/// the canary and sign with it is `key_errc::master_key_mismatch`, with a
/// message naming the problem; no canary and `!may_create` is
/// `key_errc::master_key_missing`.
[[nodiscard]] caf::expected<canary_state>
check_master_key(pkcs11::session& sess, CK_OBJECT_HANDLE master,
                 std::string_view master_label, store::key_store& st,
                 bool may_create);

} // namespace hsm::keys
