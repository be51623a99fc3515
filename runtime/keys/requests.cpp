#include "runtime/keys/requests.hpp"

#include "runtime/crypto/fingerprint.hpp"

#include <algorithm>
#include <limits>
#include <string>

namespace hsm::keys {

std::string printable(std::string_view text) {
  return net::printable(text, 40);
}

namespace {

/// The lease times of `j`, from a lease of `lease_ms` that began at
/// `received`.
void set_lease(job& j, int64_t lease_ms,
               std::chrono::steady_clock::time_point received) {
  if (lease_ms <= 0)
    return;
  std::chrono::milliseconds lease{lease_ms};
  j.lease_deadline = received + lease;
  j.start_by = j.lease_deadline
               - std::min<std::chrono::milliseconds>(lease / 4,
                                                     std::chrono::seconds{1});
}

} // namespace

caf::error validate_key_id(std::string_view key_id) {
  if (key_id.empty())
    return caf::make_error(key_errc::invalid_request,
                           std::string{"key_id is empty"});
  if (key_id.size() > max_key_id_length)
    return caf::make_error(key_errc::invalid_request,
                           "key_id is longer than "
                             + std::to_string(max_key_id_length)
                             + " characters");
  if (key_id.starts_with(reserved_key_id_prefix))
    return caf::make_error(key_errc::invalid_request,
                           "key ids starting with '"
                             + std::string{reserved_key_id_prefix}
                             + "' are reserved for the driver's own objects");
  for (char c : key_id) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == ':'
              || c == '-';
    if (!ok)
      return caf::make_error(key_errc::invalid_request,
                             std::string{"key_id may only hold A-Z a-z 0-9 . "
                                         "_ : -"});
  }
  return caf::none;
}

caf::expected<scheme> parse_scheme_name(std::string_view name) {
  if (auto s = parse_scheme(name))
    return *s;
  return caf::make_error(key_errc::scheme_unsupported,
                         "unknown scheme '" + printable(name)
                           + "' (schemes: secp256k1, p256, ed25519; Schnorr "
                             "and Stark have no PKCS#11 mechanism)");
}

caf::error validate_payload(scheme s, std::span<const uint8_t> payload) {
  if (is_ecdsa(s)) {
    if (payload.size() != 32)
      return caf::make_error(key_errc::invalid_payload,
                             std::string{to_string(s)}
                               + " signs a 32-byte hash; got "
                               + std::to_string(payload.size()) + " bytes");
    return caf::none;
  }
  if (payload.empty() || payload.size() > max_ed25519_message)
    return caf::make_error(key_errc::invalid_payload,
                           "ed25519 signs a message of 1 to "
                             + std::to_string(max_ed25519_message)
                             + " bytes; got " + std::to_string(payload.size()));
  return caf::none;
}

caf::expected<job> to_job(const net::wire_request& req,
                          std::chrono::steady_clock::time_point received) {
  if (req.error)
    return req.error;
  if (auto err = validate_key_id(req.key_id))
    return err;
  job j;
  j.id = req.id;
  j.lease = req.lease;
  set_lease(j, req.lease_ms, received);
  j.kind = req.kind;
  j.key_id = req.key_id;
  if (req.kind == job_kind::generate_key) {
    auto s = parse_scheme_name(req.scheme_name);
    if (!s)
      return s.error();
    j.scheme = *s;
  } else {
    j.payload = req.payload;
    j.payload_sha256 = crypto::sha256(j.payload);
  }
  return j;
}

caf::expected<polled>
read_poll(std::string_view body,
          std::chrono::steady_clock::time_point received) {
  return read_poll(body, std::numeric_limits<size_t>::max(), received);
}

caf::expected<polled>
read_poll(std::string_view body, size_t max,
          std::chrono::steady_clock::time_point received) {
  auto decoded = net::decode_poll(body, max);
  if (!decoded)
    return decoded.error();
  polled out;
  out.unanswerable = decoded->unanswerable;
  out.excess = decoded->excess;
  out.duplicates = decoded->duplicates;
  for (auto& req : decoded->requests) {
    auto j = to_job(req, received);
    if (j) {
      out.jobs.push_back(std::move(*j));
      continue;
    }
    job ref;
    ref.id = req.id;
    ref.lease = req.lease;
    set_lease(ref, req.lease_ms, received);
    out.rejected.push_back(answer(ref, j.error()));
    // Never a job: it reached no HSM, so it is logged, not audited.
    out.rejected.back().audit.reset();
  }
  return out;
}

} // namespace hsm::keys
