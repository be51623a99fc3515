#pragma once

// The HSM half of the key path, per scheme: generate a key pair as session
// objects, wrap the private key with the master key, destroy both; or unwrap
// a blob into a non-extractable session key, sign, destroy. Token-resident
// keys (opt-in, for schemes the token cannot wrap) are token objects named
// by CKA_ID = key id.
//
// Called by whoever owns the session (the CLI, an hsm_session actor). No
// private key material leaves the token: the results are public keys,
// wrapped blobs and raw signatures.

#include "messages/errors.hpp"
#include "messages/scheme.hpp"
#include "runtime/pkcs11/session.hpp"

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace hsm::pkcs11 {

/// How `CKA_EC_PARAMS` names the Ed25519 curve: the RFC 8410 OID
/// (1.3.101.112, what SoftHSMv2 takes), or the PKCS#11 3.0 PrintableString
/// "edwards25519" (what Thales Luna wants). The capability probe finds the
/// one the token takes. Other schemes always use their curve OID.
enum class ed25519_params {
  oid,
  curve_name,
};

/// A new key as the store will keep it.
struct generated_key {
  /// Canonical public key (SEC1 uncompressed, or 32 bytes for Ed25519).
  std::vector<uint8_t> public_key;
  /// The private key wrapped by the master key (CKM_AES_KEY_WRAP_PAD).
  std::vector<uint8_t> wrapped_key;
};

/// Generates a key pair of `s` on the token as session objects, wraps the
/// private key with `master`, destroys both objects. The private key may
/// sign and nothing else, is sensitive, not modifiable, not copyable; with
/// `wrap_with_trusted` (a master key the token marks `CKA_TRUSTED`) only a
/// trusted key may wrap it.
[[nodiscard]] caf::expected<generated_key>
generate_wrapped(session& sess, CK_OBJECT_HANDLE master, scheme s,
                 bool wrap_with_trusted = false,
                 ed25519_params form = ed25519_params::oid);

/// Unwraps `blob` into a non-extractable session key, signs `payload` with
/// the scheme's mechanism (CKM_ECDSA over the hash, CKM_EDDSA over the
/// message), destroys the key. Returns the token's raw signature. An unwrap
/// that refuses the blob itself (`blob_refused`) is `key_errc::key_corrupted`;
/// other failures keep their class (`classify`).
[[nodiscard]] caf::expected<std::vector<uint8_t>>
sign_wrapped(session& sess, CK_OBJECT_HANDLE master, scheme s,
             std::span<const uint8_t> blob, std::span<const uint8_t> payload);

/// A new token-resident key.
struct resident_key {
  /// Canonical public key.
  std::vector<uint8_t> public_key;
  /// The private key object, for destroying it if the store refuses it.
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
};

/// Generates a token-resident key pair: the private key is a token object,
/// sensitive, not extractable, with CKA_ID = `id` and CKA_LABEL = `label` (a
/// label unique per generation, so that racing or crashed generations for
/// one key id never make the stored reference ambiguous). The public half is
/// a session object, destroyed here.
[[nodiscard]] caf::expected<resident_key>
generate_resident(session& sess, scheme s, std::span<const uint8_t> id,
                  std::string_view label,
                  ed25519_params form = ed25519_params::oid);

/// Signs with the token-resident private key with CKA_ID = `id` and
/// CKA_LABEL = `label`. A missing object is `key_errc::key_not_on_this_hsm`
/// (retryable: the key lives in another driver's HSM); two are
/// `key_errc::key_corrupted`.
[[nodiscard]] caf::expected<std::vector<uint8_t>>
sign_resident(session& sess, scheme s, std::span<const uint8_t> id,
              std::string_view label, std::span<const uint8_t> payload);

/// Destroys the token-resident key with CKA_ID = `id` and CKA_LABEL =
/// `label` (one generation's key; others with the same id stay).
[[nodiscard]] caf::error destroy_resident(session& sess,
                                          std::span<const uint8_t> id,
                                          std::string_view label);

/// Destroys every token object whose CKA_ID is `id`.
[[nodiscard]] caf::error destroy_resident(session& sess,
                                          std::span<const uint8_t> id);

} // namespace hsm::pkcs11
