#include "runtime/crypto/hex.hpp"

#include <openssl/rand.h>

#include <cstdlib>
#include <string>

namespace hsm::crypto {

int hex_digit_value(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

std::string to_hex(std::span<const uint8_t> bytes) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (auto b : bytes) {
    out.push_back(digits[b >> 4]);
    out.push_back(digits[b & 0x0f]);
  }
  return out;
}

caf::expected<std::vector<uint8_t>> from_hex(std::string_view text) {
  // Positions in errors count from the start of `text`, prefix included, so
  // that they point at the character the user typed.
  size_t offset = 0;
  if (text.size() >= 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X'))
    offset = 2;
  auto digits = text.substr(offset);
  if (digits.size() % 2 != 0)
    return caf::make_error(key_errc::invalid_request,
                           "hex: odd number of digits ("
                             + std::to_string(digits.size()) + ")");
  std::vector<uint8_t> out;
  out.reserve(digits.size() / 2);
  for (size_t i = 0; i < digits.size(); i += 2) {
    auto hi = hex_digit_value(digits[i]);
    auto lo = hex_digit_value(digits[i + 1]);
    if (hi < 0 || lo < 0) {
      auto pos = offset + i + (hi < 0 ? 0 : 1);
      return caf::make_error(key_errc::invalid_request,
                             "hex: invalid character at position "
                               + std::to_string(pos));
    }
    out.push_back(static_cast<uint8_t>((hi << 4) | lo));
  }
  return out;
}

std::string random_hex(size_t n_bytes) {
  std::vector<uint8_t> bits(n_bytes);
  if (n_bytes > 0 && RAND_bytes(bits.data(), static_cast<int>(n_bytes)) != 1)
    std::abort();
  return to_hex(bits);
}

} // namespace hsm::crypto
