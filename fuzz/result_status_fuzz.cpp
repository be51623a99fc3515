// Fuzzes the reader of the proxy's answer to a batch of results
// (`net::decode_result_statuses`) against a fixed batch of three results.
// Must never crash, leak or trip a sanitizer; one status per result sent.

#include "runtime/net/wire_codec.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::vector<hsm::job_result> sent{
    {"a", "la", hsm::error_result{"unknown_key", "no such key", false}, {}, {}},
    {"b", "lb", hsm::error_result{"hsm_unavailable", "down", true}, {}, {}},
    {"a", "lc", hsm::error_result{"invalid_request", "dup id", false}, {}, {}},
  };
  std::string_view body{reinterpret_cast<const char*>(data), size};
  auto st = hsm::net::decode_result_statuses(body, sent);
  if (st && st->size() != sent.size())
    std::abort(); // a status per result sent, no more, no less
  return 0;
}
