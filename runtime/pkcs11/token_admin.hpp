#pragma once

// Token set-up for test and dev tokens, and the master key. Used by the CLI
// (`hsm-driver token init`, `hsm-driver master-key init`), the dev mode and
// the tests; production tokens are set up with the vendor's tools.

#include "messages/errors.hpp"
#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/session.hpp"

#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace hsm::pkcs11 {

/// Initialises a free slot's token as `label` (C_InitToken), then sets the
/// user PIN (C_InitPIN as SO). A token with that label already present is
/// `config_errc::invalid_option`; no free slot is an `hsm_errc`.
[[nodiscard]] caf::error init_token(const module& mod, std::string_view label,
                                    const secret_pin& so_pin,
                                    const secret_pin& user_pin);

/// The master key object labelled `label`: `key_errc::master_key_missing`
/// when absent; two of them is `hsm_errc::fatal` (ambiguous).
[[nodiscard]] caf::expected<CK_OBJECT_HANDLE>
find_master_key(session& s, std::string_view label);

/// The label of the row-MAC key that goes with the master key `label`.
[[nodiscard]] std::string row_mac_key_label(std::string_view master_label);

/// The row-MAC key (HMAC-SHA256, sign/verify only) beside the master key
/// labelled `master_label`; `key_errc::master_key_missing` when absent.
[[nodiscard]] caf::expected<CK_OBJECT_HANDLE>
find_row_mac_key(session& s, std::string_view master_label);

/// Creates the token AES-256 master key and, beside it, the row-MAC key
/// (each only if missing; `key_policy.hpp` has their attributes): token object,
/// private, sensitive, not extractable, wrap/unwrap only. Returns nullopt-free
/// handle; if a key with that label exists, returns it and sets `*created` to
/// false.
[[nodiscard]] caf::expected<CK_OBJECT_HANDLE>
create_master_key(session& s, std::string_view label, bool* created);

/// Test and dev tokens only: creates the master key from a known 32-byte
/// value (C_CreateObject; SoftHSMv2 accepts it), so that two test tokens
/// hold the same master key, as two production HSMs would after the
/// vendor's cloning procedure. The object gets the same attributes as a
/// generated one. An existing key with that label is returned unchanged
/// (`*created` false).
[[nodiscard]] caf::expected<CK_OBJECT_HANDLE>
import_master_key(session& s, std::string_view label,
                  std::span<const uint8_t> value, bool* created);

} // namespace hsm::pkcs11
