#pragma once

// What the driver reads from its own certificate files for monitoring.
// Pure functions over files; any thread.

#include "messages/errors.hpp"

#include <cstdint>
#include <filesystem>

namespace hsm::net {

/// The `notAfter` of the first certificate in the PEM file at `path` (the
/// leaf of a chain), in Unix seconds; `net_errc::bad_tls_material` if the
/// file holds no readable certificate.
[[nodiscard]] caf::expected<int64_t>
certificate_not_after(const std::filesystem::path& path);

} // namespace hsm::net
