// Fuzzes hex parsing (`crypto::from_hex`, the input as text) and the
// CKA_EC_POINT reader (`crypto::parse_ec_point`, the input as raw bytes,
// for each scheme; a point it accepts is then compressed). Must never
// crash, leak or trip a sanitizer; parsed hex round-trips.

#include "runtime/crypto/ec.hpp"
#include "runtime/crypto/hex.hpp"

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>
#include <string_view>

namespace {

void check_hex(std::string_view text) {
  auto bytes = hsm::crypto::from_hex(text);
  if (!bytes)
    return;
  if (text.starts_with("0x") || text.starts_with("0X"))
    text.remove_prefix(2);
  std::string lower;
  for (char c : text)
    lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (hsm::crypto::to_hex(*bytes) != lower)
    std::abort(); // hex that does not round-trip
}

void check_point(hsm::scheme s, std::span<const uint8_t> raw) {
  auto key = hsm::crypto::parse_ec_point(s, raw);
  if (!key)
    return;
  if (key->size() != (hsm::is_ecdsa(s) ? 65u : 32u))
    std::abort(); // not the canonical stored form
  if (hsm::is_ecdsa(s)) {
    auto compressed = hsm::crypto::compress_public_key(s, *key);
    if (!compressed || compressed->size() != 33)
      std::abort(); // an accepted point that does not compress
  }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check_hex({reinterpret_cast<const char*>(data), size});
  std::span<const uint8_t> raw{data, size};
  for (auto s : hsm::all_schemes)
    check_point(s, raw);
  return 0;
}
