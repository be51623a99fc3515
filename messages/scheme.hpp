#pragma once

// The key schemes the driver knows: part of the vocabulary every layer
// shares. Pure data; any thread.

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace hsm {

/// A signature scheme a key belongs to. See DESIGN.md, "Key schemes".
enum class scheme : uint8_t {
  secp256k1,
  p256,
  ed25519,
};

/// Every scheme, in the order probes and demos run them.
inline constexpr std::array<scheme, 3> all_schemes{scheme::secp256k1,
                                                   scheme::p256,
                                                   scheme::ed25519};

/// The wire name: `secp256k1`, `p256`, `ed25519`.
std::string_view to_string(scheme x);

/// Parses a wire name; nullopt for anything else (e.g. `schnorr`).
std::optional<scheme> parse_scheme(std::string_view name);

/// True for the ECDSA schemes (which sign a 32-byte hash).
constexpr bool is_ecdsa(scheme x) {
  return x == scheme::secp256k1 || x == scheme::p256;
}

/// Largest message an ed25519 sign request may carry, in bytes.
inline constexpr size_t max_ed25519_message = 64 * 1024;

} // namespace hsm
