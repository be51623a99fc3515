#pragma once

// What the driver answers: a key, a signature or an error, as typed values.
// The actors pass these around; only the proxy client's codec turns them
// into JSON, once, when the result is posted. Plain values; any thread.

#include "messages/audit.hpp"
#include "messages/errors.hpp"
#include "messages/job.hpp"
#include "messages/scheme.hpp"

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace hsm {

/// A key as reported: only public data.
struct key_result {
  std::string key_id;
  hsm::scheme scheme = hsm::scheme::secp256k1;
  /// SEC1 uncompressed (EC) or 32 raw bytes (Ed25519).
  std::vector<uint8_t> public_key;
  /// SEC1 compressed (EC only).
  std::vector<uint8_t> public_key_compressed;
  /// `sha256:` + lowercase hex SHA-256 of `public_key`
  /// (`crypto::public_key_fingerprint`).
  std::string public_key_fingerprint;
  /// `CKM_AES_KEY_WRAP_PAD` or `token-resident`.
  std::string storage;
  int64_t created_at_ms = 0;
  /// True if this request created the key; false if it existed.
  bool created = false;
};

/// A finished signature, verified against the stored public key.
struct signature {
  /// 64 bytes: r||s (ECDSA, low-s for secp256k1) or the Ed25519 signature.
  std::vector<uint8_t> raw;
  /// ECDSA only: 0..3, bit 0 = parity of R.y, bit 1 = R.x overflowed n.
  std::optional<int> recovery_id;
  /// ECDSA only: the DER `ECDSA-Sig-Value` of (r, s).
  std::vector<uint8_t> der;
  /// The fingerprint of the stored public key this signature was verified
  /// against (as `key_result::public_key_fingerprint`), so that the platform
  /// can cross-check which key signed. Set by `crypto::finish_signature`.
  std::string public_key_fingerprint;
};

/// A released signature and the key that made it.
struct signature_result {
  std::string key_id;
  hsm::scheme scheme = hsm::scheme::secp256k1;
  hsm::signature sig;
};

/// An error answer, as the wire carries it.
struct error_result {
  /// Stable wire code (`unknown_key`, `hsm_unavailable`, ...).
  std::string code;
  /// For humans.
  std::string message;
  /// True when the proxy may hand the request out again.
  bool retryable = false;
};

/// The answer to one request.
struct job_result {
  std::string id;
  std::string lease;
  std::variant<error_result, key_result, signature_result> outcome;
  /// The job's `lease_deadline`.
  std::chrono::steady_clock::time_point lease_deadline{};
  /// What the job asked for, for the audit trail; none for an answer to a
  /// request that was never a job (malformed: it reached no HSM).
  std::optional<audit_facts> audit;
  /// Its audit entry is durable already: appended with the key's put.
  bool audit_written = false;

  /// True unless the outcome is an error.
  bool ok() const {
    return !std::holds_alternative<error_result>(outcome);
  }
};

/// The error answer for `err`: its wire code, its description, and whether
/// it is retryable.
inline error_result to_error_result(const caf::error& err) {
  return error_result{wire_code(err), describe(err), is_retryable(err)};
}

/// What `j` asked for, as the audit trail keeps it.
inline audit_facts facts_of(const job& j) {
  return audit_facts{j.kind, j.key_id, j.payload_sha256};
}

/// Answers `j` with `outcome`.
inline job_result answer(const job& j, key_result outcome) {
  return job_result{j.id, j.lease, std::move(outcome), j.lease_deadline,
                    facts_of(j)};
}

/// Answers `j` with `outcome`.
inline job_result answer(const job& j, signature_result outcome) {
  return job_result{j.id, j.lease, std::move(outcome), j.lease_deadline,
                    facts_of(j)};
}

/// Answers `j` with an error.
inline job_result answer(const job& j, const caf::error& err) {
  return job_result{j.id, j.lease, to_error_result(err), j.lease_deadline,
                    facts_of(j)};
}

/// The audit entry of `r`, answered at `at_ms`; nullopt if `r` carries no
/// audit facts.
inline std::optional<audit_entry> audit_entry_of(const job_result& r,
                                                 int64_t at_ms) {
  if (!r.audit)
    return std::nullopt;
  audit_entry e;
  e.request_id = r.id;
  e.kind = r.audit->kind;
  e.key_id = r.audit->key_id;
  e.payload_sha256 = r.audit->payload_sha256;
  e.at_ms = at_ms;
  if (auto* k = std::get_if<key_result>(&r.outcome)) {
    e.public_key_fingerprint = k->public_key_fingerprint;
    e.outcome = "ok";
  } else if (auto* s = std::get_if<signature_result>(&r.outcome)) {
    e.public_key_fingerprint = s->sig.public_key_fingerprint;
    e.outcome = "ok";
  } else {
    e.outcome = std::get<error_result>(r.outcome).code;
  }
  return e;
}

} // namespace hsm
