#pragma once

// What the driver asks of the keys on the token, and the check of a master
// key against it (DESIGN invariant 4, "keys stay in the HSM").
//
// A blob in the database is only as safe as the master key's policy: a
// master key without an unwrap template lets anyone logged in unwrap a
// blob as an extractable, non-sensitive key and read it (softhsm.md). So
// `master-key init` makes keys with the policy below, and start-up refuses
// a master key whose attributes let a blob leave the HSM. Pure functions
// over a session; the caller's thread.

#include "messages/errors.hpp"
#include "runtime/pkcs11/session.hpp"

#include <string>
#include <string_view>
#include <vector>

namespace hsm::pkcs11 {

/// The attributes of a master key the driver creates (`master-key init`):
/// AES, token, private, sensitive, never extractable, not modifiable, not
/// copyable; wrap and unwrap only (no encrypt, decrypt, sign, verify or
/// derive); an unwrap template that admits only sensitive, non-extractable
/// private keys, and a wrap template that wraps only sensitive private keys.
[[nodiscard]] attributes master_key_template(std::string_view label);

/// The attributes of the row-MAC key made beside the master key: a generic
/// secret on the token, private, sensitive, never extractable, not
/// modifiable, not copyable; sign and verify (CKM_SHA256_HMAC) only.
[[nodiscard]] attributes row_mac_key_template(std::string_view label);

/// The `CKA_UNWRAP_TEMPLATE` of a master key: every key unwrapped with it
/// is a private key, sensitive and not extractable.
[[nodiscard]] attributes unwrap_policy();

/// The `CKA_WRAP_TEMPLATE` of a master key: it wraps private keys that are
/// sensitive, nothing else (never a secret key such as the row-MAC key).
[[nodiscard]] attributes wrap_policy();

/// One attribute of a master key that lets key material leave the HSM.
struct weakness {
  /// The attribute, e.g. `CKA_EXTRACTABLE` or `CKA_UNWRAP_TEMPLATE`.
  std::string attribute;
  /// What the token reports (e.g. `TRUE`, `absent`, `not reported`).
  std::string found;
  /// What it must be.
  std::string wanted;
};

/// Reads the master key's attributes and lists each one that lets a blob
/// leave the HSM; empty means the key is sound. An attribute the token does
/// not report counts as weak (it cannot be shown to hold). Errors are
/// session failures only.
[[nodiscard]] caf::expected<std::vector<weakness>>
inspect_master_key(session& s, CK_OBJECT_HANDLE key);

/// True if the token marks `key` `CKA_TRUSTED` (set by the security
/// officer): keys generated with `CKA_WRAP_WITH_TRUSTED` may then be wrapped
/// by it, and by no untrusted key. False where the token does not report it.
[[nodiscard]] caf::expected<bool> is_trusted(session& s, CK_OBJECT_HANDLE key);

/// One line naming every weakness, for the refusal and for the warning
/// under `--allow-weak-master-key`.
[[nodiscard]] std::string describe(const std::vector<weakness>& found);

/// What an operator does about a weak master key: the partition policy a
/// network HSM must set, and the way out (a new key and a rotation).
[[nodiscard]] std::string weak_master_key_advice();

} // namespace hsm::pkcs11
