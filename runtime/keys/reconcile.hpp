#pragma once

// Reconciliation of token-resident keys with the store. A resident key is a
// private token object with CKA_ID = key id and CKA_LABEL = "<key id>/<16
// hex>", unique per generation; its row (`resident_mechanism`) names that
// label in `key_blob`. A generation whose put fails or times out keeps its
// object (the put may have committed), and a generation that loses a race
// may crash before it removes its own: such objects accumulate. This lists
// them, compares each with the row stored under its key id, and (asked to)
// destroys those no row can ever name.
//
// Safety: objects are destroyed by handle only; nothing is destroyed when a
// store read fails; private keys whose id is not a valid key id (the probe's
// reserved `hsm-driver-` ids, a customer's own keys) or whose label has
// another shape are never touched, nor is any secret key (master, row MAC).
// A loser is certainly unused: rows are never deleted and never change their
// key's label, so a key id whose row names another label never names this
// one. An orphan (no row) may be a generation in flight whose put has not
// committed yet; orphans are destroyed only when the caller says so
// (`include_orphans`), which the command line allows only with every driver
// on this token stopped (README, "Reconciling token-resident keys").
//
// Runs on the caller's session and store; one thread at a time.

#include "messages/errors.hpp"
#include "messages/key_record.hpp"
#include "runtime/pkcs11/session.hpp"
#include "store/key_store.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::keys {

/// What a resident key object is to the store.
enum class resident_class : uint8_t {
  /// The row under its key id names exactly this object's label: in use.
  kept,
  /// A row exists under its key id but names another label, or is a wrapped
  /// key: a generation that lost the race. Never used; safe to destroy.
  loser,
  /// No row under its key id: a generation whose put failed before it
  /// committed, or one still in flight.
  orphan,
};

/// `kept`, `loser` or `orphan`.
[[nodiscard]] std::string_view to_string(resident_class x);

/// True if `label` has the shape of a resident key's label for `key_id`:
/// the key id, `/`, then 16 lowercase hex digits.
[[nodiscard]] bool is_resident_label(std::string_view key_id,
                                     std::string_view label);

/// Classifies the resident object labelled `label` against `row`, the record
/// stored under its key id (nullopt: none).
[[nodiscard]] resident_class classify(std::string_view label,
                                      const std::optional<key_record>& row);

/// One resident key object found on the token.
struct resident_object {
  /// The private key object.
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  /// Its CKA_ID: the key id.
  std::string key_id;
  /// Its CKA_LABEL.
  std::string label;
  resident_class what = resident_class::kept;
  /// True if this run destroyed it.
  bool destroyed = false;
};

/// What a reconciliation may do.
struct reconcile_options {
  /// Destroy losers (and, with `include_orphans`, orphans); else only report.
  bool apply = false;
  /// With `apply`: destroy orphans too. Only with every driver on this
  /// token stopped: an orphan may be a generation whose put is in flight.
  bool include_orphans = false;
};

/// What a reconciliation found and did.
struct reconcile_report {
  /// Every resident key object, ordered by key id and label.
  std::vector<resident_object> objects;
  /// Private token objects that are not the driver's resident keys (another
  /// label shape, an id that is no valid key id); never touched.
  size_t ignored = 0;
  /// Destroys that did not happen: "<key id> (<label>): <why>".
  std::vector<std::string> failures;

  /// How many objects are of class `x`.
  [[nodiscard]] size_t count(resident_class x) const;

  /// How many objects of class `x` this run destroyed.
  [[nodiscard]] size_t destroyed(resident_class x) const;

  /// The key ids of the objects of class `x`, in order (one per object).
  [[nodiscard]] std::vector<std::string> key_ids(resident_class x) const;
};

/// Lists the resident key objects on the token of `sess`, classifies each
/// against the row `st.get` returns for its key id, and with `opts.apply`
/// destroys (by handle) the losers, and the orphans with
/// `opts.include_orphans`. Every row is read before anything is destroyed:
/// a store or token error while listing is returned, with nothing destroyed.
/// A destroy the token refuses is recorded in `failures`; the others go on.
[[nodiscard]] caf::expected<reconcile_report>
reconcile_resident_keys(pkcs11::session& sess, store::key_store& st,
                        reconcile_options opts = {});

} // namespace hsm::keys
