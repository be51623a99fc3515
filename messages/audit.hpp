#pragma once

// The audit trail's vocabulary: what the driver records of every key it
// generates and every signature it makes (and of every such request it
// answers with an error), before the answer leaves the driver. Rows are
// chained per driver by hash (store/audit.hpp), so that an edited or
// deleted row shows. Plain values; any thread.

#include "messages/job.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace hsm {

/// What a request asked for, kept with its answer for the audit trail.
struct audit_facts {
  job_kind kind = job_kind::generate_key;
  std::string key_id;
  /// sign only: SHA-256 of the payload (32 bytes); empty for generate_key.
  std::vector<uint8_t> payload_sha256;
};

/// One operation as the audit trail records it.
struct audit_entry {
  /// The proxy's request id.
  std::string request_id;
  job_kind kind = job_kind::generate_key;
  std::string key_id;
  /// `sha256:<hex>` of the key's public key; empty when the request failed
  /// before a key was known.
  std::string public_key_fingerprint;
  /// sign only: SHA-256 of the payload; empty for generate_key.
  std::vector<uint8_t> payload_sha256;
  /// `ok`, or the error's wire code (`unknown_key`, `hsm_unavailable`...).
  std::string outcome;
  /// When the answer was ready, milliseconds since the Unix epoch (UTC).
  int64_t at_ms = 0;

  bool operator==(const audit_entry&) const = default;
};

/// A stored audit row: an entry, the driver that wrote it, its place in
/// that driver's chain and the chain's hashes.
struct audit_row {
  std::string driver_id;
  /// 1, 2, ... per driver, without gaps.
  uint64_t seq = 0;
  audit_entry entry;
  /// The previous row's `entry_hash` (32 zero bytes for seq 1).
  std::vector<uint8_t> prev_hash;
  /// SHA-256 over the row (`store::audit_hash`).
  std::vector<uint8_t> entry_hash;

  bool operator==(const audit_row&) const = default;
};

/// Entries appended together, in one transaction (the storage actor's
/// `audit_atom`).
struct audit_batch {
  std::vector<audit_entry> entries;
};

/// The name of a job kind in the audit trail: `generate_key` or `sign`.
inline const char* audit_kind_name(job_kind k) {
  return k == job_kind::sign ? "sign" : "generate_key";
}

/// The job kind named `name` in the audit trail.
inline std::optional<job_kind> parse_audit_kind(const std::string& name) {
  if (name == "sign")
    return job_kind::sign;
  if (name == "generate_key")
    return job_kind::generate_key;
  return std::nullopt;
}

} // namespace hsm
