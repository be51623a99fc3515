#pragma once

// What a subcommand prints and how the process ends (README, "Command
// line"): one JSON document on stdout, logs on stderr, and an exit code of
// 0 (ok), 1 (the operation failed) or 2 (bad usage or configuration).
// Called from the main thread only.

#include "messages/errors.hpp"
#include "messages/results.hpp"

#include <nlohmann/json.hpp>

namespace hsm {

/// Exit code: the command did what it was asked.
inline constexpr int exit_ok = 0;
/// Exit code: the operation failed (the token, the store, the proxy, a
/// request), or `run` stopped because it could not go on.
inline constexpr int exit_failed = 1;
/// Exit code: bad usage or configuration.
inline constexpr int exit_usage = 2;

/// Prints `j` on stdout, indented by two spaces. Documents are
/// `ordered_json`: keys print in the order they were set.
void print(const nlohmann::ordered_json& j);

/// Logs `err`, prints `{"ok": false, "error": {code, message, retryable}}`
/// and returns its exit code: `exit_usage` for a configuration error,
/// `exit_failed` for any other.
[[nodiscard]] int fail(const caf::error& err);

/// A key as the command line prints it: the wire form
/// (`net::to_json(key_result)`) and `created_at_ms`.
nlohmann::ordered_json key_json(const key_result& key);

} // namespace hsm
