#include "actors/store_actor.hpp"

#include "runtime/base/logging.hpp"

#include <unordered_map>

namespace hsm {

namespace {

struct store_state {
  std::shared_ptr<store::key_store> st;
  std::unordered_map<std::string, key_record> cache;
  static constexpr size_t max_cache = 100000;

  void remember(const key_record& rec) {
    if (cache.size() >= max_cache)
      cache.clear();
    cache.emplace(rec.key_id, rec);
  }
};

store_actor::behavior_type
store_impl(store_actor::stateful_pointer<store_state> self,
           std::shared_ptr<store::key_store> st) {
  self->state.st = std::move(st);
  return {
    [=](caf::get_atom, const std::string& key_id) -> caf::result<key_lookup> {
      auto& s = self->state;
      if (auto i = s.cache.find(key_id); i != s.cache.end())
        return key_lookup{true, i->second};
      auto rec = s.st->get(key_id);
      if (!rec)
        return rec.error();
      if (!*rec)
        return key_lookup{};
      s.remember(**rec);
      return key_lookup{true, std::move(**rec)};
    },
    [=](caf::put_atom, const key_record& rec) -> caf::result<put_result> {
      auto put = self->state.st->put(rec);
      if (!put)
        return put.error();
      self->state.remember(put->record);
      return std::move(*put);
    },
  };
}

} // namespace

store_actor spawn_store_actor(caf::actor_system& sys,
                              std::shared_ptr<store::key_store> st) {
  return sys.spawn<caf::detached>(store_impl, std::move(st));
}

} // namespace hsm
