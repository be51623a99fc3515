#pragma once

// A PKCS#11 function table for tests: forwards every call to the real module
// (SoftHSMv2), counts the calls tests assert on, and lets a test inject a
// return value or a delay before selected calls (session closed mid-sign, a
// call that hangs past the HSM timeout, ...). Hooks are set before the
// module is loaded and read from any thread.

#include "runtime/pkcs11/function_table.hpp"
#include "runtime/pkcs11/module.hpp"

#include <atomic>
#include <functional>
#include <memory>

namespace hsm::test {

/// Call counters.
struct call_counts {
  std::atomic<int> login{0};
  std::atomic<int> open_session{0};
  std::atomic<int> generate_key_pair{0};
  std::atomic<int> unwrap_key{0};
  std::atomic<int> sign{0};
  /// C_CloseSession calls the module has answered (counted on return).
  std::atomic<int> closed_session{0};
};

/// A hook gets the 1-based number of the call; returning CKR_OK lets the
/// call through, anything else is returned instead of calling the module.
using fault_hook = std::function<CK_RV(int call_number)>;

/// Faults to inject; shared by the table and the test.
struct fault_plan {
  call_counts counts;
  fault_hook before_sign;
  fault_hook before_generate_key_pair;
  /// Before C_UnwrapKey; same contract.
  fault_hook before_unwrap;
  /// Sees the public-key template of C_GenerateKeyPair (after
  /// `before_generate_key_pair` let the call through); same contract.
  std::function<CK_RV(const CK_ATTRIBUTE* pub, CK_ULONG count)>
    check_public_template;
};

/// A decorator for `pkcs11::module::load` that installs `plan`.
pkcs11::table_decorator fault_decorator(std::shared_ptr<fault_plan> plan);

} // namespace hsm::test
