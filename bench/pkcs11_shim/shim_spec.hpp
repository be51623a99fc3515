#pragma once

// The behaviour spec of the PKCS#11 shim (bench/pkcs11_shim/README.md): what
// the shim does before, or instead of, forwarding a call to the real module.
// Parsed once from HSM_SHIM_SPEC (or HSM_SHIM_SPEC_FILE) when the shim
// loads. Pure functions over strings and numbers, no PKCS#11 header (a CK_RV
// is an `rv_code`), so the grammar is unit-tested without a module; any
// thread.
//
// Grammar (whitespace around every token is ignored):
//
//   spec     := [clause] (';' [clause])*        empty clauses are skipped
//   clause   := kind '=' rule (',' rule)*
//             | 'seed' '=' digits               seeds every '%' choice
//             | 'counts' '=' path               the injected-fault counts file
//   kind     := 'delay' | 'fail' | 'hang' | 'invalidate' | 'outage'
//   rule     := target ':' value
//   target   := '*' | a PKCS#11 function name    ('*': every function
//                                                 without a rule of its own)
//   value    := duration                         delay
//             | rv ('|' rv)* [when]              fail
//             | [when] ['for' duration]          hang (no 'for': until exit)
//             | [when]                           invalidate
//             | rv [when | '@' duration] 'for' duration     outage
//             | 'none'                           no rule (not for delay: 0)
//   rv       := CKR_<NAME> | 0x<hex>             never CKR_OK
//   when     := '@' N | '@' N '+' | '/' N | '%' P   (none: every call)
//   duration := digits unit | '0'                unit: ns | us | ms | s
//
// Examples: `delay=C_Sign:2ms,*:100us`, `fail=C_Sign:CKR_DEVICE_ERROR%1`,
// `outage=C_Sign:CKR_DEVICE_REMOVED@100 for 5s; seed=7`.

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

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

/// True if function `index` takes a session handle as its first argument
/// (C_InitPIN, C_SetPIN, and C_CloseSession to C_CancelFunction except
/// C_CloseAllSessions, which takes a slot).
constexpr bool takes_session(size_t index) {
  if (index == *function_index("C_InitPIN")
      || index == *function_index("C_SetPIN"))
    return true;
  return index >= *function_index("C_CloseSession")
         && index <= *function_index("C_CancelFunction")
         && index != *function_index("C_CloseAllSessions");
}

/// True if an error from function `index` ends the session's active
/// operation (PKCS#11 2.40, 5.8-5.12: the single-part and final calls). The
/// shim forwards such a call before it answers it with an injected error,
/// so that the real module ends its operation too.
constexpr bool ends_operation(size_t index) {
  for (auto name :
       {"C_Encrypt", "C_EncryptFinal", "C_Decrypt", "C_DecryptFinal",
        "C_Digest", "C_DigestFinal", "C_Sign", "C_SignFinal", "C_SignRecover",
        "C_Verify", "C_VerifyFinal", "C_VerifyRecover"})
    if (index == *function_index(name))
      return true;
  return false;
}

/// How long a call waits (delay, bounded hang, outage length).
using duration = std::chrono::nanoseconds;

/// The longest duration a spec may give (a typo guard: `2000000s`).
inline constexpr duration max_delay = std::chrono::hours{1};

/// A CK_RV as a number; CK_RV is `unsigned long` in every PKCS#11 header
/// (`shim.cpp` checks it against p11-kit's).
using rv_code = unsigned long;

/// Which calls of a function a rule selects. Calls are counted per function
/// and per process, from 1 (every call the application makes, including
/// those the shim answers itself).
struct selector {
  /// The forms of `when`.
  enum class mode : uint8_t {
    /// No `when`: every call.
    every_call,
    /// `@N`: the N-th call only.
    nth,
    /// `@N+`: the N-th call and every later one.
    from_nth,
    /// `/N`: calls N, 2N, 3N, ...
    every_nth,
    /// `%P`: each call with probability P percent (see `chance_hit`).
    chance,
    /// `@T` (outage only): a window starting T after the shim loaded.
    at_time,
  };

  mode how = mode::every_call;

  /// N for `nth`, `from_nth`, `every_nth`.
  uint64_t n = 0;

  /// P for `chance`, in millionths of a percent (100 % = 100'000'000).
  uint32_t millionths = 0;

  /// T for `at_time`.
  duration at{};

  friend bool operator==(const selector&, const selector&) = default;
};

/// 100 % in `selector::millionths`.
inline constexpr uint32_t all_millionths = 100'000'000;

/// `fail`: answer with one of `codes` (chosen like a `%` choice), without
/// forwarding; see `ends_operation` for the calls forwarded first.
struct fail_rule {
  /// The codes to answer with (`rv|rv|...`), at least one.
  std::vector<rv_code> codes;
  /// The calls answered.
  selector when;
  friend bool operator==(const fail_rule&, const fail_rule&) = default;
};

/// `hang`: block the call before forwarding it, for `bound` (then forward
/// it as usual) or, without a bound, until the process ends.
struct hang_rule {
  /// The calls blocked.
  selector when;
  /// How long (`for D`); none: until the process ends.
  std::optional<duration> bound;
  friend bool operator==(const hang_rule&, const hang_rule&) = default;
};

/// `invalidate`: every session open at this call is lost; calls on it get
/// CKR_SESSION_HANDLE_INVALID from then on.
struct invalidate_rule {
  /// The calls at which every open session is lost.
  selector when;
  friend bool operator==(const invalidate_rule&, const invalidate_rule&)
    = default;
};

/// `outage`: for `length`, every call to any function (but C_Initialize
/// and C_Finalize) gets `code`. Starts at the selected call, or at `at`
/// after load for `selector::mode::at_time`.
struct outage_rule {
  /// What every call gets during the outage.
  rv_code code = 0;
  /// The calls that start it, or (`at_time`) when it starts.
  selector when;
  /// How long it lasts (`for D`).
  duration length{};
  friend bool operator==(const outage_rule&, const outage_rule&) = default;
};

/// The kinds of injected fault, as the counts file names them.
enum class fault_kind : uint8_t {
  /// A `fail` rule answered the call.
  fail,
  /// A `hang` rule blocked the call.
  hang,
  /// An `invalidate` rule fired at the call (sessions lost).
  invalidate,
  /// The call was on a lost session: CKR_SESSION_HANDLE_INVALID.
  session_invalid,
  /// An outage answered the call.
  outage,
};

/// Number of `fault_kind` values.
inline constexpr size_t fault_kind_count = 5;

/// `fail`, `hang`, `invalidate`, `session_invalid`, `outage`.
std::string_view to_string(fault_kind kind);

/// What the shim does, per function. A default-constructed spec forwards
/// every call at once. Every per-function table is indexed as
/// `function_names`; a function's entry is its own rule, else the `*` rule,
/// else none (a zero delay).
struct spec {
  /// The delay before forwarding (every call).
  std::array<duration, function_count> delay{};

  /// The `fail` rules.
  std::array<std::optional<fail_rule>, function_count> fail{};

  /// The `hang` rules.
  std::array<std::optional<hang_rule>, function_count> hang{};

  /// The `invalidate` rules.
  std::array<std::optional<invalidate_rule>, function_count> invalidate{};

  /// The `outage` rules (the function whose call starts the outage).
  std::array<std::optional<outage_rule>, function_count> outage{};

  /// The seed of every `%` choice; none: the shim draws one at load and
  /// writes it to the counts file.
  std::optional<uint64_t> seed;

  /// The counts file; empty: none.
  std::string counts;

  /// True if any rule of `fail`, `hang`, `invalidate` or `outage` is set.
  bool injects_faults() const noexcept;

  /// True if every delay is zero, no fault rule is set and there is no
  /// counts file (a pure forwarder).
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

/// Parses a CK_RV: a `CKR_` name of PKCS#11 2.40 (case-sensitive) or a
/// hexadecimal number (`0x80000001`, for vendor codes). CKR_OK is an error:
/// it is not a fault.
parsed<rv_code> parse_rv(std::string_view text);

/// A CK_RV the spec can name.
struct named_rv {
  std::string_view name;
  rv_code code = 0;
};

/// Every `CKR_` name of PKCS#11 2.40 (p11-kit's header, without
/// CKR_VENDOR_DEFINED), CKR_OK first, in numeric order.
std::span<const named_rv> known_rvs();

/// The `CKR_` name of `rv`, or `0x` and its hexadecimal value.
std::string rv_name(rv_code rv);

/// Parses a `when` (`@N`, `@N+`, `/N`, `%P`; `@T` with a duration if
/// `allow_time`); the empty string is `every_call`. N is at least 1; P is
/// more than 0 and at most 100, with at most 6 decimals.
parsed<selector> parse_selector(std::string_view text, bool allow_time);

/// Parses a whole spec (see the grammar above). The empty string is the
/// default spec. A function named twice in one kind, a setting given twice,
/// an unknown kind, an unknown function name, `C_GetFunctionList` and a bad
/// value are errors.
parsed<spec> parse_spec(std::string_view text);

/// The spec text of a spec file: `#` starts a comment to the end of its
/// line, and every line break separates clauses (like `;`).
std::string spec_text_from_file(std::string_view content);

/// Whether call `n` of function `index` falls into a `%P` choice of `kind`
/// under `seed`: a hash of (seed, kind, index, n) below P. Holds no state, so
/// a seed selects the same calls in every run, whichever threads make them.
bool chance_hit(uint64_t seed, fault_kind kind, size_t index, uint64_t n,
                uint32_t millionths);

/// Whether `when` selects call `n` (from 1) of function `index`, for a rule
/// of `kind`. `at_time` selects no call (the shim checks outage windows
/// against the clock).
bool selects(const selector& when, uint64_t n, uint64_t seed, fault_kind kind,
             size_t index);

/// The code a `fail` rule with `codes` answers call `n` of `index` with:
/// one of them, chosen by a hash like `chance_hit` (the only one if one).
rv_code pick_code(const std::vector<rv_code>& codes, uint64_t seed,
                  size_t index, uint64_t n);

/// A duration as the spec writes it, in the largest unit that divides it
/// exactly (`2ms`, `1500us`, `0`).
std::string to_string(duration d);

/// A `when` as the spec writes it (`@3`, `@3+`, `/10`, `%0.5`, `@2s`; the
/// empty string for `every_call`).
std::string to_string(const selector& when);

/// The spec in canonical form: the settings, then one clause per kind in
/// the order delay, fail, hang, invalidate, outage; in each, the most
/// frequent value becomes `*` and the other functions are listed in
/// function order (`delay=C_Sign:2ms,C_UnwrapKey:500us`); the empty string
/// for a pure forwarder. Parsing it gives the same spec.
std::string to_string(const spec& s);

} // namespace hsm::shim
