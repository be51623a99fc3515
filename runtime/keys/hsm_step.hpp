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

/// The token objects serving keys: the master key and the row-MAC key
/// beside it, and the name rows record for the master key.
struct key_handles {
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE row_mac = CK_INVALID_HANDLE;
  /// The master key's label: what a row's `master_key_id` must say.
  std::string master_key_id;
};

/// Finds the master key labelled `master_label` and its row-MAC key.
[[nodiscard]] caf::expected<key_handles>
find_key_handles(pkcs11::session& sess, std::string_view master_label);

/// The bytes the row MAC covers: a domain tag, then each field with its
/// length (key id, scheme, public key, wrap mechanism, master key id,
/// format version, blob), so that no two rows share an input.
[[nodiscard]] std::vector<uint8_t> row_mac_input(const key_record& rec);

/// Checks a stored row before anything of it reaches the HSM's unwrap: a
/// format and mechanism this driver knows, the master key it holds, and
/// the row MAC (computed by the HSM, compared in constant time). A row
/// that fails is `key_errc::key_corrupted`, naming what failed.
[[nodiscard]] caf::error check_row(pkcs11::session& sess,
                                   const key_handles& keys,
                                   const key_record& rec);

/// Makes a new key on the token, as the record the store will keep: wrapped
/// by the master key, or (`resident`) a token object with CKA_ID = key id
/// and a label unique to this generation; in the current row format, with
/// its row MAC. Before it is returned the key proves itself: a signature
/// made through the path a real one takes (`sign_with` on the record, so
/// the stored blob is unwrapped) verifies against the public key.
/// `resident_handle`, if given, receives the private object of a resident
/// key (CK_INVALID_HANDLE otherwise), so that the caller can decide its fate.
[[nodiscard]] caf::expected<key_record>
make_key(pkcs11::session& sess, const key_handles& keys, scheme s,
         std::string_view key_id, bool resident,
         CK_OBJECT_HANDLE* resident_handle = nullptr);

/// The token's raw signature over `payload` with the key of `rec`, after
/// `check_row`.
[[nodiscard]] caf::expected<std::vector<uint8_t>>
sign_with(pkcs11::session& sess, const key_handles& keys, const key_record& rec,
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
