// The PKCS#11 layer on a real SoftHSMv2 token.

#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/rv.hpp"
#include "runtime/pkcs11/token_admin.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/softhsm_env.hpp"

#include <gtest/gtest.h>

namespace hsm {
namespace {

bool attribute_is_true(pkcs11::session& s, CK_OBJECT_HANDLE h,
                       CK_ATTRIBUTE_TYPE type) {
  auto v = s.attribute(h, type);
  return v && v->size() == 1 && (*v)[0] == CK_TRUE;
}

TEST(ModuleTest, MissingModulePathIsAClearError) {
  auto mod = pkcs11::module::load("/nonexistent/libpkcs11-missing.so");
  ASSERT_FALSE(mod);
  EXPECT_EQ(mod.error(), config_errc::bad_file);
  EXPECT_NE(describe(mod.error()).find("/nonexistent/libpkcs11-missing.so"),
            std::string::npos);
}

TEST(ModuleTest, LibraryWithoutPkcs11IsRefused) {
  auto mod = pkcs11::module::load("/usr/lib/x86_64-linux-gnu/libsqlite3.so.0");
  ASSERT_FALSE(mod);
  EXPECT_EQ(mod.error(), config_errc::bad_file);
  EXPECT_NE(describe(mod.error()).find("C_GetFunctionList"), std::string::npos);
}

TEST(ModuleTest, UnknownTokenLabelNamesTheOption) {
  auto slot = test::shared_module().find_token("no-such-token-label");
  ASSERT_FALSE(slot);
  EXPECT_EQ(slot.error(), config_errc::invalid_option);
  EXPECT_NE(describe(slot.error()).find("--token-label"), std::string::npos);
}

TEST(ModuleTest, TokenIsFoundByLabelAndLabelsStayUnique) {
  auto label = test::unique_label("find");
  auto tok = test::make_token(label);
  auto slot = test::shared_module().find_token(label);
  ASSERT_TRUE(slot) << describe(slot.error());
  pkcs11::secret_pin so{test::so_pin};
  pkcs11::secret_pin user{test::user_pin};
  auto err = pkcs11::init_token(test::shared_module(), label, so, user);
  EXPECT_EQ(err, config_errc::invalid_option);
}

TEST(SessionTest, WrongPinIsFatalAndTriedOnce) {
  auto label = test::unique_label("pin");
  auto tok = test::make_token(label);
  auto slot = test::shared_module().find_token(label);
  ASSERT_TRUE(slot);
  // A fresh module-wide login state: log the token out first.
  test::shared_module().fns().logout(tok.sess.handle());
  auto sess = pkcs11::session::open(test::shared_module(), *slot);
  ASSERT_TRUE(sess);
  auto before = test::counts().login.load();
  auto err = sess->login(pkcs11::secret_pin{"wrong-pin"});
  ASSERT_TRUE(err);
  EXPECT_EQ(err, hsm_errc::fatal);
  EXPECT_TRUE(is_fatal(err));
  EXPECT_FALSE(is_retryable(err));
  EXPECT_NE(describe(err).find("C_Login"), std::string::npos);
  EXPECT_NE(describe(err).find("CKR_PIN_INCORRECT"), std::string::npos);
  EXPECT_EQ(test::counts().login.load(), before + 1);
}

TEST(MasterKeyTest, IsSensitiveNotExtractableAndWrapsOnly) {
  auto tok = test::make_token(test::unique_label("mk"));
  EXPECT_TRUE(attribute_is_true(tok.sess, tok.master, CKA_TOKEN));
  EXPECT_TRUE(attribute_is_true(tok.sess, tok.master, CKA_SENSITIVE));
  EXPECT_FALSE(attribute_is_true(tok.sess, tok.master, CKA_EXTRACTABLE));
  EXPECT_TRUE(attribute_is_true(tok.sess, tok.master, CKA_WRAP));
  EXPECT_TRUE(attribute_is_true(tok.sess, tok.master, CKA_UNWRAP));
  auto value = tok.sess.attribute(tok.master, CKA_VALUE);
  ASSERT_FALSE(value);
  EXPECT_NE(describe(value.error()).find("CKR_ATTRIBUTE_SENSITIVE"),
            std::string::npos);
}

TEST(MasterKeyTest, InitIsIdempotent) {
  auto tok = test::make_token(test::unique_label("mk2"));
  bool created = true;
  auto again = pkcs11::create_master_key(tok.sess, "hsm-driver-master",
                                         &created);
  ASSERT_TRUE(again);
  EXPECT_FALSE(created);
  EXPECT_EQ(*again, tok.master);
}

TEST(KeyOpsTest, SignLeavesNoPrivateKeyObjectBehind) {
  auto tok = test::make_token(test::unique_label("ops"));
  auto key = pkcs11::generate_wrapped(tok.sess, tok.master, scheme::p256);
  ASSERT_TRUE(key) << describe(key.error());
  auto hash = test::sha256("leftovers");
  auto sig = pkcs11::sign_wrapped(tok.sess, tok.master, scheme::p256,
                                  key->wrapped_key, hash);
  ASSERT_TRUE(sig) << describe(sig.error());
  pkcs11::attributes tmpl;
  tmpl.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY);
  auto found = tok.sess.find(tmpl, 16);
  ASSERT_TRUE(found);
  EXPECT_TRUE(found->empty()) << found->size() << " private keys left";
  pkcs11::attributes pub;
  pub.add_ulong(CKA_CLASS, CKO_PUBLIC_KEY);
  auto pubs = tok.sess.find(pub, 16);
  ASSERT_TRUE(pubs);
  EXPECT_TRUE(pubs->empty());
}

TEST(KeyOpsTest, BlobFromOneMasterKeyDoesNotUnwrapUnderAnother) {
  auto a = test::make_token(test::unique_label("mka"));
  auto b = test::make_token(test::unique_label("mkb"));
  auto key = pkcs11::generate_wrapped(a.sess, a.master, scheme::secp256k1);
  ASSERT_TRUE(key);
  auto sig = pkcs11::sign_wrapped(b.sess, b.master, scheme::secp256k1,
                                  key->wrapped_key, test::sha256("x"));
  ASSERT_FALSE(sig);
  // SoftHSMv2 answers CKR_GENERAL_ERROR: an HSM failure by its code, not a
  // corrupt blob. Telling "another master key" apart is the master-key
  // guard's job (the canary), and a blob's row MAC is checked before any
  // unwrap.
  EXPECT_EQ(pkcs11::function_of(sig.error()), "C_UnwrapKey")
    << describe(sig.error());
  EXPECT_NE(sig.error(), key_errc::key_corrupted) << describe(sig.error());
}

} // namespace
} // namespace hsm
