// Reconciliation of token-resident keys on a real SoftHSMv2 token and a
// real SQLite file: what a failed or lost put leaves behind, and what
// `reconcile_resident_keys` keeps, destroys and never touches.

#include "runtime/keys/reconcile.hpp"

#include "runtime/keys/key_service.hpp"
#include "runtime/keys/master_key_guard.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "store/sqlite_store.hpp"
#include "tests/support/openssl_verify.hpp"
#include "tests/support/softhsm_env.hpp"

#include <gtest/gtest.h>

#include <algorithm>

namespace hsm {
namespace {

using keys::resident_class;

/// Forwards every call to the real store, with two faults a test can set:
/// a put that commits and then answers an error (the answer lost on the
/// way), and a `get` of one key id that fails.
class faulty_store final : public store::key_store {
public:
  explicit faulty_store(store::key_store& inner) : inner_(inner) {
    // nop
  }

  /// `put_many_audited` commits, then answers `store_errc::unavailable`.
  bool fail_after_commit = false;
  /// `get` of this key id answers `store_errc::unavailable`.
  std::string fail_get_of;
  /// Puts that committed and answered an error.
  size_t lost_answers = 0;
  /// Every `get`, in order.
  std::vector<std::string> gets;

  caf::expected<store::audited_puts>
  put_many_audited(const std::vector<key_record>& recs,
                   const store::put_audit& audit) override {
    auto res = inner_.put_many_audited(recs, audit);
    if (!res || !fail_after_commit)
      return res;
    ++lost_answers;
    return store::make_unavailable("connection lost after commit (test)");
  }

  caf::expected<std::optional<key_record>>
  get(std::string_view key_id) override {
    gets.emplace_back(key_id);
    if (!fail_get_of.empty() && key_id == fail_get_of)
      return store::make_unavailable("get failed (test)");
    return inner_.get(key_id);
  }

  caf::expected<std::optional<store::canary_record>> get_canary() override {
    return inner_.get_canary();
  }

  caf::expected<store::canary_record>
  put_canary(const store::canary_record& c) override {
    return inner_.put_canary(c);
  }

  caf::expected<int> schema_version() override {
    return inner_.schema_version();
  }

  caf::expected<uint64_t> unsealed_rows() override {
    return inner_.unsealed_rows();
  }

  caf::expected<std::vector<store::row_count>> count_rows() override {
    return inner_.count_rows();
  }

  caf::expected<std::vector<key_record>>
  pending_rows(std::string_view target_label, std::string_view after_key_id,
               size_t limit) override {
    return inner_.pending_rows(target_label, after_key_id, limit);
  }

  caf::expected<bool> replace_row(const key_record& old_row,
                                  const key_record& new_row) override {
    return inner_.replace_row(old_row, new_row);
  }

  caf::expected<std::optional<store::rotation_record>> get_rotation() override {
    return inner_.get_rotation();
  }

  caf::expected<bool>
  set_rotation(const std::optional<store::rotation_record>& expected,
               const store::rotation_record& next) override {
    return inner_.set_rotation(expected, next);
  }

  caf::expected<bool>
  replace_canary(const store::canary_record& old_canary,
                 const store::canary_record& next) override {
    return inner_.replace_canary(old_canary, next);
  }

  caf::expected<std::vector<audit_row>>
  append_audit(std::string_view driver_id,
               const std::vector<audit_entry>& entries) override {
    return inner_.append_audit(driver_id, entries);
  }

  caf::expected<std::vector<audit_row>>
  read_audit(std::string_view after_driver, uint64_t after_seq,
             size_t limit) override {
    return inner_.read_audit(after_driver, after_seq, limit);
  }

private:
  store::key_store& inner_;
};

std::vector<uint8_t> bytes_of(std::string_view text) {
  return {text.begin(), text.end()};
}

class ReconcileTest : public ::testing::Test {
protected:
  void SetUp() override {
    token = std::make_unique<test::test_token>(
      test::make_token(test::unique_label("rc")));
    auto opened = store::sqlite_store::open(test::fresh_dir("rc") / "keys.db");
    ASSERT_TRUE(opened) << describe(opened.error());
    st = std::move(*opened);
    auto guard = keys::check_master_key(token->sess, token->master,
                                        "hsm-driver-master", *st, true);
    ASSERT_TRUE(guard) << describe(guard.error());
    auto caps = keys::probe(token->sess, token->master, {scheme::ed25519});
    ASSERT_TRUE(caps) << describe(caps.error());
    ASSERT_TRUE(caps->of(scheme::ed25519).resident);
    resident_caps = *caps;
  }

  keys::key_service service(store::key_store& on) {
    auto h = keys::find_key_handles(token->sess, "hsm-driver-master");
    EXPECT_TRUE(h) << describe(h.error());
    return keys::key_service{token->sess, h ? *h : keys::key_handles{}, on,
                             resident_caps};
  }

  /// The private token objects with CKA_ID `key_id` (and `label`, if
  /// given).
  std::vector<CK_OBJECT_HANDLE> objects(std::string_view key_id,
                                        std::string_view label = {}) {
    pkcs11::attributes tmpl;
    tmpl.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY)
      .add_bool(CKA_TOKEN, true)
      .add_bytes(CKA_ID, bytes_of(key_id));
    if (!label.empty())
      tmpl.add_text(CKA_LABEL, label);
    auto found = token->sess.find(tmpl, 64);
    EXPECT_TRUE(found) << describe(found.error());
    return found ? *found : std::vector<CK_OBJECT_HANDLE>{};
  }

  /// A resident object under `key_id` labelled `label` that no generation
  /// stored: what a lost race or a crash leaves.
  CK_OBJECT_HANDLE stray(std::string_view key_id, std::string_view label) {
    auto key = pkcs11::generate_resident(token->sess, scheme::ed25519,
                                         bytes_of(key_id), label);
    EXPECT_TRUE(key) << describe(key.error());
    return key ? key->handle : CK_INVALID_HANDLE;
  }

  /// The stored label of the resident key `key_id`.
  std::string stored_label(std::string_view key_id) {
    auto row = st->get(key_id);
    EXPECT_TRUE(row && *row);
    if (!row || !*row)
      return {};
    return {(*row)->key_blob.begin(), (*row)->key_blob.end()};
  }

  /// Signs with `key_id` through the key path and checks the signature.
  void expect_signs(std::string_view key_id) {
    auto row = st->get(key_id);
    ASSERT_TRUE(row && *row);
    auto s = (*row)->scheme;
    auto msg = is_ecdsa(s) ? test::sha256("reconciled")
                           : std::vector<uint8_t>{'r', 'c'};
    auto svc = service(*st);
    auto sig = svc.sign(key_id, msg);
    ASSERT_TRUE(sig) << key_id << ": " << describe(sig.error());
    EXPECT_TRUE(test::openssl_verify(
      s, (*row)->public_key, msg, is_ecdsa(s) ? sig->sig.der : sig->sig.raw));
  }

  static keys::reconcile_options dry_run() {
    return {};
  }

  static keys::reconcile_options apply(bool include_orphans = false) {
    return {true, include_orphans};
  }

  std::unique_ptr<test::test_token> token;
  std::unique_ptr<store::sqlite_store> st;
  keys::capabilities resident_caps;
};

TEST_F(ReconcileTest, PutThatFailsAfterCommitKeepsAKeyThatReconcileKeeps) {
  faulty_store lossy{*st};
  lossy.fail_after_commit = true;
  {
    auto svc = service(lossy);
    auto res = svc.generate("lost-answer", "ed25519");
    ASSERT_FALSE(res) << "the generation must report the put's error";
    EXPECT_EQ(res.error(), store_errc::unavailable);
  }
  EXPECT_EQ(lossy.lost_answers, 1u);
  // The put did commit, and the resident key it names stayed.
  auto label = stored_label("lost-answer");
  ASSERT_TRUE(keys::is_resident_label("lost-answer", label)) << label;
  ASSERT_EQ(objects("lost-answer", label).size(), 1u);
  // Reconciliation, even told to destroy orphans, keeps it.
  for (auto opts : {dry_run(), apply(), apply(true)}) {
    auto rep = keys::reconcile_resident_keys(token->sess, *st, opts);
    ASSERT_TRUE(rep) << describe(rep.error());
    ASSERT_EQ(rep->objects.size(), 1u);
    EXPECT_EQ(rep->objects[0].key_id, "lost-answer");
    EXPECT_EQ(rep->objects[0].label, label);
    EXPECT_EQ(rep->objects[0].what, resident_class::kept);
    EXPECT_FALSE(rep->objects[0].destroyed);
    EXPECT_TRUE(rep->failures.empty());
  }
  EXPECT_EQ(objects("lost-answer").size(), 1u);
  // And the key the row names signs: the redelivered request is served.
  expect_signs("lost-answer");
  auto again = service(*st).generate("lost-answer", "ed25519");
  ASSERT_TRUE(again) << describe(again.error());
  EXPECT_FALSE(again->created);
}

TEST_F(ReconcileTest, LosersAreDestroyedWithApplyAndTheKeptKeyStillSigns) {
  auto svc = service(*st);
  ASSERT_TRUE(svc.generate("raced", "ed25519"));
  ASSERT_TRUE(svc.generate("wrapped", "p256"));
  auto kept_label = stored_label("raced");
  // Two generations that lost the race for "raced", and a resident object
  // under the id of a wrapped key.
  auto loser1 = stray("raced", "raced/0123456789abcdef");
  auto loser2 = stray("raced", "raced/fedcba9876543210");
  auto loser3 = stray("wrapped", "wrapped/00000000000000aa");
  ASSERT_EQ(objects("raced").size(), 3u);

  auto dry = keys::reconcile_resident_keys(token->sess, *st, dry_run());
  ASSERT_TRUE(dry) << describe(dry.error());
  EXPECT_EQ(dry->count(resident_class::kept), 1u);
  EXPECT_EQ(dry->count(resident_class::loser), 3u);
  EXPECT_EQ(dry->count(resident_class::orphan), 0u);
  EXPECT_EQ(dry->key_ids(resident_class::loser),
            (std::vector<std::string>{"raced", "raced", "wrapped"}));
  EXPECT_EQ(dry->destroyed(resident_class::loser), 0u);
  EXPECT_EQ(objects("raced").size(), 3u) << "a dry run destroyed something";
  EXPECT_EQ(objects("wrapped").size(), 1u);

  auto applied = keys::reconcile_resident_keys(token->sess, *st, apply());
  ASSERT_TRUE(applied) << describe(applied.error());
  EXPECT_TRUE(applied->failures.empty());
  EXPECT_EQ(applied->destroyed(resident_class::loser), 3u);
  std::vector<CK_OBJECT_HANDLE> destroyed;
  for (auto& o : applied->objects)
    if (o.destroyed)
      destroyed.push_back(o.handle);
  std::sort(destroyed.begin(), destroyed.end());
  std::vector<CK_OBJECT_HANDLE> losers{loser1, loser2, loser3};
  std::sort(losers.begin(), losers.end());
  EXPECT_EQ(destroyed, losers);
  auto left = objects("raced");
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(objects("raced", kept_label), left);
  EXPECT_TRUE(objects("wrapped").empty());
  expect_signs("raced");
  expect_signs("wrapped");
  // Nothing is left to do.
  auto again = keys::reconcile_resident_keys(token->sess, *st, apply(true));
  ASSERT_TRUE(again);
  EXPECT_EQ(again->count(resident_class::loser), 0u);
  EXPECT_EQ(again->count(resident_class::kept), 1u);
}

TEST_F(ReconcileTest, OrphansGoOnlyWithIncludeOrphansAndOthersNever) {
  auto svc = service(*st);
  ASSERT_TRUE(svc.generate("in-use", "ed25519"));
  stray("orphan", "orphan/0123456789abcdef");
  stray("in-use", "in-use/0000000000000001"); // a loser
  // Not the driver's: the probe's reserved ids, another label shape, a
  // label for another id. Never touched.
  stray("hsm-driver-probe-x", "hsm-driver-probe-x/0123456789abcdef");
  stray("customer", "customer-gen-1");
  stray("other", "orphan/0123456789abcdef");

  auto dry = keys::reconcile_resident_keys(token->sess, *st, dry_run());
  ASSERT_TRUE(dry) << describe(dry.error());
  EXPECT_EQ(dry->count(resident_class::orphan), 1u);
  EXPECT_EQ(dry->key_ids(resident_class::orphan),
            std::vector<std::string>{"orphan"});
  EXPECT_EQ(dry->count(resident_class::loser), 1u);
  EXPECT_EQ(dry->count(resident_class::kept), 1u);
  EXPECT_EQ(dry->ignored, 3u);

  // --apply alone: the loser goes, the orphan stays.
  auto losers_only = keys::reconcile_resident_keys(token->sess, *st, apply());
  ASSERT_TRUE(losers_only) << describe(losers_only.error());
  EXPECT_EQ(losers_only->destroyed(resident_class::loser), 1u);
  EXPECT_EQ(losers_only->destroyed(resident_class::orphan), 0u);
  EXPECT_EQ(objects("orphan").size(), 1u);
  EXPECT_EQ(objects("in-use").size(), 1u);

  // --apply --include-orphans: the orphan goes; nothing else.
  auto all = keys::reconcile_resident_keys(token->sess, *st, apply(true));
  ASSERT_TRUE(all) << describe(all.error());
  EXPECT_EQ(all->destroyed(resident_class::orphan), 1u);
  EXPECT_TRUE(objects("orphan").empty());
  EXPECT_EQ(objects("in-use").size(), 1u);
  EXPECT_EQ(objects("hsm-driver-probe-x").size(), 1u);
  EXPECT_EQ(objects("customer").size(), 1u);
  EXPECT_EQ(objects("other").size(), 1u);
  expect_signs("in-use");
}

TEST_F(ReconcileTest, StoreErrorDestroysNothing) {
  auto svc = service(*st);
  ASSERT_TRUE(svc.generate("a-kept", "ed25519"));
  stray("a-kept", "a-kept/0123456789abcdef"); // a loser, read first
  stray("z-orphan", "z-orphan/0123456789abcdef");
  faulty_store broken{*st};
  broken.fail_get_of = "z-orphan";
  auto rep = keys::reconcile_resident_keys(token->sess, broken, apply(true));
  ASSERT_FALSE(rep) << "a store error must abort the reconciliation";
  EXPECT_EQ(rep.error(), store_errc::unavailable);
  // The loser's row was read (and judged) before the failing read, and
  // still nothing was destroyed.
  EXPECT_EQ(broken.gets, (std::vector<std::string>{"a-kept", "z-orphan"}));
  EXPECT_EQ(objects("a-kept").size(), 2u);
  EXPECT_EQ(objects("z-orphan").size(), 1u);
  // With the store back, the same run destroys both.
  broken.fail_get_of.clear();
  auto ok = keys::reconcile_resident_keys(token->sess, broken, apply(true));
  ASSERT_TRUE(ok) << describe(ok.error());
  EXPECT_EQ(objects("a-kept").size(), 1u);
  EXPECT_TRUE(objects("z-orphan").empty());
  expect_signs("a-kept");
}

} // namespace
} // namespace hsm
