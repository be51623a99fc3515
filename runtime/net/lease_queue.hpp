#pragma once

// The reference proxy's request queue: requests in delivery order, leases
// that expire after a fixed time and make their request visible again, at
// most one accepted answer per lease, per-request state and counters for the
// admin API. Leases are 128 random bits from OpenSSL's generator and are
// bound to the client (certificate) they were handed to: an answer from any
// other is refused. Answered requests are kept for the admin API for a
// bounded time and count (`retention`), then forgotten. Bookkeeping only:
// no threads, no sockets, no JSON (a request's
// params and a driver's answer are opaque text to it), and every time
// decision reads the injected `hsm::clock`, so tests drive it with a
// `manual_clock`. Leases expire lazily: each call first expires what is due.
// Not thread-safe: its owner serialises the calls (the reference proxy holds
// one mutex around it); blocking until there is work is the owner's business,
// helped by `has_work` and `next_expiry`.

#include "runtime/base/clock.hpp"

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hsm::net {

/// Where a request is in its life.
enum class request_status : uint8_t {
  /// Visible: the next poll may lease it.
  queued,
  /// Leased to a driver until its lease expires or is answered.
  leased,
  /// Answered (a result, or an error that is not retryable).
  done,
};

/// The name the admin API shows: `queued`, `leased` or `done`.
const char* to_string(request_status x);

/// A driver's answer to a request (`POST /v1/results`).
struct request_outcome {
  /// True for a result, false for an error.
  bool ok = false;
  /// Not ok only: the request goes back to the front of the queue at once
  /// instead of being done (the error's `retryable`).
  bool retryable = false;
  /// The `result` object (ok) or the `error` object (not ok) as JSON text;
  /// stored as it is, never looked into.
  std::string body;
};

/// A request handed to a driver under a lease.
struct delivery {
  /// The request id.
  std::string id;
  /// The lease; an answer must name it.
  std::string lease;
  /// The request kind, as enqueued (`generate_key`, `sign`).
  std::string kind;
  /// The params as enqueued (JSON text).
  std::string params;
};

/// One request as the admin API shows it.
struct request_info {
  /// The request id.
  std::string id;
  /// The request kind.
  std::string kind;
  /// Queued, leased or done.
  request_status status = request_status::queued;
  /// How often it was leased.
  size_t deliveries = 0;
  /// The driver holding the lease (leased only, else empty).
  std::string driver;
  /// The accepted answer (done only).
  std::optional<request_outcome> outcome;
};

/// What `lease_queue::complete` made of an answer. Only `accepted` takes
/// effect; the others are the protocol's 409 (`lease_not_current`).
enum class completion : uint8_t {
  /// Recorded: the request is done, or queued again for a retryable error.
  accepted,
  /// No request has this id.
  unknown_request,
  /// The request has an accepted answer already.
  already_answered,
  /// The lease is current but was handed to another client: only the
  /// holder may answer under it.
  not_lease_holder,
  /// The request is not leased under this lease: the lease expired or
  /// ended with a retryable error (the request is queued or leased again),
  /// or it was never issued for this request.
  lease_not_current,
};

/// Counters of the queue (`GET /v1/admin/stats`).
struct queue_stats {
  /// Requests visible now.
  size_t queued = 0;
  /// Leases in flight now.
  size_t leased = 0;
  /// Requests answered.
  size_t done = 0;
  /// Deliveries after the first (lease expiries, retryable errors).
  size_t redelivered = 0;
  /// Answers refused (anything but `completion::accepted`).
  size_t rejected_results = 0;
  /// Leases taken back before their driver could have seen them
  /// (`lease_queue::give_back`).
  size_t given_back = 0;
  /// Answered requests forgotten (`lease_queue::retention`).
  size_t evicted = 0;
  /// Leases in flight now, per driver id.
  std::map<std::string, size_t> in_flight;
  /// Most leases ever in flight at once, per driver id.
  std::map<std::string, size_t> max_in_flight;
};

/// How long answered requests stay for the admin API to read. The oldest
/// answered request is forgotten once it is older than `keep_for` or more
/// than `keep_max` are kept; queued and leased requests are never dropped.
/// An id forgotten may be enqueued again, as a new request.
struct retention {
  std::chrono::milliseconds keep_for{std::chrono::minutes{10}};
  size_t keep_max = 100000;
};

/// Requests, leases and answers of the reference proxy.
class lease_queue {
public:
  /// The steady time the clock gives.
  using time_point = std::chrono::steady_clock::time_point;

  /// A queue whose leases last `lease_duration` as `clk` counts time. `clk`
  /// must outlive the queue.
  lease_queue(const hsm::clock& clk, std::chrono::milliseconds lease_duration,
              retention keep = {});

  // -- requests and answers ---------------------------------------------------

  /// Appends a request and returns its id: `id` if given, else a fresh one.
  /// An id that exists already, in any state, is not enqueued twice: the
  /// call returns it and changes nothing.
  std::string enqueue(std::string kind, std::string params,
                      std::optional<std::string> id = std::nullopt);

  /// Leases up to `max` visible requests to `driver`, front of the queue
  /// first, each under a fresh lease that expires `lease_duration` from now
  /// and that only `holder` (the client's certificate, as the owner names
  /// it) may answer.
  std::vector<delivery> lease(const std::string& driver, size_t max,
                              const std::string& holder = {});

  /// Records the answer to request `id` under `lease` from `holder`.
  /// Accepted only while that lease is current and from its holder; it then
  /// ends the lease.
  completion complete(const std::string& id, const std::string& lease,
                      request_outcome outcome, const std::string& holder = {});

  /// Takes back lease `lease` of request `id` as if it had never been handed
  /// out, for a lease whose poll answer could not be written to its driver:
  /// the request is visible again at the front of the queue and that
  /// delivery is not counted. False (and nothing changes) if the lease is
  /// not current. Give back the leases of one answer last to first to keep
  /// their order.
  bool give_back(const std::string& id, const std::string& lease);

  // -- time -------------------------------------------------------------------

  /// Makes every request whose lease expired visible again, at the front of
  /// the queue (earliest expiry first); returns how many. Every other call
  /// does this first.
  size_t expire();

  /// True if a poll would get a request now.
  bool has_work();

  /// The earliest expiry of a lease in flight (nullopt if none): when
  /// `has_work` may turn true without a call changing the queue.
  std::optional<time_point> next_expiry();

  // -- admin ------------------------------------------------------------------

  /// A request's state; nullopt for an unknown id.
  std::optional<request_info> find(const std::string& id);

  /// The counters.
  queue_stats stats();

private:
  struct entry {
    std::string kind;
    std::string params;
    request_status status = request_status::queued;
    size_t deliveries = 0;
    // The current lease (leased only).
    std::string lease;
    std::string driver;
    std::string holder;
    time_point expiry;
    // The answer (done only).
    request_outcome outcome;
  };

  /// Forgets answered requests beyond the retention.
  void evict(time_point now);

  /// Ends `e`'s lease (answer or expiry): drops it from the index and from
  /// its holder's in-flight count.
  void end_lease(const std::string& id, entry& e);

  const hsm::clock& clock_;
  std::chrono::milliseconds lease_duration_;
  retention keep_;
  std::unordered_map<std::string, entry> requests_;
  /// Answered requests, oldest first (when answered, id).
  std::deque<std::pair<time_point, std::string>> finished_;
  /// Visible requests in delivery order (ids).
  std::deque<std::string> queue_;
  /// Live leases by expiry (expiry, id).
  std::set<std::pair<time_point, std::string>> leases_;
  size_t done_ = 0;
  size_t redelivered_ = 0;
  size_t rejected_results_ = 0;
  size_t given_back_ = 0;
  size_t evicted_ = 0;
  std::map<std::string, size_t> in_flight_;
  std::map<std::string, size_t> max_in_flight_;
};

} // namespace hsm::net
