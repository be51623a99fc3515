#include "actors/slot_supervisor.hpp"

#include <algorithm>
#include <map>
#include <vector>

#include "runtime/logging.hpp"

namespace hsm {

namespace {

struct slot {
  hsm_session_actor handle;
  uint64_t generation = 0;
  uint32_t failures = 0;
  bool dead = false;
};

struct supervisor_state {
  std::shared_ptr<const session_context> ctx;
  supervisor_config cfg;
  caf::actor dispatcher;
  std::vector<slot> slots;
  /// Sessions abandoned in a hung call, by address, with their slot.
  std::map<caf::actor_addr, size_t> abandoned;
  uint32_t reinit_failures = 0;
  bool stopping = false;
  bool fatal_reported = false;
};

using supervisor_ptr = caf::stateful_actor<supervisor_state>*;

void start_slot(supervisor_ptr self, size_t index) {
  auto& st = self->state;
  auto& s = st.slots[index];
  ++s.generation;
  s.handle = spawn_hsm_session(self->system(), st.ctx, index, s.generation,
                               caf::actor_cast<caf::actor>(self), st.cfg.mode);
  self->monitor(s.handle);
}

std::chrono::milliseconds backoff(const supervisor_config& cfg,
                                  uint32_t failures) {
  auto ms = cfg.backoff_min.count() << std::min<uint32_t>(failures, 16);
  return std::chrono::milliseconds{std::min<long long>(
    ms, static_cast<long long>(cfg.backoff_max.count()))};
}

void schedule_respawn(supervisor_ptr self, size_t index) {
  auto& s = self->state.slots[index];
  auto wait = backoff(self->state.cfg, s.failures++);
  self->delayed_send(self, wait, respawn_atom::value, index, s.generation);
}

size_t abandoned_in(const supervisor_state& st, size_t index) {
  return static_cast<size_t>(
    std::count_if(st.abandoned.begin(), st.abandoned.end(),
                  [index](const auto& kv) { return kv.second == index; }));
}

/// Slot-fatal: retrying cannot help and may lock the PIN.
bool slot_fatal(const caf::error& reason) {
  return reason == hsm_errc::fatal || reason == key_errc::master_key_missing
         || reason.category() == caf::atom("config");
}

void on_down(supervisor_ptr self, const caf::down_msg& dm) {
  auto& st = self->state;
  if (st.abandoned.erase(dm.source) > 0)
    return; // an abandoned session finally returned and exited
  auto i = std::find_if(st.slots.begin(), st.slots.end(), [&](slot& s) {
    return s.handle && s.handle.address() == dm.source;
  });
  if (i == st.slots.end())
    return;
  auto index = static_cast<size_t>(i - st.slots.begin());
  i->handle = nullptr;
  self->send(st.dispatcher, slot_down_atom::value, index);
  if (st.stopping)
    return;
  auto log = logger("hsm");
  if (slot_fatal(dm.reason)) {
    i->dead = true;
    log->error("[slot={}] stopped for good: {}", index, describe(dm.reason));
    if (std::all_of(st.slots.begin(), st.slots.end(),
                    [](const slot& s) { return s.dead; }))
      log->critical("no healthy HSM session left: polling for nothing");
    return;
  }
  if (dm.reason == hsm_errc::reinit_module) {
    if (++st.reinit_failures >= st.cfg.reinit_limit && !st.fatal_reported
        && st.cfg.on_fatal) {
      st.fatal_reported = true;
      st.cfg.on_fatal("the PKCS#11 module lost the token "
                      + std::to_string(st.reinit_failures)
                      + " times in a row (" + describe(dm.reason)
                      + "); it needs a fresh C_Initialize");
    }
  } else {
    st.reinit_failures = 0;
  }
  log->warn("[slot={}] session ended ({}); restarting in {} ms", index,
            describe(dm.reason), backoff(st.cfg, i->failures).count());
  schedule_respawn(self, index);
}

caf::behavior supervisor_impl(supervisor_ptr self,
                              std::shared_ptr<const session_context> ctx,
                              supervisor_config cfg, caf::actor dispatcher) {
  auto& init = self->state;
  init.ctx = std::move(ctx);
  init.cfg = std::move(cfg);
  init.dispatcher = std::move(dispatcher);
  init.slots.resize(init.cfg.sessions);
  for (size_t i = 0; i < init.cfg.sessions; ++i)
    start_slot(self, i);
  self->set_down_handler([=](caf::down_msg& dm) { on_down(self, dm); });
  return {
    [=](ready_atom, size_t index, uint64_t generation) {
      auto& s = self->state.slots[index];
      if (!s.handle || s.generation != generation)
        return;
      logger("hsm")->info("[slot={}] session up", index);
      self->send(self->state.dispatcher, slot_up_atom::value, index,
                 s.handle);
    },
    [=](slot_ok_atom, size_t index) {
      self->state.slots[index].failures = 0;
      self->state.reinit_failures = 0;
    },
    [=](respawn_atom, size_t index, uint64_t generation) {
      auto& st = self->state;
      auto& s = st.slots[index];
      if (st.stopping || s.dead || s.generation != generation || s.handle)
        return;
      // Each stuck predecessor holds an HSM session; do not pile them up.
      if (abandoned_in(st, index) > 1) {
        schedule_respawn(self, index);
        return;
      }
      start_slot(self, index);
    },
    [=](replace_atom, size_t index, caf::actor session) {
      auto& st = self->state;
      auto& s = st.slots[index];
      if (!s.handle || st.stopping
          || s.handle.address() != session.address())
        return; // a late report about a session already replaced
      logger("hsm")->warn("[slot={}] call exceeded the HSM timeout: "
                          "abandoning the session (it exits when the call "
                          "returns), starting a new one",
                          index);
      st.abandoned.emplace(s.handle.address(), index);
      self->send_exit(s.handle, caf::exit_reason::kill);
      s.handle = nullptr;
      self->send(st.dispatcher, slot_down_atom::value, index);
      schedule_respawn(self, index);
    },
    [=](stats_atom) { return self->state.abandoned.size(); },
    [=](stop_atom) {
      auto& st = self->state;
      st.stopping = true;
      for (auto& s : st.slots)
        if (s.handle)
          self->send_exit(s.handle, caf::exit_reason::user_shutdown);
      return st.abandoned.size();
    },
  };
}

} // namespace

caf::actor spawn_slot_supervisor(caf::actor_system& sys,
                                 std::shared_ptr<const session_context> ctx,
                                 supervisor_config cfg,
                                 caf::actor dispatcher) {
  return sys.spawn(supervisor_impl, std::move(ctx), std::move(cfg),
                   std::move(dispatcher));
}

} // namespace hsm
