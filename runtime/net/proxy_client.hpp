#pragma once

// The client side of the proxy protocol (DESIGN.md): HTTPS with a client
// certificate, the server verified against `--ca-cert`, TLS 1.3 minimum
// (1.2 with `--tls-min 1.2`), over libcurl. One `proxy_client` is one
// connection (one curl easy handle, kept alive between calls): the poller owns
// one for the long-poll and the result poster owns another, so a result never
// waits behind a poll. Not thread-safe; blocking: call it from a detached actor
// or a thread of its own. The proxy is not trusted with the driver's memory: a
// response body is read up to `max_response_bytes` (wire_codec.hpp) and a
// longer one aborts the transfer.

#include "messages/errors.hpp"
#include "runtime/net/tls_material.hpp"

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

namespace hsm::net {

/// Options of a client.
struct proxy_client_config {
  /// `host:port` of the proxy (`--proxy-addr`); IPv6 as `[::1]:8443`.
  std::string proxy_addr;
  /// Client TLS files (`--ca-cert`, `--client-cert`, `--client-key`).
  tls_files tls;
  /// The files as loaded and checked (`load_client_tls`), shared by the
  /// daemon's clients and replaced on SIGHUP; a client notices a new set
  /// before its next call and opens its next connection with it. Null:
  /// `create` reads `tls` itself, unchecked (tests present bad
  /// certificates to the proxy this way).
  std::shared_ptr<tls_source> material;
  /// This driver's id (`--driver-id`), sent with every poll and result.
  std::string driver_id;
  /// Connect (TCP + TLS) timeout.
  std::chrono::milliseconds connect_timeout{5000};
  /// Extra time allowed beyond a poll's `wait_ms` before giving up.
  std::chrono::milliseconds poll_grace{10000};
  /// Timeout of a result post.
  std::chrono::milliseconds post_timeout{15000};
  /// An idle kept-alive connection is reused only this long. libcurl counts
  /// idle time in whole seconds, rounded down, so a connection idle for
  /// up to `max_idle` + 1 s (exclusive) is still reused: keep
  /// `max_idle + 1 s` below the proxy's idle timeout (the reference proxy's
  /// is 3 s: 1 + 1 < 3). A connection that died anyway is replaced at once,
  /// if no byte of an answer came back on it.
  std::chrono::seconds max_idle{1};
  /// Accept TLS 1.2 (`--tls-min 1.2`) for a proxy that cannot speak 1.3;
  /// by default TLS 1.3 is the minimum.
  bool allow_tls12 = false;
  /// An HTTPS proxy to reach the proxy through (`--https-proxy`); empty:
  /// none, whatever `https_proxy`, `HTTPS_PROXY` or `ALL_PROXY` say (a
  /// variable left in a service's environment must not reroute its
  /// traffic).
  std::string https_proxy;
};

/// An HTTP answer.
struct http_reply {
  long status = 0;
  std::string body;
};

/// What the poller and the result poster need of a connection to the
/// proxy. `proxy_client` is the real one; actor tests script their own.
/// Blocking; one caller at a time.
class proxy_link {
public:
  virtual ~proxy_link() = default;

  /// `POST /v1/poll` for at most `max` requests, waiting up to `wait`.
  [[nodiscard]] virtual caf::expected<http_reply>
  poll(size_t max, std::chrono::milliseconds wait) = 0;

  /// `POST /v1/results` with a JSON body.
  [[nodiscard]] virtual caf::expected<http_reply>
  post_result(const std::string& body) = 0;

  /// This driver's id, sent with every poll and result.
  [[nodiscard]] virtual const std::string& driver_id() const = 0;
};

/// One HTTPS connection to the proxy.
class proxy_client : public proxy_link {
public:
  /// Checks the files exist and are readable (an error names the option),
  /// and prepares the handle. Does not connect yet.
  [[nodiscard]] static caf::expected<std::unique_ptr<proxy_client>>
  create(const proxy_client_config& cfg);

  ~proxy_client() override;
  proxy_client(const proxy_client&) = delete;
  proxy_client& operator=(const proxy_client&) = delete;

  /// `POST /v1/poll {"driver_id","max","wait_ms"}`, `max` cut to
  /// `max_poll_requests`. Returns the reply on any HTTP status; transport
  /// failures are `net_errc::unreachable` (retry with backoff) or
  /// `net_errc::tls_failed` (certificate problems, with a named cause
  /// where one is known: `cause_of` gives `wrong_ca`, `expired`,
  /// `not_yet_valid` or `wrong_server_name` for the proxy's certificate,
  /// and for a client certificate the proxy refused, `wrong_ca`,
  /// `expired`, `wrong_eku` or `other` from its alert); a body longer than
  /// `max_response_bytes` is `net_errc::bad_response` (back off too).
  [[nodiscard]] caf::expected<http_reply>
  poll(size_t max, std::chrono::milliseconds wait) override;

  /// `POST /v1/results` with a JSON body (see wire_codec.hpp). Returns
  /// the reply on any HTTP status (200 accepted, 409 lease expired or already
  /// answered); transport failures as for `poll`.
  [[nodiscard]] caf::expected<http_reply>
  post_result(const std::string& body) override;

  /// Connects and completes the TLS handshake, nothing more: checks the
  /// proxy's certificate (its CA, validity and name) before the first
  /// call. A failure is as for `poll`. The connection it opens is not used
  /// for calls: use a client of its own.
  [[nodiscard]] caf::error handshake();

  /// `config().driver_id`.
  [[nodiscard]] const std::string& driver_id() const override;

  /// The configuration.
  const proxy_client_config& config() const noexcept;

  /// Calls sent again at once because the kept-alive connection they went
  /// out on had died while idle: it failed on first use (send error,
  /// receive error, nothing received) before any byte of an answer arrived.
  /// A call that failed after part of an answer came is never sent again
  /// (the proxy may have acted on it).
  [[nodiscard]] uint64_t reconnects() const noexcept;

private:
  proxy_client() = default;
  struct impl;
  std::unique_ptr<impl> impl_;
};

} // namespace hsm::net
