// The key path on a real SoftHSMv2 token and a real SQLite file.

#include "runtime/keys/key_service.hpp"

#include "runtime/app/token_setup.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/token_admin.hpp"
#include "store/sqlite_store.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/softhsm_env.hpp"

#include <gtest/gtest.h>
#include <openssl/x509.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <iterator>

namespace hsm {
namespace {

using test::sha256;

/// Reads one scalar column with the sqlite3 C API, bypassing the store.
std::vector<uint8_t> raw_blob(const std::filesystem::path& db,
                              const std::string& sql) {
  sqlite3* h = nullptr;
  sqlite3_open(db.c_str(), &h);
  sqlite3_stmt* st = nullptr;
  sqlite3_prepare_v2(h, sql.c_str(), -1, &st, nullptr);
  std::vector<uint8_t> out;
  if (sqlite3_step(st) == SQLITE_ROW) {
    auto* p = static_cast<const uint8_t*>(sqlite3_column_blob(st, 0));
    out.assign(p, p + sqlite3_column_bytes(st, 0));
  }
  sqlite3_finalize(st);
  sqlite3_close(h);
  return out;
}

void exec_sql(const std::filesystem::path& db, const std::string& sql) {
  sqlite3* h = nullptr;
  sqlite3_open(db.c_str(), &h);
  ASSERT_EQ(sqlite3_exec(h, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK)
    << sqlite3_errmsg(h);
  sqlite3_close(h);
}

bool contains(const std::vector<uint8_t>& hay,
              const std::vector<uint8_t>& needle) {
  return std::search(hay.begin(), hay.end(), needle.begin(), needle.end())
         != hay.end();
}

class KeyServiceTest : public ::testing::Test {
protected:
  void SetUp() override {
    token = std::make_unique<test::test_token>(
      test::make_token(test::unique_label("ks")));
    db = test::fresh_dir("ks") / "keys.db";
    auto opened = store::sqlite_store::open(db);
    ASSERT_TRUE(opened) << describe(opened.error());
    st = std::move(*opened);
    auto guard = keys::check_master_key(token->sess, token->master,
                                        "hsm-driver-master", *st, true);
    ASSERT_TRUE(guard) << describe(guard.error());
    ASSERT_EQ(*guard, keys::canary_state::created);
  }

  keys::key_service service(std::set<scheme> resident = {scheme::ed25519}) {
    auto caps = keys::probe(token->sess, token->master, resident);
    EXPECT_TRUE(caps) << describe(caps.error());
    return keys::key_service{token->sess, handles(), *st, *caps};
  }

  keys::key_handles handles() {
    auto h = keys::find_key_handles(token->sess, "hsm-driver-master");
    EXPECT_TRUE(h) << describe(h.error());
    return h ? *h : keys::key_handles{};
  }

  std::unique_ptr<test::test_token> token;
  std::filesystem::path db;
  std::unique_ptr<store::sqlite_store> st;
};

TEST_F(KeyServiceTest, ProbeServesEcdsaWrappedAndRefusesWrappedEd25519) {
  auto caps = keys::probe(token->sess, token->master, {});
  ASSERT_TRUE(caps) << describe(caps.error());
  EXPECT_TRUE(caps->of(scheme::secp256k1).served);
  EXPECT_TRUE(caps->of(scheme::p256).served);
  EXPECT_FALSE(caps->of(scheme::secp256k1).resident);
  // SoftHSMv2 2.6 cannot wrap Ed25519 keys (softhsm.md).
  EXPECT_FALSE(caps->of(scheme::ed25519).served);
  EXPECT_NE(caps->of(scheme::ed25519).detail.find("CKR_KEY_NOT_WRAPPABLE"),
            std::string::npos)
    << caps->of(scheme::ed25519).detail;
  keys::key_service svc{token->sess, handles(), *st, *caps};
  auto res = svc.generate("ed-refused", "ed25519");
  ASSERT_FALSE(res);
  EXPECT_EQ(res.error(), key_errc::scheme_unsupported);
  EXPECT_EQ(wire_code(res.error()), "scheme_unsupported");
  EXPECT_FALSE(*st->get("ed-refused"));
}

TEST_F(KeyServiceTest, ProbeWithResidentOptInServesEd25519) {
  auto caps = keys::probe(token->sess, token->master, {scheme::ed25519});
  ASSERT_TRUE(caps) << describe(caps.error());
  EXPECT_TRUE(caps->of(scheme::ed25519).served);
  EXPECT_TRUE(caps->of(scheme::ed25519).resident);
  // The probe cleans up after itself: no resident probe key is left behind.
  pkcs11::attributes tmpl;
  tmpl.add_bool(CKA_TOKEN, true).add_ulong(CKA_CLASS, CKO_PRIVATE_KEY);
  auto found = token->sess.find(tmpl, 16);
  ASSERT_TRUE(found);
  EXPECT_TRUE(found->empty());
}

TEST_F(KeyServiceTest, Ed25519FallsBackToTheCurveNameWhereTheOidIsRefused) {
  // A token that wants the PKCS#11 3.0 PrintableString "edwards25519"
  // (Thales Luna) refuses the RFC 8410 OID: stand in for it by refusing
  // every Ed25519 generation whose CKA_EC_PARAMS is the OID.
  static const std::vector<uint8_t> oid{0x06, 0x03, 0x2B, 0x65, 0x70};
  std::atomic<int> refused{0};
  test::shared_plan()->check_public_template = [&](const CK_ATTRIBUTE* pub,
                                                   CK_ULONG n) -> CK_RV {
    for (CK_ULONG i = 0; i < n; ++i) {
      if (pub[i].type != CKA_EC_PARAMS)
        continue;
      auto* p = static_cast<const uint8_t*>(pub[i].pValue);
      if (std::vector<uint8_t>(p, p + pub[i].ulValueLen) == oid) {
        ++refused;
        return CKR_CURVE_NOT_SUPPORTED;
      }
    }
    return CKR_OK;
  };
  auto caps = keys::probe(token->sess, token->master, {scheme::ed25519});
  ASSERT_TRUE(caps) << describe(caps.error());
  auto& ed = caps->of(scheme::ed25519);
  EXPECT_TRUE(ed.served) << ed.detail;
  EXPECT_EQ(ed.params, pkcs11::ed25519_params::curve_name);
  EXPECT_EQ(refused.load(), 1);
  // Keys are then made with the form the probe found, and sign.
  keys::key_service svc{token->sess, handles(), *st, *caps};
  auto key = svc.generate("ed-by-name", "ed25519");
  ASSERT_TRUE(key) << describe(key.error());
  std::vector<uint8_t> msg{'h', 'i'};
  auto sig = svc.sign("ed-by-name", msg);
  test::shared_plan()->check_public_template = nullptr;
  ASSERT_TRUE(sig) << describe(sig.error());
  EXPECT_EQ(refused.load(), 1);
  // A token that takes the OID keeps it.
  auto plain = keys::probe(token->sess, token->master, {scheme::ed25519});
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->of(scheme::ed25519).params, pkcs11::ed25519_params::oid);
}

TEST_F(KeyServiceTest, ProbeLeavesResidentKeysItDidNotMake) {
  // A resident key under the id the probe used to take (and destroy by id
  // at every start), and one under a customer's id.
  std::string old_probe_id = "hsm-driver-probe-ed25519";
  std::vector<uint8_t> old_id{old_probe_id.begin(), old_probe_id.end()};
  auto theirs = pkcs11::generate_resident(token->sess, scheme::ed25519, old_id,
                                          "customer-gen-1");
  ASSERT_TRUE(theirs) << describe(theirs.error());
  std::vector<uint8_t> cust_id{'c', 'u', 's', 't'};
  auto cust = pkcs11::generate_resident(token->sess, scheme::p256, cust_id,
                                        "cust-gen-1");
  ASSERT_TRUE(cust) << describe(cust.error());
  for (int run = 0; run < 2; ++run) {
    auto caps = keys::probe(token->sess, token->master,
                            {scheme::ed25519, scheme::p256});
    ASSERT_TRUE(caps) << describe(caps.error());
    EXPECT_TRUE(caps->of(scheme::ed25519).served);
    EXPECT_TRUE(caps->of(scheme::p256).served);
  }
  pkcs11::attributes tmpl;
  tmpl.add_bool(CKA_TOKEN, true).add_ulong(CKA_CLASS, CKO_PRIVATE_KEY);
  auto found = token->sess.find(tmpl, 16);
  ASSERT_TRUE(found);
  std::sort(found->begin(), found->end());
  std::vector<CK_OBJECT_HANDLE> expected{theirs->handle, cust->handle};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(*found, expected) << "the probe destroyed or left objects";
  // And the driver refuses key ids under its reserved prefix.
  auto svc = service();
  auto res = svc.generate(old_probe_id, "p256");
  ASSERT_FALSE(res);
  EXPECT_EQ(res.error(), key_errc::invalid_request);
  EXPECT_NE(describe(res.error()).find("reserved"), std::string::npos);
}

TEST_F(KeyServiceTest, EveryServedSchemeGeneratesSignsAndVerifies) {
  auto svc = service();
  int served = 0;
  for (auto s : all_schemes) {
    auto id = "every-" + std::string{to_string(s)};
    auto key = svc.generate(id, to_string(s));
    ASSERT_TRUE(key) << to_string(s) << ": " << describe(key.error());
    ++served;
    EXPECT_TRUE(key->created);
    auto payload = is_ecdsa(s) ? sha256("payload for " + id)
                               : std::vector<uint8_t>{'h', 'i', '!'};
    auto sig = svc.sign(id, payload);
    ASSERT_TRUE(sig) << to_string(s) << ": " << describe(sig.error());
    ASSERT_EQ(sig->sig.raw.size(), 64u);
    if (is_ecdsa(s)) {
      EXPECT_EQ(key->public_key.size(), 65u);
      EXPECT_EQ(key->public_key_compressed.size(), 33u);
      ASSERT_TRUE(sig->sig.recovery_id);
      EXPECT_TRUE(
        test::openssl_verify(s, key->public_key, payload, sig->sig.der))
        << to_string(s);
    } else {
      EXPECT_EQ(key->public_key.size(), 32u);
      EXPECT_TRUE(
        test::openssl_verify(s, key->public_key, payload, sig->sig.raw));
    }
  }
  EXPECT_EQ(served, 3);
}

TEST_F(KeyServiceTest, Secp256k1SignaturesAreAlwaysLowS) {
  auto svc = service();
  ASSERT_TRUE(svc.generate("low-s", "secp256k1"));
  int high_from_token = 0;
  for (int i = 0; i < 60; ++i) {
    auto payload = sha256("low-s " + std::to_string(i));
    auto sig = svc.sign("low-s", payload);
    ASSERT_TRUE(sig) << describe(sig.error());
    EXPECT_TRUE(test::is_low_s_secp256k1(sig->sig.raw)) << i;
    auto rec = st->get("low-s");
    EXPECT_TRUE(test::openssl_verify(scheme::secp256k1, (*rec)->public_key,
                                     payload, sig->sig.der));
    high_from_token += *sig->sig.recovery_id;
  }
  // About half of the token's raw signatures have a high s (softhsm.md); the
  // recovery ids then vary too. All 60 equal would mean a constant answer.
  EXPECT_GT(high_from_token, 0);
  EXPECT_LT(high_from_token, 60);
}

TEST_F(KeyServiceTest, StoredBlobIsNotThePrivateKey) {
  auto svc = service();
  ASSERT_TRUE(svc.generate("blob-k1", "secp256k1"));
  ASSERT_TRUE(svc.generate("blob-r1", "p256"));
  for (auto id : {"blob-k1", "blob-r1"}) {
    auto blob = raw_blob(db, std::string{"SELECT key_blob FROM keys WHERE "
                                         "key_id = '"}
                               + id + "'");
    ASSERT_FALSE(blob.empty());
    // AES-KWP output: a multiple of 8 bytes, no PKCS#8 structure in clear.
    EXPECT_EQ(blob.size() % 8, 0u);
    const unsigned char* der = blob.data();
    auto* p8 = d2i_PKCS8_PRIV_KEY_INFO(nullptr, &der,
                                       static_cast<long>(blob.size()));
    EXPECT_EQ(p8, nullptr) << "the blob parses as PKCS#8 PrivateKeyInfo";
    PKCS8_PRIV_KEY_INFO_free(p8);
    // id-ecPublicKey OID body; every PKCS#8 EC key carries it.
    EXPECT_FALSE(contains(blob, {0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01}));
  }
  // Nowhere in the database file either.
  st.reset();
  std::ifstream in{db, std::ios::binary};
  std::vector<uint8_t> file{std::istreambuf_iterator<char>{in}, {}};
  EXPECT_FALSE(contains(file, {0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01}));
}

TEST_F(KeyServiceTest, SecondGenerateReturnsStoredKeyWithoutTouchingTheHsm) {
  auto svc = service();
  auto first = svc.generate("idem", "p256");
  ASSERT_TRUE(first) << describe(first.error());
  EXPECT_TRUE(first->created);
  auto before = test::counts().generate_key_pair.load();
  auto second = svc.generate("idem", "p256");
  ASSERT_TRUE(second) << describe(second.error());
  EXPECT_FALSE(second->created);
  EXPECT_EQ(second->public_key, first->public_key);
  EXPECT_EQ(test::counts().generate_key_pair.load(), before);
  // Same key id, other scheme: refused, the stored key stays.
  auto other = svc.generate("idem", "secp256k1");
  ASSERT_FALSE(other);
  EXPECT_EQ(other.error(), key_errc::invalid_request);
  EXPECT_EQ((*st->get("idem"))->public_key, first->public_key);
}

TEST_F(KeyServiceTest, ResidentKeyIsIdempotentAndSigns) {
  auto svc = service();
  auto first = svc.generate("res-ed", "ed25519");
  ASSERT_TRUE(first) << describe(first.error());
  EXPECT_EQ(first->storage, "token-resident");
  auto second = svc.generate("res-ed", "ed25519");
  ASSERT_TRUE(second);
  EXPECT_EQ(second->public_key, first->public_key);
  std::vector<uint8_t> msg{'m', 's', 'g'};
  auto sig = svc.sign("res-ed", msg);
  ASSERT_TRUE(sig) << describe(sig.error());
  EXPECT_TRUE(test::openssl_verify(scheme::ed25519, first->public_key, msg,
                                   sig->sig.raw));
}

TEST_F(KeyServiceTest, UnknownKeyIdIsAClearError) {
  auto svc = service();
  auto sig = svc.sign("nobody", sha256("x"));
  ASSERT_FALSE(sig);
  EXPECT_EQ(sig.error(), key_errc::unknown_key);
  EXPECT_NE(describe(sig.error()).find("nobody"), std::string::npos);
  auto shown = svc.show("nobody");
  ASSERT_FALSE(shown);
  EXPECT_EQ(shown.error(), key_errc::unknown_key);
}

TEST_F(KeyServiceTest, WrongHashLengthIsRefusedBeforeTheHsm) {
  auto svc = service();
  ASSERT_TRUE(svc.generate("hashlen", "secp256k1"));
  auto before = test::counts().sign.load();
  for (size_t n : {0u, 20u, 31u, 33u, 64u}) {
    std::vector<uint8_t> payload(n, 0xAB);
    auto sig = svc.sign("hashlen", payload);
    ASSERT_FALSE(sig) << n;
    EXPECT_EQ(sig.error(), key_errc::invalid_payload) << n;
  }
  EXPECT_EQ(test::counts().sign.load(), before);
}

TEST_F(KeyServiceTest, BadKeyIdsAndSchemesAreRefused) {
  auto svc = service();
  for (auto id : {"", "has space", "semi;colon", "quote'"}) {
    auto r = svc.generate(id, "p256");
    ASSERT_FALSE(r) << id;
    EXPECT_EQ(r.error(), key_errc::invalid_request) << id;
  }
  auto r = svc.generate(std::string(129, 'a'), "p256");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), key_errc::invalid_request);
  for (auto name : {"schnorr", "stark", "P256", ""}) {
    auto g = svc.generate("scheme-test", name);
    ASSERT_FALSE(g) << name;
    EXPECT_EQ(g.error(), key_errc::scheme_unsupported) << name;
  }
  EXPECT_FALSE(*st->get("scheme-test"));
}

TEST_F(KeyServiceTest, CorruptedBlobIsAnErrorAndChangesNothing) {
  auto svc = service();
  auto key = svc.generate("corrupt", "secp256k1");
  ASSERT_TRUE(key);
  // Flip one byte of the wrapped key in the database file.
  exec_sql(db, "UPDATE keys SET key_blob = CAST(substr(key_blob, 1, 10) || "
               "X'00' || substr(key_blob, 12) AS BLOB) WHERE key_id = "
               "'corrupt'");
  auto tampered = raw_blob(db, "SELECT key_blob FROM keys WHERE key_id = "
                               "'corrupt'");
  auto sig = svc.sign("corrupt", sha256("x"));
  ASSERT_FALSE(sig);
  EXPECT_EQ(sig.error(), key_errc::key_corrupted) << describe(sig.error());
  EXPECT_FALSE(is_retryable(sig.error()));
  // A truncated blob too.
  exec_sql(db, "UPDATE keys SET key_blob = CAST(substr(key_blob, 1, 40) AS "
               "BLOB) WHERE key_id = 'corrupt'");
  auto sig2 = svc.sign("corrupt", sha256("x"));
  ASSERT_FALSE(sig2);
  EXPECT_EQ(sig2.error(), key_errc::key_corrupted) << describe(sig2.error());
  // The record is still there, public key unchanged: nothing was rewritten.
  auto rec = st->get("corrupt");
  ASSERT_TRUE(rec && *rec);
  EXPECT_EQ((*rec)->public_key, key->public_key);
}

TEST_F(KeyServiceTest, SwappedPublicKeyIsRefusedBeforeTheUnwrap) {
  auto svc = service();
  auto a = svc.generate("swap-a", "p256");
  auto b = svc.generate("swap-b", "p256");
  ASSERT_TRUE(a && b);
  // A row whose public key belongs to another key.
  exec_sql(db, "UPDATE keys SET public_key = (SELECT public_key FROM keys "
               "WHERE key_id = 'swap-b') WHERE key_id = 'swap-a'");
  auto unwraps = test::counts().unwrap_key.load();
  auto sig = svc.sign("swap-a", sha256("x"));
  ASSERT_FALSE(sig);
  EXPECT_EQ(sig.error(), key_errc::key_corrupted) << describe(sig.error());
  EXPECT_NE(describe(sig.error()).find("row MAC"), std::string::npos);
  EXPECT_EQ(test::counts().unwrap_key.load(), unwraps);
}

TEST_F(KeyServiceTest, WholeRowSwapIsRefusedBeforeTheUnwrap) {
  auto svc = service();
  auto a = svc.generate("row-a", "secp256k1");
  auto b = svc.generate("row-b", "secp256k1");
  ASSERT_TRUE(a && b);
  // Everything of B's row but its key id, MAC included, under A's id: the
  // swap that would otherwise release B's signatures as A's.
  exec_sql(db, "UPDATE keys SET (public_key, key_blob, wrap_mechanism, "
               "master_key_id, format_version, row_mac) = (SELECT public_key, "
               "key_blob, wrap_mechanism, master_key_id, format_version, "
               "row_mac FROM keys WHERE key_id = 'row-b') WHERE key_id = "
               "'row-a'");
  auto unwraps = test::counts().unwrap_key.load();
  auto sig = svc.sign("row-a", sha256("x"));
  ASSERT_FALSE(sig);
  EXPECT_EQ(sig.error(), key_errc::key_corrupted) << describe(sig.error());
  EXPECT_NE(describe(sig.error()).find("row MAC"), std::string::npos);
  EXPECT_EQ(test::counts().unwrap_key.load(), unwraps)
    << "the HSM unwrapped a swapped row";
  // B still signs under its own id.
  EXPECT_TRUE(svc.sign("row-b", sha256("x")));
}

TEST_F(KeyServiceTest, RowsOfAnotherFormatOrMasterKeyAreRefused) {
  auto svc = service();
  ASSERT_TRUE(svc.generate("fmt", "p256"));
  auto unwraps = test::counts().unwrap_key.load();
  // A downgrade to the format without a MAC.
  exec_sql(db, "UPDATE keys SET format_version = 1, row_mac = X'' WHERE "
               "key_id = 'fmt'");
  auto old = svc.sign("fmt", sha256("x"));
  ASSERT_FALSE(old);
  EXPECT_EQ(old.error(), key_errc::key_corrupted);
  EXPECT_NE(describe(old.error()).find("format 1"), std::string::npos)
    << describe(old.error());
  // An unknown mechanism is never guessed to be AES-KWP.
  exec_sql(db, "UPDATE keys SET format_version = 2, wrap_mechanism = "
               "'CKM_AES_KEY_WRAP' WHERE key_id = 'fmt'");
  auto mech = svc.sign("fmt", sha256("x"));
  ASSERT_FALSE(mech);
  EXPECT_NE(describe(mech.error()).find("unknown wrap mechanism"),
            std::string::npos)
    << describe(mech.error());
  // Another master key's row.
  exec_sql(db, "UPDATE keys SET wrap_mechanism = 'CKM_AES_KEY_WRAP_PAD', "
               "master_key_id = 'other-master' WHERE key_id = 'fmt'");
  auto other = svc.sign("fmt", sha256("x"));
  ASSERT_FALSE(other);
  EXPECT_NE(describe(other.error()).find("other-master"), std::string::npos)
    << describe(other.error());
  EXPECT_EQ(test::counts().unwrap_key.load(), unwraps);
}

TEST_F(KeyServiceTest, StartIsRefusedWhileRowsPredateTheMac) {
  auto svc = service();
  ASSERT_TRUE(svc.generate("legacy-row", "p256"));
  driver_config cfg;
  cfg.master_key_label = "hsm-driver-master";
  cfg.sqlite_path = db;
  auto ok = set_up_keys(token->sess, cfg, key_steps{.probe = false});
  ASSERT_TRUE(ok) << describe(ok.error());
  exec_sql(db, "UPDATE keys SET format_version = 1, row_mac = X'' WHERE "
               "key_id = 'legacy-row'");
  auto refused = set_up_keys(token->sess, cfg, key_steps{.probe = false});
  ASSERT_FALSE(refused);
  EXPECT_NE(describe(refused.error()).find("predate the row MAC"),
            std::string::npos)
    << describe(refused.error());
}

TEST_F(KeyServiceTest, OtherMasterKeyIsRefusedAndWritesNothing) {
  auto svc = service();
  ASSERT_TRUE(svc.generate("guarded", "p256"));
  auto other = test::make_token(test::unique_label("other"));
  auto guard = keys::check_master_key(other.sess, other.master,
                                      "hsm-driver-master", *st, true);
  ASSERT_FALSE(guard);
  EXPECT_EQ(guard.error(), key_errc::master_key_mismatch);
  EXPECT_NE(describe(guard.error()).find("master key"), std::string::npos);
  // The canary is the first one still.
  auto again = keys::check_master_key(token->sess, token->master,
                                      "hsm-driver-master", *st, false);
  ASSERT_TRUE(again) << describe(again.error());
  EXPECT_EQ(*again, keys::canary_state::matches);
}

TEST_F(KeyServiceTest, MissingMasterKeyIsAClearError) {
  auto label = test::unique_label("nomk");
  auto tok = test::make_token(label, "some-other-label");
  auto found = pkcs11::find_master_key(tok.sess, "hsm-driver-master");
  ASSERT_FALSE(found);
  EXPECT_EQ(found.error(), key_errc::master_key_missing);
  EXPECT_NE(describe(found.error()).find("master-key init"), std::string::npos);
}

} // namespace
} // namespace hsm
