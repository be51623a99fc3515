#pragma once

// Integration-test support: one SoftHSMv2 set-up per test run (its own
// SOFTHSM2_CONF and token folder under a fresh temporary folder), one loaded
// module for the whole process (one module per process, as in production)
// with a counting decorator on its function table, and a way to run the
// real `hsm-driver` binary.

#include "runtime/pkcs11/module.hpp"
#include "runtime/pkcs11/secret_pin.hpp"
#include "runtime/pkcs11/session.hpp"
#include "tests/support/fault_table.hpp"
#include "tests/support/process.hpp"
#include "tests/support/proxy_helpers.hpp"

#include <atomic>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::test {

/// The user PIN of every test token. Test-only.
inline constexpr std::string_view user_pin = "test-user-pin-4711";
/// The SO PIN of every test token. Test-only.
inline constexpr std::string_view so_pin = "test-so-pin-0815";

/// This run's temporary folder (removed at exit).
const std::filesystem::path& work_dir();

/// The SOFTHSM2_CONF of this run.
std::string softhsm_conf();

/// A fresh sub-folder of work_dir().
std::filesystem::path fresh_dir(std::string_view prefix);

/// A label no other test of this run uses (<= 32 characters).
std::string unique_label(std::string_view prefix);

/// The fault plan of the shared module's function table (set hooks, read
/// counts; reset the hooks at the end of a test).
std::shared_ptr<fault_plan> shared_plan();

/// The counts of the shared module's function table.
call_counts& counts();

/// The module shared by every test in this process.
pkcs11::module& shared_module();

/// A token created for one test, with a logged-in session and a master key.
struct test_token {
  std::string label;
  pkcs11::session sess;
  CK_OBJECT_HANDLE master = CK_INVALID_HANDLE;
};

/// Creates and initialises a token labelled `label`, logs in, creates the
/// master key `master_label`.
test_token make_token(const std::string& label,
                      std::string_view master_label = "hsm-driver-master");

/// A master key as tokens were set up before the master-key policy:
/// AES-256, wrap/unwrap, sensitive, not extractable, and nothing else said
/// (no unwrap template; modifiable, copyable). No row-MAC key.
CK_OBJECT_HANDLE make_legacy_master_key(pkcs11::session& sess,
                                        std::string_view label);

} // namespace hsm::test
