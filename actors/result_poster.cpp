#include "actors/result_poster.hpp"

#include "runtime/base/jitter.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/net/wire_codec.hpp"

#include <map>

namespace hsm {

namespace {

/// A result still being posted.
struct pending_post {
  std::string id;
  std::string body;
  int attempt = 0;
  std::chrono::milliseconds wait{0};
  caf::typed_response_promise<bool> rp;
};

struct poster_state {
  result_poster_config cfg;
  std::shared_ptr<net::proxy_link> link;
  std::shared_ptr<std::atomic<bool>> stopping;
  std::map<uint64_t, pending_post> pending;
  uint64_t next_id = 0;
};

using poster_ptr = result_poster_actor::stateful_pointer<poster_state>;

enum class outcome {
  /// Posted, or refused as stale (409): settled.
  done,
  /// Refused for good (another 4xx): left for redelivery.
  refused,
  /// A transient failure: try again later.
  retry,
};

/// One attempt at posting `p`.
outcome post_once(poster_state& st, pending_post& p) {
  auto log = logger("poster");
  ++p.attempt;
  auto reply = st.link->post_result(p.body);
  if (reply && reply->status == 200) {
    log->debug("[req={}] result posted", p.id);
    return outcome::done;
  }
  if (reply && reply->status == 409) {
    log->warn("[req={}] result refused with 409 (lease expired or answered "
              "already); dropped",
              p.id);
    return outcome::done;
  }
  if (reply && reply->status >= 400 && reply->status < 500) {
    log->error("[req={}] result refused with HTTP {}: {}; dropped (the "
               "request will be redelivered)",
               p.id, reply->status, reply->body.substr(0, 200));
    return outcome::refused;
  }
  log->warn("[req={}] posting the result failed (attempt {}): {}", p.id,
            p.attempt,
            reply ? "HTTP " + std::to_string(reply->status)
                  : describe(reply.error()));
  return outcome::retry;
}

/// Tries `id` once more; schedules the next attempt or settles it.
void attempt(poster_ptr self, uint64_t id) {
  auto& st = self->state;
  auto i = st.pending.find(id);
  if (i == st.pending.end())
    return;
  auto& p = i->second;
  auto result = post_once(st, p);
  if (result != outcome::retry) {
    p.rp.deliver(result == outcome::done);
    st.pending.erase(i);
    return;
  }
  bool stopping = st.stopping && st.stopping->load();
  if (p.attempt >= st.cfg.max_attempts || stopping) {
    logger("poster")->error("[req={}] result not delivered; the request "
                            "will be redelivered when its lease expires",
                            p.id);
    p.rp.deliver(false);
    st.pending.erase(i);
    return;
  }
  p.wait = p.wait.count() == 0 ? st.cfg.backoff_min
                               : std::min(p.wait * 2, st.cfg.backoff_max);
  self->delayed_send(self, jittered(p.wait), retry_atom::value, id);
}

result_poster_actor::behavior_type
poster_impl(poster_ptr self, result_poster_config cfg,
            std::shared_ptr<net::proxy_link> link,
            std::shared_ptr<std::atomic<bool>> stopping) {
  auto& init = self->state;
  init.cfg = cfg;
  init.link = std::move(link);
  init.stopping = std::move(stopping);
  return {
    [=](result_atom, const job_result& r) -> caf::result<bool> {
      auto& st = self->state;
      auto id = ++st.next_id;
      auto& p = st.pending[id];
      p.id = r.id;
      p.body = net::encode_result(r, st.link->driver_id());
      p.rp = self->make_response_promise<bool>();
      auto rp = p.rp;
      attempt(self, id);
      return rp;
    },
    [=](retry_atom, uint64_t id) { attempt(self, id); },
  };
}

} // namespace

result_poster_actor
spawn_result_poster(caf::actor_system& sys, result_poster_config cfg,
                    std::shared_ptr<net::proxy_link> link,
                    std::shared_ptr<std::atomic<bool>> stopping) {
  auto mode = cfg.mode;
  return spawn_as(sys, mode, poster_impl, std::move(cfg), std::move(link),
                  std::move(stopping));
}

} // namespace hsm
