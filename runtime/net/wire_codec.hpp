#pragma once

// The proxy wire format (DESIGN.md, "The proxy protocol") on the driver's
// side, as JSON: a poll response decoded into requests, and typed results
// encoded for `POST /v1/results`. Only the shape of the JSON is checked
// here; the key-path rules (key ids, scheme names, payload sizes) are
// applied above, in runtime/keys/requests.hpp. Pure functions; any thread.

#include "messages/errors.hpp"
#include "messages/job.hpp"
#include "messages/results.hpp"

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::net {

/// Largest accepted payload, in bytes, before scheme checks.
inline constexpr size_t max_payload_bytes = max_ed25519_message;

/// One request of a poll response, decoded. When `error` is set the request
/// is malformed (missing or mistyped field, unknown kind, bad hex, oversized
/// payload) and must be answered with that error; the other fields are then
/// only partly filled.
struct wire_request {
  std::string id;
  std::string lease;
  /// `lease_ms`: how long the lease lasts from the poll's answer; 0 when the
  /// proxy did not say.
  int64_t lease_ms = 0;
  job_kind kind = job_kind::generate_key;
  std::string key_id;
  /// generate_key only: the scheme name as sent.
  std::string scheme_name;
  /// sign only: the decoded payload.
  std::vector<uint8_t> payload;
  caf::error error;
};

/// A decoded poll response.
struct decoded_poll {
  /// Requests with a usable id and lease, in order.
  std::vector<wire_request> requests;
  /// Requests without a usable id or lease: they cannot be answered and are
  /// left for redelivery (their lease expires); counted for the log.
  size_t unanswerable = 0;
};

/// Decodes `{"requests":[...]}`. A body that is not that shape is
/// `net_errc::bad_response`; a single bad request carries its own error.
[[nodiscard]] caf::expected<decoded_poll> decode_poll(std::string_view body);

/// The `result` object of a key (without its creation time).
nlohmann::ordered_json to_json(const key_result& r);

/// The `result` object of a signature.
nlohmann::ordered_json to_json(const signature_result& r);

/// The `error` object of an error answer.
nlohmann::ordered_json to_json(const error_result& r);

/// The body of `POST /v1/results` for one result.
std::string encode_result(const job_result& r, std::string_view driver_id);

/// The body of `POST /v1/results` for a batch:
/// `{"driver_id","results":[{"id","lease","ok",...},...]}`.
std::string encode_results(const std::vector<job_result>& rs,
                           std::string_view driver_id);

/// What the proxy said of one result of a batch.
enum class result_status : uint8_t {
  /// Recorded.
  accepted,
  /// The lease expired or the request is answered already (as a 409).
  lease_not_current,
  /// The proxy refused the entry (malformed), or did not mention it.
  refused,
};

/// Reads a batch answer `{"results":[{"id","status"},...]}` into one status
/// per result of `sent`, in order; a body that is not that shape is
/// `net_errc::bad_response`.
[[nodiscard]] caf::expected<std::vector<result_status>>
decode_result_statuses(std::string_view body,
                       const std::vector<job_result>& sent);

} // namespace hsm::net
