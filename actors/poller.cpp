#include "actors/poller.hpp"

#include <random>
#include <thread>

#include "runtime/logging.hpp"

namespace hsm {

namespace {

std::chrono::milliseconds jittered(std::chrono::milliseconds base) {
  static thread_local std::mt19937 rng{std::random_device{}()};
  std::uniform_int_distribution<long long> dist{base.count() / 2,
                                                base.count()};
  return std::chrono::milliseconds{dist(rng)};
}

// -- poster -------------------------------------------------------------------

struct poster_state {
  std::shared_ptr<net::proxy_client> client;
  std::shared_ptr<std::atomic<bool>> stopping;
  uint64_t posted = 0;
};

caf::behavior poster_impl(caf::stateful_actor<poster_state>* self,
                          std::shared_ptr<net::proxy_client> client,
                          std::shared_ptr<std::atomic<bool>> stopping) {
  self->state.client = std::move(client);
  self->state.stopping = std::move(stopping);
  return {
    [=](result_atom, const job_result& r) {
      auto& st = self->state;
      auto log = logger("poller");
      auto body = encode_result(r, st.client->config().driver_id);
      auto wait = std::chrono::milliseconds{100};
      for (int attempt = 1; attempt <= 8; ++attempt) {
        auto reply = st.client->post_result(body);
        if (reply && reply->status == 200) {
          ++st.posted;
          log->debug("[req={}] result posted (ok={})", r.id, r.ok);
          return;
        }
        if (reply && reply->status == 409) {
          log->warn("[req={}] result refused with 409 (lease expired or "
                    "answered already); dropped",
                    r.id);
          return;
        }
        if (reply && reply->status >= 400 && reply->status < 500) {
          log->error("[req={}] result refused with HTTP {}: {}; dropped "
                     "(the request will be redelivered)",
                     r.id, reply->status, reply->body.substr(0, 200));
          return;
        }
        log->warn("[req={}] posting the result failed (attempt {}): {}",
                  r.id, attempt,
                  reply ? "HTTP " + std::to_string(reply->status)
                        : describe(reply.error()));
        if (st.stopping && st.stopping->load())
          break;
        std::this_thread::sleep_for(jittered(wait));
        wait = std::min(wait * 2, std::chrono::milliseconds{5000});
      }
      log->error("[req={}] result not delivered; the request will be "
                 "redelivered when its lease expires",
                 r.id);
    },
  };
}

// -- poller -------------------------------------------------------------------

struct poller_state {
  poller_config cfg;
  std::shared_ptr<net::proxy_client> client;
  caf::actor dispatcher;
  bool stopping = false;
  std::chrono::milliseconds backoff{0};
};

using poller_ptr = caf::stateful_actor<poller_state>*;

void poll_once(poller_ptr self, int64_t credit) {
  auto& st = self->state;
  auto log = logger("poller");
  auto reply = st.client->poll(static_cast<size_t>(credit), st.cfg.poll_wait);
  if (!reply || reply->status != 200) {
    st.backoff = std::clamp(st.backoff * 2, st.cfg.backoff_min,
                            st.cfg.backoff_max);
    log->warn("poll failed: {}; retrying in ~{} ms",
              reply ? "HTTP " + std::to_string(reply->status)
                    : describe(reply.error()),
              st.backoff.count());
    self->delayed_send(self, jittered(st.backoff), poll_atom::value);
    return;
  }
  st.backoff = std::chrono::milliseconds{0};
  auto parsed = parse_poll(reply->body);
  if (!parsed) {
    log->warn("bad poll response: {}", describe(parsed.error()));
    self->delayed_send(self, st.cfg.backoff_min, poll_atom::value);
    return;
  }
  if (parsed->unanswerable > 0)
    log->warn("{} request(s) without id or lease ignored (left for "
              "redelivery)",
              parsed->unanswerable);
  for (auto& r : parsed->rejected) {
    log->info("[req={}] rejected: {}", r.id, r.error_message);
    self->send(st.dispatcher, result_atom::value, std::move(r));
  }
  for (auto& j : parsed->jobs) {
    if (st.stopping) {
      // Leased after the stop: hand it back at once.
      self->send(st.dispatcher, result_atom::value,
                 error_result(j, caf::make_error(
                                   hsm_errc::retryable,
                                   std::string{"driver shutting down"})));
      continue;
    }
    self->send(st.dispatcher, job_atom::value, std::move(j));
  }
  self->send(self, poll_atom::value);
}

caf::behavior poller_impl(poller_ptr self, poller_config cfg,
                          std::shared_ptr<net::proxy_client> client,
                          caf::actor dispatcher) {
  auto& init = self->state;
  init.cfg = cfg;
  init.client = std::move(client);
  init.dispatcher = std::move(dispatcher);
  self->send(self, poll_atom::value);
  return {
    [=](poll_atom) {
      auto& st = self->state;
      if (st.stopping)
        return;
      self->request(st.dispatcher, std::chrono::seconds{5}, credit_atom::value)
        .await(
          [=](int64_t credit) {
            if (self->state.stopping)
              return;
            // No healthy, free slot: poll for nothing (invariant 6).
            if (credit <= 0) {
              self->delayed_send(self, self->state.cfg.idle_pause,
                                 poll_atom::value);
              return;
            }
            poll_once(self, credit);
          },
          [=](caf::error&) {
            self->delayed_send(self, self->state.cfg.idle_pause,
                               poll_atom::value);
          });
    },
    [=](stop_atom) {
      self->state.stopping = true;
      return caf::unit;
    },
  };
}

} // namespace

caf::actor spawn_result_poster(caf::actor_system& sys,
                               std::shared_ptr<net::proxy_client> client,
                               std::shared_ptr<std::atomic<bool>> stopping) {
  return sys.spawn<caf::detached>(poster_impl, std::move(client),
                                  std::move(stopping));
}

caf::actor spawn_poller(caf::actor_system& sys, poller_config cfg,
                        std::shared_ptr<net::proxy_client> client,
                        caf::actor dispatcher) {
  return sys.spawn<caf::detached>(poller_impl, cfg, std::move(client),
                                  std::move(dispatcher));
}

} // namespace hsm
