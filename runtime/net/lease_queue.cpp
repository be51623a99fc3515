#include "runtime/net/lease_queue.hpp"

#include "runtime/crypto/hex.hpp"

#include <algorithm>
#include <cstdlib>

namespace hsm::net {

const char* to_string(request_status x) {
  switch (x) {
    case request_status::queued:
      return "queued";
    case request_status::leased:
      return "leased";
    case request_status::done:
      return "done";
  }
  return "unknown";
}

namespace {

/// `prefix` and 128 random bits from OpenSSL's generator, in hex: leases
/// cannot be guessed, and ids of requests enqueued without one do not
/// collide.
std::string random_token(const char* prefix) {
  return prefix + crypto::random_hex(16);
}

} // namespace

lease_queue::lease_queue(const hsm::clock& clk,
                         std::chrono::milliseconds lease_duration,
                         retention keep)
  : clock_(clk), lease_duration_(lease_duration), keep_(keep) {
  // nop
}

// -- requests and answers -----------------------------------------------------

std::string lease_queue::enqueue(std::string kind, std::string params,
                                 std::optional<std::string> id) {
  expire();
  if (id && requests_.count(*id) > 0)
    return *id;
  if (!id) {
    do {
      id = random_token("req-");
    } while (requests_.count(*id) > 0);
  }
  entry e;
  e.kind = std::move(kind);
  e.params = std::move(params);
  requests_.emplace(*id, std::move(e));
  queue_.push_back(*id);
  return *id;
}

std::vector<delivery> lease_queue::lease(const std::string& driver, size_t max,
                                         const std::string& holder) {
  expire();
  std::vector<delivery> out;
  auto now = clock_.steady_now();
  while (!queue_.empty() && out.size() < max) {
    auto id = std::move(queue_.front());
    queue_.pop_front();
    auto& e = requests_.at(id);
    e.status = request_status::leased;
    e.lease = random_token("lease-");
    e.driver = driver;
    e.holder = holder;
    e.expiry = now + lease_duration_;
    if (++e.deliveries > 1)
      ++redelivered_;
    leases_.emplace(e.expiry, id);
    auto n = ++in_flight_[driver];
    auto& peak = max_in_flight_[driver];
    peak = std::max(peak, n);
    out.push_back(delivery{std::move(id), e.lease, e.kind, e.params});
  }
  return out;
}

completion
lease_queue::complete(const std::string& id, const std::string& lease,
                      request_outcome outcome, const std::string& holder) {
  expire();
  auto it = requests_.find(id);
  if (it == requests_.end()) {
    ++rejected_results_;
    return completion::unknown_request;
  }
  auto& e = it->second;
  if (e.status == request_status::done) {
    ++rejected_results_;
    return completion::already_answered;
  }
  if (e.status != request_status::leased || e.lease != lease) {
    ++rejected_results_;
    return completion::lease_not_current;
  }
  if (e.holder != holder) {
    ++rejected_results_;
    return completion::not_lease_holder;
  }
  end_lease(id, e);
  if (!outcome.ok && outcome.retryable) {
    // A retryable failure: visible again at once, to any driver.
    e.status = request_status::queued;
    queue_.push_front(id);
  } else {
    e.status = request_status::done;
    e.outcome = std::move(outcome);
    ++done_;
    finished_.emplace_back(clock_.steady_now(), id);
    evict(clock_.steady_now());
  }
  return completion::accepted;
}

bool lease_queue::give_back(const std::string& id, const std::string& lease) {
  expire();
  auto it = requests_.find(id);
  if (it == requests_.end())
    return false;
  auto& e = it->second;
  if (e.status != request_status::leased || e.lease != lease)
    return false;
  end_lease(id, e);
  e.status = request_status::queued;
  if (e.deliveries > 1)
    --redelivered_;
  if (e.deliveries > 0)
    --e.deliveries;
  queue_.push_front(id);
  ++given_back_;
  return true;
}

// -- time ---------------------------------------------------------------------

size_t lease_queue::expire() {
  auto now = clock_.steady_now();
  std::vector<std::string> expired;
  while (!leases_.empty() && leases_.begin()->first <= now) {
    auto id = leases_.begin()->second;
    auto& e = requests_.at(id);
    end_lease(id, e);
    e.status = request_status::queued;
    expired.push_back(std::move(id));
  }
  queue_.insert(queue_.begin(), expired.begin(), expired.end());
  evict(now);
  return expired.size();
}

void lease_queue::evict(time_point now) {
  while (!finished_.empty()
         && (finished_.size() > keep_.keep_max
             || now - finished_.front().first >= keep_.keep_for)) {
    requests_.erase(finished_.front().second);
    finished_.pop_front();
    ++evicted_;
  }
}

bool lease_queue::has_work() {
  expire();
  return !queue_.empty();
}

std::optional<lease_queue::time_point> lease_queue::next_expiry() {
  expire();
  if (leases_.empty())
    return std::nullopt;
  return leases_.begin()->first;
}

// -- admin --------------------------------------------------------------------

std::optional<request_info> lease_queue::find(const std::string& id) {
  expire();
  auto it = requests_.find(id);
  if (it == requests_.end())
    return std::nullopt;
  const auto& e = it->second;
  request_info out;
  out.id = id;
  out.kind = e.kind;
  out.status = e.status;
  out.deliveries = e.deliveries;
  out.driver = e.driver;
  if (e.status == request_status::done)
    out.outcome = e.outcome;
  return out;
}

queue_stats lease_queue::stats() {
  expire();
  queue_stats out;
  out.queued = queue_.size();
  out.leased = leases_.size();
  out.done = done_;
  out.redelivered = redelivered_;
  out.rejected_results = rejected_results_;
  out.given_back = given_back_;
  out.evicted = evicted_;
  out.in_flight = in_flight_;
  out.max_in_flight = max_in_flight_;
  return out;
}

// -- internals ----------------------------------------------------------------

void lease_queue::end_lease(const std::string& id, entry& e) {
  leases_.erase({e.expiry, id});
  auto& n = in_flight_[e.driver];
  if (n > 0)
    --n;
  e.lease.clear();
  e.driver.clear();
  e.holder.clear();
}

} // namespace hsm::net
