#pragma once

// OpenSSL's error queue as error values, for the TLS and PKI code. Any thread
// (OpenSSL's queue is per thread).

#include "messages/errors.hpp"

#include <string>

namespace hsm::net {

/// The oldest queued OpenSSL error as text (empty if none); clears the queue.
std::string openssl_reason();

/// `net_errc::bad_tls_material` with `what` and OpenSSL's reason, if any.
caf::error bad_tls_material(std::string what);

} // namespace hsm::net
