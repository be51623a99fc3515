// Master-key rotation on a real SoftHSMv2 token and a real SQLite file,
// through the real binary: rows made under a legacy master key (no policy:
// a PIN and a dump open them) move to a sound key inside the HSM, format-1
// rows are sealed on the way, a kill -9 half-way loses nothing and a rerun
// finishes, drivers serve rows under both keys while it runs, and once the
// rotation is declared complete the old key is refused.

#include "runtime/crypto/hex.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/token_admin.hpp"
#include "store/sqlite_store.hpp"
#include "tests/support/soak.hpp"
#include "tests/support/softhsm_env.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>

#include <chrono>
#include <thread>

namespace hsm {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr std::string_view old_label = "legacy-mk";
constexpr std::string_view new_label = "sound-mk";

class RotationTest : public ::testing::Test {
protected:
  void SetUp() override {
    token = std::make_unique<test::test_token>(
      test::make_token(test::unique_label("rot"), "unused-mk"));
    dir = test::fresh_dir("rot");
    db = dir / "keys.db";
    auto opened = store::sqlite_store::open(db);
    ASSERT_TRUE(opened) << describe(opened.error());
    st = std::move(*opened);
    legacy = test::make_legacy_master_key(token->sess, old_label);
    env = {{"SOFTHSM2_CONF", test::softhsm_conf()},
           {"PKCS11_MODULE", test::softhsm_module()},
           {"PKCS11_THALES_MODULE", ""},
           {"PKCS11_IBM_MODULE", ""},
           {"USER_PIN_FILE", ""},
           {"USER_PIN", std::string{test::user_pin}},
           {"HSM_TOKEN_LABEL", token->label},
           {"HSM_ALLOW_WEAK_MASTER_KEY", ""},
           {"SQLITE_PATH", db.string()}};
  }

  test::run_result run(const std::vector<std::string>& args) {
    return test::run_driver(args, env);
  }

  /// The canary under the legacy key, as the first start recorded it.
  void record_canary() {
    auto guard = keys::check_master_key(token->sess, legacy, old_label, *st,
                                        true);
    ASSERT_TRUE(guard) << describe(guard.error());
  }

  /// Rows as a release before the row MAC wrote them: format 1, no MAC,
  /// no master key named, wrapped under the legacy key.
  void put_format_1_rows(int n) {
    for (int i = 0; i < n; ++i) {
      auto s = i % 2 == 0 ? scheme::secp256k1 : scheme::p256;
      auto key = pkcs11::generate_wrapped(token->sess, legacy, s);
      ASSERT_TRUE(key) << describe(key.error());
      key_record rec;
      rec.key_id = "old-" + std::to_string(i);
      rec.scheme = s;
      rec.public_key = key->public_key;
      rec.key_blob = key->wrapped_key;
      rec.wrap_mechanism = std::string{aes_key_wrap_pad};
      rec.created_at_ms = 1;
      rec.format_version = 1;
      auto put = st->put(rec);
      ASSERT_TRUE(put && put->inserted);
      public_keys[rec.key_id] = rec.public_key;
    }
  }

  /// Rows of the current format under the legacy key (a driver that ran
  /// with --allow-weak-master-key): the legacy key gets its row-MAC key.
  void put_format_2_rows(int n) {
    bool created = true;
    auto mk = pkcs11::create_master_key(token->sess, old_label, &created);
    ASSERT_TRUE(mk) << describe(mk.error());
    ASSERT_FALSE(created);
    auto h = keys::find_key_handles(token->sess, old_label);
    ASSERT_TRUE(h) << describe(h.error());
    for (int i = 0; i < n; ++i) {
      auto rec = keys::make_key(token->sess, *h, scheme::secp256k1,
                                "cur-" + std::to_string(i), false);
      ASSERT_TRUE(rec) << describe(rec.error());
      auto put = st->put(*rec);
      ASSERT_TRUE(put && put->inserted);
      public_keys[rec->key_id] = rec->public_key;
    }
  }

  /// Rows under each master key id, and of format 1.
  std::map<std::string, uint64_t> census() {
    std::map<std::string, uint64_t> out;
    auto counts = st->count_rows();
    EXPECT_TRUE(counts) << describe(counts.error());
    if (counts)
      for (auto& c : *counts)
        out[c.format_version == 1 ? std::string{"format-1"} : c.master_key_id]
          += c.rows;
    return out;
  }

  /// Signs with every row through `handles` and checks each signature
  /// against the public key the row had before the rotation.
  void expect_every_key_signs(keys::key_handles& handles) {
    for (auto& [id, pub] : public_keys) {
      auto rec = st->get(id);
      ASSERT_TRUE(rec && *rec) << id;
      EXPECT_EQ((*rec)->public_key, pub) << id;
      auto payload = keys::fixed_payload((*rec)->scheme, "after rotation");
      auto raw = keys::sign_with(token->sess, handles, **rec, payload);
      ASSERT_TRUE(raw) << id << ": " << describe(raw.error());
      EXPECT_TRUE(crypto::finish_signature((*rec)->scheme, pub, payload, *raw))
        << id;
    }
  }

  std::unique_ptr<test::test_token> token;
  std::filesystem::path dir;
  std::filesystem::path db;
  std::unique_ptr<store::sqlite_store> st;
  CK_OBJECT_HANDLE legacy = CK_INVALID_HANDLE;
  std::map<std::string, std::string> env;
  std::map<std::string, std::vector<uint8_t>> public_keys;
};

TEST_F(RotationTest, MovesLegacyRowsToASoundKeyAndRetiresTheOldOne) {
  record_canary();
  put_format_1_rows(6);
  // And a token-resident key of that release: sealed, not re-wrapped.
  std::string rid = "resident-0";
  std::string rlabel = rid + "/0123456789abcdef";
  auto resident = pkcs11::generate_resident(
    token->sess, scheme::p256, std::vector<uint8_t>(rid.begin(), rid.end()),
    rlabel);
  ASSERT_TRUE(resident) << describe(resident.error());
  key_record rrec;
  rrec.key_id = rid;
  rrec.scheme = scheme::p256;
  rrec.public_key = resident->public_key;
  rrec.key_blob.assign(rlabel.begin(), rlabel.end());
  rrec.wrap_mechanism = std::string{resident_mechanism};
  rrec.created_at_ms = 1;
  rrec.format_version = 1;
  ASSERT_TRUE(st->put(rrec));
  public_keys[rid] = rrec.public_key;
  // The legacy key is refused at start, naming what is weak.
  auto refused = run({"--master-key-label", std::string{old_label}, "keys",
                      "sign", "--key-id", "old-0", "--payload",
                      std::string(64, 'a')});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.out.find("master_key_weak"), std::string::npos)
    << refused.out;
  EXPECT_NE(refused.out.find("CKA_UNWRAP_TEMPLATE"), std::string::npos);

  auto rotated = run({"--master-key-label", std::string{old_label},
                      "--allow-weak-master-key", "master-key", "rotate", "--to",
                      std::string{new_label}, "--create", "--batch", "4"});
  ASSERT_EQ(rotated.exit_code, 0) << rotated.out << rotated.err;
  auto out = json::parse(rotated.out);
  EXPECT_EQ(out["rewrapped"], 6);
  EXPECT_EQ(out["resealed"], 1);
  EXPECT_EQ(out["rows_left"], 0);
  EXPECT_TRUE(out["canary_moved"].get<bool>());
  EXPECT_EQ(out["rotation"]["phase"], "running");
  EXPECT_EQ(census(),
            (std::map<std::string, uint64_t>{{std::string{new_label}, 7}}));

  // Every key signs under the new key, for the public key it always had.
  auto handles = keys::find_key_handles(token->sess, new_label);
  ASSERT_TRUE(handles) << describe(handles.error());
  expect_every_key_signs(*handles);
  // The binary serves them without the weak-key flag.
  auto signed_now = run({"--master-key-label", std::string{new_label}, "keys",
                         "sign", "--key-id", "old-1", "--payload",
                         std::string(64, 'b')});
  EXPECT_EQ(signed_now.exit_code, 0) << signed_now.out << signed_now.err;

  // `master-key check` reports the rotation and checks every row's MAC.
  auto check = run(
    {"--master-key-label", std::string{new_label}, "master-key", "check"});
  ASSERT_EQ(check.exit_code, 0) << check.out << check.err;
  auto c = json::parse(check.out);
  EXPECT_EQ(c["row_macs"]["checked"], 7);
  EXPECT_EQ(c["row_macs"]["failed"], 0);
  EXPECT_EQ(c["rotation"]["rows_left"], 0);
  EXPECT_TRUE(c["master_keys"][0]["sound"].get<bool>());

  auto done = run({"--master-key-label", std::string{old_label},
                   "--allow-weak-master-key", "master-key", "rotate", "--to",
                   std::string{new_label}, "--complete"});
  ASSERT_EQ(done.exit_code, 0) << done.out << done.err;
  EXPECT_EQ(json::parse(done.out)["rotation"]["phase"], "complete");

  // From now on the old key is refused, even with the weak-key flag.
  auto old_again = run({"--master-key-label", std::string{old_label},
                        "--allow-weak-master-key", "keys", "sign", "--key-id",
                        "old-1", "--payload", std::string(64, 'c')});
  EXPECT_EQ(old_again.exit_code, 2) << old_again.out;
  EXPECT_NE(old_again.out.find("retired"), std::string::npos) << old_again.out;
  // `master-key check` says the token still holds the retired key.
  auto check2 = run(
    {"--master-key-label", std::string{new_label}, "master-key", "check"});
  ASSERT_EQ(check2.exit_code, 0) << check2.out << check2.err;
  auto c2 = json::parse(check2.out);
  EXPECT_EQ(c2["retired_master_keys"][0]["label"], std::string{old_label});
  EXPECT_TRUE(c2["retired_master_keys"][0]["on_token"].get<bool>());

  // A row restored from an old backup is refused before any unwrap.
  keys::key_handles after;
  after = *handles;
  after.retired.emplace_back(old_label);
  auto set = keys::key_set_for(token->sess, after, old_label);
  ASSERT_FALSE(set);
  EXPECT_EQ(set.error(), key_errc::key_corrupted);
}

TEST_F(RotationTest, KillNineHalfWayLosesNothingAndARerunFinishes) {
  record_canary();
  constexpr int rows = test::soak(120);
  put_format_2_rows(rows);
  bool created = false;
  ASSERT_TRUE(pkcs11::create_master_key(token->sess, new_label, &created));
  auto proc = test::start_driver(
    {"--master-key-label", std::string{old_label}, "--allow-weak-master-key",
     "master-key", "rotate", "--to", std::string{new_label}, "--batch", "1"},
    env, (dir / "rotate.log").string());
  test::kill_on_exit guard{proc};
  // Kill it once some rows moved.
  uint64_t moved = 0;
  auto deadline = std::chrono::steady_clock::now() + 60s;
  while (std::chrono::steady_clock::now() < deadline) {
    moved = census()[std::string{new_label}];
    if (moved >= 10)
      break;
    std::this_thread::sleep_for(2ms);
  }
  ASSERT_EQ(::kill(proc.pid, SIGKILL), 0);
  test::wait_exit(proc, 10'000);
  auto half = census();
  ASSERT_GE(half[std::string{new_label}], 10u);
  ASSERT_LT(half[std::string{new_label}], uint64_t{rows})
    << "the rotation finished before it could be killed";
  EXPECT_EQ(half[std::string{new_label}] + half[std::string{old_label}],
            uint64_t{rows});

  // While it is half-way, a driver that started before the rotation (it
  // knows only the old key) serves rows under both: it finds the new key
  // on the token when a row names it.
  auto before = keys::find_key_handles(token->sess, old_label);
  ASSERT_TRUE(before);
  before->allow_weak = true;
  expect_every_key_signs(*before);
  EXPECT_EQ(before->others.size(), 1u);

  auto rerun = run({"--master-key-label", std::string{old_label},
                    "--allow-weak-master-key", "master-key", "rotate", "--to",
                    std::string{new_label}});
  ASSERT_EQ(rerun.exit_code, 0) << rerun.out << rerun.err;
  auto out = json::parse(rerun.out);
  EXPECT_EQ(out["rows_left"], 0);
  EXPECT_EQ(out["rewrapped"].get<uint64_t>(), half[std::string{old_label}]);
  EXPECT_EQ(census(),
            (std::map<std::string, uint64_t>{{std::string{new_label}, rows}}));
  auto handles = keys::find_key_handles(token->sess, new_label);
  ASSERT_TRUE(handles);
  expect_every_key_signs(*handles);
}

TEST_F(RotationTest, ASoundMasterKeyCannotGiveItsKeysAway) {
  // `master-key init` keys make every unwrapped key non-extractable: no
  // rotation can move their rows, and the rotation says so and moves none.
  auto h = keys::find_key_handles(token->sess, "unused-mk");
  ASSERT_TRUE(h) << describe(h.error());
  auto rec = keys::make_key(token->sess, *h, scheme::p256, "sealed-0", false);
  ASSERT_TRUE(rec);
  ASSERT_TRUE(st->put(*rec));
  auto guard = keys::check_master_key(token->sess, h->master, "unused-mk", *st,
                                      true);
  ASSERT_TRUE(guard);
  auto rotated = run({"--master-key-label", "unused-mk", "master-key", "rotate",
                      "--to", std::string{new_label}, "--create"});
  EXPECT_EQ(rotated.exit_code, 1) << rotated.out << rotated.err;
  EXPECT_NE(rotated.out.find("non-extractable"), std::string::npos)
    << rotated.out;
  auto row = st->get("sealed-0");
  ASSERT_TRUE(row && *row);
  EXPECT_EQ((*row)->master_key_id, "unused-mk");
  EXPECT_EQ((*row)->key_blob, rec->key_blob);
}

} // namespace
} // namespace hsm
