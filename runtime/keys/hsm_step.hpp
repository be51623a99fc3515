#pragma once

// The HSM step of the key path, shared by the command line's key_service
// and the hsm_session actor: make a key as the record the store will keep,
// and sign with a stored record. Runs on the caller's session; one thread
// at a time.

#include "messages/errors.hpp"
#include "messages/key_record.hpp"
#include "messages/scheme.hpp"
#include "runtime/pkcs11/key_ops.hpp"
#include "runtime/pkcs11/session.hpp"

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace hsm::keys {

/// Which master keys a driver serves, decided at start from the
/// configuration and the store's rotation record (`master-key rotate`).
struct master_key_plan {
  /// New keys are wrapped under this one: the configured key, or the target
  /// of a running rotation.
  std::string current;
  /// While a rotation runs: the key rows are moved off; empty otherwise.
  std::string previous;
  /// Never served: the source of a completed rotation.
  std::vector<std::string> retired;
  /// Serve with a master key whose policy lets a blob leave the HSM (the
  /// operator's `--allow-weak-master-key`; logged at start).
  bool allow_weak = false;
};

/// One master key and the row-MAC key beside it.
struct master_key_set {
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE row_mac = CK_INVALID_HANDLE;
  /// The master key's label: what a row's `master_key_id` says.
  std::string label;
  /// The token marks the master key `CKA_TRUSTED`: new keys get
  /// `CKA_WRAP_WITH_TRUSTED`, so that only a trusted key can wrap them.
  bool trusted = false;
};

/// The token objects serving keys: the current master key and the row-MAC
/// key beside it (new keys), and the other master keys rows may name.
struct key_handles {
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE row_mac = CK_INVALID_HANDLE;
  /// The current master key's label: what a new row's `master_key_id` says.
  std::string master_key_id;
  /// The current master key is `CKA_TRUSTED` (`master_key_set::trusted`).
  bool master_trusted = false;
  /// Other master keys this driver serves rows of: the source of a running
  /// rotation, and keys a rotation that began after start moved rows to
  /// (found on the token by the label a row names, when the row comes).
  std::vector<master_key_set> others;
  /// Labels never served (`master_key_plan::retired`).
  std::vector<std::string> retired;
  /// `master_key_plan::allow_weak`, for keys found after start.
  bool allow_weak = false;

  /// The current set.
  master_key_set current() const {
    return {master, row_mac, master_key_id, master_trusted};
  }
};

/// Finds the master key labelled `master_label` and its row-MAC key.
[[nodiscard]] caf::expected<master_key_set>
find_key_set(pkcs11::session& sess, std::string_view master_label);

/// Finds the master key labelled `master_label` and its row-MAC key.
[[nodiscard]] caf::expected<key_handles>
find_key_handles(pkcs11::session& sess, std::string_view master_label);

/// Finds every key `plan` names (the previous one too, while a rotation
/// runs).
[[nodiscard]] caf::expected<key_handles>
find_key_handles(pkcs11::session& sess, const master_key_plan& plan);

/// The set serving rows that name `label` (a token-resident row of format 2
/// that names none is the current set's). A label not held yet is looked up
/// on the token, its policy checked (`pkcs11::inspect_master_key`; a weak
/// key is `key_errc::master_key_weak` unless `allow_weak`) and kept in
/// `others`. A retired label is `key_errc::key_corrupted`, one the token
/// lacks `key_errc::key_not_on_this_hsm` (retryable: another driver's HSM
/// may hold it), each naming it.
[[nodiscard]] caf::expected<master_key_set>
key_set_for(pkcs11::session& sess, key_handles& keys, std::string_view label);

/// The bytes the row MAC covers: a domain tag, then each field with its
/// length (key id, scheme, public key, wrap mechanism, master key id,
/// format version, blob), so that no two rows share an input.
[[nodiscard]] std::vector<uint8_t> row_mac_input(const key_record& rec);

/// Checks a stored row before anything of it reaches the HSM's unwrap: a
/// format and mechanism this driver knows, a master key it serves
/// (`key_set_for`), and the row MAC (computed by the HSM with that key's
/// row-MAC key, compared in constant time). A row that fails is
/// `key_errc::key_corrupted`, naming what failed. Returns the set the row
/// is served with.
[[nodiscard]] caf::expected<master_key_set>
check_row(pkcs11::session& sess, key_handles& keys, const key_record& rec);

/// The row MAC of `rec` made by `set`'s row-MAC key.
[[nodiscard]] caf::expected<std::vector<uint8_t>>
compute_row_mac(pkcs11::session& sess, const master_key_set& set,
                const key_record& rec);

/// Makes a new key on the token, as the record the store will keep: wrapped
/// by the master key, or (`resident`) a token object with CKA_ID = key id
/// and a label unique to this generation; in the current row format, with
/// its row MAC. Before it is returned the key proves itself: a signature
/// made through the path a real one takes (`sign_with` on the record, so
/// the stored blob is unwrapped) verifies against the public key.
/// `resident_handle`, if given, receives the private object of a resident
/// key (CK_INVALID_HANDLE otherwise), so that the caller can decide its fate.
/// `form` is how this token takes Ed25519's curve parameters (the probe's
/// `capability::params`).
[[nodiscard]] caf::expected<key_record>
make_key(pkcs11::session& sess, key_handles& keys, scheme s,
         std::string_view key_id, bool resident,
         CK_OBJECT_HANDLE* resident_handle = nullptr,
         pkcs11::ed25519_params form = pkcs11::ed25519_params::oid);

/// The token's raw signature over `payload` with the key of `rec`, after
/// `check_row`.
[[nodiscard]] caf::expected<std::vector<uint8_t>>
sign_with(pkcs11::session& sess, key_handles& keys, const key_record& rec,
          std::span<const uint8_t> payload);

/// Removes the token object of a resident record (a no-op for a wrapped
/// one).
[[nodiscard]] caf::error destroy_resident_key(pkcs11::session& sess,
                                              const key_record& rec);

/// A fixed payload of the right shape for `s`, made from `text`: its
/// SHA-256 for ECDSA, the text itself for Ed25519. For the probe and the
/// master-key canary.
std::vector<uint8_t> fixed_payload(scheme s, std::string_view text);

} // namespace hsm::keys
