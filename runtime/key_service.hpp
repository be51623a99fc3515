#pragma once

// The key path, composed: validate a request, look the key up in the store,
// do the HSM step, persist, finish and verify the signature. The daemon's
// actors run the same steps split across storage, session and dispatcher;
// the command line runs them in one thread through `key_service`.
//
// Also here: the capability probe (which schemes this token can serve) and
// the master-key guard (invariant 5).

#include <array>
#include <cstdint>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "messages/errors.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/pkcs11/session.hpp"
#include "runtime/schemes.hpp"
#include "store/key_store.hpp"

namespace hsm {

// -- request validation (pure) --------------------------------------------------

/// Longest key id accepted.
inline constexpr size_t max_key_id_length = 128;

/// Key ids are 1..128 characters of `A-Z a-z 0-9 . _ : -`; anything else is
/// `key_errc::invalid_request`.
[[nodiscard]] caf::error validate_key_id(std::string_view key_id);

/// Parses a scheme name: unknown names (`schnorr`, `stark`, ...) are
/// `key_errc::scheme_unsupported` saying which schemes exist.
[[nodiscard]] caf::expected<scheme> parse_scheme_name(std::string_view name);

/// ECDSA payloads are 32-byte hashes; Ed25519 payloads are messages of
/// 1..max_ed25519_message bytes. Else `key_errc::invalid_payload`.
[[nodiscard]] caf::error validate_payload(scheme s,
                                          std::span<const uint8_t> payload);

// -- capability probe -----------------------------------------------------------

/// How the driver serves one scheme on this token.
struct capability {
  hsm::scheme scheme = hsm::scheme::secp256k1;
  /// True if requests for the scheme are served.
  bool served = false;
  /// True if keys of the scheme are token-resident (opt-in).
  bool resident = false;
  /// What the probe found, for the operator: `ok`, or the failing step.
  std::string detail;
};

/// What the probe found for every scheme.
struct capabilities {
  std::array<capability, all_schemes.size()> schemes;

  /// The entry of `s`.
  const capability& of(scheme s) const;
};

/// Runs, per scheme, generate -> wrap -> unwrap -> sign -> verify -> destroy
/// on the token (or generate -> sign -> verify -> destroy as token-resident
/// keys for the schemes in `resident_opt_in`). A scheme whose round trip
/// fails is not served. Only a session-level failure is an error.
[[nodiscard]] caf::expected<capabilities>
probe(pkcs11::session& sess, CK_OBJECT_HANDLE master,
      const std::set<scheme>& resident_opt_in);

// -- master-key guard -----------------------------------------------------------

/// What the guard found.
enum class canary_state {
  /// This call wrote the canary (first start against this database).
  created,
  /// The canary unwrapped and signed: the token holds the right master key.
  matches,
};

/// Checks the master key against the store's canary; on first use (no
/// canary, `may_create`) writes one. A token whose master key cannot unwrap
/// the canary and sign with it is `key_errc::master_key_mismatch`, with a
/// message naming the problem; no canary and `!may_create` is
/// `key_errc::master_key_missing`.
[[nodiscard]] caf::expected<canary_state>
check_master_key(pkcs11::session& sess, CK_OBJECT_HANDLE master,
                 std::string_view master_label, store::key_store& st,
                 bool may_create);

// -- key service ----------------------------------------------------------------

/// A key as reported: only public data.
struct key_view {
  std::string key_id;
  hsm::scheme scheme = hsm::scheme::secp256k1;
  /// SEC1 uncompressed (EC) or 32 raw bytes (Ed25519).
  std::vector<uint8_t> public_key;
  /// SEC1 compressed (EC only).
  std::vector<uint8_t> public_key_compressed;
  /// `CKM_AES_KEY_WRAP_PAD` or `token-resident`.
  std::string storage;
  int64_t created_at_ms = 0;
  /// True if this request created the key; false if it existed.
  bool created = false;
};

/// A released signature (verified against the stored public key).
struct signature_view {
  std::string key_id;
  hsm::scheme scheme = hsm::scheme::secp256k1;
  crypto::signature sig;
};

/// The `scheme_unsupported` error for a scheme the token does not serve,
/// with the probe's reason.
[[nodiscard]] caf::error scheme_not_served(const capability& c);

// -- the HSM step, shared by key_service and the hsm_session actor -----------

/// Makes a new key on the token, as the record the store will keep: wrapped
/// by `master`, or (`resident`) a token object with CKA_ID = key id and a
/// label unique to this generation. `resident_handle`, if given, receives
/// the private object of a resident key (CK_INVALID_HANDLE otherwise), so
/// that a key the store refuses can be removed.
[[nodiscard]] caf::expected<store::key_record>
make_key(pkcs11::session& sess, CK_OBJECT_HANDLE master, scheme s,
         std::string_view key_id, bool resident,
         CK_OBJECT_HANDLE* resident_handle = nullptr);

/// The token's raw signature over `payload` with the key of `rec`.
[[nodiscard]] caf::expected<std::vector<uint8_t>>
sign_with(pkcs11::session& sess, CK_OBJECT_HANDLE master,
          const store::key_record& rec, std::span<const uint8_t> payload);

/// Builds the public view of a stored record.
[[nodiscard]] caf::expected<key_view> make_key_view(const store::key_record& r,
                                                    bool created);

/// Synchronous key path over one session and one store. Not thread-safe.
class key_service {
public:
  key_service(pkcs11::session& sess, CK_OBJECT_HANDLE master,
              store::key_store& st, capabilities caps)
    : sess_(sess), master_(master), store_(st), caps_(caps) {
    // nop
  }

  /// Generates a key under `key_id`, or returns the stored one without
  /// touching the HSM (idempotent by key id). Reported only after commit.
  [[nodiscard]] caf::expected<key_view> generate(std::string_view key_id,
                                                 std::string_view scheme_name);

  /// Signs `payload` with the key stored under `key_id`; the signature is
  /// verified against the stored public key before it is returned.
  [[nodiscard]] caf::expected<signature_view>
  sign(std::string_view key_id, std::span<const uint8_t> payload);

  /// The stored key, public data only.
  [[nodiscard]] caf::expected<key_view> show(std::string_view key_id);

private:
  caf::expected<store::key_record> lookup(std::string_view key_id);

  pkcs11::session& sess_;
  CK_OBJECT_HANDLE master_;
  store::key_store& store_;
  capabilities caps_;
};

} // namespace hsm
