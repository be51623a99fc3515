#pragma once

// The reference proxy's readers of the bodies it is sent: by a driver
// (`POST /v1/poll`, `POST /v1/results`) and through the admin API
// (`POST /v1/admin/requests`, `POST /v1/admin/faults`). Each reads untrusted
// bytes into a typed value, or says what is wrong with them in words fit for
// a 400's message. They never throw, and they are fuzzed
// (fuzz/proxy_bodies_fuzz.cpp). Pure functions; any thread.

#include "runtime/net/lease_queue.hpp"

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace hsm::net {

/// What is wrong with a body: the message of the 400 that refuses it.
struct body_complaint {
  std::string message;
};

/// A body read into a `T`, or why it could not be.
template <class T>
using body_read = std::variant<T, body_complaint>;

/// `POST /v1/poll {"driver_id","max","wait_ms"}`.
struct poll_ask {
  std::string driver_id;
  /// At least 1.
  uint64_t max = 1;
  uint64_t wait_ms = 0;
};

[[nodiscard]] body_read<poll_ask> read_poll_ask(std::string_view body);

/// One result a driver posts: `{"id","lease","ok",("result"|"error")}`.
struct posted_result {
  /// The entry's `id` if it is a string (echoed in a batch's status even
  /// when the entry is refused); empty otherwise.
  std::string id;
  std::string lease;
  request_outcome outcome;
  /// Set if the entry is malformed; then only `id` is meaningful.
  std::optional<body_complaint> complaint;
};

/// `POST /v1/results`: one result with its `driver_id`, or a batch
/// `{"driver_id","results":[...]}`. A malformed entry of a batch is refused
/// on its own (`posted_result::complaint`); a malformed single result
/// refuses the body.
struct posted_results {
  std::string driver_id;
  bool batch = false;
  std::vector<posted_result> results;
};

[[nodiscard]] body_read<posted_results> read_results(std::string_view body);

/// `POST /v1/admin/requests {"kind","params","id"?}`.
struct enqueue_ask {
  std::string kind;
  /// `params` (an object) as JSON text, stored as it is.
  std::string params;
  /// The id asked for; the queue makes one up when there is none.
  std::optional<std::string> id;
};

[[nodiscard]] body_read<enqueue_ask> read_enqueue(std::string_view body);

/// Most poll answers one `POST /v1/admin/faults` may spoil.
inline constexpr uint64_t max_fault_polls = 1000;

/// `POST /v1/admin/faults {"fault","polls"?}`; `fault` is checked against
/// the names of `poll_fault` by the caller.
struct fault_ask {
  std::string fault;
  /// 1 to `max_fault_polls`; 1 when not given.
  uint64_t polls = 1;
};

[[nodiscard]] body_read<fault_ask> read_fault_ask(std::string_view body);

/// Serialises `j` without throwing on invalid UTF-8 (replaced by U+FFFD).
[[nodiscard]] std::string dump_json(const nlohmann::json& j);

} // namespace hsm::net
