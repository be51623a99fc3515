#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/capabilities.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/rv.hpp"

#include <openssl/rand.h>

#include <array>

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
                         scheme s, pkcs11::ed25519_params form) {
  auto key = pkcs11::generate_wrapped(sess, master, s, false, form);
  if (!key)
    return key.error();
  auto payload = fixed_payload(s, "hsm-driver capability probe");
  auto raw = pkcs11::sign_wrapped(sess, master, s, key->wrapped_key, payload);
  if (!raw)
    return raw.error();
  auto sig = crypto::finish_signature(s, key->public_key, payload, *raw);
  return sig ? caf::none : sig.error();
}

/// The CKA_ID and CKA_LABEL of the probe's own resident key: outside the
/// key-id alphabet (a space), under the reserved prefix, and new on every
/// run, so that it can never name a customer's key nor an old leftover.
std::string probe_object_id(scheme s) {
  std::array<uint8_t, 8> nonce{};
  if (RAND_bytes(nonce.data(), static_cast<int>(nonce.size())) != 1)
    nonce.fill(0);
  return std::string{reserved_key_id_prefix} + "probe "
         + std::string{to_string(s)} + " " + crypto::to_hex(nonce);
}

/// One resident round trip: generate, sign, verify, destroy -- the probe's
/// own object, by its handle, and nothing else.
caf::error probe_resident(pkcs11::session& sess, scheme s,
                          pkcs11::ed25519_params form) {
  auto id = probe_object_id(s);
  std::vector<uint8_t> id_bytes{id.begin(), id.end()};
  auto key = pkcs11::generate_resident(sess, s, id_bytes, id, form);
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
  if (auto err = sess.destroy(key->handle); err && !result)
    result = err;
  return result;
}

/// True if `err` is C_GenerateKeyPair refusing the curve parameters.
bool params_refused(const caf::error& err) {
  auto rv = pkcs11::rv_of(err);
  if (!rv || pkcs11::function_of(err) != "C_GenerateKeyPair")
    return false;
  switch (*rv) {
    case CKR_ATTRIBUTE_VALUE_INVALID:
    case CKR_DOMAIN_PARAMS_INVALID:
    case CKR_CURVE_NOT_SUPPORTED:
    case CKR_TEMPLATE_INCONSISTENT:
      return true;
    default:
      return false;
  }
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
    auto round_trip = [&](pkcs11::ed25519_params form) {
      return c.resident ? probe_resident(sess, s, form)
                        : probe_wrapped(sess, master, s, form);
    };
    auto err = round_trip(pkcs11::ed25519_params::oid);
    if (err && s == scheme::ed25519 && params_refused(err)) {
      auto second = round_trip(pkcs11::ed25519_params::curve_name);
      if (!second) {
        c.params = pkcs11::ed25519_params::curve_name;
        err = caf::none;
      } else if (!params_refused(second)) {
        // The name got further than the OID: its failure says more.
        err = second;
      }
    }
    // A round trip that fails is a scheme not served, even where the token
    // answers with a device or general error (SoftHSMv2 answers
    // CKR_FUNCTION_FAILED to an Ed25519 unwrap); only a lost session or
    // token stops the probe.
    if (err && is_session_failure(err)) {
      auto rv = pkcs11::rv_of(err);
      if (!rv || pkcs11::session_lost(*rv))
        return err;
    }
    c.served = !err;
    c.detail = err ? wrap_hint(s, err) : "ok";
  }
  return caps;
}

} // namespace hsm::keys
