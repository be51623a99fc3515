#pragma once

// The proxy wire format (DESIGN.md, "The proxy protocol") on the driver's
// side: a poll response parsed into typed jobs, each request validated on its
// own (a bad one becomes an error result at once and never reaches the HSM),
// and results encoded for `POST /v1/results`. Pure functions; any thread.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "messages/errors.hpp"
#include "runtime/key_service.hpp"
#include "runtime/schemes.hpp"

namespace hsm {

/// What a request asks for.
enum class job_kind : uint8_t { generate_key, sign };

/// One validated request, as the dispatcher runs it.
struct job {
  std::string id;
  std::string lease;
  job_kind kind = job_kind::generate_key;
  std::string key_id;
  /// generate_key only.
  hsm::scheme scheme = hsm::scheme::secp256k1;
  /// sign only: the hash (ECDSA) or message (Ed25519).
  std::vector<uint8_t> payload;
  /// How many times a slot failed under this job.
  uint32_t attempts = 0;
};

/// The answer to one request.
struct job_result {
  std::string id;
  std::string lease;
  bool ok = false;
  /// ok: the result object, serialised JSON.
  std::string result_json;
  /// !ok: the error.
  std::string error_code;
  std::string error_message;
  bool retryable = false;
};

/// A parsed poll response.
struct parsed_poll {
  /// Valid requests.
  std::vector<job> jobs;
  /// Answers to invalid requests (malformed params, unknown kind, bad
  /// hex, oversized payload, ...), to post at once.
  std::vector<job_result> rejected;
  /// Requests without a usable id or lease: they cannot be answered and are
  /// left for redelivery (their lease expires); counted for the log.
  size_t unanswerable = 0;
};

/// Largest accepted payload, in bytes, before scheme checks.
inline constexpr size_t max_payload_bytes = max_ed25519_message;

/// Parses `{"requests":[...]}`. A body that is not that shape is
/// `net_errc::bad_response`; single bad requests end up in `rejected`.
[[nodiscard]] caf::expected<parsed_poll> parse_poll(std::string_view body);

/// An error result for `j`.
job_result error_result(const job& j, const caf::error& err);

/// The result of a generate_key.
job_result key_result(const job& j, const key_view& v);

/// The result of a sign.
job_result signature_result(const job& j, const signature_view& v);

/// The body of `POST /v1/results`.
std::string encode_result(const job_result& r, std::string_view driver_id);

} // namespace hsm
