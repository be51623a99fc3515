#include "actors/dispatcher.hpp"

#include "runtime/base/clock.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/keys/decisions.hpp"
#include "runtime/keys/requests.hpp"

#include <deque>
#include <functional>
#include <optional>
#include <unordered_map>
#include <vector>

namespace hsm {

namespace {

/// One session index as the dispatcher sees it.
struct session_entry {
  hsm_session_actor handle;
  bool up = false;
  /// The token of the job holding the session; 0 when free.
  uint64_t holder = 0;
  /// A session failed here since the last success: tell the supervisor
  /// when one succeeds again (it resets its backoff then).
  bool failed_recently = false;
};

/// A job whose lookup is done, waiting for a session.
struct ready_job {
  job j;
  /// sign: the key to sign with; generate_key: none (the key is new).
  std::optional<key_record> rec;
  /// When it joined the queue (for `request_stage::queue_wait`).
  std::chrono::steady_clock::time_point queued_at
    = std::chrono::steady_clock::now();
};

using clock_time = caf::actor_clock::time_point;

/// A request in flight and what to do if it is not answered in time.
struct pending_call {
  clock_time deadline;
  std::function<void()> on_timeout;
};

struct dispatcher_state {
  dispatcher_config cfg;
  store_actor store;
  result_poster_actor poster;
  session_supervisor_actor supervisor;
  std::vector<session_entry> sessions;
  /// Looked up, waiting for a free session; failed attempts go first.
  std::deque<ready_job> ready;
  /// Jobs in their lookup.
  size_t looking_up = 0;
  /// Every lease the driver holds, from the poller's hand-over until its
  /// result is posted.
  size_t held = 0;
  uint64_t next_token = 0;
  bool stopping = false;
  dispatcher_stats stats;
  std::vector<caf::typed_response_promise<bool>> drained;
  /// Credit questions waiting for credit.
  std::vector<caf::typed_response_promise<int64_t>> credit_waiters;
  /// Requests in flight by call id, each with its deadline. The requests
  /// themselves go out without a CAF timeout: CAF 0.17 keeps a request's
  /// timeout in its clock until it expires even after the answer came
  /// (memory grows with the request rate times the timeout) and wakes the
  /// clock thread for each one. One deadline message at a time does it.
  std::unordered_map<uint64_t, pending_call> calls;
  uint64_t next_call = 0;
  /// The deadline message on its way: its sequence number and time.
  uint64_t deadline_seq = 0;
  std::optional<clock_time> deadline_at;
  /// While the store fails, no new leases are taken: credits are 0 until
  /// the pause ends (a call in the deadline table). The pause doubles with
  /// each failure in a row, from `min_store_pause` up to `max_store_pause`;
  /// a store call that succeeds resets it.
  bool store_paused = false;
  caf::timespan store_pause{0};
};

/// The first pause after a store failure, and the longest.
constexpr caf::timespan min_store_pause = std::chrono::milliseconds{200};
constexpr caf::timespan max_store_pause = std::chrono::seconds{5};

using dispatcher_ptr = dispatcher_actor::stateful_pointer<dispatcher_state>;

/// Who holds which session for one run of a job.
struct hold {
  size_t index;
  uint64_t token;
};

void pump(dispatcher_ptr self);

/// Makes sure a deadline message arrives by `when` at the latest.
void arm_deadline(dispatcher_ptr self, clock_time when) {
  auto& st = self->state;
  if (st.deadline_at && *st.deadline_at <= when)
    return;
  st.deadline_at = when;
  auto delay = std::max(when - self->clock().now(), clock_time::duration{0});
  self->delayed_send(self, delay, deadline_atom::value, ++st.deadline_seq);
}

/// Registers a call that must be answered within `timeout`; returns its
/// id. `on_timeout` runs (once) if the deadline passes first.
uint64_t begin_call(dispatcher_ptr self, caf::timespan timeout,
                    std::function<void()> on_timeout) {
  auto& st = self->state;
  auto id = ++st.next_call;
  auto deadline = self->clock().now() + timeout;
  st.calls.emplace(id, pending_call{deadline, std::move(on_timeout)});
  arm_deadline(self, deadline);
  return id;
}

/// True (and forgets the call) if call `id` is still waiting for its
/// answer; false if its deadline already passed (a late answer: ignored).
bool end_call(dispatcher_ptr self, uint64_t id) {
  return self->state.calls.erase(id) > 0;
}

/// The deadline message `seq` arrived: every call due by its time has
/// timed out. A stale message (a sooner one was armed since) is ignored.
void on_deadline(dispatcher_ptr self, uint64_t seq) {
  auto& st = self->state;
  if (seq != st.deadline_seq || !st.deadline_at)
    return;
  auto due = std::max(*st.deadline_at, self->clock().now());
  st.deadline_at.reset();
  std::vector<std::function<void()>> expired;
  std::optional<clock_time> next;
  for (auto i = st.calls.begin(); i != st.calls.end();) {
    if (i->second.deadline <= due) {
      expired.push_back(std::move(i->second.on_timeout));
      i = st.calls.erase(i);
    } else {
      if (!next || i->second.deadline < *next)
        next = i->second.deadline;
      ++i;
    }
  }
  if (next)
    arm_deadline(self, *next);
  for (auto& f : expired)
    f();
}

caf::error timed_out() {
  return caf::make_error(caf::sec::request_timeout);
}

size_t healthy(const dispatcher_state& st) {
  size_t n = 0;
  for (auto& s : st.sessions)
    if (s.up)
      ++n;
  return n;
}

/// Healthy sessions x pipeline, minus every lease held; none while the
/// store fails.
int64_t credits(const dispatcher_state& st) {
  if (st.stopping || st.store_paused)
    return 0;
  auto limit = static_cast<int64_t>(healthy(st) * st.cfg.pipeline);
  return std::max<int64_t>(0, limit - static_cast<int64_t>(st.held));
}

/// Publishes sessions, credits and leases to the metrics (a few atomic
/// stores; nothing when metrics are off).
void publish(const dispatcher_state& st) {
  if (st.cfg.metrics)
    st.cfg.metrics->set_dispatch_state(healthy(st), credits(st), st.held);
}

/// Records how long `stage` took since `since`, if metrics are on.
void observe(const dispatcher_state& st, request_stage stage,
             std::chrono::steady_clock::time_point since) {
  if (st.cfg.metrics)
    st.cfg.metrics->observe_since(stage, since);
}

/// Answers the credit questions that waited, once there is credit (or the
/// dispatcher stops: then with 0, so that the poller sees the stop).
void notify_credit(dispatcher_ptr self) {
  auto& st = self->state;
  publish(st);
  if (st.credit_waiters.empty())
    return;
  auto c = credits(st);
  if (c <= 0 && !st.stopping)
    return;
  for (auto& rp : st.credit_waiters)
    rp.deliver(c);
  st.credit_waiters.clear();
}

void check_drained(dispatcher_ptr self) {
  auto& st = self->state;
  if (st.held == 0) {
    for (auto& rp : st.drained)
      rp.deliver(true);
    st.drained.clear();
  }
}

/// Hands a finished job's result to the poster. Every lease reaches this
/// exactly once; it counts as held until the poster answers.
void report(dispatcher_ptr self, job_result r) {
  auto& st = self->state;
  if (r.ok())
    ++st.stats.done;
  else
    ++st.stats.failed;
  if (st.cfg.metrics)
    st.cfg.metrics->count_request(
      r.audit ? &r.audit->kind : nullptr,
      r.ok() ? std::string_view{"ok"}
             : std::string_view{std::get<error_result>(r.outcome).code});
  auto reported = std::chrono::steady_clock::now();
  auto posted = [=] {
    observe(self->state, request_stage::post, reported);
    --self->state.held;
    notify_credit(self);
    check_drained(self);
  };
  auto call = begin_call(self, st.cfg.post_timeout, posted);
  self->request(st.poster, caf::infinite, result_atom::value, std::move(r))
    .then(
      [=](bool) {
        if (end_call(self, call))
          posted();
      },
      [=](caf::error&) {
        if (end_call(self, call))
          posted();
      });
}

/// Frees the session if `h` still holds it, and starts the next job.
void release(dispatcher_ptr self, hold h) {
  auto& s = self->state.sessions[h.index];
  if (s.holder == h.token)
    s.holder = 0;
  pump(self);
}

/// A store call succeeded: the next failure pauses briefly again.
void store_answered(dispatcher_ptr self) {
  self->state.store_pause = caf::timespan{0};
}

/// A caf::sec error from the storage actor (timeout, actor gone) means the
/// store is unavailable: retryable, never a permanent answer. Either way
/// the store failed: intake pauses (credits 0) for a while.
caf::error store_failure(dispatcher_ptr self, const caf::error& err) {
  auto& st = self->state;
  if (!st.store_paused) {
    st.store_pause = st.store_pause == caf::timespan{0}
                       ? min_store_pause
                       : std::min(st.store_pause * 2, max_store_pause);
    st.store_paused = true;
    ++st.stats.store_pauses;
    publish(st);
    logger("dispatch")
      ->warn("the key store failed ({}); taking no new "
             "requests for {} ms",
             describe(err),
             std::chrono::duration_cast<std::chrono::milliseconds>(
               st.store_pause)
               .count());
    begin_call(self, st.store_pause, [=] {
      self->state.store_paused = false;
      notify_credit(self);
    });
  }
  if (err.category() == caf::atom("system"))
    return caf::make_error(store_errc::unavailable,
                           "key store: " + describe(err));
  return err;
}

/// The session `session` failed under `rj` (died, timed out, or a
/// session-level error): mark its index down, ask for a replacement on a
/// timeout, and retry the job elsewhere a bounded number of times.
void session_failed(dispatcher_ptr self, hold h, hsm_session_actor session,
                    ready_job rj, const caf::error& err) {
  auto& st = self->state;
  ++st.stats.session_failures;
  auto& s = st.sessions[h.index];
  if (s.holder == h.token)
    s.holder = 0;
  if (s.handle == session) {
    // Every session-level failure ends the session actor: the index is
    // down until the supervisor reports a new session.
    s.up = false;
    publish(st);
    s.failed_recently = true;
    if (err == caf::sec::request_timeout)
      self->send(st.supervisor, replace_atom::value, h.index, session);
  }
  if (++rj.j.attempts < st.cfg.max_attempts && !st.stopping) {
    ++st.stats.retried;
    rj.queued_at = std::chrono::steady_clock::now();
    logger("dispatch")
      ->warn("[req={} session={}] {}; retrying on another "
             "session",
             rj.j.id, h.index, describe(err));
    st.ready.push_front(std::move(rj));
  } else if (st.stopping) {
    report(self, answer(rj.j, keys::shutting_down()));
  } else {
    report(self, answer(rj.j, keys::no_session_could_serve(err)));
  }
  pump(self);
}

/// A successful HSM call on `h`'s session.
void session_ok(dispatcher_ptr self, hold h) {
  auto& s = self->state.sessions[h.index];
  if (s.failed_recently) {
    s.failed_recently = false;
    self->send(self->state.supervisor, session_ok_atom::value, h.index);
  }
}

/// The HSM call of `rj` on `session` failed: a session failure is retried
/// elsewhere, any other error is the answer.
void hsm_failed(dispatcher_ptr self, hold h, hsm_session_actor session,
                ready_job rj, const caf::error& err) {
  if (is_session_failure(err))
    return session_failed(self, h, std::move(session), std::move(rj), err);
  release(self, h);
  report(self, answer(rj.j, err));
}

/// Answers a generate_key from what the store holds under its key id.
void report_stored(dispatcher_ptr self, const job& j, const put_result& put) {
  auto res = keys::answer_stored(put.record, j.scheme, put.inserted);
  auto r = res ? answer(j, std::move(*res)) : answer(j, res.error());
  // Only an inserted record is audited with its put, and its answer is
  // the one the entry was made from (`audit_of_new_key`).
  r.audit_written = put.audited && r.ok();
  report(self, std::move(r));
}

/// The audit entry of the answer to `j` if `rec`, just generated, is
/// inserted; none if that answer is an error (then it is audited after the
/// put, as every other answer).
std::optional<audit_entry> audit_of_new_key(const job& j,
                                            const key_record& rec) {
  auto res = keys::answer_stored(rec, j.scheme, true);
  if (!res)
    return std::nullopt;
  return audit_entry_of(answer(j, std::move(*res)), now_ms());
}

void run_sign(dispatcher_ptr self, hold h, ready_job rj) {
  auto& st = self->state;
  auto session = st.sessions[h.index].handle;
  auto call = begin_call(self, st.cfg.hsm_timeout, [=] {
    hsm_failed(self, h, session, rj, timed_out());
  });
  auto started = std::chrono::steady_clock::now();
  self->request(session, caf::infinite, sign_atom::value, *rj.rec, rj.j.payload)
    .then(
      [=](signature_result& sig) {
        if (!end_call(self, call))
          return;
        observe(self->state, request_stage::hsm, started);
        session_ok(self, h);
        release(self, h);
        report(self, answer(rj.j, std::move(sig)));
      },
      [=](caf::error& err) {
        if (!end_call(self, call))
          return;
        observe(self->state, request_stage::hsm, started);
        hsm_failed(self, h, session, rj, err);
      });
}

/// Stores a freshly generated `rec` and reports what the store committed
/// (durable before visible).
void store_generated(dispatcher_ptr self, hsm_session_actor session,
                     ready_job rj, key_record rec) {
  auto& st = self->state;
  auto on_error = [=](const caf::error& err) {
    // The put may still commit (the store works through its mailbox after
    // this deadline; a PostgreSQL commit can be in doubt): a resident key
    // stays on the token. Reconciliation removes it later only if the
    // store, read again, does not name it.
    if (rec.resident())
      logger("dispatch")
        ->warn("key '{}': the store did not confirm the put ({}); its "
               "resident key stays on the token",
               rec.key_id, describe(err));
    report(self, answer(rj.j, store_failure(self, err)));
  };
  auto call = begin_call(self, st.cfg.store_timeout,
                         [=] { on_error(timed_out()); });
  auto started = std::chrono::steady_clock::now();
  auto on_put = [=](put_result& put) {
    if (!end_call(self, call))
      return;
    observe(self->state, request_stage::store, started);
    store_answered(self);
    if (!put.inserted && rec.resident())
      self->send(session, destroy_atom::value, rec);
    report_stored(self, rj.j, put);
  };
  auto on_put_error = [=](caf::error& err) {
    if (!end_call(self, call))
      return;
    observe(self->state, request_stage::store, started);
    on_error(err);
  };
  // With the audit entry, one commit makes both durable. If the reply
  // comes too late (the deadline above answered with an error), the entry
  // may still commit: the trail then holds the key's "ok" and the error
  // that was posted, both true.
  std::optional<audit_entry> entry;
  if (st.cfg.audit_with_put && rj.j.kind == job_kind::generate_key)
    entry = audit_of_new_key(rj.j, rec);
  if (entry)
    self
      ->request(st.store, caf::infinite, caf::put_atom::value, rec,
                std::move(*entry))
      .then(on_put, on_put_error);
  else
    self->request(st.store, caf::infinite, caf::put_atom::value, rec)
      .then(on_put, on_put_error);
}

void run_generate(dispatcher_ptr self, hold h, ready_job rj) {
  auto& st = self->state;
  auto session = st.sessions[h.index].handle;
  const auto& j = rj.j;
  auto call = begin_call(self, st.cfg.hsm_timeout, [=] {
    hsm_failed(self, h, session, rj, timed_out());
  });
  auto started = std::chrono::steady_clock::now();
  self
    ->request(session, caf::infinite, generate_atom::value, j.key_id, j.scheme)
    .then(
      [=](key_record& rec) {
        if (!end_call(self, call))
          return;
        observe(self->state, request_stage::hsm, started);
        session_ok(self, h);
        release(self, h);
        store_generated(self, session, rj, std::move(rec));
      },
      [=](caf::error& err) {
        if (!end_call(self, call))
          return;
        observe(self->state, request_stage::hsm, started);
        hsm_failed(self, h, session, rj, err);
      });
}

/// True when `j`'s lease ends too soon to start it.
bool lease_ending(dispatcher_ptr self, const job& j) {
  return j.start_by != std::chrono::steady_clock::time_point{}
         && self->clock().now() >= j.start_by;
}

/// The next ready job worth starting; those whose lease ends too soon are
/// handed back on the way.
std::optional<ready_job> next_ready(dispatcher_ptr self) {
  auto& st = self->state;
  while (!st.ready.empty()) {
    auto rj = std::move(st.ready.front());
    st.ready.pop_front();
    if (!lease_ending(self, rj.j))
      return rj;
    report(self, answer(rj.j, keys::lease_ending()));
  }
  return std::nullopt;
}

/// Runs the next ready jobs on free healthy sessions.
void pump(dispatcher_ptr self) {
  auto& st = self->state;
  if (st.stopping)
    return;
  for (size_t i = 0; i < st.sessions.size() && !st.ready.empty(); ++i) {
    auto& s = st.sessions[i];
    if (!s.up || s.holder != 0)
      continue;
    auto rj = next_ready(self);
    if (!rj)
      return;
    hold h{i, ++st.next_token};
    s.holder = h.token;
    observe(st, request_stage::queue_wait, rj->queued_at);
    if (rj->rec)
      run_sign(self, h, std::move(*rj));
    else
      run_generate(self, h, std::move(*rj));
  }
}

/// The lookup of `j` answered `found`: decide, or queue for a session.
void looked_up(dispatcher_ptr self, job j, key_lookup& found) {
  auto& st = self->state;
  if (st.stopping)
    return report(self, answer(j, keys::shutting_down()));
  if (j.kind == job_kind::generate_key) {
    // Idempotent: a stored key is the answer, the HSM untouched.
    if (found.found)
      return report_stored(self, j, put_result{found.record, false});
    st.ready.push_back(ready_job{std::move(j), std::nullopt});
    return pump(self);
  }
  if (!found.found)
    return report(self, answer(j, keys::unknown_key(j.key_id)));
  auto refused = keys::validate_payload(found.record.scheme, j.payload);
  if (!refused)
    refused = keys::check_served(st.cfg.caps, found.record.scheme);
  if (refused)
    return report(self, answer(j, refused));
  st.ready.push_back(ready_job{std::move(j), std::move(found.record)});
  pump(self);
}

/// Takes a job from the poller: answered at once when it cannot be served,
/// else its key is looked up right away (while sessions are busy).
void accept(dispatcher_ptr self, job& j) {
  auto& st = self->state;
  ++st.held;
  publish(st);
  if (st.stopping)
    return report(self, answer(j, keys::shutting_down()));
  if (j.kind == job_kind::generate_key)
    if (auto err = keys::check_served(st.cfg.caps, j.scheme))
      return report(self, answer(j, err));
  if (st.ready.size() + st.looking_up >= st.cfg.max_queue)
    return report(self, answer(j, keys::queue_full()));
  ++st.looking_up;
  auto failed = [=](const caf::error& err) {
    --self->state.looking_up;
    report(self, answer(j, store_failure(self, err)));
  };
  auto call = begin_call(self, st.cfg.store_timeout,
                         [=] { failed(timed_out()); });
  auto started = std::chrono::steady_clock::now();
  self->request(st.store, caf::infinite, caf::get_atom::value, j.key_id)
    .then(
      [=](key_lookup& found) {
        if (!end_call(self, call))
          return;
        observe(self->state, request_stage::store, started);
        store_answered(self);
        --self->state.looking_up;
        looked_up(self, j, found);
      },
      [=](caf::error& err) {
        if (!end_call(self, call))
          return;
        observe(self->state, request_stage::store, started);
        failed(err);
      });
}

dispatcher_actor::behavior_type
dispatcher_impl(dispatcher_ptr self, dispatcher_config cfg, store_actor store,
                result_poster_actor poster,
                supervisor_factory make_supervisor) {
  auto& init = self->state;
  init.cfg = std::move(cfg);
  init.cfg.pipeline = std::max<size_t>(init.cfg.pipeline, 1);
  init.store = std::move(store);
  init.poster = std::move(poster);
  init.sessions.resize(init.cfg.sessions);
  init.supervisor = make_supervisor(caf::actor_cast<dispatcher_actor>(self));
  self->link_to(init.supervisor);
  publish(init);
  return {
    [=](job_atom, job& j) { accept(self, j); },
    [=](credit_atom) -> caf::result<int64_t> {
      auto& st = self->state;
      auto c = credits(st);
      if (c > 0 || st.stopping)
        return c;
      // No credit now: the answer waits until there is (invariant 6:
      // without a healthy session, that is until one comes up).
      auto rp = self->make_response_promise<int64_t>();
      st.credit_waiters.push_back(rp);
      return rp;
    },
    [=](result_atom, job_result& r) {
      // An answer the poller made itself (an invalid request).
      ++self->state.held;
      publish(self->state);
      report(self, std::move(r));
    },
    [=](session_up_atom, size_t index, hsm_session_actor& handle) {
      auto& s = self->state.sessions[index];
      s.handle = std::move(handle);
      s.up = true;
      s.holder = 0;
      pump(self);
      notify_credit(self);
      publish(self->state);
    },
    [=](session_down_atom, size_t index) {
      self->state.sessions[index].up = false;
      publish(self->state);
    },
    [=](deadline_atom, uint64_t seq) { on_deadline(self, seq); },
    [=](drain_atom) -> caf::result<bool> {
      auto rp = self->make_response_promise<bool>();
      self->state.drained.push_back(rp);
      check_drained(self);
      return rp;
    },
    [=](stop_atom) {
      // Hand back what never started (the proxy re-queues a retryable
      // error at once) and start nothing new.
      auto& st = self->state;
      st.stopping = true;
      while (!st.ready.empty()) {
        auto rj = std::move(st.ready.front());
        st.ready.pop_front();
        report(self, answer(rj.j, keys::shutting_down()));
      }
      notify_credit(self);
    },
    [=](close_atom) -> caf::delegated<size_t> {
      return self->delegate(self->state.supervisor, close_atom::value);
    },
    [=](stuck_atom) -> caf::delegated<size_t> {
      return self->delegate(self->state.supervisor, stuck_atom::value);
    },
    [=](stats_atom) {
      auto& st = self->state;
      auto out = st.stats;
      out.queued = st.ready.size();
      out.held = st.held;
      for (auto& s : st.sessions) {
        out.healthy_sessions += s.up ? 1 : 0;
        out.busy_sessions += s.holder != 0 ? 1 : 0;
      }
      return out;
    },
  };
}

} // namespace

dispatcher_actor spawn_dispatcher(caf::actor_system& sys, dispatcher_config cfg,
                                  store_actor store, result_poster_actor poster,
                                  supervisor_factory make_supervisor) {
  return sys.spawn(dispatcher_impl, std::move(cfg), std::move(store),
                   std::move(poster), std::move(make_supervisor));
}

} // namespace hsm
