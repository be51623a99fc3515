#pragma once

// Logging set-up: one named spdlog logger per component (`runtime`, `hsm`,
// `store`, later `poller`, `dispatch`), all writing to stderr. Never pass a
// PIN, a private key or a plaintext blob to a logger; log key ids, lengths
// and hash prefixes instead. `secret_pin` has no formatter on purpose.

#include "messages/errors.hpp"

#include <spdlog/logger.h>

#include <memory>
#include <string_view>

namespace hsm {

/// Sets the level of every logger (`trace` .. `critical`, `off`). An unknown
/// level is `config_errc::invalid_option` naming `--log-level`.
[[nodiscard]] caf::error init_logging(std::string_view level);

/// How every log line looks: `text` (the default:
/// `2026-12-03T03:13:01.123 info  [hsm] [req=r1] message`) or `json`: one
/// object per line, `{"ts","level","logger",...,"msg"}`, where the
/// `[key=value ...]` tags a message starts with (`req`, `session`) become
/// fields of their own, so that every line of a request's path carries its
/// request id. Unknown formats are `config_errc::invalid_option` naming
/// `--log-format`.
[[nodiscard]] caf::error set_log_format(std::string_view format);

/// One log line as the `json` format writes it (without the newline): for
/// tests, and the formatter's own use.
std::string json_log_line(std::string_view ts, std::string_view level,
                          std::string_view logger, std::string_view msg);

/// The logger of one component, created on first use.
std::shared_ptr<spdlog::logger> logger(std::string_view component);

} // namespace hsm
