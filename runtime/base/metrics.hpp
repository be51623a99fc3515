#pragma once

// The driver's Prometheus metrics (prometheus-cpp's core library) and the
// state its health checks read. One instance per daemon, shared by the
// actors that update it and the HTTP listener that serves it
// (runtime/net/metrics_server.hpp). Thread-safe: every update is an atomic
// operation on a series made at construction (prometheus-cpp's histograms
// take a short mutex of their own per observation); only the PKCS#11 error
// counter adds a labelled series on first use of a CKR name, on the error
// path. No label ever carries a key id, a request id or anything secret:
// every label value comes from a fixed set, so the number of series is
// bounded. The README's "Metrics and health" lists every metric.

#include "messages/job.hpp"

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace hsm {

/// A stage of a request whose duration is measured
/// (`hsm_driver_stage_duration_seconds{stage}`).
enum class request_stage : uint8_t {
  /// Looked up, waiting for a free healthy session.
  queue_wait,
  /// One call to a session (generate, or sign with unwrap and verify).
  hsm,
  /// One call to the key store (a lookup, or the put of a new key).
  store,
  /// From the answer being ready until the poster settled it (the audit
  /// append and the `POST /v1/results` included).
  post,
};

/// Why a poll failed (`hsm_driver_poll_errors_total{reason}`).
enum class poll_error : uint8_t {
  /// No answer: connection, TLS or timeout.
  unreachable,
  /// An HTTP status other than 200.
  http_status,
  /// A 200 whose body is not a poll answer.
  bad_response,
};

/// Why a post of results failed (`hsm_driver_post_errors_total{reason}`).
enum class post_error : uint8_t {
  /// No answer: connection, TLS or timeout (retried).
  unreachable,
  /// A 5xx (retried).
  server_error,
  /// Refused for good (a 4xx other than 409, or `refused` in a batch).
  refused,
  /// The answer to a batch does not parse.
  bad_response,
};

/// Which key store operation failed (`hsm_driver_store_errors_total`).
enum class store_op : uint8_t { get, put, audit, ping };

/// Which of the driver's store connections (`hsm_driver_store_up`).
enum class store_role : uint8_t {
  /// Key lookups and puts.
  keys,
  /// The audit trail's appends.
  audit,
};

/// What `/readyz` reports as not ready: a component and why.
struct not_ready {
  std::string component;
  std::string reason;
};

/// The metrics of one daemon.
class driver_metrics {
public:
  /// Makes every metric; `sessions` is `--sessions`.
  explicit driver_metrics(size_t sessions);
  ~driver_metrics();
  driver_metrics(const driver_metrics&) = delete;
  driver_metrics& operator=(const driver_metrics&) = delete;

  // -- requests ---------------------------------------------------------------

  /// Counts one answered request. `kind` is none for a request that was
  /// refused before it became a job (counted as `invalid`); `outcome` is
  /// `ok` or the answer's wire code (an unknown code counts as `other`).
  void count_request(const job_kind* kind, std::string_view outcome);

  /// Records that `stage` of a request took `seconds`.
  void observe(request_stage stage, double seconds);

  /// Records the time from `since` until now for `stage`.
  void observe_since(request_stage stage,
                     std::chrono::steady_clock::time_point since);

  // -- sessions, credits, leases ----------------------------------------------

  /// The dispatcher's view: sessions up, credits it could give now, leases
  /// held (from the poll until the result is posted).
  void set_dispatch_state(size_t healthy_sessions, int64_t credits,
                          size_t leases_held);

  /// Counts one session started again after its predecessor ended.
  void count_session_restart();

  /// Counts one PKCS#11 call that failed: `function` such as `C_Sign`,
  /// `rv_name` such as `CKR_DEVICE_ERROR`. Names outside the standard
  /// spelling (vendor-defined or unknown values) count as `other`.
  void count_pkcs11_error(std::string_view function, std::string_view rv_name);

  // -- the proxy --------------------------------------------------------------

  /// The proxy answered (a poll with 200, or a post that was not a
  /// transport or server error).
  void proxy_reached();

  void count_poll_error(poll_error why);
  void count_post_error(post_error why);

  // -- the store --------------------------------------------------------------

  /// A store operation on the `role` connection succeeded (or failed).
  void store_answered(store_role role, bool ok);

  void count_store_error(store_op op);

  // -- the client certificate -------------------------------------------------

  /// The `notAfter` of `--client-cert`, Unix seconds. Set at start; a
  /// certificate reload sets it again.
  void set_client_certificate_expiry(int64_t unix_seconds);

  // -- health -----------------------------------------------------------------

  /// The driver is stopping: no longer ready.
  void set_stopping();

  /// What keeps the driver from being ready now: fewer than one healthy
  /// session, a store connection whose last operation failed, no success
  /// with the proxy within `proxy_window` (or none yet), stopping. Empty
  /// when ready.
  [[nodiscard]] std::vector<not_ready>
  readiness(std::chrono::milliseconds proxy_window) const;

  // -- exposition -------------------------------------------------------------

  /// Every metric in the Prometheus text format (version 0.0.4).
  [[nodiscard]] std::string text() const;

  /// Reads one series' value, for tests and readiness: `name` is the
  /// metric's name, `labels` its labels in any order; -1 when there is no
  /// such series. A histogram answers its sample count.
  [[nodiscard]] double value(
    std::string_view name,
    const std::vector<std::pair<std::string, std::string>>& labels = {}) const;

private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

} // namespace hsm
