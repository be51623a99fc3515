#pragma once

// One validated request from the proxy, as the poller hands it to the
// dispatcher and the dispatcher runs it. Plain values; any thread.

#include "messages/scheme.hpp"

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
  /// How many times a session failed under this job.
  uint32_t attempts = 0;
};

} // namespace hsm
