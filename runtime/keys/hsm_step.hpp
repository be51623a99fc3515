#pragma once

// The HSM step of the key path, shared by the command line's key_service
// and the hsm_session actor: make a key as the record the store will keep,
// and sign with a stored record. Runs on the caller's session; one thread
// at a time.

#include "messages/errors.hpp"
#include "messages/key_record.hpp"
#include "messages/scheme.hpp"
#include "runtime/pkcs11/session.hpp"

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace hsm::keys {

/// Makes a new key on the token, as the record the store will keep: wrapped
/// by `master`, or (`resident`) a token object with CKA_ID = key id and a
/// label unique to this generation. `resident_handle`, if given, receives
/// the private object of a resident key (CK_INVALID_HANDLE otherwise), so
/// that a key the store refuses can be removed.
[[nodiscard]] caf::expected<key_record>
make_key(pkcs11::session& sess, CK_OBJECT_HANDLE master, scheme s,
         std::string_view key_id, bool resident,
         CK_OBJECT_HANDLE* resident_handle = nullptr);

/// The token's raw signature over `payload` with the key of `rec`.
[[nodiscard]] caf::expected<std::vector<uint8_t>>
sign_with(pkcs11::session& sess, CK_OBJECT_HANDLE master, const key_record& rec,
          std::span<const uint8_t> payload);

/// Removes the token object of a resident record (a no-op for a wrapped
/// one).
[[nodiscard]] caf::error destroy_resident_key(pkcs11::session& sess,
                                              const key_record& rec);

/// A fixed payload of the right shape for `s`, made from `text`: its
/// SHA-256 for ECDSA, the text itself for Ed25519. For the probe and the
/// master-key canary.
std::vector<uint8_t> fixed_payload(scheme s, std::string_view text);

} // namespace hsm::keys
