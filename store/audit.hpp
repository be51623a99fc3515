#pragma once

// The audit trail's hash chain. Each driver's rows form one chain: row `seq`
// carries the previous row's hash and its own, a SHA-256 over a fixed,
// length-prefixed encoding of the row (its driver, seq, previous hash and
// every field of the entry). An edited row no longer matches its hash; a
// deleted row leaves a gap in `seq` and breaks the next row's link. A chain
// cut short at its end shows only against a head recorded elsewhere: each
// row's hash is also logged (info) as it is written. Pure functions; any
// thread.

#include "messages/audit.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::store {

/// The previous hash of a chain's first row: 32 zero bytes.
std::vector<uint8_t> audit_genesis();

/// SHA-256 over `driver_id`, `seq`, `prev_hash` and `e`.
std::vector<uint8_t> audit_hash(std::string_view driver_id, uint64_t seq,
                                const std::vector<uint8_t>& prev_hash,
                                const audit_entry& e);

/// The row that follows `prev` (nullopt: the chain's first) in
/// `driver_id`'s chain.
audit_row chain_next(std::string_view driver_id,
                     const std::optional<audit_row>& prev, audit_entry e);

/// What `audit_checker` found.
struct audit_report {
  struct chain {
    std::string driver_id;
    uint64_t rows = 0;
    /// The last row's seq and hash (the chain's head).
    uint64_t head_seq = 0;
    std::vector<uint8_t> head_hash;
  };
  std::vector<chain> chains;
  /// One line per break: the driver, the seq and what is wrong.
  std::vector<std::string> breaks;

  bool ok() const {
    return breaks.empty();
  }
};

/// Checks rows fed in (driver, seq) order, a chain at a time.
class audit_checker {
public:
  void add(const audit_row& row);
  audit_report finish();

private:
  audit_report report_;
  std::optional<audit_row> last_;
};

} // namespace hsm::store
