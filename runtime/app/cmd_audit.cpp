// `hsm-driver audit verify`: checks every driver's chain in the audit
// trail (store/audit.hpp). Needs the database only: no token, no PIN.

#include "runtime/app/commands.hpp"
#include "runtime/app/output.hpp"
#include "runtime/app/store_open.hpp"
#include "runtime/crypto/hex.hpp"
#include "store/audit.hpp"

namespace hsm {

namespace {

/// Rows read per query.
constexpr size_t audit_page = 1000;

} // namespace

int cmd_audit_verify(const driver_config& cfg) {
  auto st = open_store(cfg);
  if (!st)
    return fail(st.error());
  store::audit_checker checker;
  std::string after_driver;
  uint64_t after_seq = 0;
  for (;;) {
    auto rows = (*st)->read_audit(after_driver, after_seq, audit_page);
    if (!rows)
      return fail(rows.error());
    for (const auto& row : *rows)
      checker.add(row);
    if (rows->size() < audit_page)
      break;
    after_driver = rows->back().driver_id;
    after_seq = rows->back().seq;
  }
  auto report = checker.finish();
  auto chains = nlohmann::ordered_json::array();
  uint64_t total = 0;
  for (const auto& c : report.chains) {
    total += c.rows;
    chains.push_back(
      nlohmann::ordered_json{{"driver_id", c.driver_id},
                             {"rows", c.rows},
                             {"head_seq", c.head_seq},
                             {"head_hash", crypto::to_hex(c.head_hash)}});
  }
  print(nlohmann::ordered_json{{"ok", report.ok()},
                               {"store", store_name(cfg)},
                               {"rows", total},
                               {"chains", chains},
                               {"breaks", report.breaks}});
  return report.ok() ? exit_ok : exit_failed;
}

} // namespace hsm
