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

/// The logger of one component, created on first use.
std::shared_ptr<spdlog::logger> logger(std::string_view component);

} // namespace hsm
