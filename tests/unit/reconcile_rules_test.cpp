// The pure rules of token-resident key reconciliation: which labels are
// the driver's resident labels, and how an object compares with its row.

#include "runtime/keys/reconcile.hpp"

#include <gtest/gtest.h>

namespace hsm {
namespace {

using keys::resident_class;

TEST(ReconcileRulesTest, ResidentLabelIsTheKeyIdASlashAndSixteenHexDigits) {
  struct label_case {
    const char* key_id;
    const char* label;
    bool resident;
  };
  constexpr label_case cases[] = {
    {"k", "k/0123456789abcdef", true},
    {"a.b:c-d_e", "a.b:c-d_e/ffffffffffffffff", true},
    {"k", "k/0123456789ABCDEF", false},  // upper case: not ours
    {"k", "k/0123456789abcde", false},   // 15 digits
    {"k", "k/0123456789abcdef0", false}, // 17 digits
    {"k", "k/0123456789abcdeg", false},
    {"k", "k-0123456789abcdef", false},
    {"k", "j/0123456789abcdef", false}, // another key id
    {"k", "kk/0123456789abcdef", false},
    {"k", "customer-gen-1", false},
    {"", "/0123456789abcdef", false},
    {"k", "", false},
  };
  for (const auto& c : cases)
    EXPECT_EQ(keys::is_resident_label(c.key_id, c.label), c.resident)
      << c.key_id << " " << c.label;
}

TEST(ReconcileRulesTest, ObjectIsKeptOnlyWhenItsRowNamesExactlyItsLabel) {
  std::string label = "k/0123456789abcdef";
  key_record row;
  row.key_id = "k";
  row.wrap_mechanism = std::string{resident_mechanism};
  row.key_blob.assign(label.begin(), label.end());
  EXPECT_EQ(keys::classify(label, row), resident_class::kept);
  // Another generation's label: this one lost the race.
  EXPECT_EQ(keys::classify("k/fedcba9876543210", row), resident_class::loser);
  // A wrapped key under the id: no resident object is its key, even one
  // whose label equals the blob's bytes.
  auto wrapped = row;
  wrapped.wrap_mechanism = std::string{aes_key_wrap_pad};
  EXPECT_EQ(keys::classify(label, wrapped), resident_class::loser);
  // No row: an orphan.
  EXPECT_EQ(keys::classify(label, std::nullopt), resident_class::orphan);
}

TEST(ReconcileRulesTest, ClassesHaveNames) {
  EXPECT_EQ(keys::to_string(resident_class::kept), "kept");
  EXPECT_EQ(keys::to_string(resident_class::loser), "loser");
  EXPECT_EQ(keys::to_string(resident_class::orphan), "orphan");
}

TEST(ReconcileRulesTest, ReportCountsPerClass) {
  keys::reconcile_report rep;
  rep.objects = {{1, "a", "a/0000000000000000", resident_class::kept, false},
                 {2, "b", "b/0000000000000000", resident_class::loser, true},
                 {3, "b", "b/1111111111111111", resident_class::loser, false},
                 {4, "c", "c/0000000000000000", resident_class::orphan, false}};
  EXPECT_EQ(rep.count(resident_class::kept), 1u);
  EXPECT_EQ(rep.count(resident_class::loser), 2u);
  EXPECT_EQ(rep.destroyed(resident_class::loser), 1u);
  EXPECT_EQ(rep.destroyed(resident_class::orphan), 0u);
  EXPECT_EQ(rep.key_ids(resident_class::loser),
            (std::vector<std::string>{"b", "b"}));
}

} // namespace
} // namespace hsm
