#include "runtime/crypto/fingerprint.hpp"

#include "runtime/crypto/hex.hpp"

#include <openssl/sha.h>

#include <array>

namespace hsm::crypto {

std::vector<uint8_t> sha256(std::span<const uint8_t> data) {
  std::vector<uint8_t> digest(SHA256_DIGEST_LENGTH);
  SHA256(data.data(), data.size(), digest.data());
  return digest;
}

std::string public_key_fingerprint(std::span<const uint8_t> public_key) {
  std::array<uint8_t, SHA256_DIGEST_LENGTH> digest{};
  SHA256(public_key.data(), public_key.size(), digest.data());
  return std::string{fingerprint_prefix} + to_hex(digest);
}

} // namespace hsm::crypto
