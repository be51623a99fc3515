#include "runtime/pkcs11/key_ops.hpp"

#include "runtime/crypto/ec.hpp"
#include "runtime/pkcs11/rv.hpp"

namespace hsm::pkcs11 {

namespace {

/// DER-encoded `CKA_EC_PARAMS` for key generation (the curve OID).
const std::vector<uint8_t>& ec_params(scheme x, ed25519_params form) {
  // OID 1.3.132.0.10 (secp256k1), 1.2.840.10045.3.1.7 (prime256v1),
  // 1.3.101.112 (Ed25519, RFC 8410), or PrintableString "edwards25519".
  static const std::vector<uint8_t> k1{0x06, 0x05, 0x2B, 0x81,
                                       0x04, 0x00, 0x0A};
  static const std::vector<uint8_t> r1{0x06, 0x08, 0x2A, 0x86, 0x48,
                                       0xCE, 0x3D, 0x03, 0x01, 0x07};
  static const std::vector<uint8_t> ed{0x06, 0x03, 0x2B, 0x65, 0x70};
  static const std::vector<uint8_t> ed_name{0x13, 0x0C, 'e', 'd', 'w',
                                            'a',  'r',  'd', 's', '2',
                                            '5',  '5',  '1', '9'};
  switch (x) {
    case scheme::secp256k1:
      return k1;
    case scheme::p256:
      return r1;
    case scheme::ed25519:
      break;
  }
  return form == ed25519_params::curve_name ? ed_name : ed;
}

CK_MECHANISM_TYPE keygen_mechanism(scheme s) {
  return s == scheme::ed25519 ? CKM_EC_EDWARDS_KEY_PAIR_GEN
                              : CKM_EC_KEY_PAIR_GEN;
}

CK_MECHANISM_TYPE sign_mechanism(scheme s) {
  return s == scheme::ed25519 ? CKM_EDDSA : CKM_ECDSA;
}

CK_KEY_TYPE key_type(scheme s) {
  return s == scheme::ed25519 ? CKK_EC_EDWARDS : CKK_EC;
}

/// Public half: a session object we only read CKA_EC_POINT from.
attributes public_template(scheme s, ed25519_params form) {
  attributes t;
  t.add_bool(CKA_TOKEN, false)
    .add_bool(CKA_PRIVATE, false)
    .add_bool(CKA_VERIFY, true)
    .add_bytes(CKA_EC_PARAMS, ec_params(s, form));
  return t;
}

/// What every private key the driver makes or unwraps may do: sign, and
/// nothing else; never readable, changeable or copyable. No CKA_WRAP or
/// CKA_UNWRAP at all: some tokens refuse EC templates carrying them.
void restrict_private(attributes& t) {
  t.add_bool(CKA_PRIVATE, true)
    .add_bool(CKA_SENSITIVE, true)
    .add_bool(CKA_SIGN, true)
    .add_bool(CKA_DERIVE, false)
    .add_bool(CKA_COPYABLE, false);
}

/// The private half of a new key pair. A key to be wrapped must be
/// extractable; with `wrap_with_trusted` only a trusted key (the master
/// key, where the token marks it so) may wrap it.
attributes private_template(bool token, bool extractable,
                            bool wrap_with_trusted) {
  attributes t;
  t.add_bool(CKA_TOKEN, token).add_bool(CKA_EXTRACTABLE, extractable);
  restrict_private(t);
  // Not on the unwrap template: SoftHSMv2 applies a template in order, and
  // once CKA_MODIFIABLE is false it refuses the rest of an unwrap's
  // attributes (CKR_ATTRIBUTE_READ_ONLY). An unwrapped key is a session
  // object destroyed after one signature.
  t.add_bool(CKA_MODIFIABLE, false);
  if (wrap_with_trusted)
    t.add_bool(CKA_WRAP_WITH_TRUSTED, true);
  return t;
}

caf::expected<std::vector<uint8_t>>
read_public_key(session& sess, CK_OBJECT_HANDLE pub, scheme s) {
  auto point = sess.attribute(pub, CKA_EC_POINT);
  if (!point)
    return point.error();
  return crypto::parse_ec_point(s, *point);
}

/// Maps an unwrap failure: a refusal of the blob itself (`blob_refused`)
/// is `key_errc::key_corrupted`; anything else keeps its class (a device
/// or general error is retried on a new session). The CK_RV stays in the
/// error (`rv_of`).
caf::error unwrap_failure(const caf::error& err) {
  if (auto rv = rv_of(err); rv && blob_refused(*rv))
    return rv_error_as(key_errc::key_corrupted,
                       "the token cannot unwrap the stored key", err);
  return err;
}

} // namespace

caf::expected<generated_key>
generate_wrapped(session& sess, CK_OBJECT_HANDLE master, scheme s,
                 bool wrap_with_trusted, ed25519_params form) {
  auto pub_tmpl = public_template(s, form);
  auto priv_tmpl = private_template(false, true, wrap_with_trusted);
  auto pair = sess.generate_key_pair(keygen_mechanism(s), pub_tmpl, priv_tmpl);
  if (!pair)
    return pair.error();
  scoped_object pub{sess, pair->first};
  scoped_object priv{sess, pair->second};
  auto public_key = read_public_key(sess, pub.get(), s);
  if (!public_key)
    return public_key.error();
  auto wrapped = sess.wrap(CKM_AES_KEY_WRAP_PAD, master, priv.get());
  if (!wrapped)
    return wrapped.error();
  return generated_key{std::move(*public_key), std::move(*wrapped)};
}

caf::expected<std::vector<uint8_t>>
sign_wrapped(session& sess, CK_OBJECT_HANDLE master, scheme s,
             std::span<const uint8_t> blob, std::span<const uint8_t> payload) {
  attributes tmpl;
  tmpl.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY)
    .add_ulong(CKA_KEY_TYPE, key_type(s))
    .add_bool(CKA_TOKEN, false)
    .add_bool(CKA_EXTRACTABLE, false);
  restrict_private(tmpl);
  auto key = sess.unwrap(CKM_AES_KEY_WRAP_PAD, master, blob, tmpl);
  if (!key)
    return unwrap_failure(key.error());
  scoped_object obj{sess, *key};
  return sess.sign(sign_mechanism(s), obj.get(), payload);
}

namespace {

caf::error destroy_matching(session& sess, attributes& tmpl) {
  auto found = sess.find(tmpl, 64);
  if (!found)
    return found.error();
  for (auto h : *found)
    if (auto err = sess.destroy(h))
      return err;
  return caf::none;
}

} // namespace

caf::error destroy_resident(session& sess, std::span<const uint8_t> id) {
  attributes tmpl;
  tmpl.add_bytes(CKA_ID, id).add_bool(CKA_TOKEN, true);
  return destroy_matching(sess, tmpl);
}

caf::error destroy_resident(session& sess, std::span<const uint8_t> id,
                            std::string_view label) {
  attributes tmpl;
  tmpl.add_bytes(CKA_ID, id)
    .add_text(CKA_LABEL, label)
    .add_bool(CKA_TOKEN, true);
  return destroy_matching(sess, tmpl);
}

caf::expected<resident_key>
generate_resident(session& sess, scheme s, std::span<const uint8_t> id,
                  std::string_view label, ed25519_params form) {
  auto pub_tmpl = public_template(s, form);
  auto priv_tmpl = private_template(true, false, false);
  priv_tmpl.add_bytes(CKA_ID, id).add_text(CKA_LABEL, label);
  auto pair = sess.generate_key_pair(keygen_mechanism(s), pub_tmpl, priv_tmpl);
  if (!pair)
    return pair.error();
  scoped_object pub{sess, pair->first};
  auto public_key = read_public_key(sess, pub.get(), s);
  if (!public_key) {
    static_cast<void>(sess.destroy(pair->second));
    return public_key.error();
  }
  return resident_key{std::move(*public_key), pair->second};
}

caf::expected<std::vector<uint8_t>>
sign_resident(session& sess, scheme s, std::span<const uint8_t> id,
              std::string_view label, std::span<const uint8_t> payload) {
  attributes tmpl;
  tmpl.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY)
    .add_ulong(CKA_KEY_TYPE, key_type(s))
    .add_bytes(CKA_ID, id)
    .add_text(CKA_LABEL, label)
    .add_bool(CKA_TOKEN, true);
  auto found = sess.find(tmpl, 2);
  if (!found)
    return found.error();
  if (found->empty())
    return caf::make_error(key_errc::key_not_on_this_hsm,
                           std::string{"this HSM holds no resident key with "
                                       "this key id and label (it lives in "
                                       "the HSM that made it)"});
  if (found->size() != 1)
    return caf::make_error(key_errc::key_corrupted,
                           std::string{"the token holds several resident "
                                       "keys with this key id and label"});
  return sess.sign(sign_mechanism(s), found->front(), payload);
}

} // namespace hsm::pkcs11
