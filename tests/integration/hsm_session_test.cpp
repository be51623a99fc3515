// The hsm_session actor on CAF's deterministic scheduler (spawn_mode
// scheduled) against a real SoftHSMv2 token: generate, sign, and the end of
// the actor after a session-level failure.

#include "actors/hsm_session.hpp"

#include "runtime/crypto/signature.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/keys/key_service.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/rv.hpp"
#include "tests/support/actor_fixture.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/softhsm_env.hpp"

#include "caf/all.hpp"
#include <gtest/gtest.h>

namespace hsm {
namespace {

class HsmSessionTest : public testing::actor_fixture {
protected:
  void SetUp() override {
    token = std::make_unique<test::test_token>(
      test::make_token(test::unique_label("sess")));
    auto caps = keys::probe(token->sess, token->master, {scheme::ed25519});
    ASSERT_TRUE(caps) << describe(caps.error());
    auto ctx = std::make_shared<session_context>();
    ctx->mod = &test::shared_module();
    auto slot = test::shared_module().find_token(token->label);
    ASSERT_TRUE(slot);
    ctx->slot = *slot;
    ctx->pin = std::make_shared<const pkcs11::secret_pin>(test::user_pin);
    ctx->master_keys.current = "hsm-driver-master";
    ctx->caps = *caps;
    session = spawn_hsm_session(sys, ctx, 0, 7,
                                caf::actor_cast<session_supervisor_actor>(
                                  caf::actor_cast<caf::actor>(self)),
                                spawn_mode::scheduled);
    sched.run();
    bool ready = false;
    self->receive([&](ready_atom, size_t index, uint64_t generation) {
      ready = index == 0 && generation == 7;
    });
    ASSERT_TRUE(ready);
  }

  void TearDown() override {
    test::shared_plan()->before_sign = nullptr;
    test::shared_plan()->before_unwrap = nullptr;
    self->send_exit(session, caf::exit_reason::user_shutdown);
    sched.run();
  }

  template <class T>
  caf::expected<T> call(caf::message msg) {
    caf::expected<T> out{caf::sec::request_timeout};
    auto h = self->request(caf::actor_cast<caf::actor>(session), caf::infinite,
                           std::move(msg));
    sched.run();
    h.receive([&](T& x) { out = std::move(x); },
              [&](caf::error& err) { out = std::move(err); });
    return out;
  }

  std::unique_ptr<test::test_token> token;
  hsm_session_actor session;
};

TEST_F(HsmSessionTest, GeneratesAndSignsWithWrappedAndResidentKeys) {
  for (auto s : {scheme::secp256k1, scheme::ed25519}) {
    auto rec = call<key_record>(
      caf::make_message(generate_atom::value, std::string{"sess-key"}, s));
    ASSERT_TRUE(rec) << describe(rec.error());
    EXPECT_EQ(rec->resident(), s == scheme::ed25519);
    auto payload = is_ecdsa(s) ? test::sha256("session actor")
                               : std::vector<uint8_t>{'h', 'i'};
    auto sig = call<signature_result>(
      caf::make_message(sign_atom::value, *rec, payload));
    ASSERT_TRUE(sig) << describe(sig.error());
    // Finished and verified in the session: check it independently too.
    EXPECT_EQ(sig->key_id, "sess-key");
    EXPECT_TRUE(crypto::verify(s, rec->public_key, payload, sig->sig.raw))
      << to_string(s);
    EXPECT_EQ(sig->sig.recovery_id.has_value(), is_ecdsa(s));
  }
}

TEST_F(HsmSessionTest, SessionLevelFailureIsAnsweredThenEndsTheActor) {
  auto rec = call<key_record>(caf::make_message(
    generate_atom::value, std::string{"fail-key"}, scheme::p256));
  ASSERT_TRUE(rec) << describe(rec.error());
  test::shared_plan()->before_sign = [](int) -> CK_RV {
    return CKR_SESSION_CLOSED;
  };
  auto first = call<signature_result>(
    caf::make_message(sign_atom::value, *rec, test::sha256("x")));
  ASSERT_FALSE(first);
  EXPECT_EQ(first.error(), hsm_errc::reopen_session);
  test::shared_plan()->before_sign = nullptr;
  // The actor ended: the next request finds no receiver.
  auto second = call<signature_result>(
    caf::make_message(sign_atom::value, *rec, test::sha256("x")));
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error(), caf::sec::request_receiver_down);
}

TEST_F(HsmSessionTest, UnwrapFailuresAreClassedByTheirCkr) {
  // The row MAC holds, so the blob is the stored one: an unwrap that then
  // fails is the HSM's fault (retried on a new session), unless the token
  // names the blob itself as bad.
  struct row {
    CK_RV rv;
    caf::error expected;
    bool session_ends;
  };
  const row rows[] = {
    {CKR_WRAPPED_KEY_INVALID, key_errc::key_corrupted, false},
    {CKR_ENCRYPTED_DATA_INVALID, key_errc::key_corrupted, false},
    {CKR_GENERAL_ERROR, hsm_errc::reopen_session, true},
    {CKR_FUNCTION_FAILED, hsm_errc::reopen_session, true},
    {CKR_DEVICE_ERROR, hsm_errc::reopen_session, true},
    {CKR_KEY_HANDLE_INVALID, hsm_errc::reopen_session, true},
  };
  for (auto& r : rows) {
    if (r.session_ends)
      SetUp(); // a fresh session actor for each case that ends one
    auto rec = call<key_record>(caf::make_message(
      generate_atom::value, std::string{"unwrap-fault"}, scheme::p256));
    ASSERT_TRUE(rec) << describe(rec.error());
    auto rv = r.rv;
    test::shared_plan()->before_unwrap = [rv](int) { return rv; };
    auto sig = call<signature_result>(
      caf::make_message(sign_atom::value, *rec, test::sha256("x")));
    test::shared_plan()->before_unwrap = nullptr;
    ASSERT_FALSE(sig) << pkcs11::rv_name(rv);
    EXPECT_EQ(sig.error(), r.expected)
      << pkcs11::rv_name(rv) << ": " << describe(sig.error());
    EXPECT_EQ(is_retryable(sig.error()), r.session_ends) << pkcs11::rv_name(rv);
    auto again = call<signature_result>(
      caf::make_message(sign_atom::value, *rec, test::sha256("x")));
    if (r.session_ends)
      EXPECT_EQ(again.error(), caf::sec::request_receiver_down)
        << pkcs11::rv_name(rv);
    else
      EXPECT_TRUE(again) << pkcs11::rv_name(rv);
  }
}

TEST_F(HsmSessionTest, AResidentKeyThisHsmLacksIsRetryableForAnotherDriver) {
  auto rec = call<key_record>(caf::make_message(
    generate_atom::value, std::string{"elsewhere"}, scheme::ed25519));
  ASSERT_TRUE(rec) << describe(rec.error());
  ASSERT_TRUE(rec->resident());
  // The key lives in another driver's HSM: here it is gone.
  std::vector<uint8_t> id{rec->key_id.begin(), rec->key_id.end()};
  ASSERT_FALSE(pkcs11::destroy_resident(token->sess, id));
  auto sig = call<signature_result>(
    caf::make_message(sign_atom::value, *rec, std::vector<uint8_t>{'h', 'i'}));
  ASSERT_FALSE(sig);
  EXPECT_EQ(sig.error(), key_errc::key_not_on_this_hsm)
    << describe(sig.error());
  EXPECT_TRUE(is_retryable(sig.error()));
  EXPECT_EQ(wire_code(sig.error()), "key_not_on_this_hsm");
}

TEST_F(HsmSessionTest, KeyErrorsAreAnsweredAndTheSessionStays) {
  auto rec = call<key_record>(caf::make_message(
    generate_atom::value, std::string{"bad-blob"}, scheme::p256));
  ASSERT_TRUE(rec);
  rec->key_blob[5] ^= 0xFF;
  auto bad = call<signature_result>(
    caf::make_message(sign_atom::value, *rec, test::sha256("x")));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error(), key_errc::key_corrupted);
  rec->key_blob[5] ^= 0xFF;
  auto good = call<signature_result>(
    caf::make_message(sign_atom::value, *rec, test::sha256("x")));
  EXPECT_TRUE(good) << describe(good.error());
}

TEST_F(HsmSessionTest, SignatureThatDoesNotVerifyIsRefusedInTheSession) {
  auto rec = call<key_record>(caf::make_message(
    generate_atom::value, std::string{"other-pub"}, scheme::p256));
  ASSERT_TRUE(rec);
  auto other = call<key_record>(caf::make_message(
    generate_atom::value, std::string{"other-key"}, scheme::p256));
  ASSERT_TRUE(other);
  // The blob of one key under the public key of another, with a row MAC
  // made for that row (as a PIN holder could): the token signs, the
  // session's check refuses to release it, and the session stays.
  rec->public_key = other->public_key;
  auto keys = keys::find_key_handles(token->sess, "hsm-driver-master");
  ASSERT_TRUE(keys) << describe(keys.error());
  auto mac = token->sess.sign(CKM_SHA256_HMAC, keys->row_mac,
                              keys::row_mac_input(*rec));
  ASSERT_TRUE(mac) << describe(mac.error());
  rec->row_mac = *mac;
  auto bad = call<signature_result>(
    caf::make_message(sign_atom::value, *rec, test::sha256("x")));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error(), key_errc::signature_mismatch);
  auto good = call<signature_result>(
    caf::make_message(sign_atom::value, *other, test::sha256("x")));
  EXPECT_TRUE(good) << describe(good.error());
}

} // namespace
} // namespace hsm
