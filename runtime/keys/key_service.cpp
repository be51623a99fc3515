#include "runtime/keys/key_service.hpp"

#include "runtime/crypto/signature.hpp"
#include "runtime/keys/decisions.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/keys/requests.hpp"

namespace hsm::keys {

caf::expected<key_record> key_service::lookup(std::string_view key_id) {
  if (auto err = validate_key_id(key_id))
    return err;
  auto rec = store_.get(key_id);
  if (!rec)
    return rec.error();
  if (!*rec)
    return unknown_key(key_id);
  return std::move(**rec);
}

caf::expected<key_result> key_service::generate(std::string_view key_id,
                                                std::string_view scheme_name) {
  if (auto err = validate_key_id(key_id))
    return err;
  auto s = parse_scheme_name(scheme_name);
  if (!s)
    return s.error();
  // Idempotent: a stored key is returned as it is; the HSM is not touched.
  auto existing = store_.get(key_id);
  if (!existing)
    return existing.error();
  if (*existing)
    return answer_stored(**existing, *s, false);
  if (auto err = check_served(caps_, *s))
    return err;
  CK_OBJECT_HANDLE resident_handle = CK_INVALID_HANDLE;
  auto rec = make_key(sess_, keys_, *s, key_id, caps_.of(*s).resident,
                      &resident_handle, caps_.of(*s).params);
  if (!rec)
    return rec.error();
  // Durable before visible: the answer is built from what the store
  // committed.
  auto put = store_.put(*rec);
  // A failed put may still have committed (an answer lost on the way): a
  // resident key then stays, never destroyed on an ambiguous outcome. Only
  // another generation's committed win makes ours certainly unused.
  if (!put)
    return put.error();
  if (!put->inserted && resident_handle != CK_INVALID_HANDLE)
    static_cast<void>(sess_.destroy(resident_handle));
  return answer_stored(put->record, *s, put->inserted);
}

caf::expected<signature_result>
key_service::sign(std::string_view key_id, std::span<const uint8_t> payload) {
  auto rec = lookup(key_id);
  if (!rec)
    return rec.error();
  if (auto err = validate_payload(rec->scheme, payload))
    return err;
  if (auto err = check_served(caps_, rec->scheme))
    return err;
  auto raw = sign_with(sess_, keys_, *rec, payload);
  if (!raw)
    return raw.error();
  auto sig = crypto::finish_signature(rec->scheme, rec->public_key, payload,
                                      *raw);
  if (!sig)
    return sig.error();
  return signature_result{rec->key_id, rec->scheme, std::move(*sig)};
}

caf::expected<key_result> key_service::show(std::string_view key_id) {
  auto rec = lookup(key_id);
  if (!rec)
    return rec.error();
  return make_key_result(*rec, false);
}

} // namespace hsm::keys
