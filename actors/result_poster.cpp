#include "actors/result_poster.hpp"

#include "runtime/base/jitter.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/net/wire_codec.hpp"

#include <algorithm>
#include <deque>

namespace hsm {

namespace {

/// The actor clock's time: the steady clock in production, the test
/// scheduler's in tests.
using steady = caf::actor_clock;

/// A result still to be posted.
struct pending_post {
  job_result r;
  /// Names it while it waits for its audit entry.
  uint64_t tag = 0;
  /// Its audit entry is durable (or it needs none); only then is it posted.
  bool audited = false;
  /// Its audit entry is in the append on its way.
  bool auditing = false;
  int attempts = 0;
  std::chrono::milliseconds wait{0};
  /// Not posted again before this time.
  steady::time_point due{};
  caf::typed_response_promise<bool> rp;
};

struct poster_state {
  result_poster_config cfg;
  std::shared_ptr<net::proxy_link> link;
  std::shared_ptr<std::atomic<bool>> stopping;
  std::deque<pending_post> pending;
  /// A `flush_atom` is in the mailbox.
  bool flush_queued = false;
  /// The earliest retry timer armed; the epoch when none.
  steady::time_point timer{};
  /// Writes the audit trail; null: no audit.
  audit_actor audit;
  /// An append is on its way to `audit`.
  bool audit_busy = false;
  /// Backoff of the next append after a failed one.
  std::chrono::milliseconds audit_wait{0};
  uint64_t next_tag = 0;
};

using poster_ptr = result_poster_actor::stateful_pointer<poster_state>;

/// How one post of a result ended.
enum class outcome {
  /// Posted, or refused as stale (409): settled.
  done,
  /// Refused for good (another 4xx): left for redelivery.
  refused,
  /// A transient failure: try again later.
  retry,
};

void settle(pending_post& p, outcome o) {
  auto log = logger("poster");
  if (o == outcome::done)
    log->debug("[req={}] result posted", p.r.id);
  p.rp.deliver(o == outcome::done);
}

/// Posts `batch`; one outcome per entry.
std::vector<outcome> post(poster_state& st,
                          const std::vector<job_result>& batch) {
  auto log = logger("poster");
  auto all = [&](outcome o) { return std::vector<outcome>(batch.size(), o); };
  auto single = batch.size() == 1;
  auto reply = st.link->post_result(
    single ? net::encode_result(batch.front(), st.link->driver_id())
           : net::encode_results(batch, st.link->driver_id()));
  auto count = [&st](post_error why) {
    if (st.cfg.metrics)
      st.cfg.metrics->count_post_error(why);
  };
  if (!reply || reply->status >= 500)
    count(reply ? post_error::server_error : post_error::unreachable);
  else if (st.cfg.metrics)
    st.cfg.metrics->proxy_reached();
  if (!reply || reply->status >= 500) {
    log->warn("posting {} result(s) failed: {}", batch.size(),
              reply ? "HTTP " + std::to_string(reply->status)
                    : describe(reply.error()));
    return all(outcome::retry);
  }
  if (reply->status == 409) {
    log->warn("[req={}] result refused with 409 (lease expired or answered "
              "already); dropped",
              batch.front().id);
    return all(outcome::done);
  }
  if (reply->status != 200) {
    count(post_error::refused);
    log->error("{} result(s) refused with HTTP {}: {}; dropped (the requests "
               "will be redelivered)",
               batch.size(), reply->status, net::printable(reply->body, 200));
    return all(outcome::refused);
  }
  if (single)
    return all(outcome::done);
  auto statuses = net::decode_result_statuses(reply->body, batch);
  if (!statuses) {
    count(post_error::bad_response);
    log->error("the proxy's answer to a batch of {} result(s) is unreadable "
               "({}); they will be redelivered",
               batch.size(), describe(statuses.error()));
    return all(outcome::refused);
  }
  std::vector<outcome> out;
  for (size_t i = 0; i < batch.size(); ++i) {
    switch ((*statuses)[i]) {
      case net::result_status::accepted:
        out.push_back(outcome::done);
        break;
      case net::result_status::lease_not_current:
        log->warn("[req={}] result refused (lease expired or answered "
                  "already); dropped",
                  batch[i].id);
        out.push_back(outcome::done);
        break;
      case net::result_status::refused:
        count(post_error::refused);
        log->error("[req={}] result refused by the proxy; dropped (the "
                   "request will be redelivered)",
                   batch[i].id);
        out.push_back(outcome::refused);
        break;
    }
  }
  return out;
}

void schedule_flush(poster_ptr self) {
  auto& st = self->state;
  if (!st.flush_queued) {
    st.flush_queued = true;
    self->send(self, flush_atom::value);
  }
}

/// Arms a timer for the earliest retry, unless one fires by then.
void arm_timer(poster_ptr self) {
  auto& st = self->state;
  auto earliest = steady::time_point::max();
  for (auto& p : st.pending)
    earliest = std::min(earliest, p.due);
  if (earliest == steady::time_point::max())
    return;
  auto now = self->clock().now();
  if (st.timer != steady::time_point{} && st.timer <= earliest
      && st.timer >= now)
    return;
  st.timer = earliest;
  // Rounded up: a timer that fired early would find nothing due.
  auto wait = std::chrono::ceil<std::chrono::milliseconds>(
    std::max(earliest - now, steady::clock_type::duration::zero()));
  self->delayed_send(self, wait, flush_atom::value);
}

/// A failed attempt of `p`: schedule the next one, or give it up.
bool retry_later(poster_state& st, pending_post& p, steady::time_point now) {
  bool stopping = st.stopping && st.stopping->load();
  p.wait = p.wait.count() == 0 ? st.cfg.backoff_min
                               : std::min(p.wait * 2, st.cfg.backoff_max);
  p.due = now + jittered(p.wait);
  bool expired = p.r.lease_deadline != steady::time_point{}
                 && p.due >= p.r.lease_deadline;
  if (p.attempts < st.cfg.max_attempts && !stopping && !expired)
    return true;
  logger("poster")->error("[req={}] result not delivered{}; the request will "
                          "be redelivered when its lease expires",
                          p.r.id, expired ? " before its lease ends" : "");
  return false;
}

/// Posts every result that is due, in batches.
void flush(poster_ptr self) {
  auto& st = self->state;
  auto now = self->clock().now();
  std::vector<size_t> picked;
  for (size_t i = 0; i < st.pending.size() && picked.size() < st.cfg.max_batch;
       ++i)
    if (st.pending[i].audited && st.pending[i].due <= now)
      picked.push_back(i);
  if (picked.empty())
    return arm_timer(self);
  std::vector<job_result> batch;
  for (auto i : picked) {
    ++st.pending[i].attempts;
    batch.push_back(st.pending[i].r);
  }
  auto outcomes = post(st, batch);
  now = self->clock().now();
  std::vector<bool> finished(st.pending.size(), false);
  for (size_t k = 0; k < picked.size(); ++k) {
    auto& p = st.pending[picked[k]];
    if (outcomes[k] == outcome::retry && retry_later(st, p, now))
      continue;
    settle(p, outcomes[k] == outcome::retry ? outcome::refused : outcomes[k]);
    finished[picked[k]] = true;
  }
  std::deque<pending_post> rest;
  for (size_t i = 0; i < st.pending.size(); ++i)
    if (!finished[i])
      rest.push_back(std::move(st.pending[i]));
  st.pending = std::move(rest);
  // More may be due (a backlog beyond one batch, results that came in
  // meanwhile are queued behind this message).
  for (auto& p : st.pending)
    if (p.audited && p.due <= now)
      return schedule_flush(self);
  arm_timer(self);
}

/// Gives up the results still waiting for their audit entry whose lease
/// has ended (or all of them once stopping): they are never posted, and
/// the proxy hands the requests out again.
void drop_unaudited(poster_ptr self, bool all) {
  auto& st = self->state;
  auto now = self->clock().now();
  std::deque<pending_post> rest;
  for (auto& p : st.pending) {
    bool expired = p.r.lease_deadline != steady::time_point{}
                   && now >= p.r.lease_deadline;
    if (!p.audited && !p.auditing && (all || expired)) {
      logger("poster")->error("[req={}] result not posted: its audit entry "
                              "could not be written{}; the request will be "
                              "redelivered",
                              p.r.id, expired ? " before its lease ended" : "");
      settle(p, outcome::refused);
      continue;
    }
    rest.push_back(std::move(p));
  }
  st.pending = std::move(rest);
}

/// Sends the audit entries of every result not yet audited in one append,
/// unless an append is on its way (its reply sends the next).
void append_audit(poster_ptr self) {
  auto& st = self->state;
  if (st.audit_busy || !st.audit)
    return;
  auto at_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::system_clock::now().time_since_epoch())
                 .count();
  audit_batch batch;
  std::vector<uint64_t> tags;
  for (auto& p : st.pending) {
    if (p.audited || p.auditing)
      continue;
    batch.entries.push_back(*audit_entry_of(p.r, at_ms));
    tags.push_back(p.tag);
    p.auditing = true;
  }
  if (tags.empty())
    return;
  st.audit_busy = true;
  auto mark = [self, tags](bool done) {
    for (auto& p : self->state.pending)
      if (std::find(tags.begin(), tags.end(), p.tag) != tags.end()) {
        p.auditing = false;
        p.audited = done;
      }
  };
  self->request(st.audit, caf::infinite, audit_atom_v, std::move(batch))
    .then(
      [self, mark](bool) {
        auto& s = self->state;
        s.audit_busy = false;
        s.audit_wait = std::chrono::milliseconds{0};
        mark(true);
        schedule_flush(self);
        append_audit(self);
      },
      [self, mark](caf::error& err) {
        auto& s = self->state;
        s.audit_busy = false;
        mark(false);
        bool stopping = s.stopping && s.stopping->load();
        logger("poster")->warn("the audit trail could not be written ({}); "
                               "results wait",
                               describe(err));
        drop_unaudited(self, stopping);
        s.audit_wait = s.audit_wait.count() == 0
                         ? s.cfg.backoff_min
                         : std::min(s.audit_wait * 2, s.cfg.backoff_max);
        // The flush this timer sends tries the append again.
        self->delayed_send(self, jittered(s.audit_wait), flush_atom_v);
      });
}

result_poster_actor::behavior_type
poster_impl(poster_ptr self, result_poster_config cfg,
            std::shared_ptr<net::proxy_link> link,
            std::shared_ptr<std::atomic<bool>> stopping, audit_actor audit) {
  auto& init = self->state;
  init.audit = std::move(audit);
  init.cfg = cfg;
  init.cfg.max_batch = std::max<size_t>(init.cfg.max_batch, 1);
  init.link = std::move(link);
  init.stopping = std::move(stopping);
  return {
    [=](result_atom, job_result& r) -> caf::result<bool> {
      auto& st = self->state;
      pending_post p;
      p.r = std::move(r);
      p.tag = ++st.next_tag;
      p.audited = !st.audit || !p.r.audit || p.r.audit_written;
      p.rp = self->make_response_promise<bool>();
      auto rp = p.rp;
      bool audited = p.audited;
      st.pending.push_back(std::move(p));
      if (!audited) {
        append_audit(self);
        return rp;
      }
      // Every result already in the mailbox joins the post this flush
      // makes: the flush message queues behind them.
      schedule_flush(self);
      return rp;
    },
    [=](flush_atom) {
      auto& st = self->state;
      st.flush_queued = false;
      if (st.timer != steady::time_point{} && st.timer <= self->clock().now())
        st.timer = {};
      append_audit(self);
      flush(self);
    },
  };
}

} // namespace

result_poster_actor
spawn_result_poster(caf::actor_system& sys, result_poster_config cfg,
                    std::shared_ptr<net::proxy_link> link,
                    std::shared_ptr<std::atomic<bool>> stopping,
                    audit_actor audit) {
  auto mode = cfg.mode;
  return spawn_as(sys, mode, poster_impl, std::move(cfg), std::move(link),
                  std::move(stopping), std::move(audit));
}

} // namespace hsm
