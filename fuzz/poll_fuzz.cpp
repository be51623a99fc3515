// Fuzzes the poll-response parser and the request validator
// (`keys::read_poll`): the body a proxy, possibly hostile, answers a poll
// with. Must never crash, leak or trip a sanitizer, and must keep its
// promises: at most `max` requests read, every request accounted for once.

#include "runtime/keys/requests.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view body{reinterpret_cast<const char*>(data), size};
  // The `max` of the poll comes from the length, so that seeds stay plain
  // JSON and both small and large bounds are tried.
  auto max = size % 17;
  auto polled = hsm::keys::read_poll(body, max);
  if (polled && polled->jobs.size() + polled->rejected.size() > max)
    std::abort(); // read more requests than the poll asked for
  return 0;
}
