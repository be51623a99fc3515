#pragma once

// The daemon: sets up the token (token_setup.hpp: module, login, master
// key, store, guard, capability probe), then starts the actor tree
// (storage, poster, dispatcher, session supervisor, poller) and serves until
// stopped. `stop` drains: stop polling, finish or hand back in-flight work
// within the drain timeout, post the results, end the sessions in their own
// actors, and finalise the module last -- unless an HSM call is stuck, see
// `stop_status`.

#include "messages/errors.hpp"
#include "messages/interfaces.hpp"
#include "runtime/app/config.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/net/metrics_server.hpp"
#include "runtime/net/proxy_client.hpp"
#include "runtime/net/tls_material.hpp"
#include "runtime/pkcs11/module.hpp"

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace hsm {

/// Everything `hsm-driver run` takes.
struct daemon_options {
  driver_config cfg;
  net::proxy_client_config proxy;
  size_t sessions = 2;
  /// Leases held per healthy session (`--pipeline`).
  size_t pipeline = 2;
  std::chrono::milliseconds hsm_timeout{10000};
  std::chrono::milliseconds drain_timeout{30000};
  std::chrono::milliseconds poll_wait{20000};
  /// How long `stop` waits for HSM calls abandoned after a timeout to
  /// return. If one is still stuck then, `stop` leaves the module loaded
  /// and reports `stop_status::hsm_call_stuck`.
  std::chrono::milliseconds abandon_grace{5000};
  /// Called once when the driver cannot go on (the module lost the token for
  /// good); `run` logs it, stops and exits with status 1.
  std::function<void(const std::string&)> on_fatal;
  /// Wraps the module's function table (fault-injection tests only).
  pkcs11::table_decorator decorate;
  /// Warn when the client certificate expires within this many days
  /// (`--cert-warn-days`), at start and once a day.
  int cert_warn_days = net::default_cert_warn_days;

  /// `--metrics-listen`: where `/metrics`, `/healthz` and `/readyz` are
  /// served; none: nowhere (the metrics are kept all the same).
  std::optional<net::metrics_listen> metrics_listen;
};

/// How long `/readyz` accepts since the last success with the proxy: twice
/// the poll wait, at least 5 s.
inline std::chrono::milliseconds
proxy_ready_window(std::chrono::milliseconds poll_wait) {
  return std::max(2 * poll_wait, std::chrono::milliseconds{5000});
}

/// How `daemon::stop` ended.
enum class stop_status {
  /// Every actor finished, every session closed, the module was finalised.
  clean,
  /// An HSM call abandoned after a timeout was still running inside the
  /// module after `abandon_grace`. Finalising the module (or closing
  /// sessions) under a busy session can crash it, so the module, its
  /// sessions and the actor system were deliberately left alive until the
  /// process exits; no C_Finalize. `run` exits with status 1.
  hsm_call_stuck,
};

/// A running daemon.
class daemon {
public:
  /// Starts everything; refuses to start (with the reason) if the token's
  /// master key does not match the store, or no scheme can be served.
  [[nodiscard]] static caf::expected<std::unique_ptr<daemon>>
  start(const daemon_options& opts);

  /// Drains and stops. Idempotent: a second call returns the first
  /// outcome.
  [[nodiscard]] stop_status stop();

  /// Fault tests only: ends one of the daemon's actors (`store`, `result
  /// poster`, `dispatcher`, `poller`) as a crash would, to show that the
  /// daemon does not go on without it (`daemon_options::on_fatal`).
  [[nodiscard]] caf::error kill_part_for_test(std::string_view part);

  /// The dispatcher's counters.
  [[nodiscard]] caf::expected<dispatcher_stats> stats();

  /// Loads and checks the TLS files again (SIGHUP): new connections use
  /// them, requests in flight finish on theirs. A set that fails the check
  /// is refused (logged and returned) and the old one stays.
  caf::error reload_tls();

  /// Logs a warning if the client certificate expires within
  /// `cert_warn_days`.
  void check_cert_expiry();

  /// Serves until SIGTERM or SIGINT (returned): reloads the TLS files on
  /// SIGHUP and checks the certificate's expiry once a day.
  int serve_until_stop_signal();

  /// The metrics; a certificate reload sets the client certificate's
  /// expiry here (`set_client_certificate_expiry`).
  [[nodiscard]] std::shared_ptr<driver_metrics> metrics() const;

  /// `http://HOST:PORT` of the metrics listener; none without one.
  [[nodiscard]] std::optional<std::string> metrics_url() const;

  ~daemon();

private:
  daemon() = default;
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// How long `run` lets start-up take (opening the token, the store, the
/// master-key guard, the probe) before it gives up on a hung HSM or
/// database: 30 s plus three HSM timeouts.
inline std::chrono::milliseconds
startup_deadline(std::chrono::milliseconds hsm_timeout) {
  return std::chrono::milliseconds{30000} + 3 * hsm_timeout;
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and every
/// thread it starts afterwards), so that the main thread takes them with
/// `sigwait` (and SIGHUP never ends the process). Call first thing, before
/// any thread exists.
void block_stop_signals();

/// Waits for SIGTERM or SIGINT; returns the signal number.
int wait_for_stop_signal();

/// Waits up to `timeout` for SIGTERM, SIGINT or SIGHUP; returns the signal
/// number, or 0 when none came.
int wait_for_signal(std::chrono::milliseconds timeout);

/// Waits up to `timeout` for SIGTERM or SIGINT; returns the signal number,
/// or 0 when none came.
int wait_for_stop_signal(std::chrono::milliseconds timeout);

} // namespace hsm
