#pragma once

// A stored key as the store, the sessions and the dispatcher exchange it:
// public data and a wrapped blob (or the reference of a token-resident key),
// never plaintext private key material. Records are immutable once written.
// Plain values; any thread.

#include "messages/scheme.hpp"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace hsm {

/// The `wrap_mechanism` of a token-resident key (no blob; `key_blob` holds
/// the key's per-generation `CKA_LABEL`; its `CKA_ID` is the key id).
inline constexpr std::string_view resident_mechanism = "token-resident";

/// The mechanism the driver wraps with (RFC 5649).
inline constexpr std::string_view aes_key_wrap_pad = "CKM_AES_KEY_WRAP_PAD";

/// The row format the driver writes: a format version, the master key the
/// blob is wrapped under, and a MAC made inside the HSM over the whole row.
/// Rows of format 1 (before the MAC) are not served until sealed.
inline constexpr int current_row_format = 2;

/// One key. Never holds plaintext private key material.
struct key_record {
  /// The proxy's name for the key; unique.
  std::string key_id;
  /// The key's scheme.
  hsm::scheme scheme = hsm::scheme::secp256k1;
  /// Canonical public key: SEC1 uncompressed (EC) or 32 raw bytes (Ed25519).
  std::vector<uint8_t> public_key;
  /// The wrapped private key, or the `CKA_LABEL` of a token-resident key.
  std::vector<uint8_t> key_blob;
  /// How `key_blob` was made: `aes_key_wrap_pad` or `resident_mechanism`.
  std::string wrap_mechanism;
  /// Creation time, milliseconds since the Unix epoch (UTC).
  int64_t created_at_ms = 0;
  /// The row format (`current_row_format`; 1 for rows from before the MAC).
  int format_version = current_row_format;
  /// The label of the master key `key_blob` is wrapped under; empty for a
  /// token-resident key.
  std::string master_key_id;
  /// HMAC-SHA256, computed by the HSM's row-MAC key, over the key id,
  /// scheme, public key, wrap mechanism, master key id, format and blob
  /// (`keys::row_mac_input`). Empty in a format-1 row.
  std::vector<uint8_t> row_mac;

  /// True for a token-resident key.
  bool resident() const {
    return wrap_mechanism == resident_mechanism;
  }
};

/// What a `put` did.
struct put_result {
  /// The record now stored under the key id: the caller's, or the one that
  /// was there before (then `inserted` is false and nothing changed).
  key_record record;
  /// True if this call wrote the record.
  bool inserted = false;
  /// True if the put's audit entry was appended in the same commit (an
  /// audited put that inserted; see `store_actor`).
  bool audited = false;
};

/// A key lookup's answer: `found` false means no key under the id.
struct key_lookup {
  bool found = false;
  key_record record;
};

} // namespace hsm
