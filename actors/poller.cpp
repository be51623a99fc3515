#include "actors/poller.hpp"

#include "runtime/base/jitter.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/keys/decisions.hpp"
#include "runtime/keys/requests.hpp"
#include "runtime/net/wire_codec.hpp"

#include <algorithm>

namespace hsm {

namespace {

struct poller_state {
  poller_config cfg;
  std::shared_ptr<net::proxy_link> link;
  dispatcher_actor dispatcher;
  std::chrono::milliseconds backoff{0};
  /// The last poll reached the proxy. Until one has (at start, after a
  /// failure) a poll returns at once: readiness (`/readyz`) follows the
  /// first round trip, not a long-poll running out on an empty queue.
  bool reached = false;
};

using poller_ptr = poller_actor::stateful_pointer<poller_state>;

bool stopping(const poller_state& st) {
  return st.cfg.stopping->load();
}

void poll_once(poller_ptr self, int64_t credit) {
  auto& st = self->state;
  auto log = logger("poller");
  // At most `max_poll_requests` at a time, so that an answer stays within
  // the response cap; with more credit the next poll follows at once.
  auto max = std::min(static_cast<size_t>(credit), net::max_poll_requests);
  auto wait = st.reached ? st.cfg.poll_wait : std::chrono::milliseconds{0};
  st.reached = false;
  auto reply = st.link->poll(max, wait);
  auto& metrics = st.cfg.metrics;
  if (!reply || reply->status != 200) {
    if (metrics)
      metrics->count_poll_error(reply ? poll_error::http_status
                                      : poll_error::unreachable);
    st.backoff = std::clamp(st.backoff * 2, st.cfg.backoff_min,
                            st.cfg.backoff_max);
    log->warn("poll failed: {}; retrying in ~{} ms",
              reply ? "HTTP " + std::to_string(reply->status)
                    : describe(reply.error()),
              st.backoff.count());
    self->delayed_send(self, jittered(st.backoff), poll_atom::value);
    return;
  }
  auto polled = keys::read_poll(reply->body, max);
  if (!polled) {
    if (metrics)
      metrics->count_poll_error(poll_error::bad_response);
    // A proxy that keeps answering garbage is backed off like one that
    // fails: its leases (if any) expire and the requests come back.
    st.backoff = std::clamp(st.backoff * 2, st.cfg.backoff_min,
                            st.cfg.backoff_max);
    log->warn("bad poll response: {}; retrying in ~{} ms",
              describe(polled.error()), st.backoff.count());
    self->delayed_send(self, jittered(st.backoff), poll_atom::value);
    return;
  }
  st.backoff = std::chrono::milliseconds{0};
  st.reached = true;
  if (metrics)
    metrics->proxy_reached();
  // One line per poll for everything a broken proxy sent beyond what can be
  // served; none of it is echoed (ids and leases that fail the checks are
  // not fit for a log).
  if (polled->unanswerable + polled->excess + polled->duplicates > 0)
    log->warn("poll answer ignored in part (left for redelivery): {} "
              "request(s) without a valid id or lease, {} beyond the {} "
              "asked for, {} duplicate(s)",
              polled->unanswerable, polled->excess, max, polled->duplicates);
  for (auto& r : polled->rejected) {
    // The id passed the id checks; the message may quote the request.
    log->info("[req={}] rejected: {}", r.id,
              net::printable(std::get<error_result>(r.outcome).message, 200));
    self->send(st.dispatcher, result_atom::value, std::move(r));
  }
  for (auto& j : polled->jobs) {
    if (stopping(st)) {
      // Leased after the stop: hand it back at once.
      self->send(st.dispatcher, result_atom::value,
                 answer(j, keys::shutting_down()));
      continue;
    }
    self->send(st.dispatcher, job_atom::value, std::move(j));
  }
  self->send(self, poll_atom::value);
}

poller_actor::behavior_type poller_impl(poller_ptr self, poller_config cfg,
                                        std::shared_ptr<net::proxy_link> link,
                                        dispatcher_actor dispatcher) {
  auto& init = self->state;
  init.cfg = cfg;
  init.link = std::move(link);
  init.dispatcher = std::move(dispatcher);
  self->send(self, poll_atom::value);
  return {
    [=](poll_atom) {
      auto& st = self->state;
      if (stopping(st))
        return;
      // The dispatcher answers once there is credit: no healthy session, no
      // answer, no poll (invariant 6). `then`, not `await`: a stop_atom is
      // answered while the question waits.
      self->request(st.dispatcher, caf::infinite, credit_atom::value)
        .then(
          [=](int64_t credit) {
            if (stopping(self->state))
              return;
            // Zero only comes from a dispatcher that is stopping.
            if (credit <= 0) {
              self->delayed_send(self, self->state.cfg.backoff_min,
                                 poll_atom::value);
              return;
            }
            poll_once(self, credit);
          },
          [=](caf::error& err) {
            logger("poller")->warn("credit question failed: {}", describe(err));
            self->delayed_send(self, self->state.cfg.backoff_min,
                               poll_atom::value);
          });
    },
    [=](stop_atom) {
      self->state.cfg.stopping->store(true);
      return true;
    },
  };
}

} // namespace

poller_actor spawn_poller(caf::actor_system& sys, poller_config cfg,
                          std::shared_ptr<net::proxy_link> link,
                          dispatcher_actor dispatcher) {
  auto mode = cfg.mode;
  return spawn_as(sys, mode, poller_impl, std::move(cfg), std::move(link),
                  std::move(dispatcher));
}

} // namespace hsm
