#pragma once

// What the process does at start to keep its secrets (the PIN, a database
// password) in its own memory: no core file, and not dumpable, so that
// neither a crash nor a ptrace attach by another process of the same user
// reads them out, and /proc/<pid>/mem and /proc/<pid>/environ are root's.

#include "messages/errors.hpp"

namespace hsm {

/// Sets the core-file limit to 0 (soft and hard) and marks the process
/// not dumpable (`PR_SET_DUMPABLE` 0). Fails only if the kernel refuses,
/// naming which.
[[nodiscard]] caf::error harden_process();

} // namespace hsm
