#pragma once

// One validated request from the proxy, as the poller hands it to the
// dispatcher and the dispatcher runs it. Plain values; any thread.

#include "messages/scheme.hpp"

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace hsm {

/// What a request asks for.
enum class job_kind : uint8_t { generate_key, sign };

/// One validated request.
struct job {
  /// The proxy's request id.
  std::string id;
  /// The lease under which this driver holds the request.
  std::string lease;
  job_kind kind = job_kind::generate_key;
  std::string key_id;
  /// generate_key only.
  hsm::scheme scheme = hsm::scheme::secp256k1;
  /// sign only: the hash (ECDSA) or message (Ed25519).
  std::vector<uint8_t> payload;
  /// sign only: SHA-256 of `payload`, for the audit trail (set where the
  /// request is read).
  std::vector<uint8_t> payload_sha256;
  /// How many times a session failed under this job.
  uint32_t attempts = 0;
  /// When the lease ends (steady clock); the epoch when the proxy did not
  /// say. A result is not posted again after it.
  std::chrono::steady_clock::time_point lease_deadline{};
  /// The latest time worth starting the work: a little before the lease
  /// ends (a quarter of the lease, at most a second); the epoch when the
  /// proxy did not say.
  std::chrono::steady_clock::time_point start_by{};
};

} // namespace hsm
