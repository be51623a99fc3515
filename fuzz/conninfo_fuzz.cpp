// Fuzzes the libpq connection-string reader (`store::parse_conninfo`) and
// what is built on it: the host/port pairing and the redaction for logs.
// Must never crash, leak or trip a sanitizer; value spans stay in the text.

#include "store/pg_conninfo.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text{reinterpret_cast<const char*>(data), size};
  auto info = hsm::store::parse_conninfo(text);
  auto redacted = hsm::store::redact_conninfo(text);
  if (!info) {
    if (redacted != hsm::store::unparsable_conninfo)
      std::abort(); // redaction read what the parser refused
    return 0;
  }
  for (auto& opt : info->options)
    if (opt.value_begin > opt.value_end || opt.value_end > size)
      std::abort(); // a value span outside the text
  auto* hosts = info->find("host");
  auto* ports = info->find("port");
  auto paired = hsm::store::pair_hosts(hosts ? *hosts : std::string_view{},
                                       ports ? *ports : std::string_view{});
  static_cast<void>(paired);
  return 0;
}
