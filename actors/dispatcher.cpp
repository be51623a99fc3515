#include "actors/dispatcher.hpp"

#include <deque>
#include <vector>

#include "runtime/crypto/signature.hpp"
#include "runtime/logging.hpp"

namespace hsm {

namespace {

struct slot_entry {
  hsm_session_actor handle;
  bool up = false;
  /// The token of the job holding the slot; 0 when free.
  uint64_t holder = 0;
  /// A session failed here since the last success: tell the supervisor
  /// when one succeeds again (it resets its backoff then).
  bool failed_recently = false;
};

struct dispatcher_state {
  dispatcher_config cfg;
  store_actor store;
  caf::actor poster;
  caf::actor supervisor;
  std::vector<slot_entry> slots;
  std::deque<job> queue;
  size_t running = 0; // jobs between start and report
  size_t posting = 0; // results handed to the poster, not yet posted
  uint64_t next_token = 0;
  bool stopping = false;
  dispatcher_stats stats;
  std::vector<caf::response_promise> drained;
};

using dispatcher_ptr = caf::stateful_actor<dispatcher_state>*;

/// Who holds which slot for one run of a job.
struct hold {
  size_t index;
  uint64_t token;
};

void pump(dispatcher_ptr self);

/// Every lease the driver holds counts until its result is posted: queued,
/// running (HSM or store step), or waiting for the poster. Credits are the
/// healthy slots minus those, so the proxy never sees more leases in flight
/// from this driver than it has healthy slots.
int64_t credits(const dispatcher_state& st) {
  if (st.stopping)
    return 0;
  int64_t healthy = 0;
  for (auto& s : st.slots)
    if (s.up)
      ++healthy;
  auto held = static_cast<int64_t>(st.queue.size() + st.running + st.posting);
  return std::max<int64_t>(0, healthy - held);
}

void check_drained(dispatcher_ptr self) {
  auto& st = self->state;
  if (st.running == 0 && st.queue.empty() && st.posting == 0) {
    for (auto& rp : st.drained)
      rp.deliver(caf::unit);
    st.drained.clear();
  }
}

/// Hands a finished job's result to the poster. Every job reaches this
/// exactly once (or goes back to the queue).
void report(dispatcher_ptr self, job_result r) {
  auto& st = self->state;
  if (r.ok)
    ++st.stats.done;
  else
    ++st.stats.failed;
  ++st.posting;
  --st.running;
  self->request(st.poster, std::chrono::minutes{5}, result_atom::value,
                std::move(r))
    .then(
      [=] {
        --self->state.posting;
        check_drained(self);
      },
      [=](caf::error&) {
        --self->state.posting;
        check_drained(self);
      });
}

caf::error shutting_down() {
  return caf::make_error(hsm_errc::retryable,
                         std::string{"driver shutting down"});
}

/// Frees the slot if `h` still holds it.
void release(dispatcher_ptr self, hold h) {
  auto& s = self->state.slots[h.index];
  if (s.holder == h.token)
    s.holder = 0;
  pump(self);
}

/// Puts `j` back at the head of the queue (or hands it back when stopping).
void requeue(dispatcher_ptr self, job j) {
  auto& st = self->state;
  if (st.stopping) {
    report(self, error_result(j, shutting_down()));
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

bool is_session_failure(const caf::error& err) {
  return err == caf::sec::request_timeout
         || err == caf::sec::request_receiver_down
         || err == hsm_errc::reopen_session || err == hsm_errc::reinit_module
         || err == hsm_errc::retryable;
}

/// The session `session` failed under `j` (died, timed out, or a
/// session-level error): mark that session's slot down, ask for a
/// replacement on a timeout, and retry the job elsewhere a bounded number
/// of times.
void session_failed(dispatcher_ptr self, hold h, hsm_session_actor session,
                    job j, const caf::error& err) {
  auto& st = self->state;
  ++st.stats.slot_failures;
  auto& s = st.slots[h.index];
  if (s.holder == h.token)
    s.holder = 0;
  if (s.handle == session) {
    // Every session-level failure ends the session actor: the slot is down
    // until the supervisor reports a new session.
    s.up = false;
    s.failed_recently = true;
    if (err == caf::sec::request_timeout)
      self->send(st.supervisor, replace_atom::value, h.index,
                 caf::actor_cast<caf::actor>(session));
  }
  if (++j.attempts < st.cfg.max_attempts) {
    ++st.stats.retried;
    logger("dispatch")->warn("[req={} slot={}] {}; retrying on another slot",
                             j.id, h.index, describe(err));
    requeue(self, std::move(j));
  } else {
    report(self, error_result(
                   j, caf::make_error(hsm_errc::retryable,
                                      "no HSM session could serve the "
                                      "request: "
                                        + describe(err))));
  }
  pump(self);
}

/// A successful HSM call on `h`'s slot.
void session_ok(dispatcher_ptr self, hold h) {
  auto& s = self->state.slots[h.index];
  if (s.failed_recently) {
    s.failed_recently = false;
    self->send(self->state.supervisor, slot_ok_atom::value, h.index);
  }
}

/// The HSM step may only run on a slot that is up; a slot that went down
/// while the job was in its store step sends the job back to the queue
/// without counting an attempt.
bool slot_gone(dispatcher_ptr self, hold h, job& j) {
  auto& s = self->state.slots[h.index];
  if (s.up && s.holder == h.token)
    return false;
  if (s.holder == h.token)
    s.holder = 0;
  requeue(self, std::move(j));
  pump(self);
  return true;
}

void run_sign(dispatcher_ptr self, hold h, job j, store::key_record rec) {
  auto& st = self->state;
  if (auto err = validate_payload(rec.scheme, j.payload)) {
    report(self, error_result(j, err));
    release(self, h);
    return;
  }
  if (const auto& cap = st.cfg.caps.of(rec.scheme); !cap.served) {
    report(self, error_result(j, scheme_not_served(cap)));
    release(self, h);
    return;
  }
  if (slot_gone(self, h, j))
    return;
  auto session = st.slots[h.index].handle;
  self->request(session, st.cfg.hsm_timeout, sign_atom::value, rec, j.payload)
    .then(
      [=](raw_signature& raw) {
        session_ok(self, h);
        release(self, h);
        auto sig = crypto::finish_signature(rec.scheme, rec.public_key,
                                            j.payload, raw.bytes);
        if (!sig)
          report(self, error_result(j, sig.error()));
        else
          report(self, signature_result(
                         j, signature_view{rec.key_id, rec.scheme,
                                           std::move(*sig)}));
      },
      [=](caf::error& err) {
        if (is_session_failure(err))
          return session_failed(self, h, session, j, err);
        release(self, h);
        report(self, error_result(j, err));
      });
}

void run_generate(dispatcher_ptr self, hold h, job j) {
  auto& st = self->state;
  if (slot_gone(self, h, j))
    return;
  auto session = st.slots[h.index].handle;
  self->request(session, st.cfg.hsm_timeout, generate_atom::value, j.key_id,
                j.scheme)
    .then(
      [=](store::key_record& rec) {
        session_ok(self, h);
        release(self, h);
        auto& ds = self->state;
        // Durable before visible: report what the store committed.
        self->request(ds.store, ds.cfg.store_timeout, caf::put_atom::value,
                      rec)
          .then(
            [=](store::put_result& put) {
              if (!put.inserted && rec.resident())
                self->send(session, destroy_atom::value, rec);
              if (put.record.scheme != j.scheme) {
                report(self, error_result(
                               j, caf::make_error(
                                    key_errc::invalid_request,
                                    "key_id already holds a "
                                      + std::string{to_string(
                                        put.record.scheme)}
                                      + " key")));
                return;
              }
              auto view = make_key_view(put.record, put.inserted);
              report(self, view ? key_result(j, *view)
                                : error_result(j, view.error()));
            },
            [=](caf::error& err) {
              if (rec.resident())
                self->send(session, destroy_atom::value, rec);
              report(self, error_result(j, store_failure(err)));
            });
      },
      [=](caf::error& err) {
        if (is_session_failure(err))
          return session_failed(self, h, session, j, err);
        release(self, h);
        report(self, error_result(j, err));
      });
}

/// Starts `j` on slot `index`: look the key up, then the HSM step.
void start(dispatcher_ptr self, size_t index, job j) {
  auto& st = self->state;
  hold h{index, ++st.next_token};
  st.slots[index].holder = h.token;
  ++st.running;
  self->request(st.store, st.cfg.store_timeout, caf::get_atom::value,
                j.key_id)
    .then(
      [=](key_lookup& found) {
        if (j.kind == job_kind::generate_key) {
          if (found.found) {
            // Idempotent: the stored key, the HSM untouched.
            release(self, h);
            if (found.record.scheme != j.scheme) {
              report(self,
                     error_result(j, caf::make_error(
                                       key_errc::invalid_request,
                                       "key_id already holds a "
                                         + std::string{to_string(
                                           found.record.scheme)}
                                         + " key")));
              return;
            }
            auto view = make_key_view(found.record, false);
            report(self, view ? key_result(j, *view)
                              : error_result(j, view.error()));
            return;
          }
          run_generate(self, h, j);
          return;
        }
        if (!found.found) {
          release(self, h);
          report(self, error_result(
                         j, caf::make_error(key_errc::unknown_key,
                                            "no key is stored under key_id '"
                                              + j.key_id + "'")));
          return;
        }
        run_sign(self, h, j, std::move(found.record));
      },
      [=](caf::error& err) {
        release(self, h);
        report(self, error_result(j, store_failure(err)));
      });
}

void pump(dispatcher_ptr self) {
  auto& st = self->state;
  if (st.stopping)
    return;
  for (size_t i = 0; i < st.slots.size() && !st.queue.empty(); ++i) {
    auto& s = st.slots[i];
    if (!s.up || s.holder != 0)
      continue;
    auto j = std::move(st.queue.front());
    st.queue.pop_front();
    start(self, i, std::move(j));
  }
}

caf::behavior dispatcher_impl(dispatcher_ptr self, dispatcher_config cfg,
                              store_actor store, caf::actor poster) {
  auto& init = self->state;
  init.cfg = cfg;
  init.store = std::move(store);
  init.poster = std::move(poster);
  init.slots.resize(cfg.sessions);
  return {
    [=](supervisor_atom, caf::actor sup) {
      self->state.supervisor = std::move(sup);
    },
    [=](job_atom, job& j) {
      auto& st = self->state;
      ++st.running;
      if (st.stopping)
        return report(self, error_result(j, shutting_down()));
      if (j.kind == job_kind::generate_key)
        if (const auto& cap = st.cfg.caps.of(j.scheme); !cap.served)
          return report(self, error_result(j, scheme_not_served(cap)));
      if (st.queue.size() >= st.cfg.max_queue)
        return report(self, error_result(j, caf::make_error(
                                              hsm_errc::retryable,
                                              std::string{"driver queue "
                                                          "full"})));
      --st.running;
      st.queue.push_back(std::move(j));
      pump(self);
    },
    [=](credit_atom) -> int64_t { return credits(self->state); },
    [=](result_atom, job_result& r) {
      // An answer the poller made itself (an invalid request).
      ++self->state.running;
      report(self, std::move(r));
    },
    [=](slot_up_atom, size_t index, hsm_session_actor handle) {
      auto& s = self->state.slots[index];
      s.handle = std::move(handle);
      s.up = true; // `holder` stays: a job may still be in its store step
      pump(self);
    },
    [=](slot_down_atom, size_t index) {
      self->state.slots[index].up = false;
    },
    [=](drain_atom) -> caf::delegated<caf::unit_t> {
      self->state.drained.push_back(self->make_response_promise());
      check_drained(self);
      return {};
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
        report(self, error_result(j, shutting_down()));
      }
    },
    [=](stats_atom) {
      auto& st = self->state;
      auto out = st.stats;
      out.queued = st.queue.size();
      for (auto& s : st.slots) {
        out.healthy_slots += s.up ? 1 : 0;
        out.busy_slots += s.holder != 0 ? 1 : 0;
      }
      return out;
    },
  };
}

} // namespace

caf::actor spawn_dispatcher(caf::actor_system& sys, dispatcher_config cfg,
                            store_actor store, caf::actor poster) {
  return sys.spawn(dispatcher_impl, cfg, std::move(store), std::move(poster));
}

void set_supervisor(caf::actor dispatcher, caf::actor supervisor) {
  caf::anon_send(dispatcher, supervisor_atom::value, std::move(supervisor));
}

} // namespace hsm
