#pragma once

// The one parser of `host:port` addresses: the proxy the driver dials
// (`--proxy-addr`), the reference proxy's listeners (`--listen`,
// `--admin-listen`) and the metrics listener (`--metrics-listen`); and the
// one loopback test of the listeners that must stay local. Pure functions;
// any thread.

#include "messages/errors.hpp"

#include <cstdint>
#include <string>
#include <string_view>

namespace hsm::net {

/// An address split into its parts.
struct host_port {
  /// A host name or an IP address; an IPv6 address without its brackets.
  std::string host;
  /// 1-65535, or 0 where `port_zero::allowed`.
  uint16_t port = 0;
};

/// Whether port 0 is accepted: a listener may ask the kernel for a free port,
/// a client must name one.
enum class port_zero { refused, allowed };

/// Parses `host:port` or `[ipv6]:port`: no scheme, user, path or spaces, a
/// decimal port. An empty `text` is `config_errc::missing_option`, anything
/// else that is not such an address `config_errc::invalid_option`; both
/// name `option` (the flag the text came from).
[[nodiscard]] caf::expected<host_port>
parse_host_port(std::string_view text, std::string_view option,
                port_zero zero = port_zero::refused);

/// True if `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`.
[[nodiscard]] bool is_loopback_host(std::string_view host);

} // namespace hsm::net
