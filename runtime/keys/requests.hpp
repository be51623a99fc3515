#pragma once

// The rules a request must pass before it may reach the HSM: key ids,
// scheme names, payload sizes; and a poll response read into typed jobs
// (the wire codec decodes the JSON, these rules check what it found). A bad
// request becomes an error answer at once. Pure functions; any thread.

#include "messages/errors.hpp"
#include "messages/job.hpp"
#include "messages/results.hpp"
#include "messages/scheme.hpp"
#include "runtime/net/wire_codec.hpp"

#include <chrono>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace hsm::keys {

/// Longest key id accepted.
inline constexpr size_t max_key_id_length = 128;

/// Untrusted text (a request's, a row's) fit for an error message and a
/// log line: at most 40 characters, anything unprintable as '?'
/// (`net::printable`).
[[nodiscard]] std::string printable(std::string_view text);

/// Key ids starting with this are refused: the driver's own token objects
/// (the capability probe's) live under it, so that cleaning them up can
/// never touch a customer's key.
inline constexpr std::string_view reserved_key_id_prefix = "hsm-driver-";

/// Key ids are 1..128 characters of `A-Z a-z 0-9 . _ : -`; anything else is
/// `key_errc::invalid_request`.
[[nodiscard]] caf::error validate_key_id(std::string_view key_id);

/// Parses a scheme name: unknown names (`schnorr`, `stark`, ...) are
/// `key_errc::scheme_unsupported` saying which schemes exist.
[[nodiscard]] caf::expected<scheme> parse_scheme_name(std::string_view name);

/// ECDSA payloads are 32-byte hashes; Ed25519 payloads are messages of
/// 1..max_ed25519_message bytes. Else `key_errc::invalid_payload`.
[[nodiscard]] caf::error validate_payload(scheme s,
                                          std::span<const uint8_t> payload);

/// Checks a decoded request against the rules above.
/// `received` is when the poll was answered: the lease ends `lease_ms`
/// after it.
[[nodiscard]] caf::expected<job>
to_job(const net::wire_request& req,
       std::chrono::steady_clock::time_point received
       = std::chrono::steady_clock::now());

/// A poll response read into jobs.
struct polled {
  /// Valid requests.
  std::vector<job> jobs;
  /// Answers to invalid requests (malformed params, unknown kind, bad
  /// hex, oversized payload, ...), to post at once.
  std::vector<job_result> rejected;
  /// Requests without a usable id or lease (see `net::valid_request_id`,
  /// `net::valid_lease`): they cannot be answered and are left for
  /// redelivery (their lease expires); counted for the log, never echoed.
  size_t unanswerable = 0;
  /// Requests after the `max`-th (more than the poll asked for): not read,
  /// left for redelivery; counted for the log.
  size_t excess = 0;
  /// Requests whose id came earlier in the same answer: dropped; counted
  /// for the log.
  size_t duplicates = 0;
};

/// Decodes the answer to a poll that asked for at most `max` requests and
/// checks each request (`net::decode_poll`: at most `max` requests are
/// read, the rest counted as `excess`). A body that is not `{"requests":[...]}`
/// (or is too large or too deep) is `net_errc::bad_response`; single bad
/// requests end up in `rejected`.
[[nodiscard]] caf::expected<polled>
read_poll(std::string_view body, size_t max,
          std::chrono::steady_clock::time_point received
          = std::chrono::steady_clock::now());

/// `read_poll` without a bound on the number of requests read, for a body
/// the caller made itself (tools, benchmarks); the driver's answers to its
/// own polls go through the overload with `max`.
[[nodiscard]] caf::expected<polled>
read_poll(std::string_view body, std::chrono::steady_clock::time_point received
                                 = std::chrono::steady_clock::now());

} // namespace hsm::keys
