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
/// log line: at most 40 characters, anything unprintable as '?'.
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
  /// Requests without a usable id or lease: they cannot be answered and are
  /// left for redelivery (their lease expires); counted for the log.
  size_t unanswerable = 0;
};

/// Decodes `{"requests":[...]}` and checks each request. A body that is not
/// that shape is `net_errc::bad_response`; single bad requests end up in
/// `rejected`.
[[nodiscard]] caf::expected<polled>
read_poll(std::string_view body, std::chrono::steady_clock::time_point received
                                 = std::chrono::steady_clock::now());

} // namespace hsm::keys
