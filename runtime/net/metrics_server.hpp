#pragma once

// The metrics and health listener of `run` and `dev` (plain HTTP,
// cpp-httplib): `GET /metrics` (Prometheus text format), `GET /healthz`
// (200 while the actors run) and `GET /readyz` (200 when the driver can
// serve: a healthy session, the store answering, the proxy reached
// recently; else 503 with a JSON body naming what is not ready). Binds a
// loopback address unless told otherwise: it is plain HTTP without
// authentication. Bound at once (so that a taken port fails the start
// before the token is touched), served once `serve` is called; its threads
// end in `stop` or the destructor. `serve` and `stop` from one thread.

#include "messages/errors.hpp"
#include "runtime/base/metrics.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace hsm::net {

/// Where the listener binds.
struct metrics_listen {
  /// An address or a host name; loopback unless `allow_remote`.
  std::string host;
  /// 0 picks a free port (`metrics_server::port` tells which).
  uint16_t port = 0;
  /// Lets `host` be an address that is not loopback.
  bool allow_remote = false;
};

/// What the listener answers from.
struct metrics_sources {
  std::shared_ptr<const driver_metrics> metrics;
  /// Empty while the driver's actors run; else what stopped.
  std::function<std::string()> liveness;
  /// `/readyz` wants a success with the proxy within this window.
  std::chrono::milliseconds proxy_window{40000};
};

/// The listener.
class metrics_server {
public:
  /// Binds `where`; refuses an address that is not loopback unless
  /// `allow_remote` (`config_errc::invalid_option` naming `option`), and
  /// fails with `net_errc::unreachable` if the address cannot be bound.
  [[nodiscard]] static caf::expected<std::unique_ptr<metrics_server>>
  bind(const metrics_listen& where, std::string_view option);

  /// Starts answering from `src` on a thread of its own.
  void serve(metrics_sources src);

  /// The port bound.
  [[nodiscard]] uint16_t port() const noexcept;

  /// `http://HOST:PORT` as a client would name it.
  [[nodiscard]] std::string url() const;

  /// Stops answering and joins the threads. Idempotent.
  void stop();

  ~metrics_server();

private:
  metrics_server() = default;
  struct impl;
  std::unique_ptr<impl> impl_;
};

} // namespace hsm::net
