#include "runtime/schemes.hpp"

namespace hsm {

std::string_view to_string(scheme x) {
  switch (x) {
    case scheme::secp256k1:
      return "secp256k1";
    case scheme::p256:
      return "p256";
    case scheme::ed25519:
      return "ed25519";
  }
  return "unknown";
}

std::optional<scheme> parse_scheme(std::string_view name) {
  for (auto x : all_schemes)
    if (to_string(x) == name)
      return x;
  return std::nullopt;
}

const std::vector<uint8_t>& ec_params(scheme x) {
  // OID 1.3.132.0.10 (secp256k1), 1.2.840.10045.3.1.7 (prime256v1),
  // 1.3.101.112 (Ed25519, RFC 8410).
  static const std::vector<uint8_t> k1{0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x0A};
  static const std::vector<uint8_t> r1{0x06, 0x08, 0x2A, 0x86, 0x48,
                                       0xCE, 0x3D, 0x03, 0x01, 0x07};
  static const std::vector<uint8_t> ed{0x06, 0x03, 0x2B, 0x65, 0x70};
  switch (x) {
    case scheme::secp256k1:
      return k1;
    case scheme::p256:
      return r1;
    case scheme::ed25519:
      break;
  }
  return ed;
}

} // namespace hsm
