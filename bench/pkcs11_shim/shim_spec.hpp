#pragma once

// The behaviour spec of the PKCS#11 shim (bench/pkcs11_shim/README.md): what
// the shim does before it forwards a call to the real module. Parsed once
// from HSM_SHIM_SPEC when the shim loads. Pure functions over strings, no
// PKCS#11 types, so the grammar is unit-tested without a module; any thread.
//
// Grammar (whitespace around every token is ignored):
//
//   spec     := [clause] (';' [clause])*        empty clauses are skipped
//   clause   := kind '=' rule (',' rule)*
//   kind     := 'delay'                          ('fail', 'hang': later)
//   rule     := target ':' value
//   target   := '*' | a PKCS#11 function name    ('*': every function
//                                                 without a rule of its own)
//   value    := duration                         (for kind 'delay')
//   duration := digits unit | '0'                unit: ns | us | ms | s
//
// Example: `delay=C_Sign:2ms,C_UnwrapKey:500us,*:0`.

#include <array>
#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace hsm::shim {

/// The PKCS#11 2.40 functions the shim forwards, in `CK_FUNCTION_LIST`
/// order, without `C_GetFunctionList` (the shim answers that one itself).
inline constexpr std::array<std::string_view, 67> function_names{
  "C_Initialize",
  "C_Finalize",
  "C_GetInfo",
  "C_GetSlotList",
  "C_GetSlotInfo",
  "C_GetTokenInfo",
  "C_GetMechanismList",
  "C_GetMechanismInfo",
  "C_InitToken",
  "C_InitPIN",
  "C_SetPIN",
  "C_OpenSession",
  "C_CloseSession",
  "C_CloseAllSessions",
  "C_GetSessionInfo",
  "C_GetOperationState",
  "C_SetOperationState",
  "C_Login",
  "C_Logout",
  "C_CreateObject",
  "C_CopyObject",
  "C_DestroyObject",
  "C_GetObjectSize",
  "C_GetAttributeValue",
  "C_SetAttributeValue",
  "C_FindObjectsInit",
  "C_FindObjects",
  "C_FindObjectsFinal",
  "C_EncryptInit",
  "C_Encrypt",
  "C_EncryptUpdate",
  "C_EncryptFinal",
  "C_DecryptInit",
  "C_Decrypt",
  "C_DecryptUpdate",
  "C_DecryptFinal",
  "C_DigestInit",
  "C_Digest",
  "C_DigestUpdate",
  "C_DigestKey",
  "C_DigestFinal",
  "C_SignInit",
  "C_Sign",
  "C_SignUpdate",
  "C_SignFinal",
  "C_SignRecoverInit",
  "C_SignRecover",
  "C_VerifyInit",
  "C_Verify",
  "C_VerifyUpdate",
  "C_VerifyFinal",
  "C_VerifyRecoverInit",
  "C_VerifyRecover",
  "C_DigestEncryptUpdate",
  "C_DecryptDigestUpdate",
  "C_SignEncryptUpdate",
  "C_DecryptVerifyUpdate",
  "C_GenerateKey",
  "C_GenerateKeyPair",
  "C_WrapKey",
  "C_UnwrapKey",
  "C_DeriveKey",
  "C_SeedRandom",
  "C_GenerateRandom",
  "C_GetFunctionStatus",
  "C_CancelFunction",
  "C_WaitForSlotEvent",
};

/// Number of forwarded functions; the size of every per-function table.
inline constexpr size_t function_count = function_names.size();

/// The position of `name` in `function_names` (exact, case-sensitive), or
/// nullopt if the shim does not forward a function of that name.
constexpr std::optional<size_t> function_index(std::string_view name) {
  for (size_t i = 0; i < function_count; ++i)
    if (function_names[i] == name)
      return i;
  return std::nullopt;
}

/// How long a call waits before it is forwarded.
using duration = std::chrono::nanoseconds;

/// The longest delay a spec may give (a typo guard: `2000000s`).
inline constexpr duration max_delay = std::chrono::hours{1};

/// What the shim does, per function. A default-constructed spec forwards
/// every call at once.
struct spec {
  /// The delay before forwarding, indexed as `function_names`: the
  /// function's own rule, else the `*` rule, else zero.
  std::array<duration, function_count> delay{};

  /// True if every delay is zero (a pure forwarder).
  bool forwards_at_once() const noexcept;

  friend bool operator==(const spec&, const spec&) = default;
};

/// A parse outcome: the value, or a message naming the problem (the clause,
/// the rule and what is wrong with it).
template <class T>
struct parsed {
  std::optional<T> value;
  std::string error;

  explicit operator bool() const noexcept {
    return value.has_value();
  }
};

/// Parses a duration: decimal digits and a unit (`ns`, `us`, `ms`, `s`), or
/// a bare `0`. Negative, fractional, unit-less (except 0) and longer than
/// `max_delay` are errors.
parsed<duration> parse_duration(std::string_view text);

/// Parses a whole spec (see the grammar above). The empty string is the
/// default spec. A function named twice in one kind, an unknown kind, an
/// unknown function name, `C_GetFunctionList` and a bad value are errors.
parsed<spec> parse_spec(std::string_view text);

/// A duration as the spec writes it, in the largest unit that divides it
/// exactly (`2ms`, `1500us`, `0`).
std::string to_string(duration d);

/// The spec in canonical form: one `delay` clause listing every non-zero
/// delay in function order (`delay=C_Sign:2ms,C_UnwrapKey:500us`), or the
/// empty string for a pure forwarder. Parsing it gives the same spec.
std::string to_string(const spec& s);

} // namespace hsm::shim
