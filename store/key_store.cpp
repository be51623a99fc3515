#include "store/key_store.hpp"

#include <algorithm>

namespace hsm::store {

caf::error sort_migrations(std::vector<migration>& ms) {
  std::sort(ms.begin(), ms.end(), [](const migration& x, const migration& y) {
    return x.version < y.version;
  });
  auto bad = [](std::string why) {
    return caf::make_error(store_errc::query_failed,
                           "invalid migration list: " + std::move(why));
  };
  for (size_t i = 0; i < ms.size(); ++i) {
    if (ms[i].version <= 0 || ms[i].sql == nullptr || ms[i].name == nullptr)
      return bad("bad entry at version " + std::to_string(ms[i].version));
    if (i > 0 && ms[i - 1].version == ms[i].version)
      return bad("version " + std::to_string(ms[i].version)
                 + " appears twice");
  }
  return caf::none;
}

} // namespace hsm::store
