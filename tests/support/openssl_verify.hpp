#pragma once

// Independent host-side checks for tests: verifies signatures with OpenSSL's
// EVP interface from the public key alone (no project crypto code), so that
// a bug in runtime/crypto cannot hide itself.

#include "messages/scheme.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace hsm::test {

/// Verifies an ECDSA DER signature over a 32-byte hash, or an Ed25519
/// signature over a message, with OpenSSL EVP only.
bool openssl_verify(scheme s, std::span<const uint8_t> public_key,
                    std::span<const uint8_t> payload,
                    std::span<const uint8_t> sig);

/// True if s (the second half of r||s) is at most n/2 on secp256k1.
bool is_low_s_secp256k1(std::span<const uint8_t> rs);

/// SHA-256 of a string.
std::vector<uint8_t> sha256(std::string_view text);

} // namespace hsm::test
