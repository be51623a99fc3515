#pragma once

// Master-key rotation (`hsm-driver master-key rotate`): every key row is
// moved from one master key to another inside the HSM, in batches, while
// drivers keep serving rows under either key. The same pass seals rows
// written before the row MAC (format 1). Resumable: a row is done when it
// names the target key in the current format, so a rerun after a crash
// picks up what is left; each row is replaced by a compare-and-swap.
//
// Runs on the caller's session and store; one thread.

#include "messages/errors.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/pkcs11/session.hpp"
#include "store/key_store.hpp"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace hsm::keys {

/// What one pass did.
struct rotation_tally {
  /// Wrapped rows re-wrapped under the target key.
  uint64_t rewrapped = 0;
  /// Rows given the target's MAC without a re-wrap (token-resident rows,
  /// and rows sealed in place when the target is their own key).
  uint64_t resealed = 0;
  /// Rows another rotator changed first (left as they are).
  uint64_t raced = 0;
  /// Rows that could not be moved (left as they are), with the reason.
  std::vector<std::string> failures;
  /// Rows not yet done for the target after the pass.
  uint64_t remaining = 0;
  /// True if the canary moved to the target in this pass.
  bool canary_moved = false;
};

/// Moves every row not yet done for `to` (`key_store::pending_rows`) that
/// names `from` (or is of format 1, which is taken to be under `from`), in
/// batches of `batch` rows. Each row is first proved under `from`: its MAC
/// (format 2), or for a format-1 row a signature through its blob verified
/// against its public key. Then it is re-wrapped inside the HSM (if
/// `from` and `to` differ), given `to`'s MAC, proved again through the
/// path a real signature takes, and swapped in. Rows that fail are left
/// and listed; rows naming a third key are left and listed. Then the canary
/// moves to `to`. `progress` (optional) is called after each batch.
/// A store or session failure ends the pass with that error; what was
/// swapped in stays.
[[nodiscard]] caf::expected<rotation_tally>
rotate_rows(pkcs11::session& sess, const master_key_set& from,
            const master_key_set& to, store::key_store& st, size_t batch,
            const std::function<void(const rotation_tally&)>& progress = {});

/// How many rows are not yet done for `to`.
[[nodiscard]] caf::expected<uint64_t> rows_left(store::key_store& st,
                                                std::string_view to);

} // namespace hsm::keys
