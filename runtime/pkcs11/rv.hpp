#pragma once

// CK_RV names and classes. Every PKCS#11 failure the driver reports carries
// the function, the CKR name and a class (messages/errors.hpp, `hsm_errc`):
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

#include <string>
#include <string_view>

#include "messages/errors.hpp"
#include "runtime/pkcs11/pkcs11.hpp"

namespace hsm::pkcs11 {

/// `CKR_PIN_INCORRECT` for 0xA0; unknown values as hex.
std::string rv_name(CK_RV rv);

/// The class of a failing return value (see the file comment).
hsm_errc classify(CK_RV rv);

/// `make_error(classify(rv), function, rv_name(rv))`.
caf::error rv_error(std::string_view function, CK_RV rv);

} // namespace hsm::pkcs11
