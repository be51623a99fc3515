#include "runtime/crypto/signature.hpp"
#include "runtime/keys/capabilities.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/rv.hpp"

namespace hsm::keys {

const capability& capabilities::of(scheme s) const {
  for (auto& c : schemes)
    if (c.scheme == s)
      return c;
  return schemes.front(); // unreachable: every scheme has an entry
}

namespace {

/// True if `err` says the token will not wrap (or unwrap) a key of the
/// probed scheme with the master key. CKR_KEY_NOT_WRAPPABLE,
/// CKR_KEY_UNEXTRACTABLE and CKR_WRAPPED_KEY_INVALID come only from
/// C_WrapKey / C_UnwrapKey; CKR_MECHANISM_INVALID counts on those steps only
/// (from C_GenerateKeyPair it means the curve, not wrapping, is missing).
/// Any refusal of C_UnwrapKey counts too: the blob was made a moment ago by
/// this token under this master key.
bool wrap_refused(const caf::error& err) {
  auto rv = pkcs11::rv_of(err);
  if (!rv)
    return false;
  auto fn = pkcs11::function_of(err);
  bool wrap_step = fn == "C_WrapKey";
  bool unwrap_step = fn == "C_UnwrapKey";
  switch (*rv) {
    case CKR_KEY_NOT_WRAPPABLE:
    case CKR_KEY_UNEXTRACTABLE:
    case CKR_WRAPPED_KEY_INVALID:
      return true;
    case CKR_MECHANISM_INVALID:
      return wrap_step || unwrap_step;
    default:
      return unwrap_step;
  }
}

std::string wrap_hint(scheme s, const caf::error& err) {
  auto text = describe(err);
  if (wrap_refused(err))
    text += "; the token cannot wrap " + std::string{to_string(s)}
            + " keys: enable key wrapping in the HSM's partition policy, or "
              "opt in to token-resident keys with --resident-schemes "
            + std::string{to_string(s)};
  return text;
}

/// One wrapped round trip: generate, wrap, unwrap, sign, verify, destroy.
caf::error probe_wrapped(pkcs11::session& sess, CK_OBJECT_HANDLE master,
                         scheme s) {
  auto key = pkcs11::generate_wrapped(sess, master, s);
  if (!key)
    return key.error();
  auto payload = fixed_payload(s, "hsm-driver capability probe");
  auto raw = pkcs11::sign_wrapped(sess, master, s, key->wrapped_key, payload);
  if (!raw)
    return raw.error();
  auto sig = crypto::finish_signature(s, key->public_key, payload, *raw);
  return sig ? caf::none : sig.error();
}

/// One resident round trip: generate, sign, verify, destroy.
caf::error probe_resident(pkcs11::session& sess, scheme s) {
  std::string id = "hsm-driver-probe-" + std::string{to_string(s)};
  std::vector<uint8_t> id_bytes{id.begin(), id.end()};
  auto key = pkcs11::generate_resident(sess, s, id_bytes, id);
  if (!key)
    return key.error();
  auto payload = fixed_payload(s, "hsm-driver capability probe");
  auto raw = pkcs11::sign_resident(sess, s, id_bytes, id, payload);
  caf::error result;
  if (!raw) {
    result = raw.error();
  } else if (auto sig = crypto::finish_signature(s, key->public_key, payload,
                                                 *raw);
             !sig) {
    result = sig.error();
  }
  if (auto err = pkcs11::destroy_resident(sess, id_bytes); err && !result)
    result = err;
  return result;
}

} // namespace

caf::expected<capabilities> probe(pkcs11::session& sess,
                                  CK_OBJECT_HANDLE master,
                                  const std::set<scheme>& resident_opt_in) {
  capabilities caps;
  for (size_t i = 0; i < all_schemes.size(); ++i) {
    auto s = all_schemes[i];
    auto& c = caps.schemes[i];
    c.scheme = s;
    c.resident = resident_opt_in.count(s) > 0;
    auto err = c.resident ? probe_resident(sess, s)
                          : probe_wrapped(sess, master, s);
    if (err && is_session_failure(err))
      return err;
    c.served = !err;
    c.detail = err ? wrap_hint(s, err) : "ok";
  }
  return caps;
}

} // namespace hsm::keys
