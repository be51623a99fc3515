#pragma once

// The reference proxy: the remote side of the protocol, for the dev mode,
// the tests and the benchmarks. An mTLS server (cpp-httplib over OpenSSL)
// over a `lease_queue` (requests, leases, redelivery when a lease expires,
// at-most-once acceptance of a result per lease, only from the client
// certificate the lease was handed to); plus an admin API on a listener of
// its own (plain HTTP, loopback only unless allowed) to enqueue requests and
// read results and statistics. Every admin call needs the bearer token, a
// `Host` naming the loopback listener, and POSTs a JSON `Content-Type`, so
// that neither another local user nor a web page in a browser on this host
// can drive it. This layer only speaks HTTP and JSON and blocks long-polls.
// Each leased request carries `lease_ms` (how long its lease lasts);
// `POST /v1/results` takes one result, or a batch
// `{"driver_id","results":[...]}` answered with a status per result
// (`accepted`, `lease_not_current`, `forbidden`, `bad_request`). A long-poll
// whose client has gone (closed or reset its connection: a driver killed
// with -9) gets no lease: the proxy checks the connection every
// `client_check_interval` while the poll waits and right before it leases,
// and takes the leases of an answer back when the answer cannot be written.
// For tests of the driver's side it injects faults into its poll answers on
// request (`poll_fault`, in process or through `/v1/admin/faults`).
// Thread-safe: the servers run on their own threads; the in-process methods
// may be called from any thread.

#include "messages/errors.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/net/lease_queue.hpp"
#include "runtime/net/wire_codec.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace hsm::net {

/// Options of the reference proxy.
struct reference_proxy_config {
  /// Listen address of the driver-facing mTLS listener.
  std::string host = "127.0.0.1";
  /// Its port; 0 picks a free one (see `port()`).
  uint16_t port = 0;
  /// Listen address of the admin listener: a loopback address unless
  /// `admin_remote` is set.
  std::string admin_host = "127.0.0.1";
  /// Its port; 0 picks a free one.
  uint16_t admin_port = 0;
  /// Lets the admin listener bind an address that is not loopback (plain
  /// HTTP: put it behind TLS). Off by default: `start` refuses such an
  /// address.
  bool admin_remote = false;
  /// The bearer token every admin call must carry
  /// (`Authorization: Bearer <token>`); empty: `start` makes a random one
  /// (`admin_token()`).
  std::string admin_token;
  /// How long answered requests stay readable through the admin API.
  retention keep;
  /// Accept TLS 1.2 from drivers; by default TLS 1.3 is the minimum.
  bool allow_tls12 = false;
  /// Upper bound on `GET /v1/admin/requests/{id}?wait_ms=`.
  std::chrono::milliseconds max_admin_wait{60000};
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
  /// for a connected but idle client. The driver reuses an idle connection
  /// for less than its `max_idle` + 1 s (libcurl counts whole seconds), so
  /// this stays above that: 3 s against the driver's 1 + 1 s.
  std::chrono::seconds idle_timeout{3};
  /// How often a waiting long-poll checks that its client is still
  /// connected (the check also runs right before any lease).
  std::chrono::milliseconds client_check_interval{100};
  /// `poll_fault::slow_body`: the answer goes out in this many pieces,
  /// `slow_body_delay` apart.
  size_t slow_body_pieces = 10;
  std::chrono::milliseconds slow_body_delay{100};
  /// `poll_fault::oversized_body`: the answer's size; by default 1 MiB more
  /// than the driver reads (`max_response_bytes`).
  size_t oversized_body_bytes = max_response_bytes + (1 << 20);
  /// `poll_fault::over_delivery`: how many requests beyond the poll's `max`
  /// it leases and lists.
  size_t over_delivery_extra = 2;
  /// The clock of leases and long-poll deadlines; null for `real_clock()`.
  /// Must outlive the proxy. With a `manual_clock`, call
  /// `reference_proxy::clock_advanced` after moving it.
  const hsm::clock* clock = nullptr;
};

/// Queue and proxy counters (`GET /v1/admin/stats`).
struct proxy_stats : queue_stats {
  /// Long-polls that ended because their client had gone (closed or reset
  /// its connection) before anything was leased to it.
  size_t dead_polls = 0;
  /// Poll answers that carried an injected fault.
  size_t faulted_polls = 0;
};

/// A client certificate the driver-facing listener has seen
/// (`GET /v1/admin/clients`).
struct client_cert_seen {
  /// Subject and issuer (RFC 2253), serial (hex), notAfter.
  std::string subject;
  std::string issuer;
  std::string serial;
  std::string not_after;
  /// Polls and result posts made with it.
  size_t polls = 0;
  size_t results = 0;
};

/// A client certificate the driver-facing listener refused in the
/// handshake (`GET /v1/admin/clients`, `"refused"`).
struct client_cert_refused {
  /// Subject and serial of the certificate presented.
  std::string subject;
  std::string serial;
  /// The cause's name (`wrong_ca`, `expired`, `not_yet_valid`,
  /// `wrong_eku`, `other`; tls_material.hpp) and OpenSSL's reason.
  std::string cause;
  std::string reason;
  /// The handshake it came from (identity only, never dereferenced).
  const void* handshake = nullptr;
};

/// A fault the reference proxy injects into one answer to `POST /v1/poll`,
/// for tests of the driver's side. Each takes the place of one answer; the
/// poll is otherwise served as usual (it waits for work, leases up to
/// `max`). The faults that break the answer keep its leases, as a proxy
/// would that does not know what the driver received: the requests are
/// redelivered when the leases expire.
enum class poll_fault : uint8_t {
  /// Leases, sends the status line, the headers and half the body, then
  /// resets the connection (TCP RST). Leases kept.
  reset,
  /// Answers 503 at once with a JSON error; leases nothing.
  server_error,
  /// Leases and sends a correct answer in `slow_body_pieces` pieces,
  /// `slow_body_delay` apart. If the driver gave up meanwhile, the leases
  /// are taken back like those of any answer that cannot be written.
  slow_body,
  /// Leases and answers 200 with a body that is not JSON (markup, control
  /// characters, terminal escapes, a NUL, bytes that are not UTF-8).
  /// Leases kept.
  garbage_body,
  /// Leases and lists every leased request twice (same id, same lease).
  duplicate_delivery,
  /// Leases and answers with a valid answer padded to
  /// `oversized_body_bytes`. Leases kept.
  oversized_body,
  /// Leases `over_delivery_extra` requests more than the poll's `max` and
  /// lists them all.
  over_delivery,
};

/// The fault's name in the admin API: `reset`, `server_error`, `slow_body`,
/// `garbage_body`, `duplicate_delivery`, `oversized_body`, `over_delivery`.
const char* to_string(poll_fault x);

/// The fault named `name`; nullopt for an unknown name.
std::optional<poll_fault> parse_poll_fault(std::string_view name);

/// The admin token in `path`, read as a secret file (`read_secret_file`:
/// 0600, this user's, no symbolic link); if there is no such file, a fresh
/// random token (256 bits from OpenSSL, in hex) written there 0600.
[[nodiscard]] caf::expected<std::string>
load_or_create_admin_token(const std::filesystem::path& path);

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
  /// The bearer token of the admin API.
  const std::string& admin_token() const noexcept;

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

  /// The client certificates seen so far, first seen first (same as
  /// `GET /v1/admin/clients`). Each is logged at info level when first
  /// seen.
  std::vector<client_cert_seen> clients() const;

  /// The client certificates refused in the handshake, oldest first (at
  /// most the last 100; `GET /v1/admin/clients` lists them as
  /// `"refused"`). Each is logged at warn level.
  std::vector<client_cert_refused> refused_clients() const;

  // -- fault injection (same as `/v1/admin/faults`) ---------------------------

  /// Injects `fault` into the next `polls` answers to `POST /v1/poll`, after
  /// the faults queued already (`POST /v1/admin/faults`).
  void inject(poll_fault fault, size_t polls = 1);

  /// Drops every queued fault (`DELETE /v1/admin/faults`).
  void clear_faults();

  /// The faults still queued, next first (`GET /v1/admin/faults`).
  std::vector<poll_fault> pending_faults() const;

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
