#pragma once

// Public-key encodings: parsing what the token returns in CKA_EC_POINT and
// producing the SEC1 forms the driver reports. Uses OpenSSL; any thread.

#include "messages/errors.hpp"
#include "messages/scheme.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace hsm::crypto {

/// Turns a token's `CKA_EC_POINT` into the canonical stored public key:
/// SEC1 uncompressed (65 bytes, `04 X Y`) for the ECDSA schemes, 32 raw bytes
/// for ed25519. Accepts the DER OCTET STRING form (`04 41 04 ...`,
/// `04 20 ...`) and the bare point some tokens return. A point that is not on
/// the curve (for Ed25519 also: not canonical, or of small order, such as 32
/// zero bytes) is `key_errc::key_corrupted`.
caf::expected<std::vector<uint8_t>>
parse_ec_point(scheme s, std::span<const uint8_t> ec_point);

/// SEC1 compressed form (33 bytes) of a canonical ECDSA public key.
caf::expected<std::vector<uint8_t>>
compress_public_key(scheme s, std::span<const uint8_t> uncompressed);

} // namespace hsm::crypto
