#include "actors/dispatcher.hpp"

#include "runtime/base/logging.hpp"
#include "runtime/crypto/signature.hpp"
#include "runtime/keys/decisions.hpp"
#include "runtime/keys/requests.hpp"

#include <deque>
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

struct dispatcher_state {
  dispatcher_config cfg;
  store_actor store;
  result_poster_actor poster;
  session_supervisor_actor supervisor;
  std::vector<session_entry> sessions;
  std::deque<job> queue;
  size_t running = 0; // jobs between start and report
  size_t posting = 0; // results handed to the poster, not yet posted
  uint64_t next_token = 0;
  bool stopping = false;
  dispatcher_stats stats;
  std::vector<caf::typed_response_promise<bool>> drained;
};

using dispatcher_ptr = dispatcher_actor::stateful_pointer<dispatcher_state>;

/// Who holds which session for one run of a job.
struct hold {
  size_t index;
  uint64_t token;
};

void pump(dispatcher_ptr self);

/// Every lease the driver holds counts until its result is posted: queued,
/// running (HSM or store step), or waiting for the poster. Credits are the
/// healthy sessions minus those, so the proxy never sees more leases in
/// flight from this driver than it has healthy sessions.
int64_t credits(const dispatcher_state& st) {
  if (st.stopping)
    return 0;
  int64_t healthy = 0;
  for (auto& s : st.sessions)
    if (s.up)
      ++healthy;
  auto held = static_cast<int64_t>(st.queue.size() + st.running + st.posting);
  return std::max<int64_t>(0, healthy - held);
}

void check_drained(dispatcher_ptr self) {
  auto& st = self->state;
  if (st.running == 0 && st.queue.empty() && st.posting == 0) {
    for (auto& rp : st.drained)
      rp.deliver(true);
    st.drained.clear();
  }
}

/// Hands a finished job's result to the poster. Every job reaches this
/// exactly once (or goes back to the queue).
void report(dispatcher_ptr self, job_result r) {
  auto& st = self->state;
  if (r.ok())
    ++st.stats.done;
  else
    ++st.stats.failed;
  ++st.posting;
  --st.running;
  auto posted = [=] {
    --self->state.posting;
    check_drained(self);
  };
  self
    ->request(st.poster, st.cfg.post_timeout, result_atom::value, std::move(r))
    .then([=](bool) { posted(); }, [=](caf::error&) { posted(); });
}

/// Frees the session if `h` still holds it.
void release(dispatcher_ptr self, hold h) {
  auto& s = self->state.sessions[h.index];
  if (s.holder == h.token)
    s.holder = 0;
  pump(self);
}

/// Puts `j` back at the head of the queue (or hands it back when stopping).
void requeue(dispatcher_ptr self, job j) {
  auto& st = self->state;
  if (st.stopping) {
    report(self, answer(j, keys::shutting_down()));
    return;
  }
  st.queue.push_front(std::move(j));
  --st.running;
}

/// A caf::sec error from the storage actor (timeout, actor gone) means the
/// store is unavailable: retryable, never a permanent answer.
caf::error store_failure(const caf::error& err) {
  if (err.category() == caf::atom("system"))
    return caf::make_error(store_errc::unavailable,
                           "key store: " + describe(err));
  return err;
}

/// The session `session` failed under `j` (died, timed out, or a
/// session-level error): mark its index down, ask for a replacement on a
/// timeout, and retry the job elsewhere a bounded number of times.
void session_failed(dispatcher_ptr self, hold h, hsm_session_actor session,
                    job j, const caf::error& err) {
  auto& st = self->state;
  ++st.stats.session_failures;
  auto& s = st.sessions[h.index];
  if (s.holder == h.token)
    s.holder = 0;
  if (s.handle == session) {
    // Every session-level failure ends the session actor: the index is
    // down until the supervisor reports a new session.
    s.up = false;
    s.failed_recently = true;
    if (err == caf::sec::request_timeout)
      self->send(st.supervisor, replace_atom::value, h.index, session);
  }
  if (++j.attempts < st.cfg.max_attempts) {
    ++st.stats.retried;
    logger("dispatch")
      ->warn("[req={} session={}] {}; retrying on another "
             "session",
             j.id, h.index, describe(err));
    requeue(self, std::move(j));
  } else {
    report(self, answer(j, keys::no_session_could_serve(err)));
  }
  pump(self);
}

/// The HSM call of `j` on `session` failed: a session failure is retried
/// elsewhere, any other error is the answer.
void hsm_failed(dispatcher_ptr self, hold h, hsm_session_actor session, job j,
                const caf::error& err) {
  if (is_session_failure(err))
    return session_failed(self, h, std::move(session), std::move(j), err);
  release(self, h);
  report(self, answer(j, err));
}

/// A successful HSM call on `h`'s session.
void session_ok(dispatcher_ptr self, hold h) {
  auto& s = self->state.sessions[h.index];
  if (s.failed_recently) {
    s.failed_recently = false;
    self->send(self->state.supervisor, session_ok_atom::value, h.index);
  }
}

/// The HSM step may only run on a session that is up; a session that went
/// down while the job was in its store step sends the job back to the
/// queue without counting an attempt.
bool session_gone(dispatcher_ptr self, hold h, job& j) {
  auto& s = self->state.sessions[h.index];
  if (s.up && s.holder == h.token)
    return false;
  if (s.holder == h.token)
    s.holder = 0;
  requeue(self, std::move(j));
  pump(self);
  return true;
}

/// Answers a generate_key from what the store holds under its key id.
void report_stored(dispatcher_ptr self, const job& j, const key_record& rec,
                   bool created) {
  auto res = keys::answer_stored(rec, j.scheme, created);
  report(self, res ? answer(j, std::move(*res)) : answer(j, res.error()));
}

void run_sign(dispatcher_ptr self, hold h, job j, key_record rec) {
  auto& st = self->state;
  auto refused = keys::validate_payload(rec.scheme, j.payload);
  if (!refused)
    refused = keys::check_served(st.cfg.caps, rec.scheme);
  if (refused) {
    report(self, answer(j, refused));
    release(self, h);
    return;
  }
  if (session_gone(self, h, j))
    return;
  auto session = st.sessions[h.index].handle;
  self->request(session, st.cfg.hsm_timeout, sign_atom::value, rec, j.payload)
    .then(
      [=](raw_signature& raw) {
        session_ok(self, h);
        release(self, h);
        auto sig = crypto::finish_signature(rec.scheme, rec.public_key,
                                            j.payload, raw.bytes);
        if (!sig)
          report(self, answer(j, sig.error()));
        else
          report(self, answer(j, signature_result{rec.key_id, rec.scheme,
                                                  std::move(*sig)}));
      },
      [=](caf::error& err) { hsm_failed(self, h, session, j, err); });
}

void run_generate(dispatcher_ptr self, hold h, job j) {
  auto& st = self->state;
  if (session_gone(self, h, j))
    return;
  auto session = st.sessions[h.index].handle;
  self
    ->request(session, st.cfg.hsm_timeout, generate_atom::value, j.key_id,
              j.scheme)
    .then(
      [=](key_record& rec) {
        session_ok(self, h);
        release(self, h);
        auto& ds = self->state;
        // Durable before visible: report what the store committed.
        self->request(ds.store, ds.cfg.store_timeout, caf::put_atom::value, rec)
          .then(
            [=](put_result& put) {
              if (!put.inserted && rec.resident())
                self->send(session, destroy_atom::value, rec);
              report_stored(self, j, put.record, put.inserted);
            },
            [=](caf::error& err) {
              if (rec.resident())
                self->send(session, destroy_atom::value, rec);
              report(self, answer(j, store_failure(err)));
            });
      },
      [=](caf::error& err) { hsm_failed(self, h, session, j, err); });
}

/// Starts `j` on session `index`: look the key up, then the HSM step.
void start(dispatcher_ptr self, size_t index, job j) {
  auto& st = self->state;
  hold h{index, ++st.next_token};
  st.sessions[index].holder = h.token;
  ++st.running;
  self->request(st.store, st.cfg.store_timeout, caf::get_atom::value, j.key_id)
    .then(
      [=](key_lookup& found) {
        if (j.kind == job_kind::generate_key) {
          if (!found.found)
            return run_generate(self, h, j);
          // Idempotent: the stored key, the HSM untouched.
          release(self, h);
          return report_stored(self, j, found.record, false);
        }
        if (!found.found) {
          release(self, h);
          return report(self, answer(j, keys::unknown_key(j.key_id)));
        }
        run_sign(self, h, j, std::move(found.record));
      },
      [=](caf::error& err) {
        release(self, h);
        report(self, answer(j, store_failure(err)));
      });
}

void pump(dispatcher_ptr self) {
  auto& st = self->state;
  if (st.stopping)
    return;
  for (size_t i = 0; i < st.sessions.size() && !st.queue.empty(); ++i) {
    auto& s = st.sessions[i];
    if (!s.up || s.holder != 0)
      continue;
    auto j = std::move(st.queue.front());
    st.queue.pop_front();
    start(self, i, std::move(j));
  }
}

/// Takes a job from the poller: answered at once when it cannot be served.
void accept(dispatcher_ptr self, job& j) {
  auto& st = self->state;
  ++st.running;
  if (st.stopping)
    return report(self, answer(j, keys::shutting_down()));
  if (j.kind == job_kind::generate_key)
    if (auto err = keys::check_served(st.cfg.caps, j.scheme))
      return report(self, answer(j, err));
  if (st.queue.size() >= st.cfg.max_queue)
    return report(self, answer(j, keys::queue_full()));
  --st.running;
  st.queue.push_back(std::move(j));
  pump(self);
}

dispatcher_actor::behavior_type
dispatcher_impl(dispatcher_ptr self, dispatcher_config cfg, store_actor store,
                result_poster_actor poster,
                supervisor_factory make_supervisor) {
  auto& init = self->state;
  init.cfg = std::move(cfg);
  init.store = std::move(store);
  init.poster = std::move(poster);
  init.sessions.resize(init.cfg.sessions);
  init.supervisor = make_supervisor(caf::actor_cast<dispatcher_actor>(self));
  self->link_to(init.supervisor);
  return {
    [=](job_atom, job& j) { accept(self, j); },
    [=](credit_atom) { return credits(self->state); },
    [=](result_atom, job_result& r) {
      // An answer the poller made itself (an invalid request).
      ++self->state.running;
      report(self, std::move(r));
    },
    [=](session_up_atom, size_t index, hsm_session_actor& handle) {
      auto& s = self->state.sessions[index];
      s.handle = std::move(handle);
      s.up = true; // `holder` stays: a job may still be in its store step
      pump(self);
    },
    [=](session_down_atom, size_t index) {
      self->state.sessions[index].up = false;
    },
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
      while (!st.queue.empty()) {
        auto j = std::move(st.queue.front());
        st.queue.pop_front();
        ++st.running;
        report(self, answer(j, keys::shutting_down()));
      }
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
      out.queued = st.queue.size();
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
