// Fuzzes the reference proxy's body readers (runtime/net/proxy_bodies.hpp):
// what a driver posts (`/v1/poll`, `/v1/results`) and what the admin API is
// sent (`/v1/admin/requests`, `/v1/admin/faults`). Must never crash, throw,
// leak or trip a sanitizer, and must keep the promises of each reader.

#include "runtime/net/proxy_bodies.hpp"

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <variant>

namespace {

template <class T>
const T* value_of(const hsm::net::body_read<T>& read) {
  if (auto* bad = std::get_if<hsm::net::body_complaint>(&read)) {
    if (bad->message.empty())
      std::abort(); // a refusal that says nothing
    return nullptr;
  }
  return &std::get<T>(read);
}

void check_poll(std::string_view body) {
  auto read = hsm::net::read_poll_ask(body);
  if (auto* ask = value_of(read); ask != nullptr)
    if (ask->driver_id.empty() || ask->max < 1)
      std::abort();
}

void check_results(std::string_view body) {
  auto read = hsm::net::read_results(body);
  auto* posted = value_of(read);
  if (posted == nullptr)
    return;
  if (posted->driver_id.empty())
    std::abort();
  if (!posted->batch && posted->results.size() != 1)
    std::abort(); // a single result is one entry
  for (const auto& r : posted->results) {
    if (!posted->batch && r.complaint)
      std::abort(); // a bad single result refuses the body
    if (r.complaint)
      continue;
    if (r.id.empty() || r.lease.empty() || r.outcome.body.empty())
      std::abort(); // an accepted entry lacks what the queue needs
    auto kept = nlohmann::json::parse(r.outcome.body, nullptr, false);
    if (!kept.is_object())
      std::abort(); // the stored outcome is not the object posted
  }
}

void check_enqueue(std::string_view body) {
  auto read = hsm::net::read_enqueue(body);
  auto* ask = value_of(read);
  if (ask == nullptr)
    return;
  if (ask->kind.empty() || (ask->id && ask->id->empty()))
    std::abort();
  auto params = nlohmann::json::parse(ask->params, nullptr, false);
  if (!params.is_object())
    std::abort(); // params stored as something other than an object
}

void check_fault(std::string_view body) {
  auto read = hsm::net::read_fault_ask(body);
  if (auto* ask = value_of(read); ask != nullptr)
    if (ask->fault.empty() || ask->polls < 1
        || ask->polls > hsm::net::max_fault_polls)
      std::abort();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view body{reinterpret_cast<const char*>(data), size};
  check_poll(body);
  check_results(body);
  check_enqueue(body);
  check_fault(body);
  return 0;
}
