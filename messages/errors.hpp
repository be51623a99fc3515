#pragma once

// Error codes of every subsystem, as CAF error-code enums.
//
// Code is for logic (retry or not, which wire code to answer with); the
// context message is for humans. PKCS#11 failures carry the function, the
// CKR name and the numeric CK_RV (as `uint64_t`) as context; `describe` shows
// the names, `hsm: reopen_session (C_Sign: CKR_SESSION_CLOSED)`, and code
// that must know the return value reads the number
// (runtime/pkcs11/rv.hpp: `rv_of`, `pin_rejected`), never the text.
// Any thread may use these; they hold no state.

#include "caf/error.hpp"
#include "caf/expected.hpp"
#include "caf/make_message.hpp"

#include <cstdint>
#include <string>

namespace hsm {

/// Classes of PKCS#11 failure. The class says what a caller should do next.
enum class hsm_errc : uint8_t {
  /// Transient: the same call on the same session may succeed later.
  retryable = 1,
  /// The session is gone (closed, handle invalid, device error): open a new
  /// session, log in again, retry.
  reopen_session,
  /// The module lost the token or its own state: finalize, initialize again.
  reinit_module,
  /// Never retried: wrong PIN, locked PIN, broken configuration, a key or
  /// template the token refuses. Retrying can lock the PIN or loop forever.
  fatal,
};

/// Errors of the key path that a request can cause; each maps to a wire code.
enum class key_errc : uint8_t {
  /// No key is stored under the key id.
  unknown_key = 1,
  /// The scheme is unknown, or the token cannot serve it.
  scheme_unsupported,
  /// The payload does not fit the scheme (e.g. not a 32-byte hash for ECDSA).
  invalid_payload,
  /// A parameter is missing or malformed (bad key id, bad hex, ...).
  invalid_request,
  /// The stored key material cannot be used (corrupted blob, bad public key).
  key_corrupted,
  /// The HSM's signature did not verify against the stored public key.
  signature_mismatch,
  /// The token's master key cannot unwrap the database's canary.
  master_key_mismatch,
  /// The master key object is missing from the token.
  master_key_missing,
  /// The master key's attributes let a blob leave the HSM (extractable,
  /// modifiable, no unwrap template, ...).
  master_key_weak,
  /// This driver's HSM does not hold what the row names (a token-resident
  /// key, or the master key a rotation moved it to): retryable, so that a
  /// driver whose HSM holds it serves the request.
  key_not_on_this_hsm,
};

/// Errors of the key store.
enum class store_errc : uint8_t {
  /// The database cannot be opened or reached.
  unavailable = 1,
  /// A statement failed.
  query_failed,
  /// The database schema is newer than this build knows.
  schema_too_new,
  /// A stored row does not parse.
  corrupt_row,
};

/// Errors in options, files and the environment, found at start-up.
enum class config_errc : uint8_t {
  /// An option has a bad value; the context names the option.
  invalid_option = 1,
  /// A required option is missing; the context names it.
  missing_option,
  /// A file named by an option cannot be used (missing, bad permissions).
  bad_file,
};

/// Errors talking to the proxy (client side) or serving it (reference proxy).
enum class net_errc : uint8_t {
  /// No connection: refused, reset, DNS, or a timeout; retried with backoff.
  unreachable = 1,
  /// The TLS handshake failed: certificate not trusted, wrong name, no client
  /// certificate. Not retried in a tight loop: configuration is wrong.
  tls_failed,
  /// The peer answered with an unexpected HTTP status.
  http_status,
  /// The peer's body is not what the protocol says.
  bad_response,
  /// TLS material (certificate, key, CA) cannot be loaded or made.
  bad_tls_material,
};

/// Names of the values, e.g. `reopen_session`.
std::string to_string(hsm_errc x);
std::string to_string(key_errc x);
std::string to_string(store_errc x);
std::string to_string(config_errc x);
std::string to_string(net_errc x);

/// Renders any project error (or a CAF system error) as one line for humans:
/// `hsm: fatal (C_Login: CKR_PIN_INCORRECT)`. The strings of the context are
/// joined with ": "; in a project error, a `uint64_t` element (the CK_RV of a
/// PKCS#11 failure, next to its CKR name) is for code and is left out.
std::string describe(const caf::error& err);

/// True when the same request may succeed if tried again later.
bool is_retryable(const caf::error& err);

/// True when a PKCS#11 error must never be retried (wrong PIN, ...).
bool is_fatal(const caf::error& err);

/// True when `err` is the failure of the HSM session that served the
/// request rather than of the request: `hsm_errc::retryable`,
/// `reopen_session` or `reinit_module`, or `caf::sec::request_timeout` /
/// `caf::sec::request_receiver_down` (the session timed out or died). The
/// caller drops or replaces that session and may retry the request on
/// another one. False for `hsm_errc::fatal` and every other error.
bool is_session_failure(const caf::error& err);

/// The short code that a request's error result carries on the wire, e.g.
/// `unknown_key`, `hsm_unavailable`, `internal`.
std::string wire_code(const caf::error& err);

} // namespace hsm

CAF_ERROR_CODE_ENUM(hsm::hsm_errc, "hsm")
CAF_ERROR_CODE_ENUM(hsm::key_errc, "key")
CAF_ERROR_CODE_ENUM(hsm::store_errc, "store")
CAF_ERROR_CODE_ENUM(hsm::config_errc, "config")
CAF_ERROR_CODE_ENUM(hsm::net_errc, "net")
