#include "runtime/keys/decisions.hpp"

#include "runtime/crypto/ec.hpp"
#include "runtime/crypto/fingerprint.hpp"

#include <string>

namespace hsm::keys {

caf::expected<key_result> make_key_result(const key_record& r, bool created) {
  key_result v;
  v.key_id = r.key_id;
  v.scheme = r.scheme;
  v.public_key = r.public_key;
  v.public_key_fingerprint = crypto::public_key_fingerprint(r.public_key);
  if (is_ecdsa(r.scheme)) {
    auto c = crypto::compress_public_key(r.scheme, r.public_key);
    if (!c)
      return c.error();
    v.public_key_compressed = std::move(*c);
  }
  v.storage = r.wrap_mechanism;
  v.created_at_ms = r.created_at_ms;
  v.created = created;
  return v;
}

caf::expected<key_result> answer_stored(const key_record& stored,
                                        scheme requested, bool created) {
  if (stored.scheme != requested)
    return caf::make_error(key_errc::invalid_request,
                           "key_id '" + stored.key_id + "' already holds a "
                             + std::string{to_string(stored.scheme)} + " key");
  return make_key_result(stored, created);
}

caf::error unknown_key(std::string_view key_id) {
  return caf::make_error(key_errc::unknown_key,
                         "no key is stored under key_id '" + std::string{key_id}
                           + "'");
}

caf::error scheme_not_served(const capability& c) {
  return caf::make_error(key_errc::scheme_unsupported,
                         std::string{to_string(c.scheme)}
                           + " is not served by this token: " + c.detail);
}

caf::error check_served(const capabilities& caps, scheme s) {
  if (const auto& cap = caps.of(s); !cap.served)
    return scheme_not_served(cap);
  return caf::none;
}

caf::error shutting_down() {
  return caf::make_error(hsm_errc::retryable,
                         std::string{"driver shutting down"});
}

caf::error lease_ending() {
  return caf::make_error(hsm_errc::retryable,
                         std::string{"lease ends before the request could be "
                                     "served; handed back"});
}

caf::error queue_full() {
  return caf::make_error(hsm_errc::retryable, std::string{"driver queue full"});
}

caf::error no_session_could_serve(const caf::error& last) {
  return caf::make_error(hsm_errc::retryable,
                         "no HSM session could serve the request: "
                           + describe(last));
}

} // namespace hsm::keys
