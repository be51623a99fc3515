// Key custody on a real SoftHSMv2 token: what someone holding the user PIN
// and a wrapped blob from the database can try, against a master key made
// by `master-key init` (each attempt refused) and against a legacy key made
// without a policy (each attempt works: the attacks are real, and the
// start-up check names that key weak).

#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/key_policy.hpp"
#include "runtime/pkcs11/rv.hpp"
#include "runtime/pkcs11/token_admin.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/softhsm_env.hpp"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <algorithm>
#include <string>
#include <vector>

namespace hsm {
namespace {

using bytes = std::vector<uint8_t>;

/// The attacker's session: the same token, logged in with the user PIN.
struct attacker {
  pkcs11::session& sess;

  /// Attempt 1: unwrap the blob as a non-sensitive, extractable generic
  /// secret and read CKA_VALUE (the plaintext PKCS#8).
  caf::expected<bytes> unwrap_as_secret(CK_OBJECT_HANDLE master,
                                        const bytes& blob) {
    pkcs11::attributes t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY)
      .add_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET)
      .add_bool(CKA_TOKEN, false)
      .add_bool(CKA_SENSITIVE, false)
      .add_bool(CKA_EXTRACTABLE, true);
    auto h = sess.unwrap(CKM_AES_KEY_WRAP_PAD, master, blob, t);
    if (!h)
      return h.error();
    pkcs11::scoped_object obj{sess, *h};
    return sess.attribute(*h, CKA_VALUE);
  }

  /// Attempt 2: unwrap it as a non-sensitive EC private key and read the
  /// scalar.
  caf::expected<bytes> unwrap_as_open_ec_key(CK_OBJECT_HANDLE master,
                                             const bytes& blob) {
    pkcs11::attributes t;
    t.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY)
      .add_ulong(CKA_KEY_TYPE, CKK_EC)
      .add_bool(CKA_TOKEN, false)
      .add_bool(CKA_PRIVATE, true)
      .add_bool(CKA_SENSITIVE, false)
      .add_bool(CKA_EXTRACTABLE, true)
      .add_bool(CKA_SIGN, true);
    auto h = sess.unwrap(CKM_AES_KEY_WRAP_PAD, master, blob, t);
    if (!h)
      return h.error();
    pkcs11::scoped_object obj{sess, *h};
    return sess.attribute(*h, CKA_VALUE);
  }

  /// Attempt 3: give the master key CKA_DECRYPT, in place or on a copy,
  /// and decrypt the blob by hand (AES-KWP is AES in a keyed mode: a key
  /// that decrypts lets the blob be opened outside C_UnwrapKey). Returns
  /// the handle of a master key that decrypts.
  caf::expected<CK_OBJECT_HANDLE> enable_decrypt(CK_OBJECT_HANDLE master) {
    pkcs11::attributes set;
    set.add_bool(CKA_DECRYPT, true);
    auto err = sess.set_attributes(master, set);
    if (!err)
      return master;
    pkcs11::attributes copy_tmpl;
    copy_tmpl.add_bool(CKA_DECRYPT, true).add_bool(CKA_TOKEN, false);
    CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
    auto rv = test::shared_module().fns().copy_object(sess.handle(), master,
                                                      copy_tmpl.data(),
                                                      copy_tmpl.size(), &copy);
    if (rv != CKR_OK)
      return pkcs11::rv_error("C_CopyObject", rv);
    return copy;
  }
};

/// True if `der` is a PKCS#8 PrivateKeyInfo OpenSSL can read: the
/// plaintext private key.
bool is_pkcs8_private_key(const bytes& der) {
  const unsigned char* p = der.data();
  auto* info = d2i_PKCS8_PRIV_KEY_INFO(nullptr, &p,
                                       static_cast<long>(der.size()));
  if (info == nullptr)
    return false;
  auto* key = EVP_PKCS82PKEY(info);
  PKCS8_PRIV_KEY_INFO_free(info);
  bool ok = key != nullptr;
  EVP_PKEY_free(key);
  return ok;
}

bool names(const std::vector<pkcs11::weakness>& found, std::string_view attr) {
  return std::any_of(found.begin(), found.end(),
                     [&](const auto& w) { return w.attribute == attr; });
}

TEST(CustodyTest, MasterKeyFromInitRefusesEveryExtractionAttempt) {
  auto tok = test::make_token(test::unique_label("custody"));
  auto key = pkcs11::generate_wrapped(tok.sess, tok.master, scheme::secp256k1);
  ASSERT_TRUE(key) << describe(key.error());
  attacker a{tok.sess};

  auto secret = a.unwrap_as_secret(tok.master, key->wrapped_key);
  ASSERT_FALSE(secret) << "the blob unwrapped as a readable secret";
  EXPECT_EQ(pkcs11::rv_of(secret.error()), CKR_TEMPLATE_INCONSISTENT)
    << describe(secret.error());

  auto scalar = a.unwrap_as_open_ec_key(tok.master, key->wrapped_key);
  ASSERT_FALSE(scalar) << "the blob unwrapped as a readable EC key";
  EXPECT_EQ(pkcs11::rv_of(scalar.error()), CKR_TEMPLATE_INCONSISTENT)
    << describe(scalar.error());

  auto decrypting = a.enable_decrypt(tok.master);
  ASSERT_FALSE(decrypting) << "the master key was made to decrypt";
  EXPECT_EQ(pkcs11::rv_of(decrypting.error()), CKR_ACTION_PROHIBITED)
    << describe(decrypting.error());

  // The driver's own path still works, and the key passes the check.
  auto sig = pkcs11::sign_wrapped(tok.sess, tok.master, scheme::secp256k1,
                                  key->wrapped_key, test::sha256("still"));
  ASSERT_TRUE(sig) << describe(sig.error());
  auto weak = pkcs11::inspect_master_key(tok.sess, tok.master);
  ASSERT_TRUE(weak) << describe(weak.error());
  EXPECT_TRUE(weak->empty()) << pkcs11::describe(*weak);
}

TEST(CustodyTest, LegacyMasterKeyLeaksAndIsNamedWeak) {
  auto tok = test::make_token(test::unique_label("legacy"));
  auto legacy = test::make_legacy_master_key(tok.sess, "legacy-master");
  attacker a{tok.sess};

  auto k1 = pkcs11::generate_wrapped(tok.sess, legacy, scheme::p256);
  ASSERT_TRUE(k1) << describe(k1.error());
  auto secret = a.unwrap_as_secret(legacy, k1->wrapped_key);
  ASSERT_TRUE(secret) << describe(secret.error());
  EXPECT_TRUE(is_pkcs8_private_key(*secret));

  auto scalar = a.unwrap_as_open_ec_key(legacy, k1->wrapped_key);
  ASSERT_TRUE(scalar) << describe(scalar.error());
  // The scalar as a big-endian integer: 32 bytes, fewer when it starts
  // with zero bytes (1 key in 256 for one byte).
  EXPECT_GE(scalar->size(), 1u);
  EXPECT_LE(scalar->size(), 32u);
  EXPECT_TRUE(std::any_of(scalar->begin(), scalar->end(),
                          [](uint8_t b) { return b != 0; }));

  auto decrypting = a.enable_decrypt(legacy);
  ASSERT_TRUE(decrypting) << describe(decrypting.error());
  auto can = tok.sess.attribute(*decrypting, CKA_DECRYPT);
  ASSERT_TRUE(can);
  EXPECT_EQ((*can)[0], CK_TRUE);

  auto weak = pkcs11::inspect_master_key(tok.sess, legacy);
  ASSERT_TRUE(weak) << describe(weak.error());
  EXPECT_TRUE(names(*weak, "CKA_MODIFIABLE")) << pkcs11::describe(*weak);
  EXPECT_TRUE(names(*weak, "CKA_COPYABLE")) << pkcs11::describe(*weak);
  EXPECT_TRUE(names(*weak, "CKA_UNWRAP_TEMPLATE")) << pkcs11::describe(*weak);
  EXPECT_TRUE(names(*weak, "CKA_WRAP_TEMPLATE")) << pkcs11::describe(*weak);
  auto text = pkcs11::describe(*weak);
  EXPECT_NE(text.find("CKA_UNWRAP_TEMPLATE is "), std::string::npos) << text;
  EXPECT_NE(text.find("CKA_MODIFIABLE is TRUE (must be FALSE)"),
            std::string::npos)
    << text;
}

TEST(CustodyTest, GeneratedKeysSignOnlyAndCannotBeChanged) {
  auto tok = test::make_token(test::unique_label("strict"));
  // A resident key stays on the token: read its attributes back.
  bytes id{'k', '1'};
  auto key = pkcs11::generate_resident(tok.sess, scheme::p256, id, "k1-gen1");
  ASSERT_TRUE(key) << describe(key.error());
  auto flag = [&](CK_ATTRIBUTE_TYPE t) {
    auto v = tok.sess.attribute(key->handle, t);
    return v && v->size() == 1 && (*v)[0] == CK_TRUE;
  };
  EXPECT_TRUE(flag(CKA_SENSITIVE));
  EXPECT_FALSE(flag(CKA_EXTRACTABLE));
  EXPECT_TRUE(flag(CKA_SIGN));
  EXPECT_FALSE(flag(CKA_DERIVE));
  EXPECT_FALSE(flag(CKA_MODIFIABLE));
  EXPECT_FALSE(flag(CKA_COPYABLE));
  pkcs11::attributes set;
  set.add_bool(CKA_DERIVE, true);
  auto err = tok.sess.set_attributes(key->handle, set);
  ASSERT_TRUE(err);
  EXPECT_EQ(pkcs11::rv_of(err), CKR_ACTION_PROHIBITED) << describe(err);
}

} // namespace
} // namespace hsm
