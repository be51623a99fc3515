#include "runtime/net/host_port.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <optional>

namespace hsm::net {

namespace {

/// The port's value if `text` is 1 to 5 decimal digits naming 0-65535.
std::optional<uint16_t> parse_port(std::string_view text) {
  if (text.empty() || text.size() > 5)
    return std::nullopt;
  unsigned value = 0;
  for (auto c : text) {
    if (c < '0' || c > '9')
      return std::nullopt;
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  if (value > 65535)
    return std::nullopt;
  return static_cast<uint16_t>(value);
}

} // namespace

caf::expected<host_port> parse_host_port(std::string_view text,
                                         std::string_view option,
                                         port_zero zero) {
  std::string opt{option};
  if (text.empty())
    return caf::make_error(config_errc::missing_option, opt,
                           "no address: pass " + opt + " host:port");
  auto invalid = [&](std::string_view why) {
    return caf::make_error(config_errc::invalid_option, opt,
                           "'" + std::string{text} + "' " + std::string{why}
                             + " (expected host:port or [ipv6]:port)");
  };
  for (auto c : text)
    if (c == '/' || c == '@' || c == '?' || c == '#' || c == ' ' || c == '\\'
        || static_cast<unsigned char>(c) < 0x21
        || static_cast<unsigned char>(c) > 0x7e)
      return invalid("holds a character not allowed in an address");
  std::string_view host;
  std::string_view port;
  if (text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size()
        || text[close + 1] != ':')
      return invalid("is not [ipv6]:port");
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
    if (host.find(':') == std::string_view::npos)
      return invalid("has brackets around a name that is not IPv6");
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos)
      return invalid("has no port");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos)
      return invalid("looks like an IPv6 address without brackets");
    if (host.find_first_of("[]") != std::string_view::npos)
      return invalid("has a stray bracket");
  }
  if (host.empty())
    return invalid("has no host");
  auto value = parse_port(port);
  if (!value || (*value == 0 && zero == port_zero::refused))
    return invalid(zero == port_zero::refused
                     ? "has no valid port (1-65535)"
                     : "has no valid port (0-65535; 0 picks a free one)");
  return host_port{std::string{host}, *value};
}

bool is_loopback_host(std::string_view host) {
  if (host == "localhost")
    return true;
  std::string text{host};
  in_addr v4{};
  if (::inet_pton(AF_INET, text.c_str(), &v4) == 1)
    return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  return ::inet_pton(AF_INET6, text.c_str(), &v6) == 1
         && IN6_IS_ADDR_LOOPBACK(&v6);
}

} // namespace hsm::net
