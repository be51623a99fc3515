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

// -- limits on what a proxy may send ------------------------------------------
//
// A broken or hostile proxy must not be able to run the driver out of memory
// or write into its logs: every answer is bounded in size, in nesting and in
// the number of requests taken from it, and ids and leases are short and
// printable before they are used or logged.

/// Most requests one poll asks for: `proxy_client::poll` sends at most this
/// `max`. With more credit the poller polls again at once.
inline constexpr size_t max_poll_requests = 32;

/// Longest request id accepted; ids are 1..128 characters of
/// `A-Z a-z 0-9 . _ : -` (the key-id alphabet).
inline constexpr size_t max_request_id_length = 128;

/// Longest lease accepted; leases are 1..256 characters of
/// `A-Z a-z 0-9 . _ : - + / =` (the key-id alphabet plus base64's), so that
/// an opaque base64 or base64url token passes.
inline constexpr size_t max_lease_length = 256;

/// Longest lease time believed (`lease_ms`); a longer one counts as this.
inline constexpr int64_t max_lease_ms = 24 * 60 * 60 * 1000;

/// Largest JSON text of one request the driver accepts: a payload of
/// `max_payload_bytes` in hex, plus 4 KiB for the id, lease, key id, kind,
/// field names and whatever else a proxy adds.
inline constexpr size_t max_request_bytes = 2 * max_payload_bytes + 4096;

/// Largest response body read from the proxy: `max_poll_requests` requests
/// of `max_request_bytes`, plus 4 KiB for the envelope; 4,329,472 bytes
/// (4.13 MiB). A longer body aborts the transfer (`net_errc::bad_response`).
inline constexpr size_t max_response_bytes = max_poll_requests
                                               * max_request_bytes
                                             + 4096;

/// Deepest nesting of arrays and objects accepted in a response; a poll
/// answer needs 4 (the answer, `requests`, a request, its `params`).
inline constexpr size_t max_json_depth = 32;

/// True if `id` is a request id the driver may use and log: 1 to
/// `max_request_id_length` characters of `A-Z a-z 0-9 . _ : -`.
[[nodiscard]] bool valid_request_id(std::string_view id);

/// True if `lease` is a lease the driver may use and log: 1 to
/// `max_lease_length` characters of `A-Z a-z 0-9 . _ : - + / =`.
[[nodiscard]] bool valid_lease(std::string_view lease);

/// Untrusted text (a proxy's, a request's, a row's) fit for an error message
/// and a log line: at most `max_chars` characters, anything outside
/// printable ASCII (control characters, escape sequences, non-ASCII bytes)
/// as '?'.
[[nodiscard]] std::string printable(std::string_view text,
                                    size_t max_chars = 40);

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
  /// Requests without a usable id or lease (missing, not a string, too
  /// long, outside the alphabet), and entries that are not objects: they
  /// cannot be answered and are left for redelivery (their lease expires);
  /// counted for the log, never echoed.
  size_t unanswerable = 0;
  /// Entries after the `max`-th request (more than the poll asked for):
  /// not looked at, left for redelivery; counted for the log.
  size_t excess = 0;
  /// Requests whose id came earlier in the same answer: dropped (the first
  /// is served; a copy takes none of the `max` places); counted for the
  /// log.
  size_t duplicates = 0;
};

/// Decodes `{"requests":[...]}`, the answer to a poll that asked for at most
/// `max` requests: entries are read in order until `max` requests (objects,
/// second copies of an id not counted) are taken; the rest are `excess`. A
/// body that is not that shape, is larger than `max_response_bytes` or
/// nested deeper than `max_json_depth` is `net_errc::bad_response`; a
/// single bad request carries its own error. Fields the protocol does not
/// name are skipped while parsing, so that memory stays in proportion to
/// what is used.
[[nodiscard]] caf::expected<decoded_poll> decode_poll(std::string_view body,
                                                      size_t max);

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
