#pragma once

// The public-key fingerprint the driver reports beside every key and every
// signature, so that the platform can cross-check which key signed:
// `sha256:` followed by the lowercase hex SHA-256 of the canonical public
// key bytes (`key_record::public_key`: SEC1 uncompressed for the ECDSA
// schemes, 32 raw bytes for Ed25519). Pure function; any thread.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::crypto {

/// What every fingerprint starts with: the hash that made it.
inline constexpr std::string_view fingerprint_prefix = "sha256:";

/// SHA-256 of `data` (32 bytes).
[[nodiscard]] std::vector<uint8_t> sha256(std::span<const uint8_t> data);

/// `sha256:` + lowercase hex of SHA-256 over `public_key`, which must be the
/// canonical form (a compressed EC key gives another fingerprint).
[[nodiscard]] std::string
public_key_fingerprint(std::span<const uint8_t> public_key);

} // namespace hsm::crypto
