#include "actors/session_supervisor.hpp"

#include "runtime/base/logging.hpp"

#include <algorithm>
#include <map>
#include <vector>

namespace hsm {

namespace {

/// One session index.
struct session_entry {
  hsm_session_actor handle;
  uint64_t generation = 0;
  uint32_t failures = 0;
  /// `reinit_module` failures of this index in a row: every index fails
  /// together when the token goes, so counting them together would reach
  /// the limit N times sooner with N sessions.
  uint32_t reinit_failures = 0;
  bool dead = false;
};

struct supervisor_state {
  supervisor_config cfg;
  dispatcher_actor dispatcher;
  std::vector<session_entry> sessions;
  /// Sessions abandoned in a hung call, by address, with their index.
  std::map<caf::actor_addr, size_t> abandoned;
  bool stopping = false;
  bool fatal_reported = false;
};

using supervisor_ptr
  = session_supervisor_actor::stateful_pointer<supervisor_state>;

void start_session(supervisor_ptr self, size_t index) {
  auto& st = self->state;
  auto& s = st.sessions[index];
  ++s.generation;
  if (s.generation > 1 && st.cfg.metrics)
    st.cfg.metrics->count_session_restart();
  s.handle = st.cfg.spawn_session(self->system(), index, s.generation,
                                  caf::actor_cast<session_supervisor_actor>(
                                    self));
  self->monitor(s.handle);
}

void schedule_respawn(supervisor_ptr self, size_t index) {
  auto& s = self->state.sessions[index];
  auto wait = restart_backoff(self->state.cfg, s.failures++);
  self->delayed_send(self, wait, respawn_atom::value, index, s.generation);
}

size_t abandoned_in(const supervisor_state& st, size_t index) {
  return static_cast<size_t>(
    std::count_if(st.abandoned.begin(), st.abandoned.end(),
                  [index](const auto& kv) { return kv.second == index; }));
}

/// Fatal for the index: retrying cannot help and may lock the PIN.
bool index_fatal(const caf::error& reason) {
  return reason == hsm_errc::fatal || reason == key_errc::master_key_missing
         || reason.category() == caf::atom("config");
}

void on_down(supervisor_ptr self, const caf::down_msg& dm) {
  auto& st = self->state;
  if (st.abandoned.erase(dm.source) > 0)
    return; // an abandoned session finally returned and exited
  auto i = std::find_if(st.sessions.begin(), st.sessions.end(),
                        [&](session_entry& s) {
                          return s.handle && s.handle.address() == dm.source;
                        });
  if (i == st.sessions.end())
    return;
  auto index = static_cast<size_t>(i - st.sessions.begin());
  i->handle = nullptr;
  self->send(st.dispatcher, session_down_atom::value, index);
  if (st.stopping)
    return;
  auto log = logger("hsm");
  if (index_fatal(dm.reason)) {
    i->dead = true;
    log->error("[session={}] stopped for good: {}", index, describe(dm.reason));
    if (std::all_of(st.sessions.begin(), st.sessions.end(),
                    [](const session_entry& s) { return s.dead; }))
      log->critical("no healthy HSM session left: polling for nothing");
    return;
  }
  if (dm.reason == hsm_errc::reinit_module) {
    if (++i->reinit_failures >= st.cfg.reinit_limit && !st.fatal_reported
        && st.cfg.on_fatal) {
      st.fatal_reported = true;
      st.cfg.on_fatal("the PKCS#11 module lost the token "
                      + std::to_string(i->reinit_failures) + " times in a row ("
                      + describe(dm.reason)
                      + "); it needs a fresh C_Initialize");
    }
  } else {
    i->reinit_failures = 0;
  }
  log->warn("[session={}] ended ({}); restarting in {} ms", index,
            describe(dm.reason), restart_backoff(st.cfg, i->failures).count());
  schedule_respawn(self, index);
}

session_supervisor_actor::behavior_type
supervisor_impl(supervisor_ptr self, supervisor_config cfg,
                dispatcher_actor dispatcher) {
  auto& init = self->state;
  init.cfg = std::move(cfg);
  init.dispatcher = std::move(dispatcher);
  init.sessions.resize(init.cfg.sessions);
  for (size_t i = 0; i < init.cfg.sessions; ++i)
    start_session(self, i);
  self->set_down_handler([=](caf::down_msg& dm) { on_down(self, dm); });
  return {
    [=](ready_atom, size_t index, uint64_t generation) {
      auto& s = self->state.sessions[index];
      if (!s.handle || s.generation != generation)
        return;
      logger("hsm")->info("[session={}] up", index);
      self->send(self->state.dispatcher, session_up_atom::value, index,
                 s.handle);
    },
    [=](session_ok_atom, size_t index) {
      self->state.sessions[index].failures = 0;
      self->state.sessions[index].reinit_failures = 0;
    },
    [=](respawn_atom, size_t index, uint64_t generation) {
      auto& st = self->state;
      auto& s = st.sessions[index];
      if (st.stopping || s.dead || s.generation != generation || s.handle)
        return;
      // Each stuck predecessor holds an HSM session; do not pile them up.
      if (abandoned_in(st, index) > 1) {
        schedule_respawn(self, index);
        return;
      }
      start_session(self, index);
    },
    [=](replace_atom, size_t index, const hsm_session_actor& session) {
      auto& st = self->state;
      auto& s = st.sessions[index];
      if (!s.handle || st.stopping || s.handle != session)
        return; // a late report about a session already replaced
      logger("hsm")->warn("[session={}] call exceeded the HSM timeout: "
                          "abandoning the session (it exits when the call "
                          "returns), starting a new one",
                          index);
      st.abandoned.emplace(s.handle.address(), index);
      self->send_exit(s.handle, caf::exit_reason::kill);
      s.handle = nullptr;
      self->send(st.dispatcher, session_down_atom::value, index);
      schedule_respawn(self, index);
    },
    [=](stuck_atom) { return self->state.abandoned.size(); },
    [=](close_atom) {
      auto& st = self->state;
      st.stopping = true;
      for (auto& s : st.sessions)
        if (s.handle)
          self->send_exit(s.handle, caf::exit_reason::user_shutdown);
      return st.abandoned.size();
    },
  };
}

} // namespace

std::chrono::milliseconds restart_backoff(const supervisor_config& cfg,
                                          uint32_t failures) {
  auto ms = cfg.backoff_min.count() << std::min<uint32_t>(failures, 16);
  return std::chrono::milliseconds{
    std::min<long long>(ms, static_cast<long long>(cfg.backoff_max.count()))};
}

session_factory hsm_sessions(std::shared_ptr<const session_context> ctx,
                             spawn_mode mode) {
  return [ctx, mode](caf::actor_system& sys, size_t index, uint64_t generation,
                     session_supervisor_actor supervisor) {
    return spawn_hsm_session(sys, ctx, index, generation, std::move(supervisor),
                             mode);
  };
}

session_supervisor_actor spawn_session_supervisor(caf::actor_system& sys,
                                                  supervisor_config cfg,
                                                  dispatcher_actor dispatcher) {
  return sys.spawn(supervisor_impl, std::move(cfg), std::move(dispatcher));
}

} // namespace hsm
