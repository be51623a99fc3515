#pragma once

// The daemon's TLS files over its life (README, "PKI"): checked at start
// (the driver's own certificate, then one handshake with the proxy to
// check the proxy's), an expiry warning at start and once a day, and the
// reload on SIGHUP that keeps the old files when the new ones fail.
// Called from the daemon's start and its main thread.

#include "messages/errors.hpp"
#include "runtime/net/proxy_client.hpp"
#include "runtime/net/tls_material.hpp"

#include <memory>

namespace hsm {

/// Loads and checks the client's TLS files (`net::load_client_tls`), logs
/// what is in use and warns if the certificate expires within `warn_days`.
/// A refusal names the cause (wrong_ca, expired, not_yet_valid, wrong_eku,
/// key_mismatch, unreadable).
[[nodiscard]] caf::expected<std::shared_ptr<net::tls_source>>
open_client_tls(const net::tls_files& files, int warn_days);

/// One TLS handshake with the proxy of `cfg`: refuses (with the cause:
/// wrong_ca, expired, not_yet_valid, wrong_server_name) a proxy whose
/// certificate fails the check. A proxy that cannot be reached is only a
/// warning: the poller keeps trying.
[[nodiscard]] caf::error
check_proxy_certificate(const net::proxy_client_config& cfg);

/// Logs a warning if the certificate in use expires within `warn_days`
/// (an error once it has expired).
void warn_if_expiring(const net::tls_source& source, int warn_days);

/// Loads and checks the files again (SIGHUP). On success the new set
/// replaces the old one for new connections; on failure the old one stays
/// and the refusal is logged. Returns the refusal, if any.
caf::error reload_client_tls(net::tls_source& source, int warn_days);

} // namespace hsm
