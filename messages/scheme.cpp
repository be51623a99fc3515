#include "messages/scheme.hpp"

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

} // namespace hsm
