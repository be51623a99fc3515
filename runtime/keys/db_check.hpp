#pragma once

// The row check of `hsm-driver db verify`: is a stored row intact, bound to
// its key id, and can this HSM use it? Runs on the caller's session; one
// thread at a time. Reads rows only; the store is never written.

#include "messages/errors.hpp"
#include "messages/key_record.hpp"
#include "runtime/keys/hsm_step.hpp"
#include "runtime/pkcs11/session.hpp"

#include <string>
#include <string_view>
#include <vector>

namespace hsm::keys {

/// Why a row is bad. A row may have more than one.
enum class row_fault {
  /// The row names a format or wrap mechanism this driver does not serve
  /// (a format-1 row from before the MAC, which `master-key rotate` seals).
  unsupported_format,
  /// The row names a master key this token does not hold (or its row-MAC
  /// key), a retired one, or one whose policy is refused.
  unknown_master_key,
  /// The row MAC does not hold: a field of the row, or the MAC, changed.
  mac_broken,
  /// The row MAC holds for the same row under another key id: the row of
  /// one key stands under the id of another (swapped or renamed key ids).
  key_id_binding,
  /// The HSM refused to unwrap the blob under the master key the row names.
  unwrap_failed,
  /// The unwrapped (or token-resident) key's signature over a fixed test
  /// digest does not verify against the stored public key, or the HSM could
  /// not sign with it.
  signature_mismatch,
  /// A token-resident row whose key object this token does not hold.
  resident_missing,
};

/// The name a report prints, e.g. `mac_broken`.
std::string_view to_string(row_fault f);

/// What `verify_row` found.
struct row_verdict {
  /// Empty for a good row.
  std::vector<row_fault> faults;
  /// One line per fault, for the operator.
  std::vector<std::string> details;
  /// The key behind the row signed the test digest and the signature
  /// verified against the stored public key: blob and public key belong
  /// together (whatever the MAC says).
  bool key_pair_intact = false;

  /// True for a good row.
  bool ok() const {
    return faults.empty();
  }

  /// Records fault `f` with its detail.
  void add(row_fault f, std::string detail) {
    faults.push_back(f);
    details.push_back(std::move(detail));
  }
};

/// Checks `rec` completely: format and mechanism, the master key it names
/// (`key_set_for`), its MAC under that key's row-MAC key, then a signature
/// over a fixed test digest made inside the HSM (a wrapped key unwrapped
/// as a sensitive, non-extractable session object and destroyed; a
/// resident key found on the token), verified in software against the
/// stored public key. The signature test runs even when the MAC fails, so
/// that the report can tell a changed key id (the key pair still belongs
/// together) from a changed blob; nothing it makes leaves the HSM but a
/// signature over the fixed digest, which is dropped. Fails only when the
/// session itself fails (`is_session_failure`); every fault of the row is
/// in the verdict.
[[nodiscard]] caf::expected<row_verdict>
verify_row(pkcs11::session& sess, key_handles& keys, const key_record& rec);

/// True if `rec`'s MAC holds when its key id is `other_key_id` (for a row
/// with `row_fault::mac_broken`: is it another key id's row?). False when
/// the master key it names is not served or the session fails.
[[nodiscard]] bool mac_holds_for(pkcs11::session& sess, key_handles& keys,
                                 const key_record& rec,
                                 std::string_view other_key_id);

} // namespace hsm::keys
