#pragma once

// CK_RV names and classes. Every PKCS#11 failure the driver reports carries
// a class (messages/errors.hpp, `hsm_errc`) and, as context, the function,
// the CKR name and the numeric CK_RV. The names are for humans (`describe`);
// code decides from the class or from the number (`rv_of`, `pin_rejected`),
// never from the text. The classes:
//
// - retryable: CKR_HOST_MEMORY, CKR_DEVICE_MEMORY, CKR_FUNCTION_CANCELED,
//   CKR_SESSION_COUNT, CKR_CANT_LOCK;
// - reopen_session: CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
//   CKR_DEVICE_ERROR, CKR_OPERATION_ACTIVE, CKR_USER_NOT_LOGGED_IN;
// - reinit_module: CKR_CRYPTOKI_NOT_INITIALIZED, CKR_TOKEN_NOT_PRESENT,
//   CKR_TOKEN_NOT_RECOGNIZED, CKR_DEVICE_REMOVED, CKR_SLOT_ID_INVALID;
// - fatal: everything else, e.g. CKR_PIN_INCORRECT, CKR_PIN_LOCKED (a retry
//   could lock the PIN), template and mechanism errors, CKR_GENERAL_ERROR.
//
// Pure functions; any thread.

#include "messages/errors.hpp"
#include "runtime/pkcs11/pkcs11.hpp"

#include <optional>
#include <string>
#include <string_view>

namespace hsm::pkcs11 {

/// `CKR_PIN_INCORRECT` for 0xA0; unknown values as hex.
std::string rv_name(CK_RV rv);

/// The class of a failing return value (see the file comment).
hsm_errc classify(CK_RV rv);

/// True if `rv` says the session or the token is gone (not that this call
/// failed on a live session): where a call's failure is otherwise judged
/// by what it was asked (the probe, the master-key guard), these still end
/// the attempt as session failures.
bool session_lost(CK_RV rv);

/// True if `err` is the session or the token failing rather than what was
/// asked of it: `session_lost` for a PKCS#11 failure, `is_session_failure`
/// for any other. A check that runs row by row (`db verify`, `db import`)
/// stops on these and judges the row on any other.
bool session_gone(const caf::error& err);

/// True if `rv`, from C_UnwrapKey, says the blob itself is bad (not the
/// device, not a handle): the only unwrap failures that make a key
/// `key_errc::key_corrupted`. SoftHSMv2 also answers CKR_GENERAL_ERROR
/// for a corrupt blob, but a blob reaches the unwrap only after its row
/// MAC held, so there that means the HSM failed, not the row.
bool blob_refused(CK_RV rv);

/// `make_error(classify(rv), function, rv_name(rv), uint64_t{rv})`: the
/// context is (function, CKR name, CK_RV); `describe` shows the names only,
/// e.g. `hsm: fatal (C_Login: CKR_PIN_INCORRECT)`.
caf::error rv_error(std::string_view function, CK_RV rv);

/// `cause`'s PKCS#11 failure under another code: `code` with context
/// (`what`, function, CKR name, CK_RV), so that `rv_of` and `function_of`
/// still answer, e.g. `key: key_corrupted (the token cannot unwrap the stored
/// key: C_UnwrapKey: CKR_WRAPPED_KEY_INVALID)`. If `cause` carries no CK_RV,
/// the context is `what` followed by `describe(cause)` in parentheses.
caf::error rv_error_as(key_errc code, std::string what,
                       const caf::error& cause);

/// The CK_RV that `err` carries: set by `rv_error` (or kept by
/// `rv_error_as`); `std::nullopt` for every other error, including
/// PKCS#11-class errors the driver made up without a return value.
std::optional<CK_RV> rv_of(const caf::error& err);

/// The PKCS#11 function that returned `rv_of(err)`, e.g. `C_UnwrapKey`;
/// `std::nullopt` when `err` carries no CK_RV.
std::optional<std::string> function_of(const caf::error& err);

/// True if the token refused the PIN: `err` carries CKR_PIN_INCORRECT,
/// CKR_PIN_INVALID, CKR_PIN_LEN_RANGE, CKR_PIN_EXPIRED or CKR_PIN_LOCKED.
/// Another login with the same PIN can lock the token: never retry.
bool pin_rejected(const caf::error& err);

} // namespace hsm::pkcs11
