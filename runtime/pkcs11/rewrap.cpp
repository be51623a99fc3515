#include "runtime/pkcs11/rewrap.hpp"

#include "runtime/pkcs11/rv.hpp"

namespace hsm::pkcs11 {

caf::expected<std::vector<uint8_t>> rewrap(session& sess, CK_OBJECT_HANDLE from,
                                           CK_OBJECT_HANDLE to, scheme s,
                                           std::span<const uint8_t> blob) {
  attributes tmpl;
  tmpl.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY)
    .add_ulong(CKA_KEY_TYPE, s == scheme::ed25519 ? CKK_EC_EDWARDS : CKK_EC)
    .add_bool(CKA_TOKEN, false)
    .add_bool(CKA_PRIVATE, true)
    .add_bool(CKA_SENSITIVE, true)
    .add_bool(CKA_EXTRACTABLE, true)
    .add_bool(CKA_SIGN, true)
    .add_bool(CKA_DERIVE, false)
    .add_bool(CKA_COPYABLE, false);
  auto key = sess.unwrap(CKM_AES_KEY_WRAP_PAD, from, blob, tmpl);
  if (!key) {
    auto rv = rv_of(key.error());
    if (rv == CKR_TEMPLATE_INCONSISTENT || rv == CKR_ATTRIBUTE_VALUE_INVALID)
      return caf::make_error(
        hsm_errc::fatal, std::string{"C_UnwrapKey"},
        std::string{"the old master key's unwrap template makes every key "
                    "it unwraps non-extractable, so no key under it can be "
                    "re-wrapped under another master key (PKCS#11 has no "
                    "operation for it, by design); its keys stay under it"});
    if (rv && blob_refused(*rv))
      return rv_error_as(key_errc::key_corrupted,
                         "the token cannot unwrap the stored key", key.error());
    return key.error();
  }
  scoped_object obj{sess, *key};
  return sess.wrap(CKM_AES_KEY_WRAP_PAD, to, obj.get());
}

} // namespace hsm::pkcs11
