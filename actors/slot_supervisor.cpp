#include "actors/slot_supervisor.hpp"

#include <algorithm>
#include <vector>

#include "runtime/logging.hpp"

namespace hsm {

namespace {

struct slot {
  hsm_session_actor handle;
  uint64_t generation = 0;
  uint32_t failures = 0;
  bool ready = false;
  bool dead = false;
};

struct supervisor_state {
  std::shared_ptr<const session_context> ctx;
  supervisor_config cfg;
  caf::actor dispatcher;
  std::vector<slot> slots;
  bool stopping = false;
};

using supervisor_ptr = caf::stateful_actor<supervisor_state>*;

void start_slot(supervisor_ptr self, size_t index) {
  auto& st = self->state;
  auto& s = st.slots[index];
  ++s.generation;
  s.ready = false;
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

/// Slot-fatal: retrying cannot help and may lock the PIN.
bool slot_fatal(const caf::error& reason) {
  return reason == hsm_errc::fatal || reason == key_errc::master_key_missing
         || reason.category() == caf::atom("config");
}

caf::behavior supervisor_impl(supervisor_ptr self,
                              std::shared_ptr<const session_context> ctx,
                              supervisor_config cfg, caf::actor dispatcher) {
  auto& st = self->state;
  st.ctx = std::move(ctx);
  st.cfg = cfg;
  st.dispatcher = std::move(dispatcher);
  st.slots.resize(cfg.sessions);
  for (size_t i = 0; i < cfg.sessions; ++i)
    start_slot(self, i);
  self->set_down_handler([=](const caf::down_msg& dm) {
    auto& sst = self->state;
    auto i = std::find_if(sst.slots.begin(), sst.slots.end(), [&](slot& s) {
      return s.handle && s.handle.address() == dm.source;
    });
    if (i == sst.slots.end())
      return; // an abandoned actor ending late
    auto index = static_cast<size_t>(i - sst.slots.begin());
    i->handle = nullptr;
    self->send(sst.dispatcher, slot_down_atom::value, index);
    if (sst.stopping)
      return;
    auto log = logger("hsm");
    if (slot_fatal(dm.reason)) {
      i->dead = true;
      log->error("[slot={}] stopped for good: {}", index, describe(dm.reason));
      if (std::all_of(sst.slots.begin(), sst.slots.end(),
                      [](const slot& s) { return s.dead; }))
        log->critical("no healthy HSM session left: polling for nothing");
      return;
    }
    auto wait = backoff(sst.cfg, i->failures++);
    log->warn("[slot={}] session ended ({}); restarting in {} ms", index,
              describe(dm.reason), wait.count());
    self->delayed_send(self, wait, respawn_atom::value, index, i->generation);
  });
  return {
    [=](ready_atom, size_t index, uint64_t generation) {
      auto& s = self->state.slots[index];
      if (!s.handle || s.generation != generation)
        return;
      s.ready = true;
      s.failures = 0;
      logger("hsm")->info("[slot={}] session up", index);
      self->send(self->state.dispatcher, slot_up_atom::value, index,
                 s.handle);
    },
    [=](respawn_atom, size_t index, uint64_t generation) {
      auto& s = self->state.slots[index];
      if (self->state.stopping || s.dead || s.generation != generation
          || s.handle)
        return;
      start_slot(self, index);
    },
    [=](replace_atom, size_t index) {
      auto& rst = self->state;
      auto& s = rst.slots[index];
      if (!s.handle || rst.stopping)
        return;
      logger("hsm")->warn("[slot={}] call exceeded the HSM timeout: "
                          "abandoning the session, starting a new one",
                          index);
      self->demonitor(s.handle.address());
      self->send_exit(s.handle, caf::exit_reason::kill);
      s.handle = nullptr;
      ++s.failures;
      self->send(rst.dispatcher, slot_down_atom::value, index);
      start_slot(self, index);
    },
    [=](stop_atom) {
      auto& rst = self->state;
      rst.stopping = true;
      for (auto& s : rst.slots)
        if (s.handle)
          self->send_exit(s.handle, caf::exit_reason::user_shutdown);
      self->quit();
    },
  };
}

} // namespace

caf::actor spawn_slot_supervisor(caf::actor_system& sys,
                                 std::shared_ptr<const session_context> ctx,
                                 supervisor_config cfg,
                                 caf::actor dispatcher) {
  return sys.spawn(supervisor_impl, std::move(ctx), cfg,
                   std::move(dispatcher));
}

} // namespace hsm
