#pragma once

// The reference proxy: the remote side of the protocol, for the dev mode,
// the tests and the benchmarks. An mTLS server (cpp-httplib over OpenSSL)
// over a `lease_queue` (requests, leases, redelivery when a lease expires,
// at-most-once acceptance of a result per lease); plus an admin API on a
// listener of its own (plain HTTP on loopback) to enqueue requests and read
// results and statistics. This layer only speaks HTTP and JSON and blocks
// long-polls. Each leased request carries `lease_ms` (how long its lease
// lasts); `POST /v1/results` takes one result, or a batch
// `{"driver_id","results":[...]}` answered with a status per result
// (`accepted`, `lease_not_current`, `bad_request`). Thread-safe: the servers
// run on their own threads; the in-process methods may be called from any
// thread.

#include "messages/errors.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/net/lease_queue.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

namespace hsm::net {

/// Options of the reference proxy.
struct reference_proxy_config {
  /// Listen address of the driver-facing mTLS listener.
  std::string host = "127.0.0.1";
  /// Its port; 0 picks a free one (see `port()`).
  uint16_t port = 0;
  /// Listen address of the admin listener (keep it on loopback).
  std::string admin_host = "127.0.0.1";
  /// Its port; 0 picks a free one.
  uint16_t admin_port = 0;
  /// Server certificate chain, key, and the CA that must sign clients.
  std::filesystem::path server_cert;
  std::filesystem::path server_key;
  std::filesystem::path client_ca;
  /// How long a lease lasts before the request is visible again.
  std::chrono::milliseconds lease_duration{30000};
  /// Upper bound on a poll's `wait_ms`.
  std::chrono::milliseconds max_wait{30000};
  /// Largest request body accepted, in bytes.
  size_t max_body = 1 << 20;
  /// Worker threads of the driver-facing listener. Each open connection
  /// (a driver's long-poll, its result connection) holds one while it is
  /// kept alive, so this bounds the connections served at once.
  size_t worker_threads = 32;
  /// How long an idle kept-alive connection stays open. cpp-httplib checks
  /// for shutdown only between requests, so `stop()` may wait this long
  /// for a connected but idle client.
  std::chrono::seconds idle_timeout{2};
  /// The clock of leases and long-poll deadlines; null for `real_clock()`.
  /// Must outlive the proxy. With a `manual_clock`, call
  /// `reference_proxy::clock_advanced` after moving it.
  const hsm::clock* clock = nullptr;
};

/// Queue counters (`GET /v1/admin/stats`).
using proxy_stats = queue_stats;

/// The running proxy. Stops and joins its threads on destruction.
class reference_proxy {
public:
  /// Starts both listeners; fails with `net_errc::bad_tls_material` if the
  /// TLS files do not load, `net_errc::unreachable` if a port cannot be bound.
  [[nodiscard]] static caf::expected<std::unique_ptr<reference_proxy>>
  start(const reference_proxy_config& cfg);

  ~reference_proxy();
  reference_proxy(const reference_proxy&) = delete;
  reference_proxy& operator=(const reference_proxy&) = delete;

  /// The driver-facing port.
  uint16_t port() const noexcept;
  /// The admin port.
  uint16_t admin_port() const noexcept;

  /// Enqueues a request (same as `POST /v1/admin/requests`); returns its id.
  /// An id that exists already is not enqueued twice.
  std::string enqueue(const std::string& kind, const nlohmann::json& params,
                      std::optional<std::string> id = std::nullopt);

  /// A request's state as `GET /v1/admin/requests/{id}` shows it; nullopt
  /// for an unknown id.
  std::optional<nlohmann::json> request_state(const std::string& id) const;

  /// Counters.
  proxy_stats stats() const;

  /// Long-polls waiting for work now (a test's way to know a poll arrived).
  size_t waiting_polls() const;

  /// Makes waiting long-polls read the clock again at once: with a
  /// `manual_clock`, call it after `advance` so that leases that expired and
  /// deadlines that passed take effect without waiting out real time. Not
  /// needed with the real clock.
  void clock_advanced();

  /// Stops both listeners (idempotent).
  void stop();

private:
  reference_proxy() = default;
  struct impl;
  std::unique_ptr<impl> impl_;
};

} // namespace hsm::net
