#include "runtime/net/openssl_error.hpp"

#include <openssl/err.h>

namespace hsm::net {

std::string openssl_reason() {
  auto code = ERR_get_error();
  std::string out;
  if (code != 0) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof(buf));
    out = buf;
  }
  ERR_clear_error();
  return out;
}

caf::error bad_tls_material(std::string what) {
  auto reason = openssl_reason();
  if (!reason.empty())
    what += " (" + reason + ")";
  return caf::make_error(net_errc::bad_tls_material, std::move(what));
}

} // namespace hsm::net
